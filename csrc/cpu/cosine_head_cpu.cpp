// CPU back end of the cosine head (ops in ops.cpp, orchestration in cosine_head_common.cpp, per-element
// math in ltk/cosine_head.h): vector norms, the fused scaling epilogue and the tangent projection, all
// parallel over vectors (at::parallel_for) with independent-lane inner loops that the compiler
// vectorises without reassociating floating-point sums (-ffp-contract=off stays exact per lane).
//
// Vectors stored as rows are processed one row at a time (the row stays in L1 between the dot product
// and the update); vectors stored as columns in blocks of kColBlock columns, so that the two passes
// (column dot products, then the update) of one block hit L2.
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
constexpr int64_t kColBlock = 64;
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

inline int64_t grain_blocks(int64_t rows) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, rows * kColBlock));
}

// Column dot products (a_j · b_j over rows) of the columns [c0, c1) into out[0 .. c1 - c0).
template <typename T>
inline void col_dots(const T* a, const T* b, int64_t rows, int64_t cols, int64_t c0, int64_t c1, T* out) {
  const int64_t w = c1 - c0;
  std::fill(out, out + w, T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* ar = a + r * cols + c0;
    const T* br = b + r * cols + c0;
    for (int64_t j = 0; j < w; ++j) out[j] += ar[j] * br[j];
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
    const int64_t nb = (cols + kColBlock - 1) / kColBlock;
    at::parallel_for(0, nb, grain_blocks(rows), [&](int64_t b, int64_t e) {
      T acc[kColBlock];
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t c0 = blk * kColBlock, c1 = std::min(cols, c0 + kColBlock);
        col_dots(m, m, rows, cols, c0, c1, acc);
        for (int64_t j = c0; j < c1; ++j) out[j] = std::sqrt(acc[j - c0]);
      }
    });
  }
}

template <typename T>
void scale_kernel(const T* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, const T* rn, const T* cn,
                  T eps, T* out) {
  // Inverse column norms once (cols values); inverse row norms on the fly.
  std::vector<T> inv_c(cn ? cols : 0);
  for (int64_t j = 0; j < (cn ? cols : 0); ++j) inv_c[j] = cosine_inv_norm(cn[j], eps);
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

template <typename T>
void tangent_kernel(T* g, const T* x, int64_t rows, int64_t cols, bool vec_rows, const T* norm, T eps,
                    bool prescaled, T s) {
  if (vec_rows) {
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T* gi = g + i * cols;
        const T* xi = x + i * cols;
        const T c = cosine_tangent_coef(norm[i], dot_lanes(xi, gi, cols), eps);
        const T alpha = cosine_tangent_alpha(norm[i], eps, prescaled, s);
        for (int64_t j = 0; j < cols; ++j) gi[j] = cosine_tangent_apply(gi[j], xi[j], alpha, c);
      }
    });
  } else {
    const int64_t nb = (cols + kColBlock - 1) / kColBlock;
    at::parallel_for(0, nb, grain_blocks(rows), [&](int64_t b, int64_t e) {
      T c[kColBlock], alpha[kColBlock];
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t c0 = blk * kColBlock, c1 = std::min(cols, c0 + kColBlock), w = c1 - c0;
        col_dots(x, static_cast<const T*>(g), rows, cols, c0, c1, c);
        for (int64_t j = 0; j < w; ++j) {
          c[j] = cosine_tangent_coef(norm[c0 + j], c[j], eps);
          alpha[j] = cosine_tangent_alpha(norm[c0 + j], eps, prescaled, s);
        }
        for (int64_t r = 0; r < rows; ++r) {
          T* gr = g + r * cols + c0;
          const T* xr = x + r * cols + c0;
          for (int64_t j = 0; j < w; ++j) gr[j] = cosine_tangent_apply(gr[j], xr[j], alpha[j], c[j]);
        }
      }
    });
  }
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
                             src.size(1), rn.defined() ? rn.const_data_ptr<scalar_t>() : nullptr,
                             cn.defined() ? cn.const_data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(eps),
                             out.mutable_data_ptr<scalar_t>());
    });
  }
  void tangent(at::Tensor& g, const at::Tensor& x, bool vec_rows, const at::Tensor& norm, double eps,
               bool prescaled, const at::Tensor& scale) const override {
    if (g.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cosine_tangent_cpu", [&] {
      const scalar_t s = scale.defined() ? scale.item<scalar_t>() : scalar_t(1);
      tangent_kernel<scalar_t>(g.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), g.size(0), g.size(1),
                               vec_rows, norm.const_data_ptr<scalar_t>(), static_cast<scalar_t>(eps), prescaled, s);
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
            bool need_weight, int64_t path) {
           return ltk::cosine_logits_backward_impl(ltk::cosine_cpu_ops(), grad, features, weight, feature_norm,
                                                   weight_norm, eps, need_features, need_weight, path);
         });
  m.impl("cosine_scale_", [](const at::Tensor& self, const std::optional<at::Tensor>& row_norm,
                             const std::optional<at::Tensor>& col_norm, double eps) {
    ltk::cosine_scale_impl(ltk::cosine_cpu_ops(), self, row_norm, col_norm, eps);
  });
  m.impl("cosine_tangent_", [](const at::Tensor& grad, const at::Tensor& vectors, const at::Tensor& norm,
                               double eps, int64_t dim, bool prescaled, const std::optional<at::Tensor>& scale) {
    ltk::cosine_tangent_impl(ltk::cosine_cpu_ops(), grad, vectors, norm, eps, dim, prescaled, scale);
  });
}
