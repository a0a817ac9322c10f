// Per-element logit transforms (methods.md §2, §3, §5), written once for CPU, CUDA and the emulator.
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

template <typename acc_t>
LTK_HD acc_t ltk_sqrt(acc_t x) {
  return ::sqrt(x);
}
template <>
LTK_HD float ltk_sqrt<float>(float x) {
  return ::sqrtf(x);
}

// Angular margin M applied to cosine c (ArcFace clamps c to [-1, 1] first, GCLAng does not). The derivative
// of sqrt(1 - c^2) is guarded: at |c| = 1 the sine is 0 and its derivative -c/sin is taken as 0
// (ltkernels.reference._safe_sqrt does the same), so gradients stay finite at the poles.
template <typename acc_t>
LTK_HD ElemOut<acc_t> angular_logit(acc_t c_in, acc_t M, acc_t m_for_fallback, int mode, acc_t S) {
  const bool arc = (mode == kArcFace || mode == kArcFaceEasy);
  // torch.clamp passes no gradient at or beyond its bounds; neither do we
  const bool clamped = arc && (c_in >= acc_t(1) || c_in <= acc_t(-1));
  const acc_t c = !arc ? c_in : (c_in > acc_t(1) ? acc_t(1) : (c_in < acc_t(-1) ? acc_t(-1) : c_in));
  const acc_t cosM = ::cos(M), sinM = ::sin(M);
  const acc_t one_minus = acc_t(1) - c * c;
  const acc_t sine = ltk_sqrt<acc_t>(one_minus > acc_t(0) ? one_minus : acc_t(0));
  const acc_t phi = c * cosM - sine * sinM;
  // d sqrt(1 - c^2)/dc = -c / sine where sine > 0, and 0 at the poles (the reference's convention)
  const acc_t dphi = sine > acc_t(0) ? cosM + c / sine * sinM : cosM;
  const bool easy = (mode == kArcFaceEasy || mode == kGclAngEasy);
  bool use_phi;
  acc_t alt;
  if (easy) {
    use_phi = c > acc_t(0);
    alt = c;
  } else {
    const acc_t pi = acc_t(3.14159265358979323846);
    use_phi = c > ::cos(pi - M);
    // ArcFace: c - sin(pi - m) m ; GCLAng: c - sin(pi - M)  (methods.md §2, §5)
    alt = (mode == kArcFace) ? c - ::sin(pi - m_for_fallback) * m_for_fallback : c - ::sin(pi - M);
  }
  ElemOut<acc_t> o;
  o.z = S * (use_phi ? phi : alt);
  // On and outside the bounds the clamp makes the output constant in c.
  o.dzdc = clamped ? acc_t(0) : S * (use_phi ? dphi : acc_t(1));
  return o;
}

}  // namespace ltk
