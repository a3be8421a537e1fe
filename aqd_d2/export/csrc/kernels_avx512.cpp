// AVX-512 variant: XOR + VPOPCNTQ on 512-bit vectors (needs AVX512F/BW/DQ/VL and
// AVX512_VPOPCNTDQ; compiled with function target attributes, selected at run time).
//
// Convolution tile: kTile output pixels x 16 output channels. The 16 weight words of one
// (kh, kw, cw) step are two zmm registers (8 channels each); the input word of each pixel
// is broadcast to all 8 lanes, XORed with both, popcounted per 64-bit lane and added to
// that pixel's two accumulators (lane = output channel, so no horizontal sums are needed).
// 2 * kTile accumulators + 2 weight registers + 1 broadcast stay within the 32 zmm.
// The epilogue converts the counts to float, applies alpha / bias and, for NCHW output,
// transposes 8x8 blocks so that each channel's kTile pixels are stored contiguously.
#include <cstring>

#include "binary_conv.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define AQD_T512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,popcnt")))

namespace aqd_bconv {
namespace {

constexpr int kTile = 8;  // output pixels per pass

// ---- binarize + pack ----------------------------------------------------------------------
AQD_T512 void pack_rows(const ConvGeom& g, const float* x, uint64_t* xp, int64_t r0, int64_t r1) {
  const int64_t row_words = g.Wp * g.CW, CW = g.CW;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Hp, h = r % g.Hp - g.ph;
    uint64_t* dst = xp + r * row_words;
    std::memset(dst, 0, sizeof(uint64_t) * row_words);
    if (h < 0 || h >= g.H) continue;
    uint64_t* px0 = dst + g.pw * CW;
    if (g.in_nhwc) {
      // channels contiguous: 16 channels -> one 16-bit compare mask, 4 masks -> one word
      for (int64_t w = 0; w < g.W; ++w) {
        const float* s = x + ((n * g.H + h) * g.W + w) * g.C;
        for (int64_t cw = 0; cw < CW; ++cw) {
          uint64_t word = 0;
          for (int j = 0; j < 4; ++j) {
            const int64_t c = cw * 64 + 16 * j, rem = g.C - c;
            if (rem <= 0) break;
            const __mmask16 m = rem >= 16 ? static_cast<__mmask16>(0xFFFF)
                                          : static_cast<__mmask16>((1u << rem) - 1);
            const __m512 f = _mm512_maskz_loadu_ps(m, s + c);
            const __mmask16 k = _mm512_mask_cmp_ps_mask(m, f, zero, _CMP_GE_OQ);
            word |= static_cast<uint64_t>(_cvtmask16_u32(k)) << (16 * j);
          }
          px0[w * CW + cw] = word;
        }
      }
    } else {
      // pixels contiguous per channel: 16 pixels of channel c -> 16-bit mask, OR-ed as bit c
      // into the 16 words (two zmm of 8 words each) of those pixels.
      const int64_t plane = g.H * g.W;
      for (int64_t cw = 0; cw < CW; ++cw) {
        const int64_t c0 = cw * 64, cn = g.C - c0 < 64 ? g.C - c0 : 64;
        for (int64_t w0 = 0; w0 < g.W; w0 += 16) {
          const int64_t rem = g.W - w0;
          const __mmask16 m = rem >= 16 ? static_cast<__mmask16>(0xFFFF)
                                        : static_cast<__mmask16>((1u << rem) - 1);
          const float* s = x + ((n * g.C + c0) * g.H + h) * g.W + w0;
          __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
          __m512i bit = _mm512_set1_epi64(1);
          for (int64_t c = 0; c < cn; ++c) {
            const __m512 f = _mm512_maskz_loadu_ps(m, s + c * plane);
            const __mmask16 k = _mm512_mask_cmp_ps_mask(m, f, zero, _CMP_GE_OQ);
            lo = _mm512_mask_or_epi64(lo, static_cast<__mmask8>(k), lo, bit);
            hi = _mm512_mask_or_epi64(hi, static_cast<__mmask8>(k >> 8), hi, bit);
            bit = _mm512_add_epi64(bit, bit);
          }
          if (CW == 1) {
            _mm512_mask_storeu_epi64(px0 + w0, static_cast<__mmask8>(m), lo);
            _mm512_mask_storeu_epi64(px0 + w0 + 8, static_cast<__mmask8>(m >> 8), hi);
          } else {
            alignas(64) uint64_t tmp[16];
            _mm512_store_si512(tmp, lo);
            _mm512_store_si512(tmp + 8, hi);
            const int64_t cnt = rem < 16 ? rem : 16;
            for (int64_t i = 0; i < cnt; ++i) px0[(w0 + i) * CW + cw] = tmp[i];
          }
        }
      }
    }
  }
}

// ---- convolution --------------------------------------------------------------------------
AQD_T512 inline void transpose8x8(__m256 v[8]) {
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

// R output pixels (ow .. ow+R-1 of row oh) x the 16 channels of block ob.
template <int R>
AQD_T512 inline void conv_tile(const ConvGeom& g, const uint64_t* xt, const uint64_t* wblk,
                               const float* alpha, const float* bias, float* y,
                               int64_t n, int64_t oh, int64_t ob, int64_t ow) {
  const int64_t xs = g.sw * g.CW, KS = g.KS;
  const int64_t* koff = g.koff;
  __m512i a0[R], a1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_si512();
  const uint64_t* wv = wblk;
  for (int64_t k = 0; k < KS; ++k, wv += kOutBlock) {
    const __m512i w0 = _mm512_loadu_si512(wv), w1 = _mm512_loadu_si512(wv + 8);
    const uint64_t* xk = xt + koff[k];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512i b = _mm512_set1_epi64(static_cast<long long>(xk[r * xs]));
      a0[r] = _mm512_add_epi64(a0[r], _mm512_popcnt_epi64(_mm512_xor_si512(b, w0)));
      a1[r] = _mm512_add_epi64(a1[r], _mm512_popcnt_epi64(_mm512_xor_si512(b, w1)));
    }
  }
  // epilogue: y = float(K - 2 * count) * alpha + bias (two roundings, as mul then add)
  const __m512i K = _mm512_set1_epi64(g.K);
  for (int half = 0; half < 2; ++half) {
    const int64_t o0 = ob * kOutBlock + half * 8;
    if (o0 >= g.O) break;
    const __m256 al = _mm256_loadu_ps(alpha + o0), bi = _mm256_loadu_ps(bias + o0);
    __m256 v[8];
#pragma GCC unroll 16
    for (int r = 0; r < 8; ++r) {
      if (r < R) {
        const __m512i cnt = half ? a1[r] : a0[r];
        const __m256 d = _mm512_cvtepi64_ps(_mm512_sub_epi64(K, _mm512_add_epi64(cnt, cnt)));
        v[r] = _mm256_add_ps(_mm256_mul_ps(d, al), bi);
      } else {
        v[r] = _mm256_setzero_ps();
      }
    }
    const int64_t nvalid = g.O - o0 < 8 ? g.O - o0 : 8;
    if (g.out_nhwc) {
      const __mmask8 cm = static_cast<__mmask8>((1u << nvalid) - 1);
      for (int r = 0; r < R; ++r)
        _mm256_mask_storeu_ps(y + out_index(g, n, o0, oh, ow + r), cm, v[r]);
    } else {
      transpose8x8(v);
      const __mmask8 pm = static_cast<__mmask8>((1u << R) - 1);
      for (int64_t j = 0; j < nvalid; ++j) {
        float* dst = y + out_index(g, n, o0 + j, oh, ow);
        if (R == 8) _mm256_storeu_ps(dst, v[j]);
        else _mm256_mask_storeu_ps(dst, pm, v[j]);
      }
    }
  }
}

AQD_T512 void conv_row(const ConvGeom& g, const uint64_t* xp, const uint64_t* wp,
                       const float* alpha, const float* bias, float* y,
                       int64_t n, int64_t oh, int64_t ob) {
  const uint64_t* xrow = xp + (n * g.Hp + oh * g.sh) * g.Wp * g.CW;
  const uint64_t* wblk = wp + ob * g.KS * kOutBlock;
  const int64_t px = g.sw * g.CW;
  int64_t ow = 0;
  for (; ow + kTile <= g.OW; ow += kTile)
    conv_tile<kTile>(g, xrow + ow * px, wblk, alpha, bias, y, n, oh, ob, ow);
  const uint64_t* xt = xrow + ow * px;
  switch (g.OW - ow) {
    case 1: conv_tile<1>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow); break;
    case 2: conv_tile<2>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow); break;
    case 3: conv_tile<3>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow); break;
    case 4: conv_tile<4>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow); break;
    case 5: conv_tile<5>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow); break;
    case 6: conv_tile<6>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow); break;
    case 7: conv_tile<7>(g, xt, wblk, alpha, bias, y, n, oh, ob, ow); break;
    default: break;
  }
}

}  // namespace

bool avx512_kernels(KernelSet* out) {
  out->pack_rows = pack_rows;
  out->conv_row = conv_row;
  return true;
}

}  // namespace aqd_bconv

#else  // not x86-64 GCC/Clang

namespace aqd_bconv {
bool avx512_kernels(KernelSet*) { return false; }
}  // namespace aqd_bconv

#endif
