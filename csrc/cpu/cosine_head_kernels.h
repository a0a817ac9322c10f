// CPU kernels of the cosine head (per-element math in ltk/cosine_head.h): vector norms, the fused scaling
// epilogue and the tangent projection, all parallel over vectors (at::parallel_for) with independent-lane
// inner loops that the compiler vectorises without reassociating floating-point sums (-ffp-contract=off
// stays exact per lane, so every instruction-set build gives the same bits). Included once per
// instruction set by isa_*.cpp (like margin_ce_rows.h): compiled without AVX flags these loops ran at
// SSE2 width, 0.5 ns per element, 15-20% of a 256x2048x1000 head step on top of its GEMMs.
//
// Vectors stored as rows are processed one row at a time (the row stays in L1 between the dot product
// and the update). Vectors stored as columns are swept row by row (sequential, prefetch-friendly, one
// TLB entry per page instead of one per row and column block): column sums go into one partial vector
// per thread, reduced at the end; the update is a second sweep.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ltk/cosine_head.h"

namespace ltk {
namespace cpu {
inline namespace CPU_CAPABILITY {

constexpr int kLanes = 16;
constexpr int64_t kGrainElems = 32768;  // elements per parallel task

// Every kernel is templated on the storage type T and the math type A = cosine_acc_t<T> (ltk/cosine_head.h):
// 16-bit elements are widened on load and rounded once on store; norms, dot products and their partial sums
// are A. For float and double A is T and the conversions vanish.
template <typename A, typename T>
inline A dot_lanes(const T* a, const T* b, int64_t n) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<A>(a[i + l]) * static_cast<A>(b[i + l]);
  }
  for (; i < n; ++i) acc[i % kLanes] += static_cast<A>(a[i]) * static_cast<A>(b[i]);
  A s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

inline int64_t grain_rows(int64_t len) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, len)); }

// Column dot products sum_r a[r, j] * b[r, j] of contiguous (rows, cols) a, b into out[cols]: one sweep
// over the rows, a partial vector per thread.
template <typename T, typename A>
void col_dots(const T* a, const T* b, int64_t rows, int64_t cols, A* out) {
  const int nt = at::get_num_threads();
  std::vector<A> part(static_cast<size_t>(nt) * cols, A(0));
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t lo, int64_t hi) {
    A* acc = part.data() + static_cast<int64_t>(at::get_thread_num()) * cols;
    for (int64_t r = lo; r < hi; ++r) {
      const T* ar = a + r * cols;
      const T* br = b + r * cols;
      for (int64_t j = 0; j < cols; ++j) acc[j] += static_cast<A>(ar[j]) * static_cast<A>(br[j]);
    }
  });
  std::fill(out, out + cols, A(0));
  for (int t = 0; t < nt; ++t) {
    const A* acc = part.data() + static_cast<int64_t>(t) * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] += acc[j];
  }
}

template <typename T, typename A = cosine_acc_t<T>>
void norms_kernel(const T* m, int64_t rows, int64_t cols, bool vec_rows, A* out) {
  if (vec_rows) {
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T* r = m + i * cols;
        out[i] = std::sqrt(dot_lanes<A>(r, r, cols));
      }
    });
  } else {
    col_dots(m, m, rows, cols, out);
    for (int64_t j = 0; j < cols; ++j) out[j] = std::sqrt(out[j]);
  }
}

template <typename A>
std::vector<A> inverse_norms(const A* n, int64_t len, A eps) {
  std::vector<A> inv(n ? len : 0);
  for (int64_t j = 0; j < (n ? len : 0); ++j) inv[j] = cosine_inv_norm(n[j], eps);
  return inv;
}

template <typename T, typename A = cosine_acc_t<T>>
void scale_kernel(const T* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, const A* rn, const A* cn,
                  A eps, T* out) {
  const std::vector<A> inv_c = inverse_norms(cn, cols, eps);  // columns once, rows on the fly
  const A* ic = cn ? inv_c.data() : nullptr;
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const A ri = rn ? cosine_inv_norm(rn[i], eps) : A(1);
      const T* si = src + i * s0;
      T* oi = out + i * cols;
      if (s1 == 1) {
        if (ic) {
          for (int64_t j = 0; j < cols; ++j) oi[j] = static_cast<T>(static_cast<A>(si[j]) * ri * ic[j]);
        } else {
          for (int64_t j = 0; j < cols; ++j) oi[j] = static_cast<T>(static_cast<A>(si[j]) * ri);
        }
      } else {
        for (int64_t j = 0; j < cols; ++j) oi[j] = static_cast<T>(static_cast<A>(si[j * s1]) * ri * (ic ? ic[j] : A(1)));
      }
    }
  });
}

// scale_kernel plus rd[i] = sum_j src_ij c_ij and cd[j] = sum_i src_ij c_ij (either may be null), one
// pass; each row is read completely before it is written, so out may alias a contiguous src.
template <typename T, typename A = cosine_acc_t<T>>
void scale_dots_kernel(const T* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, const T* c, const A* rn,
                       const A* cn, A eps, T* out, A* rd, A* cd) {
  const std::vector<A> inv_c = inverse_norms(cn, cols, eps);
  const A* ic = cn ? inv_c.data() : nullptr;
  const int nt = cd ? at::get_num_threads() : 0;
  std::vector<A> part(static_cast<size_t>(nt) * cols, A(0));
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
    A* acc = cd ? part.data() + static_cast<int64_t>(at::get_thread_num()) * cols : nullptr;
    for (int64_t i = b; i < e; ++i) {
      const A ri = rn ? cosine_inv_norm(rn[i], eps) : A(1);
      const T* si = src + i * s0;
      const T* ci = c + i * cols;
      T* oi = out + i * cols;
      if (s1 == 1) {
        if (rd) rd[i] = dot_lanes<A>(si, ci, cols);
        if (acc) {
          for (int64_t j = 0; j < cols; ++j) acc[j] += static_cast<A>(si[j]) * static_cast<A>(ci[j]);
        }
        for (int64_t j = 0; j < cols; ++j) oi[j] = static_cast<T>(static_cast<A>(si[j]) * ri * (ic ? ic[j] : A(1)));
      } else {
        A r = 0;
        for (int64_t j = 0; j < cols; ++j) {
          const A v = static_cast<A>(si[j * s1]);
          const A cij = static_cast<A>(ci[j]);
          r += v * cij;
          if (acc) acc[j] += v * cij;
          oi[j] = static_cast<T>(v * ri * (ic ? ic[j] : A(1)));
        }
        if (rd) rd[i] = r;
      }
    }
  });
  if (cd) {
    std::fill(cd, cd + cols, A(0));
    for (int t = 0; t < nt; ++t) {
      const A* acc = part.data() + static_cast<int64_t>(t) * cols;
      for (int64_t j = 0; j < cols; ++j) cd[j] += acc[j];
    }
  }
}

template <typename T, typename A = cosine_acc_t<T>>
void tangent_kernel(T* g, const T* x, int64_t rows, int64_t cols, bool vec_rows, const A* norm, A eps,
                    bool prescaled, A s, const A* dots) {
  if (vec_rows) {
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T* gi = g + i * cols;
        const T* xi = x + i * cols;
        const A d = dots ? dots[i] : dot_lanes<A>(xi, static_cast<const T*>(gi), cols);
        const A c = cosine_tangent_coef(norm[i], d, eps);
        const A alpha = cosine_tangent_alpha(norm[i], eps, prescaled, s);
        for (int64_t j = 0; j < cols; ++j) {
          gi[j] = static_cast<T>(cosine_tangent_apply(static_cast<A>(gi[j]), static_cast<A>(xi[j]), alpha, c));
        }
      }
    });
  } else {
    std::vector<A> coef(cols), alpha(cols);
    if (dots) {
      std::copy(dots, dots + cols, coef.begin());
    } else {
      col_dots(x, static_cast<const T*>(g), rows, cols, coef.data());
    }
    for (int64_t j = 0; j < cols; ++j) {
      coef[j] = cosine_tangent_coef(norm[j], coef[j], eps);
      alpha[j] = cosine_tangent_alpha(norm[j], eps, prescaled, s);
    }
    const A* cf = coef.data();
    const A* al = alpha.data();
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        T* gr = g + r * cols;
        const T* xr = x + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          gr[j] = static_cast<T>(cosine_tangent_apply(static_cast<A>(gr[j]), static_cast<A>(xr[j]), al[j], cf[j]));
        }
      }
    });
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace ltk
