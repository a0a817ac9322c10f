// Per-pair math of the hyperspherical uniformity regulariser (ltkernels.regularisers, docs/methods.md §6),
// shared by the CPU kernel (cpu/uniformity_cpu.cpp), the CUDA kernels (cuda/uniformity_kernels.cuh) and
// the SIMT emulator. RECONSTRUCTED FROM THE ABSTRACT of Gao et al. (CAAI TIT 2025): the formulas are not
// verified against the paper.
//
// Over normalised class weights w^_j (C x D) with squared norms n_j (1, or < 1 for a weight below the
// normalisation eps), the squared distance of a pair is d2 = n_j + n_k - 2 w^_j . w^_k (from the Gram
// tile), clamped below at dist_eps (1e-12 by default) so coincident vectors give finite values:
//   gaussian  U = log mean_{j != k} exp(-t d2)           per pair: exponent a = -t max(d2, dist_eps)
//   riesz     U = mean_{j != k} d2^(-s/2)   (= |w^_j - w^_k|^-s, MHE energy)
//   log       U = mean_{j != k} -log |w^_j - w^_k|  (= -0.5 log d2)
// For riesz / log the pair derivative p = dU_pair / d d2 is 0 where d2 was clamped (as torch.clamp_min's
// gradient below the bound). For the gaussian the derivative weight is exp(a - shift) for every pair; a
// clamped pair has w^_j ~ w^_k, so its contribution (w^_j - w^_k) to the gradient is ~0 anyway.
#pragma once

#include <cmath>

#include "ltk/hd.h"
#include "ltk/math.h"

namespace ltk {

// Kernel codes (ltkernels/regularisers.py: UNIFORMITY_KERNELS).
enum UniformityKernel : int { kUniGaussian = 0, kUniRiesz = 1, kUniLog = 2 };

// Squared distance from a Gram entry g = w^_j . w^_k and the squared norms (not clamped).
template <typename T>
LTK_HD T uni_raw_d2(T nj, T nk, T g) {
  return nj + nk - T(2) * g;
}

// max(d2, dist_eps) that keeps a NaN distance NaN (a NaN weight must make the regulariser NaN, as the
// eager reference's clamp_min does, not the finite value of a clamped pair).
template <typename T>
LTK_HD T uni_clamp_d2(T d2, T dist_eps) {
  return d2 < dist_eps ? dist_eps : d2;
}

// Gaussian exponent a = -t max(d2, dist_eps).
template <typename T>
LTK_HD T uni_gaussian_exponent(T d2, T t, T dist_eps) {
  return -t * uni_clamp_d2(d2, dist_eps);
}

// Riesz (s > 0) or log energy of one pair: f = value, p = d f / d d2 (0 where clamped).
template <typename T>
LTK_HD void uni_energy(int kernel, T d2, T s, T dist_eps, T& f, T& p) {
  const bool clamped = d2 < dist_eps;  // false for NaN, which propagates
  const T x = clamped ? dist_eps : d2;
  if (kernel == kUniLog) {
    f = T(-0.5) * ltk_log<T>(x);
    p = clamped ? T(0) : T(-0.5) / x;
    return;
  }
  T v;
  if (s == T(1)) {
    v = T(1) / ltk_sqrt<T>(x);
  } else if (s == T(2)) {
    v = T(1) / x;
  } else {
    v = ltk_pow<T>(x, T(-0.5) * s);
  }
  f = v;
  p = clamped ? T(0) : T(-0.5) * s * v / x;
}

}  // namespace ltk
