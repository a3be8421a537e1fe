// Shared declarations of the fused k-bit (int8 code) convolution (int8_conv.cpp has the
// data layouts and the arithmetic; int8_kernels.cpp the instruction-set variants).
//
// Variants (function-level target attributes, never global -m flags; chosen at run time):
//   generic    : portable C++ (any CPU, any compiler)
//   avx2       : (AVX2 + FMA) vpmaddubsw (u8 x s8 -> pairs summed in int16) + vpmaddwd (-> int32). The
//                int16 pair sum cannot saturate: input codes are <= 127 (at most 7 bits;
//                the op checks this when it runs this variant) and weight codes are in [-128, 127], so
//                |2 * 127 * (-128)| = 32512 <= 32767.
//   avx512vnni : vpdpbusd (u8 x s8, 4 products summed straight into int32, no saturation).
#pragma once

#include <cstdint>

namespace aqd_i8 {

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512Vnni = 2 };

constexpr int64_t kLanes = 16;   // output channels per weight vector (16 x int32 = 64 bytes)
constexpr int kMaxPixels = 6;    // output pixels per micro-kernel call
constexpr int kMaxVecs = 4;      // weight vectors (of kLanes channels) per micro-kernel call

// Integer part of the convolution for P <= kMaxPixels output pixels and NV <= kMaxVecs
// vectors of kLanes output channels:
//   out[p * out_stride + v * kLanes + l] =
//       sum_{kk < KS} sum_{j < 4} px[p][koff[kk] + j] * w[v * w_vstride + (kk * kLanes + l) * 4 + j]
// with px[p] the first (uint8) input byte of pixel p's receptive field and w the int8
// weights laid out [vector][KS][kLanes][4]. Exact in int32 (no saturation, see above).
using MicroFn = void (*)(const uint8_t* const* px, int P, const int8_t* w, int64_t w_vstride,
                         int NV, const int64_t* koff, int64_t KS, int32_t* out,
                         int64_t out_stride);

// Geometry of one call: input N, C, H, W (C padded to Cp = 4 * ceil(C / 4)), padded Hp, Wp,
// output O, OH, OW, kernel, stride, padding, dilation; KS = KH * KW * Cp / 4 reduction
// steps; OV weight vectors of kLanes channels; in_nhwc: channels_last input memory.
struct Geom {
  int64_t N, C, H, W, Cp, Hp, Wp, O, KH, KW, sh, sw, ph, pw, dh, dw, OH, OW, KS, OV;
  bool in_nhwc;
};

// The input quantizer's encoding, done in the pack (no float temporary, no code tensor):
//   mode 0: c = round(clamp(x * m, lo, hi)) + add    (LSQ: m = 1/s; LIQ activations: m = q/alpha)
//   mode 1: c = round(clamp(x, lo, hi) * m) + add    (DoReFa activations: m = q)
// in float32, as torch evaluates those quantizers (m rounded to float32 first, as torch does
// with a Python scalar factor). round() is half to even, computed as (t + 1.5 * 2^23) -
// 1.5 * 2^23, exact for |t| < 2^22 (here |t| <= 255) in the default rounding mode.
struct Encoding {
  float m, lo, hi;
  int32_t add;
  int64_t mode;
};

inline uint8_t encode_one(float v, const Encoding& e) {
  float t = e.mode == 0 ? v * e.m : v;
  t = t < e.lo ? e.lo : t;
  t = t > e.hi ? e.hi : t;
  if (e.mode != 0) t = t * e.m;
  t = (t + 12582912.0f) - 12582912.0f;
  return static_cast<uint8_t>(static_cast<int32_t>(t) + e.add);
}

// Pack + encode the rows [r0, r1) of the flattened (n, padded row) index of the padded NHWC
// uint8 buffer [N][Hp][Wp][Cp] from the float input (padding pixels and channel tail = z).
using PackFloatFn = void (*)(const Geom& g, const float* src, uint8_t* dst, uint8_t z,
                             const Encoding& e, int64_t r0, int64_t r1);

// Float epilogue of np pixels (int32 rows acc + p * acc_stride) into y + p * O:
//   a[o] = acc[o] - corr[o];  y[o] = fma(float(a[o]), scale[o], bias[o])
//   with shift != nullptr (sum column O): y[o] = fma(float(a[O]), shift[o], y[o])
// Each term is rounded once (a fused multiply-add), as torch.addcmul computes it.
using EpilogueFn = void (*)(const int32_t* acc, int64_t np, int64_t acc_stride,
                            const int32_t* corr, const float* scale, const float* bias,
                            const float* shift, int64_t O, float* y);

struct Int8Kernels {
  MicroFn micro;
  EpilogueFn epilogue;
  PackFloatFn pack_float;  // nullptr: the portable one in int8_conv.cpp
};

// Each returns false when its variant is not compiled in (other compiler / architecture).
bool int8_generic_kernel(Int8Kernels* out);
bool int8_avx2_kernel(Int8Kernels* out);
bool int8_avx512vnni_kernel(Int8Kernels* out);

}  // namespace aqd_i8
