// Fused multi-level ROIAlign for CPU inference (float32): one call pools the boxes of all
// images from all FPN levels and writes the (R, C, PH, PW) result directly (no zero-filled
// output per level, no index_put), vectorised over channels, OpenMP over boxes.
//
// Semantics: those of detectron2's ROIPooler with ROIAlign (aligned = false) or ROIAlignV2
// (aligned = true) level poolers, i.e. torchvision's roi_align CPU kernel applied per level
// to the boxes assigned to that level. Every float operation of one output value is the one
// torchvision performs, in the same order (this file reimplements its documented arithmetic
// for channel vectors; no code is copied):
//   start = roi * scale - offset (offset 0.5 if aligned); size = end - start, at least 1
//   unless aligned; bin = size / pooled; grid = sampling_ratio > 0 ? sampling_ratio :
//   ceil(size / pooled); count = max(grid_h * grid_w, 1);
//   sample y = start_h + ph * bin_h + (iy + .5f) * bin_h / grid_h (x likewise);
//   a sample outside [-1, H] x [-1, W] has weights 0 at pixel 0; else y, x clamped to >= 0,
//   low = (int) y, high = low + 1 (both H - 1 at the border, y = low there), ly = y - low,
//   hy = 1. - ly (in double, then float), w1 = hy * hx, w2 = hy * lx, w3 = ly * hx, w4 = ly * lx;
//   out = ((((0 + s_0) + s_1) + ...) / count with s = w1 v1 + w2 v2 + w3 v3 + w4 v4 evaluated
//   left to right, samples in (iy, ix) order.
// Each channel is an independent lane with exactly these operations (multiply and add stay
// separate: -ffp-contract=off), so the result equals detectron2's ROIPooler bit for bit.
//
// Layout: a level that is not channels_last is converted once per call (only levels that
// received boxes; roi_align_transpose.cpp: a blocked transpose, 8 x 8 AVX2 register blocks,
// about 2x faster than torch's strided copy), so the 4 bilinear taps of a sample are contiguous C-vectors. Per
// box, the PH * PW bins are accumulated into a [PH * PW][C] buffer, then transposed into the
// NCHW output.
//
// Instruction sets: the channel loop exists three times with function-level target
// attributes (generic and AVX2 vectorised by the compiler, AVX-512F with intrinsics), chosen
// at run time from the CPU's features (no global -m flags); all three compute the same bits.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "roi_align.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // intrinsics used only inside target-attributed functions
#endif

namespace aqd_roi {
namespace {

enum RoiIsa : int64_t { kGeneric = 0, kAvx2 = 2, kAvx512 = 3 };

// One sampling coordinate along y (or x): taps low / high, weights l (to high) and h (to low),
// valid = inside [-1, size]. Computed with torchvision's float operations.
struct Axis {
  int64_t low, high;
  float l, h;
  bool valid;
};

Axis axis_sample(float v, int64_t size) {
  Axis a{0, 0, 0.f, 0.f, false};
  if (!(v >= -1.0 && v <= size)) return a;  // NaN lands here as well
  if (v <= 0) v = 0;
  a.low = static_cast<int64_t>(static_cast<int>(v));
  if (a.low >= size - 1) {
    a.high = a.low = size - 1;
    v = static_cast<float>(a.low);
  } else {
    a.high = a.low + 1;
  }
  a.l = v - static_cast<float>(a.low);
  a.h = 1. - a.l;  // double subtraction rounded to float, as torchvision's `T hy = 1. - ly`
  a.valid = true;
  return a;
}

// The sampling coordinates of one box along one axis: grid samples per bin, pooled bins.
// Returns grid (>= 0) and fills coords[pooled * grid] in (bin, sample) order.
int64_t box_axis(float start, float bin, int64_t pooled, int64_t grid, int64_t size,
                 std::vector<Axis>& coords) {
  coords.resize(static_cast<size_t>(pooled * grid));
  for (int64_t p = 0; p < pooled; ++p)
    for (int64_t i = 0; i < grid; ++i) {
      const float v = start + static_cast<float>(p) * bin +
                      static_cast<float>(static_cast<float>(i) + .5f) * bin / static_cast<float>(grid);
      coords[p * grid + i] = axis_sample(v, size);
    }
  return grid;
}

struct BoxWork {
  const float* feat;   // this image's level, NHWC
  int64_t C, W;        // channels, level width
  int64_t PH, PW, gh, gw;
  float count;
  const Axis* ys;      // [PH * gh]
  const Axis* xs;      // [PW * gw]
};

// acc[b][c] for the PH * PW bins of one box; the channel loops are what gets vectorised.
#if defined(__GNUC__) || defined(__clang__)
#define AQD_ROI_INLINE inline __attribute__((always_inline))
#else
#define AQD_ROI_INLINE inline
#endif

AQD_ROI_INLINE void pool_box_impl(const BoxWork& w, float* __restrict acc) {
  const int64_t C = w.C;
  for (int64_t ph = 0; ph < w.PH; ++ph)
    for (int64_t pw = 0; pw < w.PW; ++pw) {
      float* __restrict a = acc + (ph * w.PW + pw) * C;
      for (int64_t c = 0; c < C; ++c) a[c] = 0.f;
      for (int64_t iy = 0; iy < w.gh; ++iy) {
        const Axis& y = w.ys[ph * w.gh + iy];
        for (int64_t ix = 0; ix < w.gw; ++ix) {
          const Axis& x = w.xs[pw * w.gw + ix];
          const float* __restrict v1 = w.feat;  // invalid sample: weights 0 at pixel 0
          const float* __restrict v2 = w.feat;
          const float* __restrict v3 = w.feat;
          const float* __restrict v4 = w.feat;
          float w1 = 0.f, w2 = 0.f, w3 = 0.f, w4 = 0.f;
          if (y.valid && x.valid) {
            v1 = w.feat + (y.low * w.W + x.low) * C;
            v2 = w.feat + (y.low * w.W + x.high) * C;
            v3 = w.feat + (y.high * w.W + x.low) * C;
            v4 = w.feat + (y.high * w.W + x.high) * C;
            w1 = y.h * x.h, w2 = y.h * x.l, w3 = y.l * x.h, w4 = y.l * x.l;
          }
          for (int64_t c = 0; c < C; ++c) a[c] += w1 * v1[c] + w2 * v2[c] + w3 * v3[c] + w4 * v4[c];
        }
      }
      const float count = w.count;
      for (int64_t c = 0; c < C; ++c) a[c] /= count;
    }
}

void pool_box_generic(const BoxWork& w, float* acc) { pool_box_impl(w, acc); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AQD_ROI_X86 1
__attribute__((target("avx2"))) void pool_box_avx2(const BoxWork& w, float* acc) {
  pool_box_impl(w, acc);
}

// AVX-512: the same arithmetic with explicit vectors, so that a block of 64 channels stays in
// four registers over all samples of a bin (no accumulator load / store per sample).
// Multiplies and adds are separate instructions in torchvision's order: s += ((w1 v1 + w2 v2)
// + w3 v3) + w4 v4, then s / count.
struct Tap {
  int64_t o1, o2, o3, o4;  // offsets of the 4 taps (pixel index * C)
  float w1, w2, w3, w4;
};

#define AQD_T512 __attribute__((target("avx512f")))

AQD_T512 inline __m512 tap_sum(const Tap& t, const float* f, __m512 s) {
  const __m512 p = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(
      _mm512_mul_ps(_mm512_set1_ps(t.w1), _mm512_loadu_ps(f + t.o1)),
      _mm512_mul_ps(_mm512_set1_ps(t.w2), _mm512_loadu_ps(f + t.o2))),
      _mm512_mul_ps(_mm512_set1_ps(t.w3), _mm512_loadu_ps(f + t.o3))),
      _mm512_mul_ps(_mm512_set1_ps(t.w4), _mm512_loadu_ps(f + t.o4)));
  return _mm512_add_ps(s, p);
}

AQD_T512 inline __m512 tap_sum_masked(const Tap& t, const float* f, __m512 s, __mmask16 m) {
  const __m512 p = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(
      _mm512_mul_ps(_mm512_set1_ps(t.w1), _mm512_maskz_loadu_ps(m, f + t.o1)),
      _mm512_mul_ps(_mm512_set1_ps(t.w2), _mm512_maskz_loadu_ps(m, f + t.o2))),
      _mm512_mul_ps(_mm512_set1_ps(t.w3), _mm512_maskz_loadu_ps(m, f + t.o3))),
      _mm512_mul_ps(_mm512_set1_ps(t.w4), _mm512_maskz_loadu_ps(m, f + t.o4)));
  return _mm512_add_ps(s, p);
}

AQD_T512 void pool_box_avx512(const BoxWork& w, float* acc) {
  const int64_t C = w.C, ns = w.gh * w.gw;
  std::vector<Tap> taps(static_cast<size_t>(std::max<int64_t>(ns, 1)));
  const __m512 count = _mm512_set1_ps(w.count);
  for (int64_t ph = 0; ph < w.PH; ++ph)
    for (int64_t pw = 0; pw < w.PW; ++pw) {
      int64_t k = 0;
      for (int64_t iy = 0; iy < w.gh; ++iy) {
        const Axis& y = w.ys[ph * w.gh + iy];
        for (int64_t ix = 0; ix < w.gw; ++ix, ++k) {
          const Axis& x = w.xs[pw * w.gw + ix];
          Tap t{0, 0, 0, 0, 0.f, 0.f, 0.f, 0.f};  // invalid sample: weights 0 at pixel 0
          if (y.valid && x.valid) {
            t = Tap{(y.low * w.W + x.low) * C, (y.low * w.W + x.high) * C, (y.high * w.W + x.low) * C,
                    (y.high * w.W + x.high) * C, y.h * x.h, y.h * x.l, y.l * x.h, y.l * x.l};
          }
          taps[k] = t;
        }
      }
      float* a = acc + (ph * w.PW + pw) * C;
      int64_t c = 0;
      for (; c + 64 <= C; c += 64) {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        const float* f = w.feat + c;
        for (int64_t i = 0; i < ns; ++i) {
          s0 = tap_sum(taps[i], f, s0);
          s1 = tap_sum(taps[i], f + 16, s1);
          s2 = tap_sum(taps[i], f + 32, s2);
          s3 = tap_sum(taps[i], f + 48, s3);
        }
        _mm512_storeu_ps(a + c, _mm512_div_ps(s0, count));
        _mm512_storeu_ps(a + c + 16, _mm512_div_ps(s1, count));
        _mm512_storeu_ps(a + c + 32, _mm512_div_ps(s2, count));
        _mm512_storeu_ps(a + c + 48, _mm512_div_ps(s3, count));
      }
      for (; c + 16 <= C; c += 16) {
        __m512 s0 = _mm512_setzero_ps();
        for (int64_t i = 0; i < ns; ++i) s0 = tap_sum(taps[i], w.feat + c, s0);
        _mm512_storeu_ps(a + c, _mm512_div_ps(s0, count));
      }
      if (c < C) {
        const __mmask16 m = static_cast<__mmask16>((1u << (C - c)) - 1u);
        __m512 s0 = _mm512_setzero_ps();
        for (int64_t i = 0; i < ns; ++i) s0 = tap_sum_masked(taps[i], w.feat + c, s0, m);
        _mm512_mask_storeu_ps(a + c, m, _mm512_div_ps(s0, count));
      }
    }
}
#endif

using PoolBoxFn = void (*)(const BoxWork&, float*);

using TransposeFn = void (*)(const float*, float*, int64_t, int64_t, int64_t, int64_t);

bool isa_supported(int64_t isa) {
  if (isa == kGeneric) return true;
#ifdef AQD_ROI_X86
  __builtin_cpu_init();
  if (isa == kAvx2) return __builtin_cpu_supports("avx2");
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f");
#endif
  return false;
}

PoolBoxFn select_fn(int64_t isa) {
  if (isa < 0) isa = isa_supported(kAvx512) ? kAvx512 : (isa_supported(kAvx2) ? kAvx2 : kGeneric);
  TORCH_CHECK(isa == kGeneric || isa == kAvx2 || isa == kAvx512, "aqd_binary.roi_align: isa must be -1 "
              "(best), 0 (generic), 2 (avx2) or 3 (avx512), got ", isa);
  TORCH_CHECK(isa_supported(isa), "aqd_binary.roi_align: instruction set ", isa,
              " is not available on this CPU / build");
#ifdef AQD_ROI_X86
  if (isa == kAvx512) return pool_box_avx512;
  if (isa == kAvx2) return pool_box_avx2;
#endif
  return pool_box_generic;
}

TransposeFn select_transpose(int64_t isa) {
  if (isa < 0) isa = isa_supported(kAvx2) ? kAvx2 : kGeneric;
#ifdef AQD_ROI_X86
  if (isa >= kAvx2 && isa_supported(kAvx2)) return nchw_to_nhwc_avx2;
#endif
  return nchw_to_nhwc_generic;
}

std::vector<int64_t> roi_align_isas() {
  std::vector<int64_t> out;
  for (int64_t isa : {kGeneric, kAvx2, kAvx512})
    if (isa_supported(isa)) out.push_back(isa);
  return out;
}

at::Tensor roi_align_multilevel(const std::vector<at::Tensor>& features, const at::Tensor& rois,
                                const at::Tensor& levels, const std::vector<double>& scales,
                                int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                                bool aligned, int64_t isa) {
  const int64_t L = static_cast<int64_t>(features.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(scales.size()) == L,
              "aqd_binary.roi_align: need one scale per feature level (", L, " levels, ",
              scales.size(), " scales)");
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "aqd_binary.roi_align: output size must be positive");
  const at::Tensor& f0 = features[0];
  TORCH_CHECK(f0.dim() == 4, "aqd_binary.roi_align: features must be 4-D (N, C, H, W)");
  const int64_t N = f0.size(0), C = f0.size(1);
  for (const auto& f : features) {
    TORCH_CHECK(f.device().is_cpu() && f.scalar_type() == at::kFloat && f.dim() == 4,
                "aqd_binary.roi_align: features must be float32 CPU tensors (N, C, H, W)");
    TORCH_CHECK(f.size(0) == N && f.size(1) == C, "aqd_binary.roi_align: levels differ in N or C");
  }
  TORCH_CHECK(rois.device().is_cpu() && rois.scalar_type() == at::kFloat && rois.dim() == 2 &&
                  rois.size(1) == 5,
              "aqd_binary.roi_align: rois must be float32 (R, 5) (batch index, x0, y0, x1, y1)");
  const int64_t R = rois.size(0);
  TORCH_CHECK(levels.device().is_cpu() && levels.scalar_type() == at::kLong && levels.dim() == 1 &&
                  levels.size(0) == R,
              "aqd_binary.roi_align: levels must be int64 (R,)");
  const PoolBoxFn fn = select_fn(isa);
  const TransposeFn transpose = select_transpose(isa);
  at::Tensor out = at::empty({R, C, pooled_h, pooled_w}, f0.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const at::Tensor rc = rois.contiguous(), lc = levels.contiguous();
  const float* rp = rc.const_data_ptr<float>();
  const int64_t* lp = lc.const_data_ptr<int64_t>();
  std::vector<char> used(static_cast<size_t>(L), 0);
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(lp[r] >= 0 && lp[r] < L, "aqd_binary.roi_align: level ", lp[r], " of box ", r,
                " is outside [0, ", L, ")");
    const int64_t n = static_cast<int64_t>(static_cast<int>(rp[r * 5]));
    TORCH_CHECK(n >= 0 && n < N, "aqd_binary.roi_align: batch index ", n, " of box ", r,
                " is outside [0, ", N, ")");
    used[lp[r]] = 1;
  }
  // NHWC copies of the levels that received boxes (none when already channels_last); NCHW
  // levels are transposed below, in the parallel region, in tasks of 64 pixels of one image
  std::vector<at::Tensor> nhwc(static_cast<size_t>(L));
  struct Task { const float* src; float* dst; int64_t HW, p0, p1; };
  std::vector<Task> tasks;
  constexpr int64_t kPix = 64;
  for (int64_t l = 0; l < L; ++l) {
    if (!used[l]) continue;
    const at::Tensor& f = features[l];
    if (f.is_contiguous(at::MemoryFormat::ChannelsLast) || !f.is_contiguous()) {
      nhwc[l] = f.contiguous(at::MemoryFormat::ChannelsLast);
      continue;
    }
    nhwc[l] = at::empty(f.sizes(), f.options().memory_format(at::MemoryFormat::ChannelsLast));
    const int64_t HW = f.size(2) * f.size(3);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < HW; p += kPix)
        tasks.push_back({f.const_data_ptr<float>() + n * C * HW, nhwc[l].mutable_data_ptr<float>() + n * C * HW,
                         HW, p, std::min(HW, p + kPix)});
  }
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  float* op = out.mutable_data_ptr<float>();
  const int64_t bins = pooled_h * pooled_w;
  const int nt = at::in_parallel_region() ? 1 : at::get_num_threads();
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 8)
#endif
    for (int64_t t = 0; t < n_tasks; ++t)
      transpose(tasks[t].src, tasks[t].dst, C, tasks[t].HW, tasks[t].p0, tasks[t].p1);
    // (implicit barrier: every level is NHWC before any box is pooled)
    std::vector<float> acc(static_cast<size_t>(bins * C));
    std::vector<Axis> ys, xs;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t r = 0; r < R; ++r) {
      const float* roi = rp + r * 5;
      const int64_t l = lp[r];
      const at::Tensor& f = nhwc[l];
      const int64_t H = f.size(2), W = f.size(3);
      const int64_t n = static_cast<int64_t>(static_cast<int>(roi[0]));
      const float scale = static_cast<float>(scales[l]);
      const float offset = aligned ? 0.5f : 0.f;
      const float start_w = roi[1] * scale - offset, start_h = roi[2] * scale - offset;
      const float end_w = roi[3] * scale - offset, end_h = roi[4] * scale - offset;
      float roi_w = end_w - start_w, roi_h = end_h - start_h;
      if (!aligned) {  // malformed boxes become 1 x 1
        roi_w = std::max(roi_w, 1.f);
        roi_h = std::max(roi_h, 1.f);
      }
      const float bin_h = roi_h / static_cast<float>(pooled_h);
      const float bin_w = roi_w / static_cast<float>(pooled_w);
      int64_t gh = sampling_ratio > 0 ? sampling_ratio
                                      : static_cast<int>(std::ceil(roi_h / static_cast<float>(pooled_h)));
      int64_t gw = sampling_ratio > 0 ? sampling_ratio
                                      : static_cast<int>(std::ceil(roi_w / static_cast<float>(pooled_w)));
      // torchvision: count = max(gh * gw, 1) with the unclamped grids; a grid <= 0 (empty or
      // inverted box) samples nothing, so every output is 0 / count = 0 either way
      const float count = static_cast<float>(std::max<int64_t>(gh * gw, 1));
      gh = std::max<int64_t>(gh, 0);
      gw = std::max<int64_t>(gw, 0);
      box_axis(start_h, bin_h, pooled_h, gh, H, ys);
      box_axis(start_w, bin_w, pooled_w, gw, W, xs);
      BoxWork w{f.const_data_ptr<float>() + n * H * W * C, C, W, pooled_h, pooled_w, gh, gw,
                count, ys.data(), xs.data()};
      fn(w, acc.data());
      float* o = op + r * C * bins;  // [C][bins] <- acc [bins][C]
      for (int64_t c = 0; c < C; ++c)
        for (int64_t b = 0; b < bins; ++b) o[c * bins + b] = acc[b * C + c];
    }
  }
  return out;
}

}  // namespace
}  // namespace aqd_roi

TORCH_LIBRARY_FRAGMENT(aqd_binary, m) {
  m.def("roi_align_isas() -> int[]", &aqd_roi::roi_align_isas);
  m.def("roi_align_multilevel(Tensor[] features, Tensor rois, Tensor levels, float[] scales, "
        "int pooled_height, int pooled_width, int sampling_ratio, bool aligned, int isa) -> Tensor",
        &aqd_roi::roi_align_multilevel);
}
