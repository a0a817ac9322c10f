// Per-element logit transforms (docs/methods.md §2, §3, §5), written once for CPU, CUDA and the emulator.
//
// linear:   z = S (r c + b + t beta - pert - m [target])          dz/dc = S r
// angular:  M = m [target] + |eta| (GCLAng cloud angle), phi = c cos M - sqrt(1 - c^2) sin M,
//           z = S * (phi or its fallback)                         dz/dc = S dphi/dc
// The fallbacks follow the official code: ArcFace uses c - sin(pi - m) m below cos(pi - m); GCLAng uses
// c - sin(pi - M); the easy-margin variants keep c when c <= 0.
#pragma once

#include <cmath>

#include "ltk/hd.h"
#include "ltk/margin_ce.h"

namespace ltk {

template <typename acc_t>
struct ElemOut {
  acc_t z;
  acc_t dzdc;
};

// The trigonometry of an angular margin M (and ArcFace's fallback margin m) for angular_logit_with: the
// same for every column that shares M, so a kernel can compute it once per row.
template <typename acc_t>
struct AngularConsts {
  acc_t cosM, sinM;
  acc_t threshold;  // cos(pi - M): phi applies above it (the non-easy modes)
  acc_t fallback;   // subtracted from c below it: ArcFace sin(pi - m) m, GCLAng sin(pi - M)
};

template <typename acc_t>
LTK_HD AngularConsts<acc_t> angular_consts(acc_t M, acc_t m_for_fallback, int mode) {
  AngularConsts<acc_t> k;
  k.cosM = ::cos(M);
  k.sinM = ::sin(M);
  k.threshold = k.fallback = acc_t(0);
  if (mode != kArcFaceEasy && mode != kGclAngEasy) {
    const acc_t pi = acc_t(3.14159265358979323846);
    k.threshold = ::cos(pi - M);
    // ArcFace: c - sin(pi - m) m ; GCLAng: c - sin(pi - M)  (docs/methods.md §2, §5)
    k.fallback = (mode == kArcFace) ? ::sin(pi - m_for_fallback) * m_for_fallback : ::sin(pi - M);
  }
  return k;
}

// Angular margin applied to cosine c (ArcFace clamps c to [-1, 1] first, GCLAng does not), its trigonometry
// precomputed. The derivative of sqrt(1 - c^2) is guarded: at |c| = 1 the sine is 0 and its derivative
// -c/sin is taken as 0 (ltkernels.reference._safe_sqrt does the same), so gradients stay finite at the poles.
template <typename acc_t>
LTK_HD ElemOut<acc_t> angular_logit_with(acc_t c_in, const AngularConsts<acc_t>& k, int mode, acc_t S) {
  const bool arc = (mode == kArcFace || mode == kArcFaceEasy);
  // torch.clamp passes no gradient at or beyond its bounds; neither do we
  const bool clamped = arc && (c_in >= acc_t(1) || c_in <= acc_t(-1));
  const acc_t c = !arc ? c_in : (c_in > acc_t(1) ? acc_t(1) : (c_in < acc_t(-1) ? acc_t(-1) : c_in));
  const acc_t one_minus = acc_t(1) - c * c;
  const acc_t sine = ltk_sqrt<acc_t>(one_minus > acc_t(0) ? one_minus : acc_t(0));
  const acc_t phi = c * k.cosM - sine * k.sinM;
  // d sqrt(1 - c^2)/dc = -c / sine where sine > 0, and 0 at the poles (the reference's convention)
  const acc_t dphi = sine > acc_t(0) ? k.cosM + c / sine * k.sinM : k.cosM;
  const bool easy = (mode == kArcFaceEasy || mode == kGclAngEasy);
  const bool use_phi = easy ? c > acc_t(0) : c > k.threshold;
  const acc_t alt = easy ? c : c - k.fallback;
  ElemOut<acc_t> o;
  o.z = S * (use_phi ? phi : alt);
  // On and outside the bounds the clamp makes the output constant in c.
  o.dzdc = clamped ? acc_t(0) : S * (use_phi ? dphi : acc_t(1));
  return o;
}

template <typename acc_t>
LTK_HD ElemOut<acc_t> angular_logit(acc_t c_in, acc_t M, acc_t m_for_fallback, int mode, acc_t S) {
  return angular_logit_with<acc_t>(c_in, angular_consts<acc_t>(M, m_for_fallback, mode), mode, S);
}

// Raw cloud noise eps_ij (the N(0, 1/3) draw before clamp and abs) from a standard normal.
template <typename acc_t>
LTK_HD acc_t scale_noise(float standard_normal) {
  return acc_t(standard_normal) * acc_t(1.0 / 3.0);
}

// Cloud perturbation of column j from the raw draw eps: linear mode subtracts
// noise_mul |clamp(eps, -1, 1)| delta_j from the cosine; GCLAng adds (pi/2) epsilon delta_j |clamp(eps)| to
// the angle (|eta| of docs/methods.md §2, epsilon >= 0).
template <typename scalar_t, typename acc_t>
LTK_HD acc_t cloud_perturbation(const MarginCeArgs<scalar_t, acc_t>& a, int64_t j, acc_t eps) {
  eps = eps > acc_t(1) ? acc_t(1) : (eps < acc_t(-1) ? acc_t(-1) : eps);
  const acc_t k = a.angular == kLinear ? a.noise_mul : acc_t(1.5707963267948966) * a.angular_eps;
  return k * (eps < acc_t(0) ? -eps : eps) * a.cloud[j];
}

// z_ij and dz_ij/dc_ij for one element of row i (target y, row scale S, row shift t, perturbation pert).
template <typename scalar_t, typename acc_t>
LTK_HD ElemOut<acc_t> element_logit(const MarginCeArgs<scalar_t, acc_t>& a, int64_t j, int64_t y, acc_t S,
                                    acc_t t, acc_t pert, acc_t c) {
  const bool tgt = (j == y);
  if (a.angular == kLinear) {
    const acc_t r = a.col_scale ? a.col_scale[j] : acc_t(1);
    acc_t x = r * c;
    if (a.col_bias) x += a.col_bias[j];
    if (a.shift_coef) x += t * a.shift_coef[j];
    x -= pert;
    if (tgt && a.margin) x -= a.margin[y];
    return ElemOut<acc_t>{S * x, S * r};
  }
  const acc_t m = (tgt && a.margin) ? a.margin[y] : acc_t(0);
  const acc_t M = m + pert;
  if (!tgt && M == acc_t(0)) {
    // no angle to add: ArcFace still clamps the cosine to [-1, 1] (no gradient at or beyond the bounds)
    const bool out = arcface_clamps(a.angular) && (c >= acc_t(1) || c <= acc_t(-1));
    return ElemOut<acc_t>{S * (out ? (c > acc_t(0) ? acc_t(1) : acc_t(-1)) : c), out ? acc_t(0) : S};
  }
  return angular_logit<acc_t>(c, M, m, a.angular, S);
}

}  // namespace ltk
