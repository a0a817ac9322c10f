// AVX-512 version of the cloud's normal generator: philox::normal4 for 16 groups of four columns at once,
// written with intrinsics because GCC's auto-vectorisation of the scalar code spends most of its time
// splitting the 32x32->64-bit multiplies and interleaving the outputs. Every float operation is the
// scalar one (same order, separate multiply and add, IEEE division and square root), so the bits equal
// philox::normal4's, which the CUDA kernel and the emulator use (tested against it for every lane).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "ltk/philox.h"

namespace ltk {
namespace cpu {
namespace avx512 {

// (hi, lo) 32-bit halves of the 64-bit products a * m, lane by lane (16 lanes).
// The odd lanes reach the multiplier through in-lane shuffles (port 5) rather than 64-bit shifts, which
// would compete with the multiplies for port 0.
inline void mul_hi_lo(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                                     // lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_CDAB), m);  // lanes 1, 3, ...
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_shuffle_epi32(even, _MM_PERM_CDAB), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_shuffle_epi32(odd, _MM_PERM_CDAB));
}

inline __m512 uniform_open(__m512i x) {
  const __m512 f = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 8));  // < 2^24: exact
  return _mm512_add_ps(_mm512_mul_ps(f, _mm512_set1_ps(5.9604644775390625e-08f)),
                       _mm512_set1_ps(2.98023223876953125e-08f));
}

inline __m512 poly_step(__m512 p, __m512 x, float c) {
  return _mm512_add_ps(_mm512_mul_ps(p, x), _mm512_set1_ps(c));
}

inline __m512 log_unit(__m512 u) {
  const __m512i b = _mm512_castps_si512(u);
  __m512i e = _mm512_sub_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 23), _mm512_set1_epi32(0xff)),
                               _mm512_set1_epi32(127));
  const __m512 m1 = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f800000)));
  const __mmask16 fold = _mm512_cmp_ps_mask(m1, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  const __m512 m = _mm512_mask_mul_ps(m1, fold, m1, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_epi32(e, fold, e, _mm512_set1_epi32(1));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 s = _mm512_div_ps(_mm512_sub_ps(m, one), _mm512_add_ps(m, one));
  const __m512 s2 = _mm512_mul_ps(s, s);
  __m512 p = _mm512_set1_ps(0.11111111f);
  p = poly_step(p, s2, 0.14285714f);
  p = poly_step(p, s2, 0.2f);
  p = poly_step(p, s2, 0.33333333f);
  p = poly_step(p, s2, 1.0f);
  const __m512 lnm = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f), s), p);
  return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(0.693147180559945f)), lnm);
}

// With kAbs, |sin| and |cos| only (GCL uses |eps|): the quadrant then only decides whether the two
// polynomials swap, and no sign is applied; the magnitudes are bit for bit those of the signed version.
template <bool kAbs = false>
inline void sincos_2pi(__m512 t, __m512& s, __m512& c) {
  const __m512 q4 = _mm512_mul_ps(t, _mm512_set1_ps(4.0f));
  const __m512i qi = _mm512_cvttps_epi32(_mm512_add_ps(q4, _mm512_set1_ps(0.5f)));
  const __m512 qf = _mm512_cvtepi32_ps(qi);
  const __m512i q = _mm512_and_si512(qi, _mm512_set1_epi32(3));
  const __m512 r = _mm512_sub_ps(q4, qf);
  const __m512 x = _mm512_mul_ps(r, _mm512_set1_ps(1.57079632679489662f));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 sp = _mm512_set1_ps(-1.9841270e-4f);
  sp = poly_step(sp, x2, 8.3333333e-3f);
  sp = poly_step(sp, x2, -1.6666667e-1f);
  sp = poly_step(sp, x2, 1.0f);
  const __m512 sx = _mm512_mul_ps(sp, x);
  __m512 cp = _mm512_set1_ps(2.4801587e-5f);
  cp = poly_step(cp, x2, -1.3888889e-3f);
  cp = poly_step(cp, x2, 4.1666667e-2f);
  cp = poly_step(cp, x2, -0.5f);
  const __m512 cx = poly_step(cp, x2, 1.0f);
  if constexpr (kAbs) {
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
    const __mmask16 odd = _mm512_test_epi32_mask(qi, _mm512_set1_epi32(1));  // quadrants 1 and 3 swap
    s = _mm512_andnot_ps(sign, _mm512_mask_blend_ps(odd, sx, cx));
    c = _mm512_andnot_ps(sign, _mm512_mask_blend_ps(odd, cx, sx));
    return;
  }
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  const __m512 nsx = _mm512_xor_ps(sx, sign), ncx = _mm512_xor_ps(cx, sign);
  const __mmask16 q1 = _mm512_cmpeq_epi32_mask(q, _mm512_set1_epi32(1));
  const __mmask16 q2 = _mm512_cmpeq_epi32_mask(q, _mm512_set1_epi32(2));
  const __mmask16 q3 = _mm512_cmpeq_epi32_mask(q, _mm512_set1_epi32(3));
  // angle = q pi/2 + x: (s, c) = (sx, cx), (cx, -sx), (-sx, -cx), (-cx, sx)
  s = _mm512_mask_mov_ps(_mm512_mask_mov_ps(_mm512_mask_mov_ps(sx, q1, cx), q2, nsx), q3, ncx);
  c = _mm512_mask_mov_ps(_mm512_mask_mov_ps(_mm512_mask_mov_ps(cx, q1, nsx), q2, ncx), q3, sx);
}

// Counters and keys of one row; block(k) gives the normals of groups [k, k + 16) as four vectors of 16
// consecutive columns (4k .. 4k + 63).
struct PhiloxRow {
  __m512i c1, c2, c3, keys0[10], keys1[10];

  PhiloxRow(uint64_t seed, uint64_t offset, uint64_t row) {
    constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
    c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>((row >> 32) ^ (offset >> 32))));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r, k0 += W0, k1 += W1) {
      keys0[r] = _mm512_set1_epi32(static_cast<int>(k0));
      keys1[r] = _mm512_set1_epi32(static_cast<int>(k1));
    }
  }

  // kAbs: the magnitudes |normal| (bit for bit those of the signed normals).
  template <bool kAbs = false>
  void block(int64_t k, __m512& o0, __m512& o1, __m512& o2, __m512& o3) const {
    const __m512i vM0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
    const __m512i vM1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(k))), lane);
    __m512i x1 = c1, x2 = c2, x3 = c3;
    for (int r = 0; r < 10; ++r) {
      __m512i hi0, lo0, hi1, lo1;
      mul_hi_lo(x0, vM0, hi0, lo0);
      mul_hi_lo(x2, vM1, hi1, lo1);
      x0 = _mm512_ternarylogic_epi32(hi1, x1, keys0[r], 0x96);  // three-way xor
      x1 = lo1;
      x2 = _mm512_ternarylogic_epi32(hi0, x3, keys1[r], 0x96);
      x3 = lo0;
    }
    const __m512 r0 = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log_unit(uniform_open(x0))));
    const __m512 r1 = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log_unit(uniform_open(x2))));
    __m512 s0, co0, s1, co1;
    sincos_2pi<kAbs>(uniform_open(x1), s0, co0);
    sincos_2pi<kAbs>(uniform_open(x3), s1, co1);
    const __m512 v0 = _mm512_mul_ps(r0, co0), v1 = _mm512_mul_ps(r0, s0);
    const __m512 v2 = _mm512_mul_ps(r1, co1), v3 = _mm512_mul_ps(r1, s1);
    // 4 x 16 transpose: output vector m holds groups 4m..4m+3, each as (v0, v1, v2, v3)
    const __m512 a = _mm512_unpacklo_ps(v0, v1), b = _mm512_unpackhi_ps(v0, v1);
    const __m512 c = _mm512_unpacklo_ps(v2, v3), d = _mm512_unpackhi_ps(v2, v3);
    const __m512 g0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
    const __m512 g1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(c)));
    const __m512 g2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
    const __m512 g3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b), _mm512_castps_pd(d)));
    // g0: groups 0, 4, 8, 12 (one per 128-bit block); g1: 1, 5, 9, 13; g2: 2, 6, ...; g3: 3, 7, ...
    const __m512 t0 = _mm512_shuffle_f32x4(g0, g1, 0x44), t1 = _mm512_shuffle_f32x4(g2, g3, 0x44);
    const __m512 t2 = _mm512_shuffle_f32x4(g0, g1, 0xEE), t3 = _mm512_shuffle_f32x4(g2, g3, 0xEE);
    o0 = _mm512_shuffle_f32x4(t0, t1, 0x88);
    o1 = _mm512_shuffle_f32x4(t0, t1, 0xDD);
    o2 = _mm512_shuffle_f32x4(t2, t3, 0x88);
    o3 = _mm512_shuffle_f32x4(t2, t3, 0xDD);
  }
};

// Standard normals of one row, groups [0, groups) of four columns, into out[4 * groups].
inline void fill_row_normals(uint64_t seed, uint64_t offset, uint64_t row, int64_t groups, float* out) {
  const PhiloxRow pr(seed, offset, row);
  int64_t k = 0;
  for (; k + 16 <= groups; k += 16) {
    __m512 o0, o1, o2, o3;
    pr.block(k, o0, o1, o2, o3);
    float* o = out + 4 * k;
    _mm512_storeu_ps(o, o0);
    _mm512_storeu_ps(o + 16, o1);
    _mm512_storeu_ps(o + 32, o2);
    _mm512_storeu_ps(o + 48, o3);
  }
  philox::normals_groups(seed, offset, row, k, groups, out + 4 * k);
}

// The cloud offsets q_j = -(noise_mul |clamp(n_j / 3, -1, 1)|) delta_j of the columns [j0, C) past a row's
// last whole block of 64 (fewer than 64: their at most 16 groups one by one) into q[j - j0], with the scalar
// operations of ltk::scale_noise and ltk::cloud_perturbation.
inline void cloud_offsets_tail(uint64_t seed, uint64_t offset, uint64_t row, int64_t j0, int64_t C, float noise_mul,
                               const float* delta, float* q) {
  alignas(64) float n[64];
  philox::normals_groups(seed, offset, row, j0 / 4, (C + 3) / 4, n);
  const float third = static_cast<float>(1.0 / 3.0);
  for (int64_t j = j0; j < C; ++j) {
    float eps = n[j - j0] * third;
    eps = eps > 1.0f ? 1.0f : (eps < -1.0f ? -1.0f : eps);
    q[j - j0] = -(noise_mul * (eps < 0.0f ? -eps : eps) * delta[j]);
  }
}

// GCL's pass 1 (float accumulation) straight from the generator: z_j = (c_j + q_j) S with the cloud offsets
// q_j above, stored for j < C and -inf up to the next multiple of 16; returns the lane-wise max. The
// operations are those of the general path (offsets, then logits_row), so the bits are too; the offsets
// never leave registers, which saved 9-10% of a GCL call at 512 x 8142 (no row-sized store and reload).
inline __m512 cloud_logits_row(uint64_t seed, uint64_t offset, uint64_t row, int64_t C, float noise_mul,
                               const float* delta, const float* c, float S, float* z) {
  const PhiloxRow pr(seed, offset, row);
  const __m512 third = _mm512_set1_ps(static_cast<float>(1.0 / 3.0)), one = _mm512_set1_ps(1.0f);
  // -(k a) d = (-k) a d exactly (rounding to nearest is symmetric), so the negation is folded into k
  const __m512 neg_k = _mm512_set1_ps(-noise_mul), vS = _mm512_set1_ps(S);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = ninf;
  auto logits = [&](__m512 n_abs, int64_t j) {
    const __m512 a = _mm512_min_ps(_mm512_mul_ps(n_abs, third), one);  // |clamp(eps, -1, 1)|
    const __m512 q = _mm512_mul_ps(_mm512_mul_ps(neg_k, a), _mm512_loadu_ps(delta + j));
    const __m512 zv = _mm512_mul_ps(_mm512_add_ps(_mm512_loadu_ps(c + j), q), vS);
    _mm512_storeu_ps(z + j, zv);
    vmax = _mm512_max_ps(vmax, zv);
  };
  int64_t j = 0;
  for (; j + 64 <= C; j += 64) {
    __m512 o0, o1, o2, o3;
    pr.block</*kAbs=*/true>(j / 4, o0, o1, o2, o3);
    logits(o0, j);
    logits(o1, j + 16);
    logits(o2, j + 32);
    logits(o3, j + 48);
  }
  if (j < C) {
    alignas(64) float q[64];
    const int64_t j0 = j;
    cloud_offsets_tail(seed, offset, row, j0, C, noise_mul, delta, q);
    for (; j < C; j += 16) {
      const int64_t n = std::min<int64_t>(16, C - j);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + j), _mm512_maskz_loadu_ps(m, q + (j - j0)));
      const __m512 zv = _mm512_mask_blend_ps(m, ninf, _mm512_mul_ps(x, vS));
      _mm512_storeu_ps(z + j, zv);
      vmax = _mm512_max_ps(vmax, zv);
    }
  }
  return vmax;
}

}  // namespace avx512
}  // namespace cpu
}  // namespace ltk
