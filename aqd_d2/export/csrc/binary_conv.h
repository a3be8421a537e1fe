// Shared declarations of the bit-packed binary convolution (see binary_conv.cpp for the
// data layouts and the exact arithmetic).
//
// The kernels exist in several instruction-set variants, each compiled with function-level
// target attributes (never with global -m flags), so one build runs on any x86-64 CPU and
// the best variant is picked at run time from the CPU's features:
//   generic : portable C++ (any CPU, any compiler)
//   popcnt  : the same C++ with the hardware POPCNT instruction (x86-64, GCC/Clang)
//   avx2    : 256-bit XOR + nibble-table popcount (vpshufb) over 16 output channels
//   avx512  : 512-bit XOR + VPOPCNTQ (AVX512F/BW/DQ/VL + AVX512_VPOPCNTDQ)
#pragma once

#include <cstdint>

namespace aqd_bconv {

// Output channels per weight block: weights are stored [OB][KH][KW][CW][kOutBlock].
constexpr int64_t kOutBlock = 16;

enum Isa : int { kGeneric = 0, kPopcnt = 1, kAvx2 = 2, kAvx512 = 3 };

struct ConvGeom {
  int64_t N, C, H, W;      // input (float, NCHW or NHWC)
  int64_t O, KH, KW;       // output channels, kernel size
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t OH, OW;          // output size
  int64_t Hp, Wp, CW;      // packed input: [N][Hp][Wp][CW] uint64 words, Hp = H + 2 ph
  int64_t OB;              // number of output-channel blocks, ceil(O / kOutBlock)
  int64_t K;               // valid bits per dot product: C * KH * KW
  int64_t KS;              // words per dot product ("steps"): KH * KW * CW
  const int64_t* koff;     // [KS] offset of step k's input word from the pixel's first word:
                           // (kh * dh * Wp + kw * dw) * CW + cw, for k = (kh * KW + kw) * CW + cw;
                           // step k's 16 weight words are at block + k * kOutBlock
  bool in_nhwc;            // input memory is NHWC (channels_last) instead of NCHW
  bool out_nhwc;           // output memory is NHWC instead of NCHW
};

// Binarize + pack the rows [row_begin, row_end) of the flattened (n, hp) index of the
// packed input; padding rows / columns and channel tail bits are written as 0 (= -1).
using PackRowsFn = void (*)(const ConvGeom& g, const float* x, uint64_t* xp,
                            int64_t row_begin, int64_t row_end);

// One output row (n, oh) for the output channels of block ob: XNOR-popcount dot products,
// then y = float(K - 2 * popcount) * alpha[o] + bias[o]. alpha / bias have OB * kOutBlock
// entries (padded with 1 / 0).
using ConvRowFn = void (*)(const ConvGeom& g, const uint64_t* xp, const uint64_t* wp,
                           const float* alpha, const float* bias, float* y,
                           int64_t n, int64_t oh, int64_t ob);

struct KernelSet {
  PackRowsFn pack_rows;
  ConvRowFn conv_row;
};

// Each returns false when its variant is not compiled in (other compiler / architecture).
bool generic_kernels(KernelSet* out);
bool popcnt_kernels(KernelSet* out);
bool avx2_kernels(KernelSet* out);
bool avx512_kernels(KernelSet* out);

// Index of an output element in NCHW or NHWC memory.
inline int64_t out_index(const ConvGeom& g, int64_t n, int64_t o, int64_t oh, int64_t ow) {
  return g.out_nhwc ? ((n * g.OH + oh) * g.OW + ow) * g.O + o
                    : ((n * g.O + o) * g.OH + oh) * g.OW + ow;
}

}  // namespace aqd_bconv
