// Fused k-bit convolution on integer codes for CPU inference (op aqd_binary::int8_conv2d),
// used by aqd_d2.export.int8_gemm.Int8ConvInference instead of its PyTorch path
// (NHWC pad copy + im2col copy + torch._int_mm + float epilogue): one pass packs the input
// codes into a padded NHWC buffer, the convolution is computed directly on that buffer (no
// im2col) into a small int32 tile that stays in cache, and the float epilogue is applied
// to the tile before the next one is computed.
//
// Arithmetic (exact in int32; the only rounding is the final float32 scaling):
//   codes  uint8 [N, C, H, W] (NCHW or channels_last memory), input value x = s_x (c - z),
//          z = `zero` in [0, 127]; codes <= 127 (at most 7 bits). Or the float32 input
//          itself with `encode` (pack_rows_float): the codes are computed in the pack.
//   weight int8 [OV][KS][16][4]: the int8 GEMM weight of Int8ConvInference, o in [0, O')
//          (O' = O, or O + 1 with the all-ones "sum column"), k = (kh, kw, c) with c padded
//          to Cp = ceil(C / 4) * 4, KS = KH * KW * Cp / 4; padded entries are 0.
//   wsum   int32 [OV * 16]: sum over k of each column's weights.
// The input is padded with the value z (the code of x = 0), so with
//   A[o] = sum_k c[k] w[k, o]   (padding included)   and   A'[o] = A[o] - z * wsum[o]
// A' is exactly the GEMM of Int8ConvInference's PyTorch path (which pads c - z with 0).
// Epilogue per output channel o < O, in float32, each term a fused multiply-add (rounded
// once, as torch.addcmul does on CPUs with FMA):
//   y = fma(float(A'[o]), scale[o], bias[o]);
//   with a sum column: y = fma(float(A'[O]), shift[o], y)
// where scale = w_scale * s_x and shift = w_shift * s_x are formed in float32 here
// (s_x = `step`). Output: float32 [N, O, OH, OW] in channels_last memory, as the PyTorch
// path returns.
//
// Work split: one OpenMP region with torch's thread count: the pack over (n, padded row),
// a barrier, then chunks of output pixels (flattened over n, oh, ow) with dynamic
// scheduling. Per chunk, for each group of up to 4 weight vectors, the micro-kernel
// (int8_kernels.cpp, variant chosen at run time) runs over blocks of 6 pixels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "int8_conv.h"

namespace aqd_i8 {
namespace {

bool cpu_supports(int64_t isa) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  switch (isa) {
    case kGeneric: return true;
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == kGeneric;
#endif
}

bool kernel_for(int64_t isa, Int8Kernels* fn) {
  if (isa < kGeneric || isa > kAvx512Vnni || !cpu_supports(isa)) return false;
  switch (isa) {
    case kGeneric: return int8_generic_kernel(fn);
    case kAvx2: return int8_avx2_kernel(fn);
    case kAvx512Vnni: return int8_avx512vnni_kernel(fn);
  }
  return false;
}

std::vector<int64_t> int8_available_isas() {
  std::vector<int64_t> out;
  Int8Kernels fn;
  for (int64_t isa = kGeneric; isa <= kAvx512Vnni; ++isa)
    if (kernel_for(isa, &fn)) out.push_back(isa);
  return out;
}

std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, "aqd_binary.int8_conv2d: ", name,
              " must have 1 or 2 values");
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

const float* channel_vector(const at::Tensor& t, int64_t O, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == O &&
                  t.is_contiguous(),
              "aqd_binary.int8_conv2d: ", name, " must be a contiguous float32 CPU tensor of ",
              O, " values");
  return t.const_data_ptr<float>();
}


// Rows [r0, r1) of the flattened (n, padded row) index of the padded NHWC buffer: each row
// is filled with z (padding pixels and the channel tail; the tail channels' weights are 0),
// then body(d, n, h) writes input row h of image n, d pointing at its first non-padding pixel.
template <class Body>
void for_padded_rows(const Geom& g, uint8_t* dst, uint8_t z, int64_t r0, int64_t r1, Body body) {
  const int64_t row = g.Wp * g.Cp;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Hp, h = r % g.Hp - g.ph;
    uint8_t* d = dst + r * row;
    std::memset(d, z, row);
    if (h >= 0 && h < g.H) body(d + g.pw * g.Cp, n, h);
  }
}

// Padded NHWC rows [r0, r1) from uint8 codes.
void pack_rows(const Geom& g, const uint8_t* src, uint8_t* dst, uint8_t z, int64_t r0,
               int64_t r1) {
  for_padded_rows(g, dst, z, r0, r1, [&](uint8_t* d, int64_t n, int64_t h) {
    if (g.in_nhwc) {
      const uint8_t* s = src + (n * g.H + h) * g.W * g.C;
      if (g.Cp == g.C) {
        std::memcpy(d, s, g.W * g.C);
      } else {
        for (int64_t w = 0; w < g.W; ++w) std::memcpy(d + w * g.Cp, s + w * g.C, g.C);
      }
    } else {
      const int64_t plane = g.H * g.W;
      const uint8_t* s = src + n * g.C * plane + h * g.W;
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t w = 0; w < g.W; ++w) d[w * g.Cp + c] = s[c * plane + w];
    }
  });
}

// pack_rows for float input: the codes of each value, in the same layout as pack_rows.
void pack_rows_float_generic(const Geom& g, const float* src, uint8_t* dst, uint8_t z,
                             const Encoding& e, int64_t r0, int64_t r1) {
  std::vector<uint8_t> tmp(g.in_nhwc ? 0 : g.W);
  for_padded_rows(g, dst, z, r0, r1, [&](uint8_t* d, int64_t n, int64_t h) {
    if (g.in_nhwc) {
      const float* s = src + (n * g.H + h) * g.W * g.C;
      for (int64_t w = 0; w < g.W; ++w)
        for (int64_t c = 0; c < g.C; ++c) d[w * g.Cp + c] = encode_one(s[w * g.C + c], e);
    } else {
      const int64_t plane = g.H * g.W;
      const float* s = src + n * g.C * plane + h * g.W;
      for (int64_t c = 0; c < g.C; ++c) {
        const float* sc = s + c * plane;
        for (int64_t w = 0; w < g.W; ++w) tmp[w] = encode_one(sc[w], e);  // vectorizable
        for (int64_t w = 0; w < g.W; ++w) d[w * g.Cp + c] = tmp[w];
      }
    }
  });
}

at::Tensor int8_conv2d(const at::Tensor& codes, std::optional<at::ArrayRef<double>> encode,
                       int64_t zero, double step, const at::Tensor& weight,
                       const at::Tensor& wsum, const at::Tensor& scale,
                       const std::optional<at::Tensor>& shift, const at::Tensor& bias,
                       int64_t out_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t isa) {
  const char* op = "aqd_binary.int8_conv2d: ";
  const bool fused = encode.has_value();
  TORCH_CHECK(codes.dim() == 4 && codes.device().is_cpu() &&
                  codes.scalar_type() == (fused ? at::kFloat : at::kByte),
              op, "input must be a 4-D CPU tensor (N, C, H, W): uint8 codes, or float32 with "
              "encode = [m, lo, hi, add, mode]");
  Encoding enc{1.f, 0.f, 0.f, 0, 0};
  if (fused) {
    const auto& e = *encode;
    TORCH_CHECK(e.size() == 5 && (e[4] == 0 || e[4] == 1), op,
                "encode must be [m, lo, hi, add, mode] with mode 0 or 1");
    enc = {static_cast<float>(e[0]), static_cast<float>(e[1]), static_cast<float>(e[2]),
           static_cast<int32_t>(e[3]), static_cast<int64_t>(e[4])};
    const double cmin = (enc.mode == 0 ? e[1] : e[1] * e[0]) + e[3];
    const double cmax = (enc.mode == 0 ? e[2] : e[2] * e[0]) + e[3];
    TORCH_CHECK(e[1] <= e[2] && cmin >= 0 && cmax <= 127, op,
                "encode gives codes in [", cmin, ", ", cmax, "], outside [0, 127]");
  }
  TORCH_CHECK(zero >= 0 && zero <= 127, op, "zero point must be in [0, 127], got ", zero);
  Geom g{};
  at::Tensor xc = codes;
  g.in_nhwc = false;
  if (!codes.is_contiguous()) {
    if (codes.is_contiguous(at::MemoryFormat::ChannelsLast)) g.in_nhwc = true;
    else xc = codes.contiguous();
  }
  g.N = xc.size(0); g.C = xc.size(1); g.H = xc.size(2); g.W = xc.size(3);
  g.Cp = (g.C + 3) / 4 * 4;
  g.O = out_channels;
  std::tie(g.KH, g.KW) = pair_arg(kernel_size, "kernel_size");
  std::tie(g.sh, g.sw) = pair_arg(stride, "stride");
  std::tie(g.ph, g.pw) = pair_arg(padding, "padding");
  std::tie(g.dh, g.dw) = pair_arg(dilation, "dilation");
  TORCH_CHECK(g.O >= 1 && g.KH >= 1 && g.KW >= 1 && g.sh >= 1 && g.sw >= 1 && g.dh >= 1 &&
                  g.dw >= 1 && g.ph >= 0 && g.pw >= 0,
              op, "bad geometry");
  g.Hp = g.H + 2 * g.ph;
  g.Wp = g.W + 2 * g.pw;
  const int64_t eff_kh = g.dh * (g.KH - 1) + 1, eff_kw = g.dw * (g.KW - 1) + 1;
  TORCH_CHECK(g.Hp >= eff_kh && g.Wp >= eff_kw, op, "padded input (", g.Hp, "x", g.Wp,
              ") is smaller than the dilated kernel (", eff_kh, "x", eff_kw, ")");
  g.OH = (g.Hp - eff_kh) / g.sh + 1;
  g.OW = (g.Wp - eff_kw) / g.sw + 1;
  g.KS = g.KH * g.KW * g.Cp / 4;
  const bool has_shift = shift.has_value() && shift->defined();
  const int64_t o_cols = g.O + (has_shift ? 1 : 0);
  g.OV = (o_cols + kLanes - 1) / kLanes;
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.device().is_cpu() &&
                  weight.is_contiguous() &&
                  weight.sizes() == at::IntArrayRef({g.OV, g.KS, kLanes, 4}),
              op, "weight must be a contiguous int8 CPU tensor of shape [", g.OV, ", ", g.KS,
              ", ", kLanes, ", 4], got ", weight.sizes());
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.is_contiguous() &&
                  wsum.numel() == g.OV * kLanes,
              op, "wsum must be a contiguous int32 tensor of ", g.OV * kLanes, " values");
  // scale[o] * s_x and shift[o] * s_x in float32 (the products torch forms for its epilogue)
  const float sx = static_cast<float>(step);
  const float* sc0 = channel_vector(scale, g.O, "scale");
  std::vector<float> scv(g.O), shv(has_shift ? g.O : 0);
  for (int64_t o = 0; o < g.O; ++o) scv[o] = sc0[o] * sx;
  const float* sc = scv.data();
  const float* bi = channel_vector(bias, g.O, "bias");
  const float* sh = nullptr;
  if (has_shift) {
    const float* sh0 = channel_vector(*shift, g.O, "shift");
    for (int64_t o = 0; o < g.O; ++o) shv[o] = sh0[o] * sx;
    sh = shv.data();
  }
  Int8Kernels ks{};
  if (isa < 0) {  // best available
    for (isa = kAvx512Vnni; isa > kGeneric && !kernel_for(isa, &ks); --isa) {}
  }
  TORCH_CHECK(kernel_for(isa, &ks), op, "instruction set ", isa,
              " is not available on this CPU / build");
  if (isa == kAvx2 && !fused && xc.numel() > 0)  // vpmaddubsw's pair sums need codes <= 127
    TORCH_CHECK(xc.max().item<uint8_t>() <= 127, op,
                "the avx2 variant needs input codes <= 127 (at most 7 bits)");

  at::Tensor y = at::empty({g.N, g.O, g.OH, g.OW}, xc.options().dtype(at::kFloat),
                           at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  at::Tensor xp = at::empty({g.N, g.Hp, g.Wp, g.Cp}, xc.options().dtype(at::kByte));
  std::vector<int64_t> koff(g.KS);
  for (int64_t kh = 0, k = 0; kh < g.KH; ++kh)
    for (int64_t kw = 0; kw < g.KW; ++kw)
      for (int64_t c4 = 0; c4 < g.Cp / 4; ++c4, ++k)
        koff[k] = (kh * g.dh * g.Wp + kw * g.dw) * g.Cp + c4 * 4;
  std::vector<int32_t> corr(g.OV * kLanes);
  const int32_t* ws = wsum.const_data_ptr<int32_t>();
  for (int64_t o = 0; o < g.OV * kLanes; ++o) corr[o] = static_cast<int32_t>(zero) * ws[o];

  const void* src = xc.const_data_ptr();
  uint8_t* xpp = xp.mutable_data_ptr<uint8_t>();
  const int8_t* wp = weight.const_data_ptr<int8_t>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t w_vstride = g.KS * kLanes * 4, acc_stride = g.OV * kLanes;
  const int64_t rows = g.N * g.Hp, pixels = g.N * g.OH * g.OW;
  const int nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  // pixels per chunk: a multiple of kMaxPixels whose int32 tile is at most 64 KiB, and at
  // least 4 chunks per thread when the layer is small enough for that to matter
  int64_t chunk = std::max<int64_t>(kMaxPixels, 16384 / acc_stride / kMaxPixels * kMaxPixels);
  const int64_t balanced = (pixels + 4 * nt - 1) / (4 * nt);
  if (nt > 1) chunk = std::min(chunk, (balanced + kMaxPixels - 1) / kMaxPixels * kMaxPixels);
  const int64_t row_chunk = std::max<int64_t>(1, rows / (8 * nt));
  const uint8_t z = static_cast<uint8_t>(zero);
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t r = 0; r < rows; r += row_chunk)
      if (fused)
        (ks.pack_float ? ks.pack_float : pack_rows_float_generic)(
            g, static_cast<const float*>(src), xpp, z, enc, r, std::min(rows, r + row_chunk));
      else
        pack_rows(g, static_cast<const uint8_t*>(src), xpp, z, r, std::min(rows, r + row_chunk));
    std::vector<int32_t> acc(chunk * acc_stride);
    std::vector<const uint8_t*> base(chunk);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t0 = 0; t0 < pixels; t0 += chunk) {
      const int64_t np = std::min(chunk, pixels - t0);
      for (int64_t i = 0; i < np; ++i) {
        const int64_t t = t0 + i, n = t / (g.OH * g.OW), r = t % (g.OH * g.OW);
        const int64_t oh = r / g.OW, ow = r % g.OW;
        base[i] = xpp + ((n * g.Hp + oh * g.sh) * g.Wp + ow * g.sw) * g.Cp;
      }
      for (int64_t v0 = 0; v0 < g.OV; v0 += kMaxVecs) {
        const int nv = static_cast<int>(std::min<int64_t>(kMaxVecs, g.OV - v0));
        for (int64_t p0 = 0; p0 < np; p0 += kMaxPixels) {
          const int pp = static_cast<int>(std::min<int64_t>(kMaxPixels, np - p0));
          ks.micro(base.data() + p0, pp, wp + v0 * w_vstride, w_vstride, nv, koff.data(), g.KS,
                acc.data() + p0 * acc_stride + v0 * kLanes, acc_stride);
        }
      }
      // float epilogue on the tile while it is in cache: NHWC output rows t0 .. t0 + np
      ks.epilogue(acc.data(), np, acc_stride, corr.data(), sc, bi, sh, g.O, yp + t0 * g.O);
    }
  }
  return y;
}

}  // namespace
}  // namespace aqd_i8

TORCH_LIBRARY_FRAGMENT(aqd_binary, m) {
  m.def("int8_available_isas() -> int[]", &aqd_i8::int8_available_isas);
  m.def("int8_conv2d(Tensor x, float[]? encode, int zero, float step, Tensor weight, Tensor wsum, "
        "Tensor scale, "
        "Tensor? shift, Tensor bias, int out_channels, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, int isa) -> Tensor",
        &aqd_i8::int8_conv2d);
}
