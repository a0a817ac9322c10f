// Per-vector math of the cosine classifier head (docs/methods.md §1.1), shared by the CPU kernels
// (cpu/cosine_head_cpu.cpp), the CUDA kernels (cuda/cosine_head_kernels.cuh) and the SIMT emulator.
//
// Forward:  c_ij = (x_i · w_j) / (max(|x_i|, eps) max(|w_j|, eps))          (F.normalize semantics)
// Backward: with u = x/|x|, A = dL/d(normalised vector) (a GEMM of the logit gradient):
//   |x| >= eps:  dL/dx = (A - (u·A) u) / |x|  =  inv (A - c x),   c = (x·A) / |x|^2,  inv = 1/|x|
//   |x| <  eps:  dL/dx = A / eps                                  (the clamp blocks the norm's gradient)
// When the GEMM was fed a logit gradient already divided by this vector's norm ("prescaled", A' = inv A)
// the same update reads dL/dx = A' - c' x with c' = (x·A') / |x|^2 and no further division.
// Every update is "g = alpha (g - c x)" with (alpha, c) from the helpers below; `s` is an optional
// global multiplier of the whole gradient (1 when absent).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ltk/hd.h"

namespace ltk {

// The type the math runs in for data of type T: float for the 16-bit types (their norms, dot products and
// epilogues accumulate in fp32, the GEMMs on them accumulate in fp32 too), T itself otherwise.
template <typename T>
struct CosineAcc {
  using type = T;
};
template <>
struct CosineAcc<c10::Half> {
  using type = float;
};
template <>
struct CosineAcc<c10::BFloat16> {
  using type = float;
};
template <typename T>
using cosine_acc_t = typename CosineAcc<T>::type;

// 1 / max(n, eps); NaN norms stay NaN (as clamp_min propagates NaN).
template <typename T>
LTK_HD T cosine_inv_norm(T n, T eps) {
  return T(1) / (n < eps ? eps : n);
}

// Coefficient of the radial component removed by the tangent projection: (x·g) / |x|^2 above the eps,
// 0 below it (no projection: the derivative of x / eps is 1 / eps).
template <typename T>
LTK_HD T cosine_tangent_coef(T n, T dot, T eps) {
  return n >= eps ? dot / (n * n) : T(0);
}

// Multiplier of the projected gradient: s when the GEMM input was prescaled, s / max(n, eps) otherwise.
template <typename T>
LTK_HD T cosine_tangent_alpha(T n, T eps, bool prescaled, T s) {
  return prescaled ? s : s * cosine_inv_norm(n, eps);
}

// g <- alpha (g - c x), the whole update for one element.
template <typename T>
LTK_HD T cosine_tangent_apply(T g, T x, T alpha, T c) {
  return alpha * (g - c * x);
}

}  // namespace ltk
