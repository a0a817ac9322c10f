// The specialised row kernel of the fused margin cross-entropy for the common case: the linear transform
// (z = S (r_j c + b_j + t_i beta_j - pert_ij - m [j = y])), fp32 input, no label smoothing, cloud
// noise (if any) from Philox. Which per-class vectors exist is a template parameter (kFeat, MarginCeFeat),
// so the hot loops test no option; the host (launch_margin_ce_stream) picks the instantiation, and any other
// call runs the generic kernel (margin_ce_kernels.cuh). Per-row quantities that do not depend on the column
// (the target's logit and margin, the row scale, weights, focal terms) are computed once per row.
//
// One block per row; the row is read in chunks of 16 bytes (kChunk elements), thread t owning chunks t,
// t + T, ... Chunks start at the row's first 16-byte boundary (column h < kChunk: an (N, 8142) fp32 tensor
// starts every other row 8 bytes off), so every full chunk moves with one 128-bit load and store; the
// columns before h (the head) and after the last full chunk (the tail) are two partial chunks read element
// by element. Two cases keep h = 0 and move each chunk in smaller aligned pieces (8, 4 bytes or elements,
// chosen per row, outside the loops): the cloud, whose Philox draws come in groups of four columns from
// column 0, and gradient rows aligned unlike the input rows. The next chunk is loaded before the current
// one's math.
//
// Each element costs one ex2 per pass: p = 2^((z - max) log2 e), the difference taken first so that, as in
// PyTorch's softmax, logits sharing a large offset keep their exact differences. Pass 1 merges a chunk's
// max into the running (max, sum) once per chunk (kChunk + 1 ex2 per chunk), pass 2 recomputes the logits
// and writes the gradient (one ex2 per element). On the GPU ex2 is the MUFU instruction (ex2.approx.ftz:
// relative error below 2^-22, denormal results flushed to 0); the emulator uses exp2f.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/margin_ce_reduce.cuh"
#include "ltk/block_reduce.cuh"
#include "ltk/launch.cuh"
#include "ltk/margin_ce.h"
#include "ltk/philox.h"
#include "ltk/transform.h"

namespace ltk {
namespace cuda {

constexpr int kStreamMaxThreads = 256;
constexpr float kLog2eF = 1.4426950408889634f;

// The per-element features of a call (bits of kFeat). Margin, target scale and weights are per row.
enum MarginCeFeat : int { kFeatColScale = 1, kFeatColBias = 2, kFeatShift = 4, kFeatCloud = 8 };

// The kFeat values that have an instantiation (the losses' combinations: CE / LDAM / KPS 0, LA bias,
// FBL shift, GCL cloud, and their mixes with a class scale); launch_margin_ce_stream lists them.
constexpr bool stream_instantiated(int f) { return f == 0 || f == 1 || f == 2 || f == 3 || f == 4 || f == 8 || f == 10; }

__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// e^d for d = z - max <= 0 (one MUFU.EX2 and one multiply)
__device__ __forceinline__ float exp_diff(float d) { return fast_exp2(d * kLog2eF); }

template <typename scalar_t>
constexpr int kChunk = 16 / static_cast<int>(sizeof(scalar_t));

// kChunk elements at p (which is kWidth-byte aligned), as floats.
template <int kWidth, typename scalar_t>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ p, float (&v)[kChunk<scalar_t>]) {
  constexpr int K = kChunk<scalar_t>;
  scalar_t e[K];
  if constexpr (kWidth == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(e, &raw, 16);
  } else if constexpr (kWidth == 8) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p) + q);
      memcpy(e + q * (K / 2), &raw, 8);
    }
  } else if constexpr (kWidth == 4 && sizeof(scalar_t) == 2) {
#pragma unroll
    for (int q = 0; q < K / 2; ++q) {
      const unsigned raw = __ldg(reinterpret_cast<const unsigned*>(p) + q);
      memcpy(e + 2 * q, &raw, 4);
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) e[k] = p[k];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = static_cast<float>(e[k]);
}

template <int kWidth, typename scalar_t>
__device__ __forceinline__ void store_chunk(scalar_t* __restrict__ p, const float (&v)[kChunk<scalar_t>]) {
  constexpr int K = kChunk<scalar_t>;
  scalar_t e[K];
#pragma unroll
  for (int k = 0; k < K; ++k) e[k] = static_cast<scalar_t>(v[k]);
  if constexpr (kWidth == 16) {
    uint4 raw;
    memcpy(&raw, e, 16);
    __stwb(reinterpret_cast<uint4*>(p), raw);  // (__stwb: the default store; one access in the emulator too)
  } else if constexpr (kWidth == 8) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      uint2 raw;
      memcpy(&raw, e + q * (K / 2), 8);
      __stwb(reinterpret_cast<uint2*>(p) + q, raw);
    }
  } else if constexpr (kWidth == 4 && sizeof(scalar_t) == 2) {
#pragma unroll
    for (int q = 0; q < K / 2; ++q) {
      unsigned raw;
      memcpy(&raw, e + 2 * q, 4);
      __stwb(reinterpret_cast<unsigned*>(p) + q, raw);
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) p[k] = e[k];
  }
}

// One row's constants: what the element transform reads, and the target's logit.
template <int kFeat>
struct StreamRow {
  const float* __restrict__ r;      // col_scale
  const float* __restrict__ b;      // col_bias
  const float* __restrict__ beta;   // shift_coef
  const float* __restrict__ delta;  // cloud
  float S, t, noise_mul;
  uint64_t seed, offset, row;
  int y;

  // The standard normals of columns j0 .. j0 + K - 1 (j0 a multiple of 4: whole Philox groups).
  template <int K>
  __device__ __forceinline__ void normals(int j0, float (&nz)[K]) const {
    if constexpr ((kFeat & kFeatCloud) != 0) {
#pragma unroll
      for (int g = 0; g < K / 4; ++g) {
        const philox::Normal4 v = philox::normal4(seed, offset, row, static_cast<uint64_t>(j0 / 4 + g));
        nz[4 * g] = v.v0;
        nz[4 * g + 1] = v.v1;
        nz[4 * g + 2] = v.v2;
        nz[4 * g + 3] = v.v3;
      }
    }
  }
  // The transformed cosine x_j (before the margin) of column j, given c and its standard normal.
  __device__ __forceinline__ float x_of(int j, float c, float nz) const {
    float x = c;
    if constexpr ((kFeat & kFeatColScale) != 0) x = r[j] * c;
    if constexpr ((kFeat & kFeatColBias) != 0) x += b[j];
    if constexpr ((kFeat & kFeatShift) != 0) x += t * beta[j];
    if constexpr ((kFeat & kFeatCloud) != 0) {
      float eps = scale_noise<float>(nz);
      eps = eps > 1.f ? 1.f : (eps < -1.f ? -1.f : eps);
      x -= noise_mul * (eps < 0.f ? -eps : eps) * delta[j];
    }
    return x;
  }
  __device__ __forceinline__ float jac(int j) const {
    if constexpr ((kFeat & kFeatColScale) != 0) return S * r[j];
    return S;
  }
};

// Logits of the chunk at j0: u[k] = S x, the target's replaced by u_t; columns outside [0, C) (the head and
// tail chunks) are -inf. kFull: every column of the chunk is in the row.
template <bool kFull, int kFeat, int K>
__device__ __forceinline__ void chunk_logits(const StreamRow<kFeat>& row, int j0, int C, const float (&c)[K],
                                             float u_t, float (&u)[K]) {
  float nz[K];
  row.normals(j0, nz);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    // (outside the row the per-class vectors must not be read)
    const bool in_row = kFull || static_cast<unsigned>(j0 + k) < static_cast<unsigned>(C);
    u[k] = in_row ? row.x_of(j0 + k, c[k], (kFeat & kFeatCloud) ? nz[k] : 0.f) * row.S : -INFINITY;
  }
  if (static_cast<unsigned>(row.y - j0) < static_cast<unsigned>(K)) {  // the target's chunk: rare, so a branch
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (j0 + k == row.y) u[k] = u_t;
  }
}

// Pass 1 over one chunk: merge its logits into the running max m and sum s = sum 2^(u - m).
template <int K>
__device__ __forceinline__ void merge_chunk(const float (&u)[K], float& m, float& s) {
  float mc = u[0];
#pragma unroll
  for (int k = 1; k < K; ++k) mc = nan_max(mc, u[k]);
  const float mn = nan_max(m, mc);
  const float ref = mn == -INFINITY ? 0.f : mn;  // all masked so far: 2^(-inf - 0) = 0, not 2^NaN
  float acc = s * exp_diff(m - ref);
#pragma unroll
  for (int k = 0; k < K; ++k) acc += exp_diff(u[k] - ref);
  s = acc;
  m = mn;
}

// Loads the partial chunk at j0 (columns outside [0, C) read as 0) element by element.
template <typename scalar_t, int K>
__device__ __forceinline__ void load_partial(const scalar_t* __restrict__ x, int j0, int C, float (&c)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k)
    c[k] = static_cast<unsigned>(j0 + k) < static_cast<unsigned>(C) ? static_cast<float>(x[j0 + k]) : 0.f;
}

// Both passes over row i: full chunks at columns h + q K moved as kWidth-byte pieces, the head chunk
// (columns h - K .. h - 1, when h > 0) and the tail chunk element by element.
template <int kWidth, int kFeat, typename scalar_t>
__device__ __forceinline__ void stream_row(const MarginCeArgs<scalar_t, float>& a, const StreamRow<kFeat>& row,
                                           const scalar_t* __restrict__ x, scalar_t* __restrict__ g, int C, int h,
                                           float u_t, float* red, float& M_out, float& sum_out) {
  constexpr int K = kChunk<scalar_t>;
  const int full = (C - h) / K;  // full chunks
  const int T = static_cast<int>(blockDim.x);
  const int tid = static_cast<int>(threadIdx.x);
  // the partial chunks: the tail (if any) by the thread next in turn after the full chunks, the head by
  // the last thread
  const int tail_j0 = h + full * K < C ? h + full * K : -1;
  const bool my_tail = tail_j0 >= 0 && tid == full % T;
  const bool my_head = h > 0 && tid == T - 1;
  float m = -INFINITY, s = 0.f;
  {
    float c[K], u[K];
    int q = tid;
    if (q < full) load_chunk<kWidth>(x + h + q * K, c);
    for (; q < full; q += T) {
      float cur[K];
#pragma unroll
      for (int k = 0; k < K; ++k) cur[k] = c[k];
      if (q + T < full) load_chunk<kWidth>(x + h + (q + T) * K, c);  // the next chunk, ahead of this one's math
      chunk_logits<true>(row, h + q * K, C, cur, u_t, u);
      merge_chunk(u, m, s);
    }
    if (my_tail) {
      load_partial(x, tail_j0, C, c);
      chunk_logits<false>(row, tail_j0, C, c, u_t, u);
      merge_chunk(u, m, s);
    }
    if (my_head) {
      load_partial(x, h - K, C, c);
      chunk_logits<false>(row, h - K, C, c, u_t, u);
      merge_chunk(u, m, s);
    }
  }
  const float M = block_max(m, red);
  // threads that saw no (unmasked) column keep m = -inf, s = 0 and contribute nothing
  const float sum = block_sum(m == -INFINITY ? 0.f : s * exp_diff(m - M), red);
  M_out = M;
  sum_out = sum;
  if (!g && !a.grad_row_shift) return;

  // ---- pass 2: the gradient, already divided by the reduction's denominator
  const float w_t = a.weight ? a.weight[row.y] : 1.f;
  const RowCoef<float> rc = row_coefficients<float>(logf(sum), u_t - M, 0.f, w_t, *a.weight_sum, 0.f, C, a.focal,
                                                    a.gamma);
  const float inv_denom = *a.inv_denom;
  const float A = rc.a / sum * inv_denom, B = rc.b * inv_denom;
  float gshift = 0.f;
  // dz/dx of the chunk at j0 into d (and its contribution to d loss / d t_i)
  auto grads = [&](int j0, const float (&u)[K], float (&d)[K], bool full_chunk) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = j0 + k;
      if (!full_chunk && static_cast<unsigned>(j) >= static_cast<unsigned>(C)) {
        d[k] = 0.f;
        continue;
      }
      const float dz = A * exp_diff(u[k] - M) - (j == row.y ? B : 0.f);
      if constexpr ((kFeat & kFeatShift) != 0) gshift += dz * row.beta[j];
      d[k] = dz * row.jac(j);
    }
  };
  auto partial = [&](int j0) {
    float c[K], u[K], d[K];
    load_partial(x, j0, C, c);
    chunk_logits<false>(row, j0, C, c, u_t, u);
    grads(j0, u, d, false);
    if (g) {
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (static_cast<unsigned>(j0 + k) < static_cast<unsigned>(C)) g[j0 + k] = static_cast<scalar_t>(d[k]);
    }
  };
  {
    float c[K], u[K], d[K];
    int q = tid;
    if (q < full) load_chunk<kWidth>(x + h + q * K, c);
    for (; q < full; q += T) {
      float cur[K];
#pragma unroll
      for (int k = 0; k < K; ++k) cur[k] = c[k];
      if (q + T < full) load_chunk<kWidth>(x + h + (q + T) * K, c);
      const int j0 = h + q * K;
      chunk_logits<true>(row, j0, C, cur, u_t, u);
      grads(j0, u, d, true);
      if (g) store_chunk<kWidth>(g + j0, d);
    }
  }
  if (my_tail) partial(tail_j0);
  if (my_head) partial(h - K);
  if constexpr ((kFeat & kFeatShift) != 0) {
    if (a.grad_row_shift) {
      gshift = block_sum(gshift, red);
      if (threadIdx.x == 0) a.grad_row_shift[row.row] = gshift * row.S;
    }
  }
}

template <int kFeat, typename scalar_t>
__global__ void __launch_bounds__(kStreamMaxThreads) margin_ce_stream_kernel(MarginCeArgs<scalar_t, float> a) {
  __shared__ float red[32];
  __shared__ float target_u;
  __shared__ double dred[32];
  __shared__ unsigned last;
  const int64_t i = blockIdx.x;
  const int C = static_cast<int>(a.C);
  const int64_t y = a.target[i];
  const scalar_t* __restrict__ x = a.input + i * a.C;
  scalar_t* __restrict__ g = a.grad ? a.grad + i * a.C : nullptr;
  if (y == a.ignore_index) {
    for (int j = threadIdx.x; j < C && g; j += blockDim.x) g[j] = scalar_t(0);
    if (threadIdx.x == 0) {
      store_row_loss(a, i, 0.f);
      if (a.grad_row_shift) a.grad_row_shift[i] = 0.f;
    }
  } else {
    CUDA_KERNEL_ASSERT(y >= 0 && y < C);
    StreamRow<kFeat> row{a.col_scale, a.col_bias, a.shift_coef, a.cloud, 0.f, 0.f, a.noise_mul, 0, 0,
                         static_cast<uint64_t>(i), static_cast<int>(y)};
    row.S = a.target_scale ? a.target_scale[y] : a.scale;
    if constexpr ((kFeat & kFeatShift) != 0) row.t = a.row_shift[i];
    if constexpr ((kFeat & kFeatCloud) != 0) philox_key(a, row.seed, row.offset);
    if (threadIdx.x == 0) {  // the target's logit, with its margin: one element, once per row
      float nz[4] = {0.f, 0.f, 0.f, 0.f};
      row.template normals<4>(static_cast<int>(y) & ~3, nz);
      float n_t = nz[0];
#pragma unroll
      for (int k = 1; k < 4; ++k)
        if ((static_cast<int>(y) & 3) == k) n_t = nz[k];
      const float m = a.margin ? a.margin[y] : 0.f;
      target_u = (row.x_of(static_cast<int>(y), static_cast<float>(x[y]), n_t) - m) * row.S;
    }
    __syncthreads();
    const float u_t = target_u;
    // Where the input row's first 16-byte boundary is one of the gradient row's too (and no cloud), full
    // chunks start there and move in 16-byte pieces; else they start at column 0, in the widest aligned
    // pieces both rows allow. One branch per row.
    const uintptr_t ax = reinterpret_cast<uintptr_t>(x), ag = g ? reinterpret_cast<uintptr_t>(g) : ax;
    int h = static_cast<int>(((16 - (ax & 15)) & 15) / sizeof(scalar_t));
    if (h >= C || (kFeat & kFeatCloud) != 0 || ((ag + h * sizeof(scalar_t)) & 15) != 0) h = 0;
    const uintptr_t off = h * sizeof(scalar_t);
    const uintptr_t mis = ((ax + off) | (ag + off)) & 15;
    float M, sum;
    if (mis == 0) {
      stream_row<16, kFeat>(a, row, x, g, C, h, u_t, red, M, sum);
    } else if ((mis & 7) == 0) {
      stream_row<8, kFeat>(a, row, x, g, C, 0, u_t, red, M, sum);
    } else if ((mis & 3) == 0 && sizeof(scalar_t) == 2) {
      stream_row<4, kFeat>(a, row, x, g, C, 0, u_t, red, M, sum);
    } else {
      stream_row<static_cast<int>(sizeof(scalar_t)), kFeat>(a, row, x, g, C, 0, u_t, red, M, sum);
    }
    if (threadIdx.x == 0) {
      const float w_t = a.weight ? a.weight[y] : 1.f;
      const RowCoef<float> rc =
          row_coefficients<float>(logf(sum), u_t - M, 0.f, w_t, *a.weight_sum, 0.f, C, a.focal, a.gamma);
      store_row_loss(a, i, rc.loss);
    }
  }
  reduce_when_last_block(a, dred, last);
}

// Threads per row: one chunk each, a multiple of the warp size, at most kStreamMaxThreads.
template <typename scalar_t>
inline int margin_ce_stream_threads(int64_t C) {
  const int64_t chunks = (C + kChunk<scalar_t> - 1) / kChunk<scalar_t>;
  int64_t t = (chunks + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > kStreamMaxThreads) t = kStreamMaxThreads;
  return static_cast<int>(t);
}

// The kFeat of a call, or -1 when the stream kernel does not cover it (the generic kernel runs).
template <typename scalar_t, typename acc_t>
int stream_features(const MarginCeArgs<scalar_t, acc_t>& a) {
  // fp32 only for now: the fp16 / bf16 instantiations spill a few bytes under nvcc 13 (the compile gate,
  // tools/cuda_resource_report.py, forbids spills), so half inputs keep the generic kernel
  if constexpr (!std::is_same_v<scalar_t, float> || !std::is_same_v<acc_t, float>) {
    return -1;
  } else {
    if (a.angular != kLinear || a.smoothing != acc_t(0) || a.noise || a.C > 0x7fffffff - 16) return -1;
    if ((reinterpret_cast<uintptr_t>(a.input) | (a.grad ? reinterpret_cast<uintptr_t>(a.grad) : 0)) %
            sizeof(scalar_t) != 0)
      return -1;
    const int f = (a.col_scale ? kFeatColScale : 0) | (a.col_bias ? kFeatColBias : 0) |
                  (a.shift_coef ? kFeatShift : 0) | (a.cloud ? kFeatCloud : 0);
    return stream_instantiated(f) ? f : -1;
  }
}

// Launches the stream kernel for the call when it covers it; false: the caller runs the generic kernel.
template <typename scalar_t, typename acc_t>
bool launch_margin_ce_stream(const MarginCeArgs<scalar_t, acc_t>& a, cudaStream_t stream) {
  if constexpr (!std::is_same_v<scalar_t, float> || !std::is_same_v<acc_t, float>) {
    return false;
  } else {
    const int f = stream_features(a);
    const dim3 grid(static_cast<unsigned>(a.N)), block(static_cast<unsigned>(margin_ce_stream_threads<scalar_t>(a.C)));
    switch (f) {
#define LTK_STREAM_CASE(F) \
  case F: LTK_LAUNCH((margin_ce_stream_kernel<F, scalar_t>), grid, block, 0, stream, a); return true;
      LTK_STREAM_CASE(0)
      LTK_STREAM_CASE(1)
      LTK_STREAM_CASE(2)
      LTK_STREAM_CASE(3)
      LTK_STREAM_CASE(4)
      LTK_STREAM_CASE(8)
      LTK_STREAM_CASE(10)
#undef LTK_STREAM_CASE
      default: return false;
    }
  }
}

}  // namespace cuda
}  // namespace ltk
