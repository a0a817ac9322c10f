// Hyperspherical uniformity regulariser (ltkernels::uniformity): tiled orchestration shared by CPU and
// CUDA, and the CPU element-wise primitives. RECONSTRUCTED FROM THE ABSTRACT of Gao et al. (CAAI TIT
// 2025); formulas in ltk/uniformity.h, not verified against the paper.
//
// The C x C Gram matrix is never materialised. Only tiles (I, K) with K >= I (block edge B) are formed,
// each by one GEMM W^_I W^_K^T; an off-diagonal tile stands for both orders (j, k) and (k, j). With
// grad, each tile adds P W^_K into the rows I and P^T W^_I into the rows K of an accumulator A (C x D),
// so forward + backward costs 1.5 C^2 D multiply-adds (eager: 3 C^2 D plus C^2-sized temporaries) and
// the extra memory is A plus three B x B tiles.
//
//   riesz / log: U = (1 / C(C-1)) sum_{j != k} f(d2_jk);  with p_jk = f'(d2_jk), r_j = sum_k p_jk,
//                A_j = sum_k p_jk w^_k:  dU/dw^_j = 4 / C(C-1) (r_j w^_j - A_j).
//   gaussian:    U = log sum_{j != k} exp(a_jk) - log C(C-1), a = -t d2. Online log-sum-exp per row (as
//                flash attention): each row keeps a running max m_j, s_j = sum_k exp(a_jk - m_j) and
//                A_j = sum_k exp(a_jk - m_j) w^_k, rescaled when m_j grows. With M = max m_j and
//                S = sum_j s_j exp(m_j - M): U = M + log S - log C(C-1),
//                dU/dw^_j = -4 t exp(m_j - M) / S (s_j w^_j - A_j).
// Finally dU/dw_j = (g_j - (w^_j . g_j) w^_j) / |w_j| (F.normalize; g_j / eps below the eps).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "ltk/uniformity.h"
#include "ltk/uniformity_op.h"

namespace ltk {

// ---------------------------------------------------------------------------------------------------
// Orchestration (device-agnostic)
// ---------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> uniformity_impl(const UniformityDeviceOps& dev, const at::Tensor& weight,
                                                   int64_t kernel, double param, double eps, double dist_eps,
                                                   int64_t block, bool compute_grad) {
  TORCH_CHECK(weight.dim() == 2, "uniformity: weight must be 2-D (C, D), got ", weight.dim(), " dims");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "uniformity: weight must be float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK(kernel == kUniGaussian || kernel == kUniRiesz || kernel == kUniLog,
              "uniformity: kernel must be 0 (gaussian), 1 (riesz) or 2 (log), got ", kernel);
  TORCH_CHECK(std::isfinite(param) && (kernel == kUniLog || param > 0),
              "uniformity: the kernel parameter (t or s) must be a positive finite number, got ", param);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "uniformity: eps must be positive, got ", eps);
  TORCH_CHECK(std::isfinite(dist_eps) && dist_eps > 0, "uniformity: dist_eps must be positive, got ", dist_eps);
  TORCH_CHECK(block == 0 || block >= 2, "uniformity: block must be 0 (auto) or >= 2, got ", block);
  const int64_t C = weight.size(0), D = weight.size(1);
  TORCH_CHECK(C >= 2, "uniformity: needs at least 2 classes (rows), got C = ", C);
  TORCH_CHECK(D >= 1, "uniformity: weight has D = 0 columns");

  const at::Tensor W = weight.contiguous();
  const at::Tensor norm = at::linalg_vector_norm(W, 2, {1}, false, std::nullopt);  // raw |w_j|
  const at::Tensor inv = norm.clamp_min(eps).reciprocal_();
  const at::Tensor Wh = W * inv.unsqueeze(1);              // w^_j, contiguous (C, D)
  const at::Tensor n2 = (Wh * Wh).sum(1);                   // |w^_j|^2 (1 unless below eps)
  const int64_t B = std::min(C, block > 0 ? block : std::max<int64_t>(2, dev.default_block(C, D)));
  const bool gauss = kernel == kUniGaussian;
  const auto opts = W.options();

  at::Tensor acc = compute_grad ? at::zeros({C, D}, opts) : at::Tensor();  // A
  at::Tensor rs = at::zeros({C}, opts);  // gaussian: s_j;  riesz / log: r_j
  at::Tensor vs = gauss ? at::Tensor() : at::zeros({C}, opts);  // riesz / log: row sums of f
  at::Tensor m = gauss ? at::full({C}, -std::numeric_limits<double>::infinity(), opts) : at::Tensor();

  // Rescale the running state of rows [r0, r0 + len) to the new maxima `cand` (gaussian).
  auto rescale = [&](int64_t r0, int64_t len, const at::Tensor& cand) {
    at::Tensor mr = m.narrow(0, r0, len);
    const at::Tensor newm = at::maximum(mr, cand);
    at::Tensor scale = at::exp(mr - newm);
    scale.masked_fill_(newm == -std::numeric_limits<double>::infinity(), 0.0);  // row without pairs yet
    rs.narrow(0, r0, len).mul_(scale);
    if (compute_grad) acc.narrow(0, r0, len).mul_(scale.unsqueeze(1));
    mr.copy_(newm);
  };

  for (int64_t i0 = 0; i0 < C; i0 += B) {
    const int64_t bi = std::min(B, C - i0);
    const at::Tensor WI = Wh.narrow(0, i0, bi);
    const at::Tensor nI = n2.narrow(0, i0, bi);
    for (int64_t k0 = i0; k0 < C; k0 += B) {
      const int64_t bk = std::min(B, C - k0);
      const bool diag = k0 == i0;
      const at::Tensor WK = Wh.narrow(0, k0, bk);
      const at::Tensor nK = n2.narrow(0, k0, bk);
      at::Tensor g = at::mm(WI, WK.t());  // contiguous (bi, bk)
      if (gauss) {
        at::Tensor none;
        dev.pair_transform(g, none, nI, nK, diag, kernel, param, dist_eps);
        rescale(i0, bi, std::get<0>(g.max(1)));
        if (!diag) rescale(k0, bk, std::get<0>(g.max(0)));
        at::Tensor pcol = diag ? at::Tensor() : at::empty_like(g);
        dev.exp_shift(g, m.narrow(0, i0, bi), m.narrow(0, k0, bk), g, pcol);  // g <- prow
        rs.narrow(0, i0, bi).add_(g.sum(1));
        if (!diag) rs.narrow(0, k0, bk).add_(pcol.sum(0));
        if (compute_grad) {
          acc.narrow(0, i0, bi).addmm_(g, WK);
          if (!diag) acc.narrow(0, k0, bk).addmm_(pcol.t(), WI);
        }
      } else {
        at::Tensor f = at::empty_like(g);
        dev.pair_transform(g, f, nI, nK, diag, kernel, param, dist_eps);  // g <- p
        vs.narrow(0, i0, bi).add_(f.sum(1), diag ? 1 : 2);
        if (compute_grad) {
          rs.narrow(0, i0, bi).add_(g.sum(1));
          acc.narrow(0, i0, bi).addmm_(g, WK);
          if (!diag) {
            rs.narrow(0, k0, bk).add_(g.sum(0));
            acc.narrow(0, k0, bk).addmm_(g.t(), WI);
          }
        }
      }
    }
  }

  const double pairs = static_cast<double>(C) * static_cast<double>(C - 1);
  at::Tensor value, coef;  // coef: per-row factor of (rs_j w^_j - A_j) in dU/dw^_j
  if (gauss) {
    const at::Tensor M = m.max();
    const at::Tensor e = at::exp(m - M);
    const at::Tensor S = (rs * e).sum();
    value = M + at::log(S) - std::log(pairs);
    if (compute_grad) coef = e * (-4.0 * param) / S;
  } else {
    value = vs.sum() / pairs;
    if (compute_grad) coef = at::full({C}, 4.0 / pairs, opts);
  }
  at::Tensor grad = at::empty({0}, opts);
  if (compute_grad) {
    // g = coef (rs w^ - A), reusing A's storage; then the normalisation's tangent projection.
    at::Tensor gh = acc.mul_(-1).addcmul_(Wh, rs.unsqueeze(1)).mul_(coef.unsqueeze(1));
    const at::Tensor above = (norm >= eps).to(opts.dtype());
    const at::Tensor dot = (gh * Wh).sum(1) * above;
    grad = gh.sub_(Wh * dot.unsqueeze(1)).mul_(inv.unsqueeze(1));
  }
  return {value, grad};
}

// ---------------------------------------------------------------------------------------------------
// CPU primitives
// ---------------------------------------------------------------------------------------------------
namespace {

constexpr int64_t kGrainElems = 16384;

inline int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, cols)); }

template <typename T>
void pair_transform_kernel(T* g, T* f, const T* nI, const T* nK, int64_t bi, int64_t bk, bool diag, int kernel,
                           T param, T dist_eps) {
  at::parallel_for(0, bi, grain_rows(bk), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* gr = g + r * bk;
      const T nr = nI[r];
      if (kernel == kUniGaussian) {
        for (int64_t c = 0; c < bk; ++c) gr[c] = uni_gaussian_exponent<T>(uni_raw_d2<T>(nr, nK[c], gr[c]), param, dist_eps);
        if (diag) gr[r] = -std::numeric_limits<T>::infinity();
      } else {
        T* fr = f + r * bk;
        for (int64_t c = 0; c < bk; ++c) {
          T fv, pv;
          uni_energy<T>(kernel, uni_raw_d2<T>(nr, nK[c], gr[c]), param, dist_eps, fv, pv);
          fr[c] = fv;
          gr[c] = pv;
        }
        if (diag) fr[r] = gr[r] = T(0);
      }
    }
  });
}

template <typename T>
void exp_shift_kernel(const T* a, const T* mI, const T* mK, T* prow, T* pcol, int64_t bi, int64_t bk) {
  at::parallel_for(0, bi, grain_rows(bk), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* ar = a + r * bk;
      T* pr = prow + r * bk;
      const T mr = mI[r];
      if (pcol) {
        T* pc = pcol + r * bk;
        for (int64_t c = 0; c < bk; ++c) {
          const T x = ar[c];
          pc[c] = uni_exp<T>(x - mK[c]);
          pr[c] = uni_exp<T>(x - mr);
        }
      } else {
        for (int64_t c = 0; c < bk; ++c) pr[c] = uni_exp<T>(ar[c] - mr);
      }
    }
  });
}

struct CpuUniformityOps final : UniformityDeviceOps {
  int64_t default_block(int64_t /*C*/, int64_t /*D*/) const override { return 1024; }
  void pair_transform(at::Tensor& g, at::Tensor& f, const at::Tensor& nI, const at::Tensor& nK, bool diag,
                      int64_t kernel, double param, double dist_eps) const override {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "uniformity_pair_transform_cpu", [&] {
      pair_transform_kernel<scalar_t>(g.mutable_data_ptr<scalar_t>(),
                                      f.defined() ? f.mutable_data_ptr<scalar_t>() : nullptr,
                                      nI.const_data_ptr<scalar_t>(), nK.const_data_ptr<scalar_t>(), g.size(0),
                                      g.size(1), diag, static_cast<int>(kernel), static_cast<scalar_t>(param),
                                      static_cast<scalar_t>(dist_eps));
    });
  }
  void exp_shift(const at::Tensor& a, const at::Tensor& mI, const at::Tensor& mK, at::Tensor& prow,
                 at::Tensor& pcol) const override {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "uniformity_exp_shift_cpu", [&] {
      exp_shift_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), mI.const_data_ptr<scalar_t>(),
                                 mK.const_data_ptr<scalar_t>(), prow.mutable_data_ptr<scalar_t>(),
                                 pcol.defined() ? pcol.mutable_data_ptr<scalar_t>() : nullptr, a.size(0), a.size(1));
    });
  }
};

}  // namespace

const UniformityDeviceOps& uniformity_cpu_ops() {
  static const CpuUniformityOps ops;
  return ops;
}

}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  m.impl("uniformity", [](const at::Tensor& weight, int64_t kernel, double param, double eps, double dist_eps,
                          int64_t block, bool compute_grad) {
    return ltk::uniformity_impl(ltk::uniformity_cpu_ops(), weight, kernel, param, eps, dist_eps, block, compute_grad);
  });
}
