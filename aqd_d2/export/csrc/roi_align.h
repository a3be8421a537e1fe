// Shared declarations of the fused multi-level ROIAlign (roi_align.cpp).
#pragma once
#include <cstdint>

namespace aqd_roi {

// NCHW -> NHWC for the pixels [p0, p1) of one image with C channels and HW pixels
// (roi_align_transpose.cpp): portable, and 8 x 8 AVX2 register blocks (x86-64 GCC/Clang only;
// call it only when the CPU has AVX2).
void nchw_to_nhwc_generic(const float* src, float* dst, int64_t C, int64_t HW, int64_t p0,
                          int64_t p1);
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) void nchw_to_nhwc_avx2(const float* src, float* dst, int64_t C,
                                                       int64_t HW, int64_t p0, int64_t p1);
#endif

}  // namespace aqd_roi
