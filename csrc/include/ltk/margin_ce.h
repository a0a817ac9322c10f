// The fused "transform the logits, then softmax cross-entropy" row op: arguments and the per-row math
// shared by the CPU kernels, the CUDA kernels and the SIMT emulator.
//
// Per row i with target y = y_i (docs/methods.md §1.2, §2-§5):
//   S_i  = target_scale[y] if given, else scale
//   x_ij = r_j c_ij + b_j + t_i beta_j - noise_mul |clamp(eps_ij, -1, 1)| delta_j - m_y [j = y]
//   z_ij = S_i x_ij                                  (linear mode; angular modes: see angular.h)
//   loss_i, dloss_i/dz_ij from softmax cross-entropy with weights / focal / label smoothing,
// and the gradient written in the same pass, already divided by the reduction's denominator.
#pragma once

#include <cstdint>

#include "ltk/hd.h"
#include "ltk/margin_ce_args.h"
#include "ltk/math.h"

namespace ltk {

// The integer codes of the op's mode arguments, X(enumerator, Python name, value): the enums below and
// the tables of ltkernels._C.margin_ce_codes (ltkernels._ops.REDUCTIONS, FOCAL, ANGULAR) come from these.
#define LTK_REDUCTION_CODES(X) X(kReduceNone, none, 0) X(kReduceSum, sum, 1) X(kReduceMean, mean, 2) \
  X(kReduceBatchMean, batch_mean, 3)
#define LTK_FOCAL_CODES(X) X(kFocalOff, off, 0) X(kFocalDetached, detached, 1) X(kFocalFull, full, 2)
#define LTK_ANGULAR_CODES(X) X(kLinear, linear, 0) X(kArcFace, arcface, 1) X(kArcFaceEasy, arcface_easy, 2) \
  X(kGclAng, gclang, 3) X(kGclAngEasy, gclang_easy, 4)
#define LTK_CODE_ENUMERATOR(enumerator, name, value) enumerator = value,

enum Reduction : int { LTK_REDUCTION_CODES(LTK_CODE_ENUMERATOR) };
enum Focal : int { LTK_FOCAL_CODES(LTK_CODE_ENUMERATOR) };
enum Angular : int { LTK_ANGULAR_CODES(LTK_CODE_ENUMERATOR) };

// The scalars of a call that a device computes for itself (the kernels' prologue; ltk/margin_ce.h's
// MarginCeArgs points at them): nothing computed on a device is read back by the host.
template <typename acc_t>
struct MarginCeScalars {
  double inv_denom_d;   // 1 / the reduction's denominator, in double for the final sum
  acc_t inv_denom;      // the same in acc_t, for the gradient
  acc_t weight_sum;     // sum_j w_j (C when no weight): label smoothing's normaliser
  unsigned blocks_done; // blocks of the main kernel that finished (the last one reduces the row losses)
};

// Raw-pointer view of one call. Per-class vectors (length C) and row vectors (length N) are acc_t and
// contiguous; a null pointer means "absent" (r = 1, b = 0, m = 0, w = 1, t = 0, delta = 0).
template <typename scalar_t, typename acc_t>
struct MarginCeArgs {
  const scalar_t* input = nullptr;  // (N, C) row-major contiguous
  const int64_t* target = nullptr;  // (N,)
  // the vectors of ltk/margin_ce_args.h: col_scale, col_bias, margin, target_scale, weight, row_shift,
  // shift_coef, cloud (delta_j: the Gaussian cloud is active when non-null)
#define LTK_MCE_ARGS_POINTER(kind, name, len) const acc_t* name = nullptr;
  LTK_MARGIN_CE_VECTOR_ARGS(LTK_MCE_ARGS_POINTER, LTK_MCE_NOSEP)
#undef LTK_MCE_ARGS_POINTER
  const acc_t* noise = nullptr;       // injected raw N(0, 1/3) draw (N, C); null: Philox in-kernel
  acc_t scale = 1;
  acc_t noise_mul = 0;
  acc_t angular_eps = 0;  // GCLAng epsilon
  // The Philox key and counter offset of the cloud noise: the values, or, under CUDA graph capture, device
  // addresses read when the kernel runs (seed_ptr non-null: seed = *seed_ptr, offset = *offset_ptr +
  // offset_intragraph), the scheme of at::PhiloxCudaState, so that each replay draws fresh noise.
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  int angular = kLinear;
  int focal = kFocalOff;
  acc_t gamma = 0;
  int64_t ignore_index = -100;
  acc_t smoothing = 0;
  int reduction = kReduceMean;
  // Scalars in the kernel's memory (host memory on the CPU; on CUDA written by the prologue kernel, so that
  // no value computed on the device is read back on the host):
  const acc_t* inv_denom = nullptr;   // 1 / the reduction's denominator
  const acc_t* weight_sum = nullptr;  // sum_j w_j (C when no weight): label smoothing's normaliser
  int64_t N = 0;
  int64_t C = 0;
  // outputs
  acc_t* row_loss = nullptr;       // (N,) per-row loss before the reduction's division
  scalar_t* grad = nullptr;        // (N, C) d(reduced loss)/d input, or null when not requested
  acc_t* grad_row_shift = nullptr; // (N,) d(reduced loss)/d t_i, or null
  // CUDA only (null on the CPU, which reduces on the host): the reduced loss in the input dtype, (N,) for
  // reduction none, else one value written by the last block to finish (scalars->blocks_done counts them;
  // the prologue zeroes it), which adds the row losses up in a fixed order.
  scalar_t* loss_out = nullptr;
  MarginCeScalars<acc_t>* scalars = nullptr;
};

// The Philox (seed, offset) of a call, resolved where the kernel runs.
template <typename scalar_t, typename acc_t>
LTK_HD void philox_key(const MarginCeArgs<scalar_t, acc_t>& a, uint64_t& seed, uint64_t& offset) {
  if (a.seed_ptr) {
    seed = static_cast<uint64_t>(*a.seed_ptr);
    offset = static_cast<uint64_t>(*a.offset_ptr) + a.offset_intragraph;
  } else {
    seed = a.seed;
    offset = a.offset;
  }
}

LTK_HD bool arcface_clamps(int angular) { return angular == kArcFace || angular == kArcFaceEasy; }

// Per-row loss and gradient coefficients: dloss_i/dz_ij = a p_ij - b [j = y] - d w_j.
template <typename acc_t>
struct RowCoef {
  acc_t loss, a, b, d;
};

// lse: log-sum-exp of the row; z_t: the target's logit; sum_wz: sum_j w_j z_ij (only read when
// smoothing > 0); w_t: weight of the target class. The result is unchanged when lse, z_t and every z_ij of
// sum_wz are taken relative to one common shift, and the kernels pass them relative to the row's softmax
// shift (log sum_j exp(z_ij - shift), z_t - shift, sum_j w_j (z_ij - shift)): computed as absolute values,
// lse - z_t loses its log-sum-exp term to rounding once the logits share an offset much larger than it
// (1e30 + log 3 - 1e30 = 0), where PyTorch's log_softmax, which subtracts the max first, does not.
template <typename acc_t>
LTK_HD RowCoef<acc_t> row_coefficients(acc_t lse, acc_t z_t, acc_t sum_wz, acc_t w_t, acc_t weight_sum,
                                       acc_t smoothing, int64_t C, int focal, acc_t gamma) {
  RowCoef<acc_t> r;
  const acc_t nll = lse - z_t;
  if (focal == kFocalOff) {
    const acc_t keep = acc_t(1) - smoothing;
    const acc_t d = smoothing / acc_t(C);
    r.loss = keep * w_t * nll;
    if (smoothing != acc_t(0)) r.loss += d * (weight_sum * lse - sum_wz);
    r.a = keep * w_t + d * weight_sum;
    r.b = keep * w_t;
    r.d = d;
    return r;
  }
  // Focal: l~ = w_t nll, p^ = exp(-l~), loss = (1 - p^)^gamma l~ (docs/methods.md §1.2).
  const acc_t lw = w_t * nll;
  const acc_t ph = ltk_exp<acc_t>(-lw);
  const acc_t q = acc_t(1) - ph;
  const acc_t qg = gamma == acc_t(0) ? acc_t(1) : ltk_pow<acc_t>(q, gamma);
  r.loss = qg * lw;
  acc_t k = qg;
  if (focal == kFocalFull && gamma != acc_t(0) && q > acc_t(0)) {
    // d/dl~ of (1 - exp(-l~))^gamma l~ = q^gamma + gamma q^(gamma-1) p^ l~
    k += gamma * ltk_pow<acc_t>(q, gamma - acc_t(1)) * ph * lw;
  }
  r.a = k * w_t;
  r.b = k * w_t;
  r.d = 0;
  return r;
}

}  // namespace ltk
