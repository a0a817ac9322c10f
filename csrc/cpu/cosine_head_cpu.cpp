// CPU back end of the cosine head (ops in ops.cpp, orchestration in cosine_head_common.cpp, per-element
// math in ltk/cosine_head.h): vector norms, the fused scaling epilogue and the tangent projection, all
// parallel over vectors (at::parallel_for) with independent-lane inner loops that the compiler
// vectorises without reassociating floating-point sums (-ffp-contract=off stays exact per lane).
//
// Vectors stored as rows are processed one row at a time (the row stays in L1 between the dot product
// and the update). Vectors stored as columns are swept row by row (sequential, prefetch-friendly, one
// TLB entry per page instead of one per row and column block): column sums go into one partial vector
// per thread, reduced at the end; the update is a second sweep.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cosine_head_op.h"
#include "ltk/cosine_head.h"

namespace ltk {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kGrainElems = 32768;  // elements per parallel task

template <typename T>
inline T dot_lanes(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (; i < n; ++i) acc[i % kLanes] += a[i] * b[i];
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

inline int64_t grain_rows(int64_t len) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, len)); }

// Column dot products sum_r a[r, j] * b[r, j] of contiguous (rows, cols) a, b into out[cols]: one sweep
// over the rows, a partial vector per thread.
template <typename T>
void col_dots(const T* a, const T* b, int64_t rows, int64_t cols, T* out) {
  const int nt = at::get_num_threads();
  std::vector<T> part(static_cast<size_t>(nt) * cols, T(0));
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t lo, int64_t hi) {
    T* acc = part.data() + static_cast<int64_t>(at::get_thread_num()) * cols;
    for (int64_t r = lo; r < hi; ++r) {
      const T* ar = a + r * cols;
      const T* br = b + r * cols;
      for (int64_t j = 0; j < cols; ++j) acc[j] += ar[j] * br[j];
    }
  });
  std::fill(out, out + cols, T(0));
  for (int t = 0; t < nt; ++t) {
    const T* acc = part.data() + static_cast<int64_t>(t) * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] += acc[j];
  }
}

template <typename T>
void norms_kernel(const T* m, int64_t rows, int64_t cols, bool vec_rows, T* out) {
  if (vec_rows) {
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T* r = m + i * cols;
        out[i] = std::sqrt(dot_lanes(r, r, cols));
      }
    });
  } else {
    col_dots(m, m, rows, cols, out);
    for (int64_t j = 0; j < cols; ++j) out[j] = std::sqrt(out[j]);
  }
}

template <typename T>
std::vector<T> inverse_norms(const T* n, int64_t len, T eps) {
  std::vector<T> inv(n ? len : 0);
  for (int64_t j = 0; j < (n ? len : 0); ++j) inv[j] = cosine_inv_norm(n[j], eps);
  return inv;
}

template <typename T>
void scale_kernel(const T* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, const T* rn, const T* cn,
                  T eps, T* out) {
  const std::vector<T> inv_c = inverse_norms(cn, cols, eps);  // columns once, rows on the fly
  const T* ic = cn ? inv_c.data() : nullptr;
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T ri = rn ? cosine_inv_norm(rn[i], eps) : T(1);
      const T* si = src + i * s0;
      T* oi = out + i * cols;
      if (s1 == 1) {
        if (ic) {
          for (int64_t j = 0; j < cols; ++j) oi[j] = si[j] * ri * ic[j];
        } else {
          for (int64_t j = 0; j < cols; ++j) oi[j] = si[j] * ri;
        }
      } else {
        for (int64_t j = 0; j < cols; ++j) oi[j] = si[j * s1] * ri * (ic ? ic[j] : T(1));
      }
    }
  });
}

// scale_kernel plus rd[i] = sum_j src_ij c_ij and cd[j] = sum_i src_ij c_ij (either may be null), one
// pass; each row is read completely before it is written, so out may alias a contiguous src.
template <typename T>
void scale_dots_kernel(const T* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, const T* c, const T* rn,
                       const T* cn, T eps, T* out, T* rd, T* cd) {
  const std::vector<T> inv_c = inverse_norms(cn, cols, eps);
  const T* ic = cn ? inv_c.data() : nullptr;
  const int nt = cd ? at::get_num_threads() : 0;
  std::vector<T> part(static_cast<size_t>(nt) * cols, T(0));
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
    T* acc = cd ? part.data() + static_cast<int64_t>(at::get_thread_num()) * cols : nullptr;
    for (int64_t i = b; i < e; ++i) {
      const T ri = rn ? cosine_inv_norm(rn[i], eps) : T(1);
      const T* si = src + i * s0;
      const T* ci = c + i * cols;
      T* oi = out + i * cols;
      if (s1 == 1) {
        if (rd) rd[i] = dot_lanes(si, ci, cols);
        if (acc) {
          for (int64_t j = 0; j < cols; ++j) acc[j] += si[j] * ci[j];
        }
        for (int64_t j = 0; j < cols; ++j) oi[j] = si[j] * ri * (ic ? ic[j] : T(1));
      } else {
        T r = 0;
        for (int64_t j = 0; j < cols; ++j) {
          const T v = si[j * s1];
          r += v * ci[j];
          if (acc) acc[j] += v * ci[j];
          oi[j] = v * ri * (ic ? ic[j] : T(1));
        }
        if (rd) rd[i] = r;
      }
    }
  });
  if (cd) {
    std::fill(cd, cd + cols, T(0));
    for (int t = 0; t < nt; ++t) {
      const T* acc = part.data() + static_cast<int64_t>(t) * cols;
      for (int64_t j = 0; j < cols; ++j) cd[j] += acc[j];
    }
  }
}

template <typename T>
void tangent_kernel(T* g, const T* x, int64_t rows, int64_t cols, bool vec_rows, const T* norm, T eps,
                    bool prescaled, T s, const T* dots) {
  if (vec_rows) {
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T* gi = g + i * cols;
        const T* xi = x + i * cols;
        const T d = dots ? dots[i] : dot_lanes(xi, static_cast<const T*>(gi), cols);
        const T c = cosine_tangent_coef(norm[i], d, eps);
        const T alpha = cosine_tangent_alpha(norm[i], eps, prescaled, s);
        for (int64_t j = 0; j < cols; ++j) gi[j] = cosine_tangent_apply(gi[j], xi[j], alpha, c);
      }
    });
  } else {
    std::vector<T> coef(cols), alpha(cols);
    if (dots) {
      std::copy(dots, dots + cols, coef.begin());
    } else {
      col_dots(x, static_cast<const T*>(g), rows, cols, coef.data());
    }
    for (int64_t j = 0; j < cols; ++j) {
      coef[j] = cosine_tangent_coef(norm[j], coef[j], eps);
      alpha[j] = cosine_tangent_alpha(norm[j], eps, prescaled, s);
    }
    const T* cf = coef.data();
    const T* al = alpha.data();
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        T* gr = g + r * cols;
        const T* xr = x + r * cols;
        for (int64_t j = 0; j < cols; ++j) gr[j] = cosine_tangent_apply(gr[j], xr[j], al[j], cf[j]);
      }
    });
  }
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* opt_mut_ptr(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

struct CpuCosineOps final : CosineDeviceOps {
  void norms(const at::Tensor& m, bool vec_rows, at::Tensor& out) const override {
    AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cosine_norms_cpu", [&] {
      norms_kernel<scalar_t>(m.const_data_ptr<scalar_t>(), m.size(0), m.size(1), vec_rows,
                             out.mutable_data_ptr<scalar_t>());
    });
  }
  void scale(const at::Tensor& src, const at::Tensor& rn, const at::Tensor& cn, double eps,
             at::Tensor& out) const override {
    if (src.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "cosine_scale_cpu", [&] {
      scale_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), src.stride(0), src.stride(1), src.size(0),
                             src.size(1), opt_ptr<scalar_t>(rn), opt_ptr<scalar_t>(cn), static_cast<scalar_t>(eps),
                             out.mutable_data_ptr<scalar_t>());
    });
  }
  void scale_dots(const at::Tensor& src, const at::Tensor& c, const at::Tensor& rn, const at::Tensor& cn, double eps,
                  at::Tensor& out, at::Tensor& row_dots, at::Tensor& col_dots) const override {
    if (col_dots.defined()) col_dots.zero_();
    if (row_dots.defined()) row_dots.zero_();
    if (src.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "cosine_scale_dots_cpu", [&] {
      scale_dots_kernel<scalar_t>(src.const_data_ptr<scalar_t>(), src.stride(0), src.stride(1), src.size(0),
                                  src.size(1), c.const_data_ptr<scalar_t>(), opt_ptr<scalar_t>(rn),
                                  opt_ptr<scalar_t>(cn), static_cast<scalar_t>(eps), out.mutable_data_ptr<scalar_t>(),
                                  opt_mut_ptr<scalar_t>(row_dots), opt_mut_ptr<scalar_t>(col_dots));
    });
  }
  void tangent(at::Tensor& g, const at::Tensor& x, bool vec_rows, const at::Tensor& norm, double eps,
               bool prescaled, const at::Tensor& scale, const at::Tensor& dots) const override {
    if (g.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cosine_tangent_cpu", [&] {
      const scalar_t s = scale.defined() ? scale.item<scalar_t>() : scalar_t(1);
      tangent_kernel<scalar_t>(g.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g.size(0), g.size(1),
                               vec_rows, norm.const_data_ptr<scalar_t>(), static_cast<scalar_t>(eps), prescaled, s,
                               opt_ptr<scalar_t>(dots));
    });
  }
};

}  // namespace

const CosineDeviceOps& cosine_cpu_ops() {
  static const CpuCosineOps ops;
  return ops;
}

}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  m.impl("cosine_logits", [](const at::Tensor& features, const at::Tensor& weight, double eps) {
    return ltk::cosine_logits_impl(ltk::cosine_cpu_ops(), features, weight, eps);
  });
  m.impl("cosine_logits_backward",
         [](const at::Tensor& grad, const at::Tensor& features, const at::Tensor& weight,
            const at::Tensor& feature_norm, const at::Tensor& weight_norm, double eps, bool need_features,
            bool need_weight, int64_t path, const std::optional<at::Tensor>& logits) {
           return ltk::cosine_logits_backward_impl(ltk::cosine_cpu_ops(), grad, features, weight, feature_norm,
                                                   weight_norm, eps, need_features, need_weight, path, logits);
         });
  m.impl("cosine_grad_prep_", [](const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& row_norm,
                                 const at::Tensor& col_norm, double eps) {
    return ltk::cosine_grad_prep_impl(ltk::cosine_cpu_ops(), grad, logits, row_norm, col_norm, eps);
  });
  m.impl("cosine_norms", [](const at::Tensor& input, int64_t dim) {
    return ltk::cosine_norms_impl(ltk::cosine_cpu_ops(), input, dim);
  });
  m.impl("cosine_scale_", [](const at::Tensor& self, const std::optional<at::Tensor>& row_norm,
                             const std::optional<at::Tensor>& col_norm, double eps) {
    ltk::cosine_scale_impl(ltk::cosine_cpu_ops(), self, row_norm, col_norm, eps);
  });
  m.impl("cosine_tangent_", [](const at::Tensor& grad, const at::Tensor& vectors, const at::Tensor& norm,
                               double eps, int64_t dim, bool prescaled, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& dots) {
    ltk::cosine_tangent_impl(ltk::cosine_cpu_ops(), grad, vectors, norm, eps, dim, prescaled, scale, dots);
  });
}
