// Instruction-set variants of the int8 convolution micro-kernel (int8_conv.h). Each keeps a
// P x NV block of int32 accumulators (P output pixels x NV vectors of 16 output channels)
// in registers for the whole reduction: per step kk, 4 input bytes of each pixel are
// broadcast to all lanes and multiplied with the 16 x 4 weight bytes of each vector, so the
// weights of one step are loaded once for P pixels and no horizontal sums are needed.
#include "int8_conv.h"

#include <cmath>
#include <cstring>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AQD_I8_X86 1
#endif

namespace aqd_i8 {
namespace {

// ---- portable C++ ------------------------------------------------------------------------
void micro_generic(const uint8_t* const* px, int P, const int8_t* w, int64_t w_vstride, int NV,
                   const int64_t* koff, int64_t KS, int32_t* out, int64_t out_stride) {
  for (int p = 0; p < P; ++p) {
    for (int v = 0; v < NV; ++v) {
      int32_t acc[kLanes] = {0};
      const int8_t* wv = w + v * w_vstride;
      for (int64_t kk = 0; kk < KS; ++kk) {
        const uint8_t* x = px[p] + koff[kk];
        const int8_t* wk = wv + kk * kLanes * 4;
        for (int64_t l = 0; l < kLanes; ++l)
          for (int j = 0; j < 4; ++j)
            acc[l] += static_cast<int32_t>(x[j]) * static_cast<int32_t>(wk[l * 4 + j]);
      }
      std::memcpy(out + p * out_stride + v * kLanes, acc, sizeof(acc));
    }
  }
}

void epilogue_generic(const int32_t* acc, int64_t np, int64_t acc_stride, const int32_t* corr,
                      const float* sc, const float* bi, const float* sh, int64_t O, float* y) {
  for (int64_t p = 0; p < np; ++p) {
    const int32_t* a = acc + p * acc_stride;
    float* yo = y + p * O;
    for (int64_t o = 0; o < O; ++o)
      yo[o] = std::fma(static_cast<float>(a[o] - corr[o]), sc[o], bi[o]);
    if (sh != nullptr) {
      const float s = static_cast<float>(a[O] - corr[O]);
      for (int64_t o = 0; o < O; ++o) yo[o] = std::fma(s, sh[o], yo[o]);
    }
  }
}

#ifdef AQD_I8_X86
inline int32_t load4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- AVX-512 VNNI --------------------------------------------------------------------------
#define AQD_T_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// The accumulators are named variables, not an array: GCC 12 keeps arrays of vectors in
// memory (stack spills in the inner loop), named ones in registers. Operations for p >= P
// or v >= NV are compile-time dead and removed.
#define AQD_I8_DECL4(p, Z) Z(p, 0) Z(p, 1) Z(p, 2) Z(p, 3)
#define AQD_I8_ALL(Z) \
  AQD_I8_DECL4(0, Z) AQD_I8_DECL4(1, Z) AQD_I8_DECL4(2, Z) AQD_I8_DECL4(3, Z) \
  AQD_I8_DECL4(4, Z) AQD_I8_DECL4(5, Z)

template <int P, int NV>
AQD_T_VNNI void vnni_block(const uint8_t* const* px, const int8_t* w, int64_t w_vstride,
                           const int64_t* koff, int64_t KS, int32_t* out, int64_t out_stride) {
#define AQD_Z(p, v) __m512i a##p##v = _mm512_setzero_si512();
  AQD_I8_ALL(AQD_Z)
#undef AQD_Z
  const uint8_t* x0 = px[0];
  const uint8_t* x1 = px[P > 1 ? 1 : 0];
  const uint8_t* x2 = px[P > 2 ? 2 : 0];
  const uint8_t* x3 = px[P > 3 ? 3 : 0];
  const uint8_t* x4 = px[P > 4 ? 4 : 0];
  const uint8_t* x5 = px[P > 5 ? 5 : 0];
  for (int64_t kk = 0; kk < KS; ++kk) {
    const int8_t* wk = w + kk * 64;
    const __m512i w0 = _mm512_loadu_si512(static_cast<const void*>(wk));
    const __m512i w1 = NV > 1 ? _mm512_loadu_si512(static_cast<const void*>(wk + w_vstride)) : w0;
    const __m512i w2 = NV > 2 ? _mm512_loadu_si512(static_cast<const void*>(wk + 2 * w_vstride)) : w0;
    const __m512i w3 = NV > 3 ? _mm512_loadu_si512(static_cast<const void*>(wk + 3 * w_vstride)) : w0;
    const int64_t off = koff[kk];
#define AQD_ROW(p)                                                  \
  if (P > p) {                                                      \
    const __m512i xb = _mm512_set1_epi32(load4(x##p + off));        \
    a##p##0 = _mm512_dpbusd_epi32(a##p##0, xb, w0);                 \
    if (NV > 1) a##p##1 = _mm512_dpbusd_epi32(a##p##1, xb, w1);     \
    if (NV > 2) a##p##2 = _mm512_dpbusd_epi32(a##p##2, xb, w2);     \
    if (NV > 3) a##p##3 = _mm512_dpbusd_epi32(a##p##3, xb, w3);     \
  }
    AQD_ROW(0) AQD_ROW(1) AQD_ROW(2) AQD_ROW(3) AQD_ROW(4) AQD_ROW(5)
#undef AQD_ROW
  }
#define AQD_S(p, v) \
  if (P > p && NV > v) _mm512_storeu_si512(static_cast<void*>(out + p * out_stride + v * kLanes), a##p##v);
  AQD_I8_ALL(AQD_S)
#undef AQD_S
}

AQD_T_VNNI void epilogue_avx512(const int32_t* acc, int64_t np, int64_t acc_stride,
                                const int32_t* corr, const float* sc, const float* bi,
                                const float* sh, int64_t O, float* y) {
  for (int64_t p = 0; p < np; ++p) {
    const int32_t* a = acc + p * acc_stride;
    float* yo = y + p * O;
    const __m512 s = _mm512_set1_ps(sh != nullptr ? static_cast<float>(a[O] - corr[O]) : 0.f);
    for (int64_t o = 0; o < O; o += 16) {
      const __mmask16 m = O - o >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << (O - o)) - 1);
      const __m512i ai = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, a + o),
                                          _mm512_maskz_loadu_epi32(m, corr + o));
      __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), _mm512_maskz_loadu_ps(m, sc + o),
                                 _mm512_maskz_loadu_ps(m, bi + o));
      if (sh != nullptr) v = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(m, sh + o), v);
      _mm512_mask_storeu_ps(yo + o, m, v);
    }
  }
}

// 16 float inputs -> 16 codes (bytes 0..15 of the result), encode_one vectorized: the same
// float32 multiply, clamp (max / min) and round half to even (vcvtps2dq, nearest-even).
AQD_T_VNNI inline __m128i encode16(__m512 v, const Encoding& e, __m512 m, __m512 lo, __m512 hi,
                                   __m512i add) {
  __m512 t = e.mode == 0 ? _mm512_mul_ps(v, m) : v;
  t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
  if (e.mode != 0) t = _mm512_mul_ps(t, m);
  const __m512i i = _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtepi32_epi8(_mm512_add_epi32(i, add));
}

AQD_T_VNNI void pack_float_avx512(const Geom& g, const float* src, uint8_t* dst, uint8_t z,
                                  const Encoding& e, int64_t r0, int64_t r1) {
  const __m512 m = _mm512_set1_ps(e.m), lo = _mm512_set1_ps(e.lo), hi = _mm512_set1_ps(e.hi);
  const __m512i add = _mm512_set1_epi32(e.add);
  const __m128i zv = _mm_set1_epi8(static_cast<char>(z));
  const int64_t row = g.Wp * g.Cp, plane = g.H * g.W;
  alignas(64) uint32_t quad[16];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Hp, h = r % g.Hp - g.ph;
    uint8_t* d = dst + r * row;
    std::memset(d, z, row);
    if (h < 0 || h >= g.H) continue;
    d += g.pw * g.Cp;
    if (g.in_nhwc) {  // channels contiguous: 16 channels per step, masked tail
      const float* sp = src + (n * g.H + h) * g.W * g.C;
      for (int64_t w = 0; w < g.W; ++w)
        for (int64_t c = 0; c < g.C; c += 16) {
          const __mmask16 k = g.C - c >= 16 ? static_cast<__mmask16>(0xFFFF)
                                            : static_cast<__mmask16>((1u << (g.C - c)) - 1);
          const __m128i b = encode16(_mm512_maskz_loadu_ps(k, sp + w * g.C + c), e, m, lo, hi, add);
          _mm_mask_storeu_epi8(d + w * g.Cp + c, k, b);
        }
      continue;
    }
    // NCHW: 4 channels x 16 pixels per step, interleaved into 16 groups of 4 bytes (one
    // 32-bit store per pixel)
    const float* sp = src + n * g.C * plane + h * g.W;
    for (int64_t c = 0; c < g.C; c += 4) {
      for (int64_t w = 0; w < g.W; w += 16) {
        const int64_t nw = g.W - w < 16 ? g.W - w : 16;
        const __mmask16 k = nw == 16 ? static_cast<__mmask16>(0xFFFF)
                                     : static_cast<__mmask16>((1u << nw) - 1);
        __m128i b[4];
        for (int j = 0; j < 4; ++j)
          b[j] = c + j < g.C ? encode16(_mm512_maskz_loadu_ps(k, sp + (c + j) * plane + w), e, m,
                                        lo, hi, add)
                             : zv;
        const __m128i t0 = _mm_unpacklo_epi8(b[0], b[1]), t1 = _mm_unpackhi_epi8(b[0], b[1]);
        const __m128i t2 = _mm_unpacklo_epi8(b[2], b[3]), t3 = _mm_unpackhi_epi8(b[2], b[3]);
        _mm_store_si128(reinterpret_cast<__m128i*>(quad), _mm_unpacklo_epi16(t0, t2));
        _mm_store_si128(reinterpret_cast<__m128i*>(quad + 4), _mm_unpackhi_epi16(t0, t2));
        _mm_store_si128(reinterpret_cast<__m128i*>(quad + 8), _mm_unpacklo_epi16(t1, t3));
        _mm_store_si128(reinterpret_cast<__m128i*>(quad + 12), _mm_unpackhi_epi16(t1, t3));
        for (int64_t p = 0; p < nw; ++p) std::memcpy(d + (w + p) * g.Cp + c, quad + p, 4);
      }
    }
  }
}

// ---- AVX2 (vpmaddubsw + vpmaddwd) ---------------------------------------------------------
#define AQD_T_AVX2 __attribute__((target("avx2,fma")))

// 3 pixels x 2 vectors (x 2 ymm halves of 8 channels) = 12 named accumulators
template <int P, int NV>
AQD_T_AVX2 void avx2_block(const uint8_t* const* px, const int8_t* w, int64_t w_vstride,
                           const int64_t* koff, int64_t KS, int32_t* out, int64_t out_stride) {
  static_assert(P <= 3 && NV <= 2, "the AVX2 block is at most 3 pixels x 2 vectors");
#define AQD_Z2(p, v) __m256i a##p##v##0 = _mm256_setzero_si256(), a##p##v##1 = a##p##v##0;
  AQD_Z2(0, 0) AQD_Z2(0, 1) AQD_Z2(1, 0) AQD_Z2(1, 1) AQD_Z2(2, 0) AQD_Z2(2, 1)
#undef AQD_Z2
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* x0 = px[0];
  const uint8_t* x1 = px[P > 1 ? 1 : 0];
  const uint8_t* x2 = px[P > 2 ? 2 : 0];
  for (int64_t kk = 0; kk < KS; ++kk) {
    const int8_t* wk = w + kk * 64;
    const __m256i w00 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk));
    const __m256i w01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32));
    const __m256i w10 = NV > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + w_vstride)) : w00;
    const __m256i w11 = NV > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + w_vstride + 32)) : w01;
    const int64_t off = koff[kk];
    // vpmaddubsw: u8 x s8 pairs summed in int16 (no saturation: <= 32512), vpmaddwd: -> int32
#define AQD_DOT(acc, xb, wv) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(xb, wv), ones))
#define AQD_ROW2(p)                                            \
  if (P > p) {                                                 \
    const __m256i xb = _mm256_set1_epi32(load4(x##p + off));   \
    AQD_DOT(a##p##00, xb, w00);                                \
    AQD_DOT(a##p##01, xb, w01);                                \
    if (NV > 1) {                                              \
      AQD_DOT(a##p##10, xb, w10);                              \
      AQD_DOT(a##p##11, xb, w11);                              \
    }                                                          \
  }
    AQD_ROW2(0) AQD_ROW2(1) AQD_ROW2(2)
#undef AQD_ROW2
#undef AQD_DOT
  }
#define AQD_S2(p, v)                                                                          \
  if (P > p && NV > v) {                                                                      \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * out_stride + v * kLanes), a##p##v##0); \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * out_stride + v * kLanes + 8), a##p##v##1); \
  }
  AQD_S2(0, 0) AQD_S2(0, 1) AQD_S2(1, 0) AQD_S2(1, 1) AQD_S2(2, 0) AQD_S2(2, 1)
#undef AQD_S2
}

AQD_T_AVX2 void epilogue_avx2(const int32_t* acc, int64_t np, int64_t acc_stride,
                              const int32_t* corr, const float* sc, const float* bi,
                              const float* sh, int64_t O, float* y) {
  for (int64_t p = 0; p < np; ++p) {
    const int32_t* a = acc + p * acc_stride;
    float* yo = y + p * O;
    const float s = sh != nullptr ? static_cast<float>(a[O] - corr[O]) : 0.f;
    const __m256 sv = _mm256_set1_ps(s);
    int64_t o = 0;
    for (; o + 8 <= O; o += 8) {
      const __m256i ai = _mm256_sub_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + o)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + o)));
      __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), _mm256_loadu_ps(sc + o),
                                 _mm256_loadu_ps(bi + o));
      if (sh != nullptr) v = _mm256_fmadd_ps(sv, _mm256_loadu_ps(sh + o), v);
      _mm256_storeu_ps(yo + o, v);
    }
    for (; o < O; ++o) {  // tail: the same single-rounding fma (hardware, target "fma")
      float v = std::fma(static_cast<float>(a[o] - corr[o]), sc[o], bi[o]);
      if (sh != nullptr) v = std::fma(s, sh[o], v);
      yo[o] = v;
    }
  }
}

// P x NV dispatch to the template instances: VNNI P in 1..6, NV in 1..4; AVX2 at most 3
// pixels x 2 vectors per pass (12 of its 16 ymm registers accumulate).
#define AQD_I8_CASES(FN, MAXP, MAXV)                                                         \
  do {                                                                                       \
    for (int p0 = 0; p0 < P; p0 += MAXP) {                                                   \
      const int pp = P - p0 < MAXP ? P - p0 : MAXP;                                          \
      for (int v0 = 0; v0 < NV; v0 += MAXV) {                                                \
        const int vv = NV - v0 < MAXV ? NV - v0 : MAXV;                                      \
        const int8_t* wb = w + v0 * w_vstride;                                               \
        int32_t* ob = out + p0 * out_stride + v0 * kLanes;                                   \
        switch (pp * 8 + vv) {                                                               \
          AQD_I8_P(FN, 1) AQD_I8_P(FN, 2) AQD_I8_P(FN, 3) AQD_I8_P(FN, 4) AQD_I8_P(FN, 5)      \
          AQD_I8_P(FN, 6)                                                                    \
        }                                                                                    \
      }                                                                                      \
    }                                                                                        \
  } while (0)
#define AQD_I8_PV(FN, PP, VV) \
  case PP * 8 + VV: FN<PP, VV>(px + p0, wb, w_vstride, koff, KS, ob, out_stride); break;
#define AQD_I8_P(FN, PP) \
  AQD_I8_PV(FN, PP, 1) AQD_I8_PV(FN, PP, 2) AQD_I8_PV(FN, PP, 3) AQD_I8_PV(FN, PP, 4)

AQD_T_VNNI void micro_vnni(const uint8_t* const* px, int P, const int8_t* w, int64_t w_vstride,
                           int NV, const int64_t* koff, int64_t KS, int32_t* out,
                           int64_t out_stride) {
  AQD_I8_CASES(vnni_block, 6, 4);
}

AQD_T_AVX2 void micro_avx2(const uint8_t* const* px, int P, const int8_t* w, int64_t w_vstride,
                           int NV, const int64_t* koff, int64_t KS, int32_t* out,
                           int64_t out_stride) {
  for (int p0 = 0; p0 < P; p0 += 3) {
    const int pp = P - p0 < 3 ? P - p0 : 3;
    for (int v0 = 0; v0 < NV; v0 += 2) {
      const int vv = NV - v0 < 2 ? NV - v0 : 2;
      const int8_t* wb = w + v0 * w_vstride;
      int32_t* ob = out + p0 * out_stride + v0 * kLanes;
      switch (pp * 8 + vv) {
        AQD_I8_PV(avx2_block, 1, 1) AQD_I8_PV(avx2_block, 1, 2) AQD_I8_PV(avx2_block, 2, 1)
        AQD_I8_PV(avx2_block, 2, 2) AQD_I8_PV(avx2_block, 3, 1) AQD_I8_PV(avx2_block, 3, 2)
      }
    }
  }
}
#endif  // AQD_I8_X86

}  // namespace

bool int8_generic_kernel(Int8Kernels* out) {
  *out = {micro_generic, epilogue_generic, nullptr};
  return true;
}

#ifdef AQD_I8_X86
bool int8_avx2_kernel(Int8Kernels* out) {
  *out = {micro_avx2, epilogue_avx2, nullptr};
  return true;
}
bool int8_avx512vnni_kernel(Int8Kernels* out) {
  *out = {micro_vnni, epilogue_avx512, pack_float_avx512};
  return true;
}
#else
bool int8_avx2_kernel(Int8Kernels*) { return false; }
bool int8_avx512vnni_kernel(Int8Kernels*) { return false; }
#endif

}  // namespace aqd_i8
