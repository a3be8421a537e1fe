// AVX2 variant (compiled with function target attributes, selected at run time on CPUs with
// AVX2 but without AVX512_VPOPCNTDQ).
//
// Popcount without a vector popcount instruction: a byte's bit count is the sum of the
// counts of its two nibbles, looked up in a 16-entry table with vpshufb (the lookup method
// of Mula, Kurz and Lemire, "Faster population counts using AVX2 instructions", 2016,
// Sec. 2 / Fig. 4). Applied to popcount(x ^ w) it costs 8 vector ops per 256 bits (xor,
// 2 and, shift, 2 shuffles, 2 adds). Here the nibble split is hoisted out of the dot
// product: since (x ^ w) & 0x0F.. = (x & 0x0F..) ^ (w & 0x0F..) (and likewise for the high
// nibbles shifted down), each conv_row call first splits the 16-channel weight block and
// the input rows it reads into low-nibble and high-nibble words (scratch, once per word),
// and the dot product then costs 6 ops per 256 bits: 2 xor, 2 vpshufb, 2 vpaddb.
//
// Harley-Seal (Sec. 3 of the same paper: carry-save adders over blocks of words, one
// popcount per block) was measured too and is slower here: every output needs its own
// ones / twos / fours state and a popcount of each level at the end, which the 9 to 72 words
// of a 3x3 dot product (64 to 512 channels) do not amortize. An exact Harley-Seal kernel
// (8-word blocks, 1 pixel x 8 channels) ran at 0.78x / 0.84x / 0.90x the speed of the
// previous nibble-table kernel at 64 ch 56x56 / 128 ch 28x28 / 256 ch 14x14 and 0.83x at
// 512 ch 7x7, where this kernel runs at about 1.35x / 1.3x / 1.2x / 1.03x.
//
// Per-byte counts grow by at most 8 per word, so they are summed in 8-bit lanes for up to 31
// words (<= 248; chunks of equal length) and then folded with vpsadbw into int32 counts in
// channel order. Tile: 2 output pixels x the 16 channels of one weight block (8 byte
// counters); the weights are memory operands (L1 loads), the input words are broadcast per
// pixel and reused by the 4 channel vectors. The counts of the whole row go to scratch, then
// a vectorized epilogue converts and stores them 8 pixels x 8 channels at a time (8x8
// transpose for NCHW).
#include <cstdint>
#include <cstring>
#include <vector>

#include "binary_conv.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define AQD_T256 __attribute__((target("avx2,popcnt")))

namespace aqd_bconv {
namespace {

constexpr int kByteSteps = 31;  // words before the 8-bit counters must be folded (31 * 8 <= 255)
constexpr uint64_t kNib = 0x0F0F0F0F0F0F0F0FULL;

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
      // pixels contiguous per channel: the 8-pixel sign mask of channel c (vmovmskps) is byte
      // c of a 64-byte bit matrix; word i (pixel i) then gathers bit i of every byte: shift
      // it to bit 7 of its byte, vpmovmskb (2 shifts + 2 vpmovmskb per word)
      const int64_t plane = g.H * g.W;
      for (int64_t cw = 0; cw < CW; ++cw) {
        const int64_t c0 = cw * 64, cn = g.C - c0 < 64 ? g.C - c0 : 64;
        for (int64_t w0 = 0; w0 < g.W; w0 += 8) {
          const int64_t rem = g.W - w0;
          const int valid = static_cast<int>(rem < 8 ? rem : 8);
          const __m256i lm = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane);
          const float* s = x + ((n * g.C + c0) * g.H + h) * g.W + w0;
          alignas(32) uint8_t m[64];
          if (cn < 64) std::memset(m + cn, 0, static_cast<size_t>(64 - cn));
          for (int64_t c = 0; c < cn; ++c) {  // lanes past the row's end: not stored below
            const float* p = s + c * plane;
            const __m256 f = rem >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lm);
            m[c] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(f, zero, _CMP_GE_OQ)));
          }
          const __m256i m0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
          const __m256i m1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(m + 32));
          for (int i = 0; i < valid; ++i) {
            const __m128i sh = _mm_cvtsi32_si128(7 - i);  // bit i -> bit 7 of the same byte
            const uint32_t lo = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_sll_epi64(m0, sh)));
            const uint32_t hi = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_sll_epi64(m1, sh)));
            px0[(w0 + i) * CW + cw] = static_cast<uint64_t>(hi) << 32 | lo;
          }
        }
      }
    }
  }
}

// Nibble split of `count` words: dst[2 i] = src[i] & 0x0F.., dst[2 i + 1] = (src[i] >> 4) &
// 0x0F.. (input words: pairs, so that one pixel's two broadcasts share a cache line).
AQD_T256 void split_pairs(const uint64_t* src, uint64_t* dst, int64_t count) {
  const __m256i nib = _mm256_set1_epi64x(static_cast<long long>(kNib));
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i lo = _mm256_and_si256(v, nib);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi64(v, 4), nib);
    // interleave per 64-bit word: (lo0 hi0 lo1 hi1) (lo2 hi2 lo3 hi3)
    const __m256i a = _mm256_unpacklo_epi64(lo, hi), b = _mm256_unpackhi_epi64(lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i),
                        _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i + 4),
                        _mm256_permute2x128_si256(a, b, 0x31));
  }
  for (; i < count; ++i) {
    dst[2 * i] = src[i] & kNib;
    dst[2 * i + 1] = (src[i] >> 4) & kNib;
  }
}

// Nibble split of a weight block: for each step k, 16 low-nibble words then 16 high-nibble
// words (dst has 32 KS words), each 16 in the order (0 2 4 6)(1 3 5 7)(8 10 12 14)(9 11 13 15)
// of the block's channels: the 64-bit counts of vectors 2 h and 2 h + 1 then interleave into
// 8 int32 counts of channels 8 h .. 8 h + 7 in order with one shift and one or.
AQD_T256 void split_block(const uint64_t* wblk, uint64_t* dst, int64_t KS) {
  const __m256i nib = _mm256_set1_epi64x(static_cast<long long>(kNib));
  for (int64_t k = 0; k < KS; ++k) {
    const __m256i* src = reinterpret_cast<const __m256i*>(wblk + k * kOutBlock);
    __m256i* lo = reinterpret_cast<__m256i*>(dst + 32 * k);
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_loadu_si256(src + 2 * h), b = _mm256_loadu_si256(src + 2 * h + 1);
      // unpack: (c0 c4 c2 c6), (c1 c5 c3 c7); permute 64-bit lanes (0 2 1 3)
      const __m256i ev = _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(a, b), 0xD8);
      const __m256i od = _mm256_permute4x64_epi64(_mm256_unpackhi_epi64(a, b), 0xD8);
      _mm256_storeu_si256(lo + 2 * h, _mm256_and_si256(ev, nib));
      _mm256_storeu_si256(lo + 2 * h + 1, _mm256_and_si256(od, nib));
      _mm256_storeu_si256(lo + 4 + 2 * h, _mm256_and_si256(_mm256_srli_epi64(ev, 4), nib));
      _mm256_storeu_si256(lo + 4 + 2 * h + 1, _mm256_and_si256(_mm256_srli_epi64(od, 4), nib));
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

// Byte counts of one pixel x 16 channels for one step: A0..A3 += popcount per byte of
// (x ^ w) for the 4 channel vectors, from the split words (xr: the pixel's low / high nibble
// words, wl: the step's 8 split weight vectors): 2 broadcasts, then per vector and nibble
// half a vpxor (weight from memory), a vpshufb and a vpaddb (6 ops per 256 bits). Written as
// inline assembly because GCC's register allocation spilled accumulators of the 2-pixel loop
// (which needs 8 accumulators, the table and 3 temporaries: 12 of the 16 ymm registers).
#define AQD_NIB(W, B, C) \
  "vpxor " W ", " B ", %[t]\n\t" "vpshufb %[t], %[lut], %[t]\n\t" "vpaddb %[t], " C ", " C "\n\t"
#define AQD_STEP(xr, A0, A1, A2, A3)                                                        \
  do {                                                                                      \
    __m256i bl_, bh_, t_;                                                                   \
    asm("vpbroadcastq %[xl], %[bl]\n\t"                                                    \
        "vpbroadcastq %[xh], %[bh]\n\t"                                                    \
        AQD_NIB("%[w0]", "%[bl]", "%[c0]") AQD_NIB("%[w1]", "%[bl]", "%[c1]")               \
        AQD_NIB("%[w2]", "%[bl]", "%[c2]") AQD_NIB("%[w3]", "%[bl]", "%[c3]")               \
        AQD_NIB("%[w4]", "%[bh]", "%[c0]") AQD_NIB("%[w5]", "%[bh]", "%[c1]")               \
        AQD_NIB("%[w6]", "%[bh]", "%[c2]") AQD_NIB("%[w7]", "%[bh]", "%[c3]")               \
        : [c0] "+x"(A0), [c1] "+x"(A1), [c2] "+x"(A2), [c3] "+x"(A3),                       \
          [bl] "=&x"(bl_), [bh] "=&x"(bh_), [t] "=&x"(t_)                                   \
        : [lut] "x"(lut), [xl] "m"((xr)[0]), [xh] "m"((xr)[1]),                             \
          [w0] "m"(wl[0]), [w1] "m"(wl[1]), [w2] "m"(wl[2]), [w3] "m"(wl[3]),               \
          [w4] "m"(wl[4]), [w5] "m"(wl[5]), [w6] "m"(wl[6]), [w7] "m"(wl[7]));              \
  } while (0)

// Fold the byte counts of one pixel (c0..c3 = channel vectors in split_block order) into 16
// int32 counts in channel order: sums of the 8 bytes of each 64-bit lane (vpsadbw), even
// channels in the low and odd channels in the high 32-bit halves. Stored (first) or added.
AQD_T256 inline void fold(__m256i c0, __m256i c1, __m256i c2, __m256i c3, bool first, int32_t* cnt) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i s0 = _mm256_or_si256(_mm256_sad_epu8(c0, zero), _mm256_slli_epi64(_mm256_sad_epu8(c1, zero), 32));
  const __m256i s1 = _mm256_or_si256(_mm256_sad_epu8(c2, zero), _mm256_slli_epi64(_mm256_sad_epu8(c3, zero), 32));
  __m256i* c = reinterpret_cast<__m256i*>(cnt);
  _mm256_storeu_si256(c, first ? s0 : _mm256_add_epi32(_mm256_loadu_si256(c), s0));
  _mm256_storeu_si256(c + 1, first ? s1 : _mm256_add_epi32(_mm256_loadu_si256(c + 1), s1));
}

// Counts of 2 pixels (or 1: pixels == 1) x 16 channels over steps [k0, k1) (k1 - k0 <=
// kByteSteps) into cnt[r * 16 + c] (int32, channel c of the block; stored when first, else
// added). xs: split input (pairs), first word of pixel 0; ws: split weight block.
AQD_T256 void count_steps(const ConvGeom& g, const uint64_t* xs, const uint64_t* ws, int pixels,
                          int64_t k0, int64_t k1, bool first, int32_t* cnt) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const int64_t xstride = 2 * g.sw * g.CW;
  const int64_t* koff = g.koff;
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  if (pixels == 2) {
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i* wl = reinterpret_cast<const __m256i*>(ws + 32 * k);
      const long long* x0 = reinterpret_cast<const long long*>(xs + 2 * koff[k]);
      AQD_STEP(x0, a0, a1, a2, a3);
      AQD_STEP(x0 + xstride, b0, b1, b2, b3);
    }
    fold(b0, b1, b2, b3, first, cnt + kOutBlock);
  } else {
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i* wl = reinterpret_cast<const __m256i*>(ws + 32 * k);
      AQD_STEP(reinterpret_cast<const long long*>(xs + 2 * koff[k]), a0, a1, a2, a3);
    }
  }
  fold(a0, a1, a2, a3, first, cnt);
}
#undef AQD_STEP
#undef AQD_NIB

// Output of R <= 8 pixels (ow .. ow+R-1 of row oh) x the channels of block ob from their
// counts (cnt[r * 16 + c]): y = float(K - 2 * count) * alpha + bias (a multiply, then an
// add; counts and K - 2 count fit in int32, whose conversion to float rounds like the int64
// one).
AQD_T256 void epilogue(const ConvGeom& g, const int32_t* cnt, int R, const float* alpha,
                       const float* bias, float* y, int64_t n, int64_t oh, int64_t ob, int64_t ow) {
  const __m256i K = _mm256_set1_epi32(static_cast<int>(g.K));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int half = 0; half < 2; ++half) {
    const int64_t o0 = ob * kOutBlock + 8 * half;
    if (o0 >= g.O) break;
    const int64_t nvalid = g.O - o0 < 8 ? g.O - o0 : 8;
    const __m256 al = _mm256_loadu_ps(alpha + o0), bi = _mm256_loadu_ps(bias + o0);
    __m256 v[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      if (r < R) {
        const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cnt + r * kOutBlock + 8 * half));
        const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(K, _mm256_add_epi32(c, c)));
        v[r] = _mm256_add_ps(_mm256_mul_ps(d, al), bi);
      } else {
        v[r] = _mm256_setzero_ps();
      }
    }
    if (g.out_nhwc) {
      const __m256i cm = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nvalid)), lane);
      for (int r = 0; r < R; ++r) {
        float* dst = y + out_index(g, n, o0, oh, ow + r);
        if (nvalid == 8) _mm256_storeu_ps(dst, v[r]);
        else _mm256_maskstore_ps(dst, cm, v[r]);
      }
    } else {
      transpose8x8(v);  // v[j] = channel o0 + j at pixels ow .. ow + 7
      const __m256i pm = _mm256_cmpgt_epi32(_mm256_set1_epi32(R), lane);
      for (int64_t j = 0; j < nvalid; ++j) {
        float* dst = y + out_index(g, n, o0 + j, oh, ow);
        if (R == 8) _mm256_storeu_ps(dst, v[j]);
        else _mm256_maskstore_ps(dst, pm, v[j]);
      }
    }
  }
}

AQD_T256 void conv_row(const ConvGeom& g, const uint64_t* xp, const uint64_t* wp,
                       const float* alpha, const float* bias, float* y,
                       int64_t n, int64_t oh, int64_t ob) {
  // scratch: split weight block (32 KS words), the split input rows this output row reads
  // (rows oh * sh .. oh * sh + (KH - 1) dh, 2 words per packed word), the counts [OW][16]
  const int64_t row_words = g.Wp * g.CW;
  const int64_t in_words = ((g.KH - 1) * g.dh + 1) * row_words;
  thread_local std::vector<uint64_t> scratch;
  const size_t need = static_cast<size_t>(32 * g.KS + 2 * in_words + kOutBlock * g.OW / 2 + 1);
  if (scratch.size() < need) scratch.resize(need);
  uint64_t* ws = scratch.data();
  uint64_t* xs = ws + 32 * g.KS;
  int32_t* cnt = reinterpret_cast<int32_t*>(xs + 2 * in_words);
  split_block(wp + ob * g.KS * kOutBlock, ws, g.KS);
  split_pairs(xp + (n * g.Hp + oh * g.sh) * row_words, xs, in_words);
  const int64_t px = 2 * g.sw * g.CW;
  // chunks of at most kByteSteps steps, of equal length (fewer short passes)
  const int64_t chunks = (g.KS + kByteSteps - 1) / kByteSteps;
  const int64_t chunk = (g.KS + chunks - 1) / chunks;
  for (int64_t k0 = 0; k0 < g.KS; k0 += chunk) {
    const int64_t k1 = k0 + chunk < g.KS ? k0 + chunk : g.KS;
    int64_t ow = 0;
    for (; ow + 2 <= g.OW; ow += 2) count_steps(g, xs + ow * px, ws, 2, k0, k1, k0 == 0, cnt + ow * kOutBlock);
    if (ow < g.OW) count_steps(g, xs + ow * px, ws, 1, k0, k1, k0 == 0, cnt + ow * kOutBlock);
  }
  for (int64_t ow = 0; ow < g.OW; ow += 8) {
    const int R = static_cast<int>(g.OW - ow < 8 ? g.OW - ow : 8);
    epilogue(g, cnt + ow * kOutBlock, R, alpha, bias, y, n, oh, ob, ow);
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
