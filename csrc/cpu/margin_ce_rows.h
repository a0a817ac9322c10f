// CPU row kernel of the fused margin cross-entropy. Included once per instruction set by isa_*.cpp, each
// of which defines CPU_CAPABILITY (the at::vec width) before including it, so this file is compiled for
// AVX-512, AVX2 and a portable default, and margin_ce_cpu.cpp picks one at run time.
//
// Per row, with thread-local scratch of C accumulator values (the row stays in L1/L2):
//   pass 1  z_j = transform(c_j) into scratch, running max (vectorised; target fixed up afterwards)
//   pass 2  e_j = exp(z_j - max) in place, sum          (one exp per element)
//   pass 3  grad_j = (a e_j / sum - d w_j) dz_j/dc_j     (written straight into the output gradient)
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "ltk/margin_ce.h"
#include "ltk/philox.h"
#include "ltk/transform.h"

namespace ltk {
namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();  // 20 ulp: far below the 1e-5 relative tolerance of fp32 losses
  } else {
    return x.exp();
  }
}

// Flush-to-zero and denormals-are-zero for the lifetime of the object, on this thread only. Large
// scales (s = 30..64) push most exp(z - max) and p_j * coefficient products into the denormal range,
// where x86 arithmetic is ~100x slower; values that small (< 1.2e-38) are far below any loss or
// gradient precision, so they are computed as 0 (PyTorch's own kernels would return the denormals).
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Standard normals of one row, columns [0, 4 groups): the Philox + Box-Muller body has no calls and no
// data-dependent branches, so `omp simd` (-fopenmp-simd) vectorises it across groups.
inline void fill_row_normals(uint64_t seed, uint64_t offset, uint64_t row, int64_t groups, float* out) {
#pragma omp simd
  for (int64_t k = 0; k < groups; ++k) {
    const philox::Normal4 v = philox::normal4(seed, offset, row, static_cast<uint64_t>(k));
    out[4 * k] = v.v0;
    out[4 * k + 1] = v.v1;
    out[4 * k + 2] = v.v2;
    out[4 * k + 3] = v.v3;
  }
}

template <typename scalar_t, typename acc_t>
void margin_ce_rows(const MarginCeArgs<scalar_t, acc_t>& a) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = a.C;
  const int64_t Cpad = (C + V - 1) / V * V;
  const bool cast_input = !std::is_same_v<scalar_t, acc_t>;
  const bool cloud = a.cloud != nullptr;
  const bool smoothing = a.smoothing != acc_t(0);
  const bool want_grad = a.grad != nullptr;
  // Angular + cloud perturbs every element non-linearly: scalar transform with a stored jacobian.
  const bool generic = a.angular != kLinear && cloud;
  const bool clamp_c = arcface_clamps(a.angular);
  const acc_t inv_denom = *a.inv_denom;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));

  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    std::vector<acc_t> zbuf(Cpad), cbuf(cast_input ? Cpad : 0), pbuf(cloud ? Cpad : 0),
        jbuf(generic ? Cpad : 0), gbuf((want_grad && cast_input) ? Cpad : 0);
    std::vector<float> nbuf((cloud && !a.noise) ? (C + 3) / 4 * 4 : 0);
    acc_t* z = zbuf.data();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = a.target[i];
      scalar_t* grow = want_grad ? a.grad + i * C : nullptr;
      if (y == a.ignore_index) {
        a.row_loss[i] = 0;
        if (grow) std::fill(grow, grow + C, scalar_t(0));
        if (a.grad_row_shift) a.grad_row_shift[i] = 0;
        continue;
      }
      const acc_t S = a.target_scale ? a.target_scale[y] : a.scale;
      const acc_t t = a.row_shift ? a.row_shift[i] : acc_t(0);
      const scalar_t* in_row = a.input + i * C;
      const acc_t* c;
      if (cast_input) {
        at::vec::convert(in_row, cbuf.data(), C);
        c = cbuf.data();
      } else {
        c = reinterpret_cast<const acc_t*>(in_row);
      }
      // Cloud: linear mode subtracts noise_mul |clamp(eps, -1, 1)| delta_j; GCLAng adds the angle
      // (pi/2) epsilon delta_j |clamp(eps, -1, 1)| to the margin.
      const acc_t* pert = nullptr;
      if (cloud) {
        acc_t* p = pbuf.data();
        if (a.noise) {
          for (int64_t j = 0; j < C; ++j) p[j] = cloud_perturbation(a, j, a.noise[i * C + j]);
        } else {
          float* nz = nbuf.data();
          fill_row_normals(a.seed, a.offset, static_cast<uint64_t>(i), (C + 3) / 4, nz);
          for (int64_t j = 0; j < C; ++j) p[j] = cloud_perturbation(a, j, scale_noise<acc_t>(nz[j]));
        }
        pert = p;
      }
      auto elem = [&](int64_t j) { return element_logit(a, j, y, S, t, pert ? pert[j] : acc_t(0), c[j]); };

      // ---- pass 1: logits and max
      Vec vmax(ninf), vswz(0);
      acc_t zmax;
      acc_t swz = 0;
      if (!generic) {
        const Vec vS(S), vt(t);
        for (int64_t j = 0; j < C; j += V) {
          const int64_t n = std::min<int64_t>(V, C - j);
          Vec x = Vec::loadu(c + j, n);
          if (clamp_c) x = at::vec::clamp(x, Vec(-1), Vec(1));
          if (a.col_scale) x = x * Vec::loadu(a.col_scale + j, n);
          if (a.col_bias) x = x + Vec::loadu(a.col_bias + j, n);
          if (a.shift_coef) x = x + vt * Vec::loadu(a.shift_coef + j, n);
          if (pert) x = x - Vec::loadu(pert + j, n);
          Vec zv = x * vS;
          if (n < V) zv = Vec::set(Vec(ninf), zv, n);
          zv.store(z + j);
          vmax = at::vec::maximum(vmax, zv);
          if (smoothing) {
            const Vec zs = n < V ? Vec::set(Vec(0), zv, n) : zv;
            vswz = vswz + (a.weight ? zs * Vec::loadu(a.weight + j, n) : zs);
          }
        }
        zmax = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
        if (smoothing) swz = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, vswz);
        // target element: margin (and the angular transform) only here
        const ElemOut<acc_t> ty = elem(y);
        if (smoothing) swz += (a.weight ? a.weight[y] : acc_t(1)) * (ty.z - z[y]);
        z[y] = ty.z;
        if (std::isnan(ty.z) || ty.z > zmax) zmax = ty.z;
      } else {
        zmax = ninf;
        for (int64_t j = 0; j < C; ++j) {
          const ElemOut<acc_t> o = elem(j);
          z[j] = o.z;
          jbuf[j] = o.dzdc;
          zmax = (std::isnan(o.z) || o.z > zmax) ? o.z : zmax;
          if (smoothing) swz += (a.weight ? a.weight[j] : acc_t(1)) * o.z;
        }
        for (int64_t j = C; j < Cpad; ++j) z[j] = ninf;
      }
      const acc_t z_t = z[y];
      // An infinite max makes the row NaN, as PyTorch's log_softmax does.
      const acc_t shift = zmax;

      // ---- pass 2: exp and sum
      Vec vsum(0);
      const Vec vshift(shift);
      for (int64_t j = 0; j < Cpad; j += V) {
        const Vec e = vexp<acc_t>(Vec::loadu(z + j) - vshift);
        e.store(z + j);
        vsum = vsum + e;
      }
      const acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, vsum);
      const acc_t lse = shift + std::log(sum);
      const acc_t w_t = a.weight ? a.weight[y] : acc_t(1);
      const RowCoef<acc_t> rc =
          row_coefficients<acc_t>(lse, z_t, swz, w_t, a.weight_sum, a.smoothing, C, a.focal, a.gamma);
      a.row_loss[i] = rc.loss;
      if (!want_grad && !a.grad_row_shift) continue;

      // ---- pass 3: gradient, already divided by the reduction denominator
      const acc_t A = rc.a / sum * inv_denom, B = rc.b * inv_denom, D = rc.d * inv_denom;
      const Vec vA(A), vD(D), vS(S);
      acc_t* g = cast_input ? gbuf.data() : reinterpret_cast<acc_t*>(grow);
      acc_t gshift = 0;
      // dL/dz_j = A e_j - D w_j - B [j = y]
      auto dz_at = [&](int64_t j) {
        return A * z[j] - D * (a.weight ? a.weight[j] : acc_t(1)) - (j == y ? B : acc_t(0));
      };
      if (a.grad_row_shift) {
        for (int64_t j = 0; j < C; ++j) gshift += dz_at(j) * a.shift_coef[j];
        a.grad_row_shift[i] = gshift * S;
      }
      if (!want_grad) continue;
      if (!generic) {
        for (int64_t j = 0; j < C; j += V) {
          const int64_t n = std::min<int64_t>(V, C - j);
          Vec gz = vA * Vec::loadu(z + j, n);
          if (D != acc_t(0)) gz = gz - vD * (a.weight ? Vec::loadu(a.weight + j, n) : Vec(1));
          Vec jac = a.col_scale ? vS * Vec::loadu(a.col_scale + j, n) : vS;
          if (clamp_c) {
            const Vec cv = Vec::loadu(c + j, n);
            jac = Vec::blendv(Vec(0), jac, (cv > Vec(-1)) & (cv < Vec(1)));
          }
          (gz * jac).store(g + j, n);
        }
        g[y] = dz_at(y) * elem(y).dzdc;
      } else {
        for (int64_t j = 0; j < C; ++j) g[j] = dz_at(j) * jbuf[j];
      }
      if (cast_input) at::vec::convert(g, grow, C);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace ltk
