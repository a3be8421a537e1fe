// AVX2 variant (compiled with function target attributes, selected at run time on CPUs with
// AVX2 but without AVX512_VPOPCNTDQ).
//
// Popcount without a vector popcount instruction: each byte of x ^ w is split into two
// nibbles and looked up in a 16-entry table with vpshufb (Mula's method). The per-byte
// counts (<= 8 per step) are summed in 8-bit lanes for up to 31 steps (<= 248, no overflow)
// and then folded into 64-bit lanes with vpsadbw. Tile: kTile pixels x 16 output channels
// = 4 ymm of 4 channel words per pixel; weights are XOR-ed straight from memory.
#include <cstring>

#include "binary_conv.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define AQD_T256 __attribute__((target("avx2,popcnt")))

namespace aqd_bconv {
namespace {

constexpr int kTile = 2;       // output pixels per pass (4 x kTile byte accumulators)
constexpr int kByteSteps = 31;  // steps before the 8-bit counters must be folded

AQD_T256 void pack_rows(const ConvGeom& g, const float* x, uint64_t* xp, int64_t r0, int64_t r1) {
  const int64_t row_words = g.Wp * g.CW, CW = g.CW;
  const __m256 zero = _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Hp, h = r % g.Hp - g.ph;
    uint64_t* dst = xp + r * row_words;
    std::memset(dst, 0, sizeof(uint64_t) * row_words);
    if (h < 0 || h >= g.H) continue;
    uint64_t* px0 = dst + g.pw * CW;
    if (g.in_nhwc) {
      for (int64_t w = 0; w < g.W; ++w) {
        const float* s = x + ((n * g.H + h) * g.W + w) * g.C;
        for (int64_t cw = 0; cw < CW; ++cw) {
          uint64_t word = 0;
          const int64_t c0 = cw * 64, cn = g.C - c0 < 64 ? g.C - c0 : 64;
          int64_t c = 0;
          for (; c + 8 <= cn; c += 8) {
            const __m256 ge = _mm256_cmp_ps(_mm256_loadu_ps(s + c0 + c), zero, _CMP_GE_OQ);
            word |= static_cast<uint64_t>(static_cast<unsigned>(_mm256_movemask_ps(ge))) << c;
          }
          for (; c < cn; ++c) word |= static_cast<uint64_t>(s[c0 + c] >= 0.f) << c;
          px0[w * CW + cw] = word;
        }
      }
    } else {
      const int64_t plane = g.H * g.W;
      for (int64_t cw = 0; cw < CW; ++cw) {
        const int64_t c0 = cw * 64, cn = g.C - c0 < 64 ? g.C - c0 : 64;
        for (int64_t w0 = 0; w0 < g.W; w0 += 8) {
          const int64_t rem = g.W - w0;
          const int valid = static_cast<int>(rem < 8 ? rem : 8);
          const __m256i lm = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane);
          const float* s = x + ((n * g.C + c0) * g.H + h) * g.W + w0;
          __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
          __m256i bit = _mm256_set1_epi64x(1);
          for (int64_t c = 0; c < cn; ++c) {
            const float* p = s + c * plane;
            const __m256 f = rem >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lm);
            const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(f, zero, _CMP_GE_OQ));
            // widen the 8 32-bit compare masks to 2 x 4 64-bit lanes, keep bit c of each word
            const __m256i ge_lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(ge));
            const __m256i ge_hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(ge, 1));
            lo = _mm256_or_si256(lo, _mm256_and_si256(ge_lo, bit));
            hi = _mm256_or_si256(hi, _mm256_and_si256(ge_hi, bit));
            bit = _mm256_add_epi64(bit, bit);
          }
          alignas(32) uint64_t tmp[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), lo);
          _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 4), hi);
          const int64_t cnt = rem < 8 ? rem : 8;
          for (int64_t i = 0; i < cnt; ++i) px0[(w0 + i) * CW + cw] = tmp[i];
        }
      }
    }
  }
}

template <int R>
AQD_T256 inline void conv_tile(const ConvGeom& g, const uint64_t* xt, const uint64_t* wblk,
                               const float* alpha, const float* bias, float* y,
                               int64_t n, int64_t oh, int64_t ob, int64_t ow) {
  const int64_t xs = g.sw * g.CW, KS = g.KS;
  const int64_t* koff = g.koff;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i zero = _mm256_setzero_si256();
  __m256i c64[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) c64[r][j] = zero;
  for (int64_t k0 = 0; k0 < KS; k0 += kByteSteps) {
    const int64_t k1 = k0 + kByteSteps < KS ? k0 + kByteSteps : KS;
    __m256i c8[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) c8[r][j] = zero;
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i* wv = reinterpret_cast<const __m256i*>(wblk + k * kOutBlock);
      const uint64_t* xk = xt + koff[k];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i b = _mm256_set1_epi64x(static_cast<long long>(xk[r * xs]));
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_xor_si256(b, _mm256_loadu_si256(wv + j));
          const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, nib));
          const __m256i vh = _mm256_srli_epi16(v, 4);
          const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(vh, nib));
          c8[r][j] = _mm256_add_epi8(c8[r][j], _mm256_add_epi8(lo, hi));
        }
      }
    }
    for (int r = 0; r < R; ++r)  // fold: sum of the 8 byte counts of each 64-bit lane
      for (int j = 0; j < 4; ++j)
        c64[r][j] = _mm256_add_epi64(c64[r][j], _mm256_sad_epu8(c8[r][j], zero));
  }
  alignas(32) int64_t cnt[R][kOutBlock];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j)
      _mm256_store_si256(reinterpret_cast<__m256i*>(&cnt[r][4 * j]), c64[r][j]);
  for (int64_t j = 0; j < kOutBlock; ++j) {
    const int64_t o = ob * kOutBlock + j;
    if (o >= g.O) break;
    for (int r = 0; r < R; ++r) {
      const float d = static_cast<float>(g.K - 2 * cnt[r][j]);
      const float v = d * alpha[o];
      y[out_index(g, n, o, oh, ow + r)] = v + bias[o];
    }
  }
}

AQD_T256 void conv_row(const ConvGeom& g, const uint64_t* xp, const uint64_t* wp,
                       const float* alpha, const float* bias, float* y,
                       int64_t n, int64_t oh, int64_t ob) {
  const uint64_t* xrow = xp + (n * g.Hp + oh * g.sh) * g.Wp * g.CW;
  const uint64_t* wblk = wp + ob * g.KS * kOutBlock;
  const int64_t px = g.sw * g.CW;
  int64_t ow = 0;
  for (; ow + kTile <= g.OW; ow += kTile)
    conv_tile<kTile>(g, xrow + ow * px, wblk, alpha, bias, y, n, oh, ob, ow);
  for (; ow < g.OW; ++ow) conv_tile<1>(g, xrow + ow * px, wblk, alpha, bias, y, n, oh, ob, ow);
}

}  // namespace

bool avx2_kernels(KernelSet* out) {
  out->pack_rows = pack_rows;
  out->conv_row = conv_row;
  return true;
}

}  // namespace aqd_bconv

#else  // not x86-64 GCC/Clang

namespace aqd_bconv {
bool avx2_kernels(KernelSet*) { return false; }
}  // namespace aqd_bconv

#endif
