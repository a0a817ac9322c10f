// Counter-based Gaussian noise for the Gaussian cloud (GCL): a pure function of (seed, offset, row, col).
//
// Philox4x32-10 (Salmon et al., SC'11) maps key = seed and counter = (col / 4, offset, row) to four
// 32-bit words; Box-Muller turns them into four N(0, 1) values, one per column of the group of four.
// Every float operation below is spelled out (no libm, explicit rounding-mode intrinsics on the device,
// -ffp-contract=off on the host) so that the CPU kernels, the CUDA kernels and the SIMT emulator
// produce identical bits for the same (seed, offset).
#pragma once

#include <cstdint>

#include "ltk/hd.h"

namespace ltk {
namespace philox {

#if defined(__CUDA_ARCH__)
LTK_HD float fmul(float a, float b) { return __fmul_rn(a, b); }
LTK_HD float fadd(float a, float b) { return __fadd_rn(a, b); }
LTK_HD float fsub(float a, float b) { return __fsub_rn(a, b); }
LTK_HD float fdiv(float a, float b) { return __fdiv_rn(a, b); }
LTK_HD float fsqrt(float a) { return __fsqrt_rn(a); }
LTK_HD uint32_t mulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
#else
LTK_HD float fmul(float a, float b) { return a * b; }
LTK_HD float fadd(float a, float b) { return a + b; }
LTK_HD float fsub(float a, float b) { return a - b; }
LTK_HD float fdiv(float a, float b) { return a / b; }
LTK_HD float fsqrt(float a) { return __builtin_sqrtf(a); }
LTK_HD uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}
#endif

LTK_HD float bits_to_float(uint32_t u) {
  union {
    uint32_t u;
    float f;
  } v;
  v.u = u;
  return v.f;
}
LTK_HD uint32_t float_to_bits(float f) {
  union {
    uint32_t u;
    float f;
  } v;
  v.f = f;
  return v.u;
}

struct Block4 {
  uint32_t x0, x1, x2, x3;
};

// Philox4x32 with 10 rounds.
LTK_HD Block4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi(M0, c0), lo0 = M0 * c0;
    const uint32_t hi1 = mulhi(M1, c2), lo1 = M1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += W0;
    k1 += W1;
  }
  return Block4{c0, c1, c2, c3};
}

// Uniform in (0, 1): 24 random bits, centred in their cell, so never 0 or 1.
LTK_HD float uniform_open(uint32_t x) {
  return fadd(fmul(static_cast<float>(x >> 8), 5.9604644775390625e-08f), 2.98023223876953125e-08f);
}

// Natural log for u in (0, 1]: u = 2^e m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s), s = (m-1)/(m+1).
LTK_HD float log_unit(float u) {
  uint32_t b = float_to_bits(u);
  int e = static_cast<int>((b >> 23) & 0xffu) - 127;
  const float m1 = bits_to_float((b & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  // branch-free so that the CPU loop vectorises: fold [sqrt 2, 2) onto [sqrt 1/2, 1)
  const bool fold = m1 > 1.41421356f;
  const float m = fold ? fmul(m1, 0.5f) : m1;
  e += fold ? 1 : 0;
  const float s = fdiv(fsub(m, 1.0f), fadd(m, 1.0f));
  const float s2 = fmul(s, s);
  // 2 (s + s^3/3 + s^5/5 + s^7/7 + s^9/9), |s| <= 0.1716
  float p = 0.11111111f;
  p = fadd(fmul(p, s2), 0.14285714f);
  p = fadd(fmul(p, s2), 0.2f);
  p = fadd(fmul(p, s2), 0.33333333f);
  p = fadd(fmul(p, s2), 1.0f);
  const float lnm = fmul(fmul(2.0f, s), p);
  return fadd(fmul(static_cast<float>(e), 0.693147180559945f), lnm);
}

// sin and cos of 2 pi t for t in [0, 1): quadrant from 4t, Taylor polynomials on [-pi/4, pi/4].
struct SinCos {
  float s, c;
};
LTK_HD SinCos sincos_2pi(float t) {
  const float q4 = fmul(t, 4.0f);               // exact
  const float qf = static_cast<float>(static_cast<int>(fadd(q4, 0.5f)));  // nearest quadrant 0..4
  const int q = static_cast<int>(qf) & 3;
  const float r = fsub(q4, qf);                 // [-0.5, 0.5]
  const float x = fmul(r, 1.57079632679489662f);  // [-pi/4, pi/4]
  const float x2 = fmul(x, x);
  float sp = -1.9841270e-4f;                    // -1/7!
  sp = fadd(fmul(sp, x2), 8.3333333e-3f);       // 1/5!
  sp = fadd(fmul(sp, x2), -1.6666667e-1f);      // -1/3!
  sp = fadd(fmul(sp, x2), 1.0f);
  const float sx = fmul(sp, x);
  float cp = 2.4801587e-5f;                     // 1/8!
  cp = fadd(fmul(cp, x2), -1.3888889e-3f);      // -1/6!
  cp = fadd(fmul(cp, x2), 4.1666667e-2f);       // 1/4!
  cp = fadd(fmul(cp, x2), -0.5f);
  const float cx = fadd(fmul(cp, x2), 1.0f);
  // angle = q pi/2 + x
  const float s = (q == 0) ? sx : (q == 1) ? cx : (q == 2) ? -sx : -cx;
  const float c = (q == 0) ? cx : (q == 1) ? -sx : (q == 2) ? -cx : sx;
  return SinCos{s, c};
}

struct Normal4 {
  float v0, v1, v2, v3;
};

// Four standard normals for columns 4k..4k+3 of row `row` (returned by value, no stores through
// pointers, so the CPU loop over k vectorises).
LTK_HD Normal4 normal4(uint64_t seed, uint64_t offset, uint64_t row, uint64_t k) {
  // counter = (group, offset low, row low, row high ^ offset high): offsets >= 2^32 are new streams too
  const Block4 b = philox4x32_10(static_cast<uint32_t>(k), static_cast<uint32_t>(offset),
                                 static_cast<uint32_t>(row), static_cast<uint32_t>((row >> 32) ^ (offset >> 32)),
                                 static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float r0 = fsqrt(fmul(-2.0f, log_unit(uniform_open(b.x0))));
  const float r1 = fsqrt(fmul(-2.0f, log_unit(uniform_open(b.x2))));
  const SinCos a0 = sincos_2pi(uniform_open(b.x1));
  const SinCos a1 = sincos_2pi(uniform_open(b.x3));
  return Normal4{fmul(r0, a0.c), fmul(r0, a0.s), fmul(r1, a1.c), fmul(r1, a1.s)};
}

// One normal for (row, col); the CPU fills whole groups of four with normal4 instead.
LTK_HD float normal_at(uint64_t seed, uint64_t offset, uint64_t row, uint64_t col) {
  const Normal4 n = normal4(seed, offset, row, col >> 2);
  const uint64_t u = col & 3;
  return u == 0 ? n.v0 : u == 1 ? n.v1 : u == 2 ? n.v2 : n.v3;
}

#if !defined(__CUDACC__)
// Host: the normals of groups [k0, k1) of one row, group k's four at out[4 (k - k0)]. The body has no calls
// and no data-dependent branches, so `omp simd` vectorises it across groups.
inline void normals_groups(uint64_t seed, uint64_t offset, uint64_t row, int64_t k0, int64_t k1, float* out) {
#pragma omp simd
  for (int64_t k = k0; k < k1; ++k) {
    const Normal4 v = normal4(seed, offset, row, static_cast<uint64_t>(k));
    float* o = out + 4 * (k - k0);
    o[0] = v.v0;
    o[1] = v.v1;
    o[2] = v.v2;
    o[3] = v.v3;
  }
}
#endif

}  // namespace philox
}  // namespace ltk
