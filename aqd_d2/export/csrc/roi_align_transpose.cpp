// NCHW -> NHWC level transposes of the fused ROIAlign (roi_align.cpp; declarations in
// roi_align.h). Pure data movement: every variant writes the same bits.
#include "roi_align.h"

#include <algorithm>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // intrinsics used only inside target-attributed functions
#endif

namespace aqd_roi {

// NCHW -> NHWC for pixels [p0, p1) of one image (generic: blocks of 16 channels so the 16
// source rows stay in L1 while each pixel's channels are written contiguously).
void nchw_to_nhwc_generic(const float* __restrict src, float* __restrict dst, int64_t C, int64_t HW,
                          int64_t p0, int64_t p1) {
  constexpr int64_t kC = 16;
  for (int64_t c0 = 0; c0 < C; c0 += kC) {
    const int64_t c1 = std::min(C, c0 + kC);
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = c0; c < c1; ++c) dst[p * C + c] = src[c * HW + p];
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// AVX2: 8 x 8 register transposes (8 channels x 8 pixels), scalar tails. Pure data movement:
// the copy is exact whatever the instruction set.
__attribute__((target("avx2"))) void nchw_to_nhwc_avx2(const float* __restrict src, float* __restrict dst,
                                                       int64_t C, int64_t HW, int64_t p0, int64_t p1) {
  const int64_t c8 = C - C % 8;
  int64_t p = p0;
  for (; p + 8 <= p1; p += 8) {
    for (int64_t c = 0; c < c8; c += 8) {
      const float* s = src + c * HW + p;
      __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + HW), r2 = _mm256_loadu_ps(s + 2 * HW),
             r3 = _mm256_loadu_ps(s + 3 * HW), r4 = _mm256_loadu_ps(s + 4 * HW),
             r5 = _mm256_loadu_ps(s + 5 * HW), r6 = _mm256_loadu_ps(s + 6 * HW),
             r7 = _mm256_loadu_ps(s + 7 * HW);
      __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = dst + p * C + c;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + C, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * C, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * C, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * C, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * C, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * C, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * C, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int64_t q = p; q < p + 8; ++q)
      for (int64_t c = c8; c < C; ++c) dst[q * C + c] = src[c * HW + q];
  }
  if (p < p1) nchw_to_nhwc_generic(src, dst, C, HW, p, p1);
}
#endif

}  // namespace aqd_roi
