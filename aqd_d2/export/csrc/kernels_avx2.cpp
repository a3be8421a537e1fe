// AVX2 variant (compiled with function target attributes, selected at run time on CPUs with
// AVX2 but without AVX512_VPOPCNTDQ).
//
// Popcount without a vector popcount instruction: each byte of x ^ w is split into two
// nibbles and looked up in a 16-entry table with vpshufb (Mula's method). The per-byte
// counts (<= 8 per step) are summed in 8-bit lanes for up to 31 steps (<= 248, no overflow)
// and then folded into 64-bit lanes with vpsadbw. Tile: kTile pixels x 8 output channels
// (half a weight block: 2 ymm of 4 channel words, loaded once per step and reused by the
// kTile pixels); the epilogue is vectorized (8 channels at a time, 8x8 transpose for NCHW).
#include <cstring>

#include "binary_conv.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define AQD_T256 __attribute__((target("avx2,popcnt")))

namespace aqd_bconv {
namespace {

constexpr int kTile = 4;       // output pixels per pass (2 x kTile byte accumulators)
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

// 8x8 float transpose (rows v[0..7] -> columns), for the NCHW epilogue.
AQD_T256 inline void transpose8x8(__m256 v[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  v[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  v[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  v[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  v[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// R output pixels (ow .. ow+R-1 of row oh) x 8 output channels (half `half` of block ob):
// 2 R byte accumulators + 2 weight vectors + the table and mask stay in the 16 ymm.
template <int R>
AQD_T256 inline void conv_tile(const ConvGeom& g, const uint64_t* xt, const uint64_t* wblk,
                               const float* alpha, const float* bias, float* y,
                               int64_t n, int64_t oh, int64_t ob, int64_t ow, int half) {
  const int64_t xs = g.sw * g.CW, KS = g.KS;
  const int64_t* koff = g.koff;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i zero = _mm256_setzero_si256();
  __m256i c64[R][2];  // folded counts (touched once per kByteSteps steps)
  for (int r = 0; r < R; ++r) c64[r][0] = c64[r][1] = zero;
  const uint64_t* wh = wblk + 8 * half;
  for (int64_t k0 = 0; k0 < KS; k0 += kByteSteps) {
    const int64_t k1 = k0 + kByteSteps < KS ? k0 + kByteSteps : KS;
    __m256i c8[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) c8[r][0] = c8[r][1] = zero;
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i* wv = reinterpret_cast<const __m256i*>(wh + k * kOutBlock);
      const __m256i w0 = _mm256_loadu_si256(wv), w1 = _mm256_loadu_si256(wv + 1);
      const uint64_t* xk = xt + koff[k];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i b = _mm256_set1_epi64x(static_cast<long long>(xk[r * xs]));
        const __m256i v0 = _mm256_xor_si256(b, w0), v1 = _mm256_xor_si256(b, w1);
        const __m256i l0 = _mm256_shuffle_epi8(lut, _mm256_and_si256(v0, nib));
        const __m256i h0 = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v0, 4), nib));
        const __m256i l1 = _mm256_shuffle_epi8(lut, _mm256_and_si256(v1, nib));
        const __m256i h1 = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v1, 4), nib));
        c8[r][0] = _mm256_add_epi8(c8[r][0], _mm256_add_epi8(l0, h0));
        c8[r][1] = _mm256_add_epi8(c8[r][1], _mm256_add_epi8(l1, h1));
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {  // fold: sum of the 8 byte counts of each 64-bit lane
      c64[r][0] = _mm256_add_epi64(c64[r][0], _mm256_sad_epu8(c8[r][0], zero));
      c64[r][1] = _mm256_add_epi64(c64[r][1], _mm256_sad_epu8(c8[r][1], zero));
    }
  }
  // epilogue: y = float(K - 2 * count) * alpha + bias (a multiply, then an add; counts and
  // K - 2 count fit in int32, whose conversion to float rounds like the int64 one)
  const int64_t o0 = ob * kOutBlock + 8 * half;
  const int64_t nvalid = g.O - o0 < 8 ? g.O - o0 : 8;
  const __m256 al = _mm256_loadu_ps(alpha + o0), bi = _mm256_loadu_ps(bias + o0);
  const __m256i K = _mm256_set1_epi32(static_cast<int>(g.K));
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  __m256 v[8];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    if (r < R) {
      // low 32 bits of the 4 + 4 int64 counts -> 8 int32 (channels 0..7 of this half)
      const __m128i lo = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c64[r][0], even));
      const __m128i hi = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c64[r][1], even));
      const __m256i cnt = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
      const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(K, _mm256_add_epi32(cnt, cnt)));
      v[r] = _mm256_add_ps(_mm256_mul_ps(d, al), bi);
    } else {
      v[r] = _mm256_setzero_ps();
    }
  }
  if (g.out_nhwc) {
    const __m256i cm = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nvalid)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int r = 0; r < R; ++r) {
      float* dst = y + out_index(g, n, o0, oh, ow + r);
      if (nvalid == 8) _mm256_storeu_ps(dst, v[r]);
      else _mm256_maskstore_ps(dst, cm, v[r]);
    }
  } else {
    transpose8x8(v);  // v[j] = channel o0 + j at pixels ow .. ow + 7
    for (int64_t j = 0; j < nvalid; ++j) {
      float* dst = y + out_index(g, n, o0 + j, oh, ow);
      if (R == 4) {
        _mm_storeu_ps(dst, _mm256_castps256_ps128(v[j]));
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, v[j]);
        for (int r = 0; r < R; ++r) dst[r] = tmp[r];
      }
    }
  }
}

AQD_T256 void conv_row(const ConvGeom& g, const uint64_t* xp, const uint64_t* wp,
                       const float* alpha, const float* bias, float* y,
                       int64_t n, int64_t oh, int64_t ob) {
  const uint64_t* xrow = xp + (n * g.Hp + oh * g.sh) * g.Wp * g.CW;
  const uint64_t* wblk = wp + ob * g.KS * kOutBlock;
  const int64_t px = g.sw * g.CW;
  const int halves = g.O - ob * kOutBlock > 8 ? 2 : 1;
  for (int half = 0; half < halves; ++half) {
    int64_t ow = 0;
    for (; ow + kTile <= g.OW; ow += kTile)
      conv_tile<kTile>(g, xrow + ow * px, wblk, alpha, bias, y, n, oh, ob, ow, half);
    const uint64_t* xt = xrow + ow * px;
    switch (g.OW - ow) {
      case 1: conv_tile<1>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow, half); break;
      case 2: conv_tile<2>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow, half); break;
      case 3: conv_tile<3>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow, half); break;
      default: break;
    }
  }
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
