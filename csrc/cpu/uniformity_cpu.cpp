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
#include <vector>

#include "ltk/uniformity.h"
#include "ltk/uniformity_op.h"

namespace ltk {

// ---------------------------------------------------------------------------------------------------
// Orchestration (device-agnostic)
// ---------------------------------------------------------------------------------------------------
namespace {

// dU/dw from A (consumed), rs and the per-row (or scalar) coefficient: g^ = coef (rs w^ - A), then the
// normalisation's tangent projection (F.normalize: no projection below eps).
at::Tensor finish_grad(at::Tensor& acc, const at::Tensor& Wh, const at::Tensor& rs, const at::Tensor& coef,
                       const at::Tensor& norm, const at::Tensor& inv, double eps, bool compute_grad) {
  if (!compute_grad) return at::empty({0}, Wh.options());
  at::Tensor c = coef.dim() == 0 ? coef : coef.unsqueeze(1);
  at::Tensor gh = acc.mul_(-1).addcmul_(Wh, rs.unsqueeze(1)).mul_(c);
  const at::Tensor above = (norm >= eps).to(Wh.scalar_type());
  // row dot products w^_j . g^_j without a C x D temporary
  const at::Tensor dot = at::bmm(gh.unsqueeze(1), Wh.unsqueeze(2)).view({-1}) * above;
  return gh.addcmul_(Wh, dot.unsqueeze(1), -1).mul_(inv.unsqueeze(1));
}

// Riesz / log, and the gaussian with the fixed shift 0: per tile one fused epilogue and, with grad, the two
// accumulation GEMMs with the same weight tile P (p_jk is symmetric).
std::tuple<at::Tensor, at::Tensor> uniformity_fixed(const UniformityDeviceOps& dev, const at::Tensor& W,
                                                    const at::Tensor& Wh, const at::Tensor& n2,
                                                    const at::Tensor& norm, const at::Tensor& inv, int64_t kernel,
                                                    double param, double eps, double dist_eps, int64_t B,
                                                    bool compute_grad) {
  const int64_t C = W.size(0), D = W.size(1);
  const bool gauss = kernel == kUniGaussian;
  const auto opts = W.options();
  at::Tensor acc = compute_grad ? at::zeros({C, D}, opts) : at::Tensor();
  at::Tensor rs = at::zeros({C}, opts);                          // row sums of p (both orders)
  at::Tensor vs = at::zeros({C}, opts.dtype(at::kDouble));       // value sums
  at::Tensor work = at::empty({B, B}, opts);
  at::Tensor rp = at::empty({B}, opts), cp = at::empty({B}, opts), rf = at::empty({B}, opts);
  for (int64_t i0 = 0; i0 < C; i0 += B) {
    const int64_t bi = std::min(B, C - i0);
    const at::Tensor WI = Wh.narrow(0, i0, bi);
    const at::Tensor nI = n2.narrow(0, i0, bi);
    for (int64_t k0 = i0; k0 < C; k0 += B) {
      const int64_t bk = std::min(B, C - k0);
      const bool diag = k0 == i0;
      const at::Tensor WK = Wh.narrow(0, k0, bk);
      at::Tensor g = at::mm(WI, WK.t());
      at::Tensor wk = work.view({-1}).narrow(0, 0, bi * bk).view({bi, bk});
      at::Tensor rowp = rp.narrow(0, 0, bi), colp = diag ? at::Tensor() : cp.narrow(0, 0, bk);
      at::Tensor rowf = gauss ? at::Tensor() : rf.narrow(0, 0, bi);
      dev.fixed_epilogue(g, wk, nI, n2.narrow(0, k0, bk), diag, kernel, param, dist_eps, rowp, colp, rowf);
      vs.narrow(0, i0, bi).add_(gauss ? rowp : rowf, diag ? 1 : 2);
      if (compute_grad) {
        rs.narrow(0, i0, bi).add_(rowp);
        acc.narrow(0, i0, bi).addmm_(g, WK);
        if (!diag) {
          rs.narrow(0, k0, bk).add_(colp);
          acc.narrow(0, k0, bk).addmm_(g.t(), WI);
        }
      }
    }
  }
  const double pairs = static_cast<double>(C) * static_cast<double>(C - 1);
  const at::Tensor total = vs.sum();
  at::Tensor value, coef;
  if (gauss) {
    value = (at::log(total) - std::log(pairs)).to(W.scalar_type());
    if (compute_grad) coef = (-4.0 * param / total).to(W.scalar_type());
  } else {
    value = (total / pairs).to(W.scalar_type());
    if (compute_grad) coef = at::scalar_tensor(4.0 / pairs, opts);
  }
  return {value, finish_grad(acc, Wh, rs, coef, norm, inv, eps, compute_grad)};
}

}  // namespace

// Default fixed-shift epilogue: pair_transform, then ATen exp and reductions (the CUDA back end uses it).
void UniformityDeviceOps::fixed_epilogue(at::Tensor& g, at::Tensor& work, const at::Tensor& nI, const at::Tensor& nK,
                                         bool diag, int64_t kernel, double param, double dist_eps,
                                         at::Tensor& rowsum_p, at::Tensor& colsum_p, at::Tensor& rowsum_f) const {
  const bool gauss = kernel == kUniGaussian;
  at::Tensor f = gauss ? at::Tensor() : work;
  pair_transform(g, f, nI, nK, diag, kernel, param, dist_eps);
  if (gauss) g.exp_();
  at::sum_out(rowsum_p, g, {1});
  if (colsum_p.defined()) at::sum_out(colsum_p, g, {0});
  if (!gauss) at::sum_out(rowsum_f, f, {1});
}

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
  const at::Tensor n2 = (norm * inv).square_();            // |w^_j|^2 (1 unless below eps)
  const int64_t B = std::min(C, block > 0 ? block : std::max<int64_t>(2, dev.default_block(C, D)));
  const bool gauss = kernel == kUniGaussian;
  const auto opts = W.options();

  // Fixed shift 0 for the gaussian when exp(a) cannot underflow: a = -t d2 >= -4t since |w^| <= 1 (float32:
  // 4t <= 80, e^-80 is a normal float; float64: 4t <= 700). Otherwise the online (per-row max) path.
  const double lse_limit = W.scalar_type() == at::kFloat ? 80.0 : 700.0;
  if (!gauss || 4.0 * param <= lse_limit) {
    return uniformity_fixed(dev, W, Wh, n2, norm, inv, kernel, param, eps, dist_eps, B, compute_grad);
  }
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
        rescale(i0, bi, g.amax(1));
        if (!diag) rescale(k0, bk, g.amax(0));
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
  return {value, finish_grad(acc, Wh, rs, coef, norm, inv, eps, compute_grad)};
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
          pc[c] = ltk_exp<T>(x - mK[c]);
          pr[c] = ltk_exp<T>(x - mr);
        }
      } else {
        for (int64_t c = 0; c < bk; ++c) pr[c] = ltk_exp<T>(ar[c] - mr);
      }
    }
  });
}

// Fixed-shift epilogue, pass 1 (rows in parallel): gaussian g <- a = -t max(d2, dist_eps) (diagonal -inf);
// riesz / log g <- x = max(d2, dist_eps) (a clamped entry is exactly dist_eps; the diagonal is zeroed later).
template <typename T>
void fixed_pass1(T* g, const T* nI, const T* nK, int64_t bi, int64_t bk, bool diag, bool gauss, T t, T dist_eps) {
  at::parallel_for(0, bi, grain_rows(bk), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* gr = g + r * bk;
      const T nr = nI[r];
      if (gauss) {
        for (int64_t c = 0; c < bk; ++c) {
          const T d2 = uni_raw_d2<T>(nr, nK[c], gr[c]);
          gr[c] = uni_gaussian_exponent<T>(d2, t, dist_eps);
        }
        if (diag) gr[r] = -std::numeric_limits<T>::infinity();
      } else {
        for (int64_t c = 0; c < bk; ++c) {
          const T d2 = uni_raw_d2<T>(nr, nK[c], gr[c]);
          gr[c] = uni_clamp_d2<T>(d2, dist_eps);
        }
        if (diag) gr[r] = T(1);
      }
    }
  });
}

// Pass 3 (rows in parallel, per-thread column partial sums in double): riesz / log turn (x, v) into
// p = dU/dd2 (0 where clamped or on the diagonal) written to g, f = value (v for riesz, -0.5 v for log,
// v = log x); all kernels reduce row sums of p (and f) and column sums of p.
template <typename T>
void fixed_pass3(T* g, const T* v, int64_t bi, int64_t bk, bool diag, int kernel, T s, T dist_eps, T* rowsum_p,
                 T* colsum_p, T* rowsum_f) {
  const int nt = at::get_num_threads();
  std::vector<double> part(colsum_p ? static_cast<size_t>(nt) * bk : 0, 0.0);
  at::parallel_for(0, bi, grain_rows(bk), [&](int64_t b, int64_t e) {
    double* cp = colsum_p ? part.data() + static_cast<size_t>(at::get_thread_num()) * bk : nullptr;
    for (int64_t r = b; r < e; ++r) {
      T* gr = g + r * bk;
      double sp = 0, sf = 0;
      if (kernel == kUniGaussian) {
        for (int64_t c = 0; c < bk; ++c) sp += gr[c];
      } else {
        const T* vr = v + r * bk;
        if (diag) gr[r] = dist_eps;  // p = 0 below (treated as clamped), f zeroed after the loop
        const bool lg = kernel == kUniLog;
        const T cf = lg ? T(-0.5) : T(1), cp_ = lg ? T(-0.5) : T(-0.5) * s;
        for (int64_t c = 0; c < bk; ++c) {
          const T x = gr[c];
          const T f = cf * vr[c];
          const T p = x == dist_eps ? T(0) : (lg ? cp_ / x : cp_ * f / x);
          gr[c] = p;
          sp += p;
          sf += f;
        }
        if (diag) sf -= cf * vr[r];
      }
      rowsum_p[r] = static_cast<T>(sp);
      if (rowsum_f) rowsum_f[r] = static_cast<T>(sf);
      if (cp) {
        for (int64_t c = 0; c < bk; ++c) cp[c] += gr[c];
      }
    }
  });
  if (colsum_p) {
    for (int64_t c = 0; c < bk; ++c) {
      double acc = 0;
      for (int th = 0; th < nt; ++th) acc += part[static_cast<size_t>(th) * bk + c];
      colsum_p[c] = static_cast<T>(acc);
    }
  }
}

struct CpuUniformityOps final : UniformityDeviceOps {
  // Fused: pass 1 (distances), pass 2 the transcendental function through ATen's vectorised kernels
  // (exp / rsqrt / reciprocal / pow / log of the tile), pass 3 (derivative, row and column sums).
  void fixed_epilogue(at::Tensor& g, at::Tensor& work, const at::Tensor& nI, const at::Tensor& nK, bool diag,
                      int64_t kernel, double param, double dist_eps, at::Tensor& rowsum_p, at::Tensor& colsum_p,
                      at::Tensor& rowsum_f) const override {
    const bool gauss = kernel == kUniGaussian;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "uniformity_fixed_pass1_cpu", [&] {
      fixed_pass1<scalar_t>(g.mutable_data_ptr<scalar_t>(), nI.const_data_ptr<scalar_t>(),
                            nK.const_data_ptr<scalar_t>(), g.size(0), g.size(1), diag, gauss,
                            static_cast<scalar_t>(param), static_cast<scalar_t>(dist_eps));
    });
    if (gauss) {
      g.exp_();
    } else if (kernel == kUniLog) {
      at::log_out(work, g);
    } else if (param == 1.0) {
      at::rsqrt_out(work, g);
    } else if (param == 2.0) {
      at::reciprocal_out(work, g);
    } else {
      at::pow_out(work, g, -0.5 * param);
    }
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "uniformity_fixed_pass3_cpu", [&] {
      fixed_pass3<scalar_t>(g.mutable_data_ptr<scalar_t>(), gauss ? nullptr : work.const_data_ptr<scalar_t>(),
                            g.size(0), g.size(1), diag, static_cast<int>(kernel), static_cast<scalar_t>(param),
                            static_cast<scalar_t>(dist_eps), rowsum_p.mutable_data_ptr<scalar_t>(),
                            colsum_p.defined() ? colsum_p.mutable_data_ptr<scalar_t>() : nullptr,
                            rowsum_f.defined() ? rowsum_f.mutable_data_ptr<scalar_t>() : nullptr);
    });
  }

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
