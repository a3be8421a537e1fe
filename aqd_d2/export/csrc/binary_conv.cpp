// Bit-packed binary convolution for CPU inference: y = conv2d(pad(sign(x), -1), sign(W)).
//
// Semantics (those of aqd_d2's binary quantizers): sign(v) = +1 for v >= 0, else -1 (so
// sign(0) = +1, and NaN counts as -1 exactly as torch's `x >= 0` does); the input is padded
// with -1 (not 0); per output channel o, y = float(dot) * alpha[o] + bias[o], where dot is
// the exact integer dot product of the +-1 vectors (a float multiply, then a float add: the
// rounding of `conv * alpha + bias` evaluated in float32 by torch, bit for bit).
//
// Data layouts (bit 1 = +1, bit 0 = -1; bit c % 64 of word c / 64 holds channel c):
//   packed input   uint64 [N][Hp][Wp][CW]        CW = ceil(C / 64), Hp = H + 2 ph, Wp = W + 2 pw;
//                  padding pixels are all-zero words (= -1), as is every channel tail bit.
//   packed weight  uint64 [OB][KH][KW][CW][16]   OB = ceil(O / 16); 16 consecutive output
//                  channels per (kh, kw, cw) step; tail bits and padded channels are 0.
// Tail bits are 0 in both operands, so they never count in popcount(x ^ w), and for the
// K = C * KH * KW valid bits  dot = K - 2 * popcount(x ^ w)  summed over all words.
//
// Work split: one OpenMP region with torch's thread count (at::get_num_threads; the library
// links the same libgomp as torch): binarize + pack over the (n, padded row) pairs, a
// barrier, then the convolution over (n, output row, block of 16 output channels), both
// with dynamic scheduling of small chunks. The inner kernels live in
// kernels_*.cpp, one per instruction set, chosen at run time (binary_conv.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "binary_conv.h"

namespace aqd_bconv {
namespace {

bool cpu_supports(Isa isa) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (isa) {
    case kGeneric: return true;
    case kPopcnt: return __builtin_cpu_supports("popcnt");
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt");
  }
  return false;
#else
  return isa == kGeneric;
#endif
}

bool kernels_for(int64_t isa, KernelSet* ks) {
  if (isa < kGeneric || isa > kAvx512 || !cpu_supports(static_cast<Isa>(isa))) return false;
  switch (isa) {
    case kGeneric: return generic_kernels(ks);
    case kPopcnt: return popcnt_kernels(ks);
    case kAvx2: return avx2_kernels(ks);
    case kAvx512: return avx512_kernels(ks);
  }
  return false;
}

std::vector<int64_t> available_isas() {
  std::vector<int64_t> out;
  KernelSet ks;
  for (int64_t isa = kGeneric; isa <= kAvx512; ++isa)
    if (kernels_for(isa, &ks)) out.push_back(isa);
  return out;
}

KernelSet select_kernels(int64_t isa) {
  KernelSet ks;
  if (isa < 0) {  // best available
    for (int64_t i = kAvx512; i >= kGeneric; --i)
      if (kernels_for(i, &ks)) return ks;
  }
  TORCH_CHECK(kernels_for(isa, &ks), "aqd_binary: instruction set ", isa,
              " is not available on this CPU / build");
  return ks;
}

std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, "aqd_binary: ", name, " must have 1 or 2 values");
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

// Float input as NCHW- or NHWC-contiguous memory; sets g.N..W and g.in_nhwc.
at::Tensor prepare_input(const at::Tensor& x, ConvGeom* g) {
  TORCH_CHECK(x.dim() == 4, "aqd_binary: input must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), "aqd_binary: input must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "aqd_binary: input must be float32, got ",
              x.scalar_type());
  at::Tensor xc = x;
  g->in_nhwc = false;
  if (!x.is_contiguous()) {
    if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) g->in_nhwc = true;
    else xc = x.contiguous();
  }
  g->N = xc.size(0); g->C = xc.size(1); g->H = xc.size(2); g->W = xc.size(3);
  return xc;
}

void set_padding(ConvGeom* g, at::IntArrayRef padding) {
  std::tie(g->ph, g->pw) = pair_arg(padding, "padding");
  TORCH_CHECK(g->ph >= 0 && g->pw >= 0, "aqd_binary: padding must be >= 0");
  g->Hp = g->H + 2 * g->ph;
  g->Wp = g->W + 2 * g->pw;
  g->CW = (g->C + 63) / 64;
}

at::Tensor pack(const at::Tensor& x, const ConvGeom& g, const KernelSet& ks) {
  at::Tensor xp = at::empty({g.N, g.Hp, g.Wp, g.CW}, x.options().dtype(at::kLong));
  const float* src = x.const_data_ptr<float>();
  uint64_t* dst = reinterpret_cast<uint64_t*>(xp.mutable_data_ptr<int64_t>());
  at::parallel_for(0, g.N * g.Hp, 1,
                   [&](int64_t b, int64_t e) { ks.pack_rows(g, src, dst, b, e); });
  return xp;
}

// Binarized, bit-packed, padded input (layout in the file header), for tests and tools.
at::Tensor pack_input(const at::Tensor& x, at::IntArrayRef padding, int64_t isa) {
  ConvGeom g{};
  const at::Tensor xc = prepare_input(x, &g);
  set_padding(&g, padding);
  return pack(xc, g, select_kernels(isa));
}

std::vector<float> per_channel(const std::optional<at::Tensor>& t, int64_t O, int64_t padded,
                               float fill, const char* name) {
  std::vector<float> out(padded, fill);
  if (t.has_value() && t->defined()) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == O,
                "aqd_binary: ", name, " must be a float32 CPU tensor of ", O, " values");
    const at::Tensor c = t->contiguous();
    const float* p = c.const_data_ptr<float>();
    std::copy(p, p + O, out.begin());
  }
  return out;
}

at::Tensor conv2d(const at::Tensor& x, const at::Tensor& weight_words,
                  const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& bias,
                  int64_t out_channels, int64_t in_channels, at::IntArrayRef kernel_size,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t isa) {
  ConvGeom g{};
  const at::Tensor xc = prepare_input(x, &g);
  TORCH_CHECK(g.C == in_channels, "aqd_binary: input has ", g.C, " channels, weight expects ",
              in_channels);
  set_padding(&g, padding);
  g.O = out_channels;
  std::tie(g.KH, g.KW) = pair_arg(kernel_size, "kernel_size");
  std::tie(g.sh, g.sw) = pair_arg(stride, "stride");
  std::tie(g.dh, g.dw) = pair_arg(dilation, "dilation");
  TORCH_CHECK(g.O >= 1 && g.KH >= 1 && g.KW >= 1, "aqd_binary: bad weight shape");
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1,
              "aqd_binary: stride and dilation must be >= 1");
  g.OB = (g.O + kOutBlock - 1) / kOutBlock;
  TORCH_CHECK(weight_words.scalar_type() == at::kLong && weight_words.device().is_cpu() &&
                  weight_words.is_contiguous(),
              "aqd_binary: weight_words must be a contiguous int64 CPU tensor");
  TORCH_CHECK(weight_words.sizes() == at::IntArrayRef({g.OB, g.KH, g.KW, g.CW, kOutBlock}),
              "aqd_binary: weight_words has shape ", weight_words.sizes(), ", expected [", g.OB,
              ", ", g.KH, ", ", g.KW, ", ", g.CW, ", ", kOutBlock, "]");
  const int64_t eff_kh = g.dh * (g.KH - 1) + 1, eff_kw = g.dw * (g.KW - 1) + 1;
  TORCH_CHECK(g.Hp >= eff_kh && g.Wp >= eff_kw, "aqd_binary: padded input (", g.Hp, "x", g.Wp,
              ") is smaller than the dilated kernel (", eff_kh, "x", eff_kw, ")");
  g.OH = (g.Hp - eff_kh) / g.sh + 1;
  g.OW = (g.Wp - eff_kw) / g.sw + 1;
  g.K = g.C * g.KH * g.KW;
  g.KS = g.KH * g.KW * g.CW;
  std::vector<int64_t> koff(g.KS);
  for (int64_t kh = 0, k = 0; kh < g.KH; ++kh)
    for (int64_t kw = 0; kw < g.KW; ++kw)
      for (int64_t cw = 0; cw < g.CW; ++cw, ++k)
        koff[k] = (kh * g.dh * g.Wp + kw * g.dw) * g.CW + cw;
  g.koff = koff.data();
  g.out_nhwc = g.in_nhwc;

  const KernelSet ks = select_kernels(isa);
  const std::vector<float> al = per_channel(alpha, g.O, g.OB * kOutBlock, 1.f, "alpha");
  const std::vector<float> bi = per_channel(bias, g.O, g.OB * kOutBlock, 0.f, "bias");
  const auto out_format = g.out_nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty({g.N, g.O, g.OH, g.OW}, xc.options(), out_format);
  if (y.numel() == 0) return y;
  at::Tensor xp = at::empty({g.N, g.Hp, g.Wp, g.CW}, xc.options().dtype(at::kLong));
  const float* xs = xc.const_data_ptr<float>();
  uint64_t* xpp = reinterpret_cast<uint64_t*>(xp.mutable_data_ptr<int64_t>());
  const uint64_t* wp = reinterpret_cast<const uint64_t*>(weight_words.const_data_ptr<int64_t>());
  float* yp = y.mutable_data_ptr<float>();
  const int64_t rows = g.N * g.Hp, items = g.N * g.OH * g.OB;
  // One parallel region: pack (barrier) then convolve. Dynamic scheduling of small chunks
  // keeps all threads busy when one of them is preempted on a shared machine.
  const int nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t row_chunk = std::max<int64_t>(1, rows / (8 * nt));
  const int64_t item_chunk = std::max<int64_t>(1, items / (16 * nt));
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t r = 0; r < rows; r += row_chunk)
      ks.pack_rows(g, xs, xpp, r, std::min(rows, r + row_chunk));
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t b = 0; b < items; b += item_chunk) {
      for (int64_t i = b, e = std::min(items, b + item_chunk); i < e; ++i) {
        const int64_t ob = i % g.OB, t = i / g.OB;
        ks.conv_row(g, xpp, wp, al.data(), bi.data(), yp, t / g.OH, t % g.OH, ob);
      }
    }
  }
  return y;
}

}  // namespace
}  // namespace aqd_bconv

TORCH_LIBRARY(aqd_binary, m) {
  m.def("available_isas() -> int[]", &aqd_bconv::available_isas);
  m.def("pack_input(Tensor x, int[] padding, int isa) -> Tensor", &aqd_bconv::pack_input);
  m.def("conv2d(Tensor x, Tensor weight_words, Tensor? alpha, Tensor? bias, int out_channels, "
        "int in_channels, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "int isa) -> Tensor",
        &aqd_bconv::conv2d);
}
