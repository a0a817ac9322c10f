// The specialised row kernels of the fused margin cross-entropy for the common case: the linear transform
// (z = S (r_j c + b_j + t_i beta_j - pert_ij - m [j = y])) or ArcFace (z = S clamp(c), the target's
// S cos(theta + m)), cloud noise (if any) from Philox, label smoothing for plain logits. Which per-class
// vectors exist is a template parameter (kFeat, MarginCeFeat), so the hot loops
// test no option; the host (plan_margin_ce_stream) picks the instantiation, and any other call runs the
// generic kernel (margin_ce_kernels.cuh). Per-row quantities that do not depend on the column (the target's
// logit and margin, the row scale, weights, focal terms) are computed once per row.
//
// Who owns a row (the Rows policy) and where pass 2 finds the logits, by the row's length:
//   small C (<= kWarpMaxCols)  RowPerWarp, cached: one warp per row, several rows per block, warp-shuffle
//                              reductions without barriers; pass 1 keeps the row's logits in shared memory;
//   medium C (cache fits)      RowPerBlock, cached: one block per row, logits cached as above;
//   large C                    RowPerBlock, streaming: pass 2 re-reads the input and recomputes the logits.
// Cached, pass 2 reads neither the input nor the cloud's per-class vector and draws no Philox noise.
//
// The row is read in chunks of 16 bytes (kChunk elements: 4 fp32, 8 fp16 / bf16), lane t of the row's
// threads owning chunks t, t + T, ... Chunks start at the row's first 16-byte boundary (column h < kChunk:
// an (N, 8142) fp32 tensor starts every other row 8 bytes off), so every full chunk moves with one 128-bit
// load and store; the columns before h (the head) and after the last full chunk (the tail) are two partial
// chunks, moved in the widest aligned pieces that stay in the row. Two cases keep h = 0 and move each chunk
// in smaller aligned pieces (8, 4 bytes or elements, chosen per row, outside the loops): the cloud, whose
// Philox draws come in groups of four columns from column 0, and gradient rows aligned unlike the input
// rows (fp32 only: kNarrowPaths). The next chunk is loaded before the current one's math. The math runs on
// groups of 4 columns (kGroup), so a 2-byte chunk is two groups and never 8 live floats. Half-precision
// elements move as 32-bit words and are converted from their bit patterns, so no array of c10::Half /
// BFloat16 objects is formed (the compiler would spill it to local memory).
//
// Each element costs one ex2 per pass: p = 2^((z - max) log2 e), the difference taken first so that, as in
// PyTorch's softmax, logits sharing a large offset keep their exact differences. Pass 1 merges a group's
// max into the running (max, sum) once per group (5 ex2 per 4 columns), pass 2 writes the gradient
// (one ex2 per element). On the GPU ex2 is the MUFU instruction (ex2.approx.ftz: relative error below
// 2^-22, denormal results flushed to 0); the emulator uses exp2f.
#pragma once

#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
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
constexpr int kWarpRowsPerBlock = kStreamMaxThreads / 32;
constexpr int kWarpMaxCols = 1024;                // one warp per row up to this many columns
constexpr int64_t kRowCacheMaxBytes = 48 * 1024;  // a block's logit cache (no opt-in attribute needed)
constexpr float kLog2eF = 1.4426950408889634f;

// The per-element features of a call (bits of kFeat). Margin, target scale and weights are per row.
// kFeatArcFace: ArcFace (or its easy-margin variant): every cosine clamped to [-1, 1], the target's logit
// S cos(theta + m) (ltk/transform.h), with no other per-element feature.
// kFeatSmooth: label smoothing (plain logits), kFeatClassWeight with it: class weights, which smoothing reads
// for every column (without smoothing only the target's is read, per row).
enum MarginCeFeat : int {
  kFeatColScale = 1, kFeatColBias = 2, kFeatShift = 4, kFeatCloud = 8, kFeatArcFace = 16, kFeatSmooth = 32,
  kFeatClassWeight = 64
};

// The kFeat values that have an instantiation (the losses' combinations: CE / LDAM / KPS 0, LA bias,
// FBL shift, GCL cloud, and their mixes with a class scale; ArcFace; label-smoothed CE, with and without class
// weights), as X(F).
#define LTK_STREAM_FEATURES(X) X(0) X(1) X(2) X(3) X(4) X(8) X(10) X(16) X(32) X(96)

constexpr bool stream_instantiated(int f) {
#define LTK_STREAM_IS(F) f == F ||
  return LTK_STREAM_FEATURES(LTK_STREAM_IS) false;
#undef LTK_STREAM_IS
}

__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// sin x and cos x for the small angles of margins: sincospif reduces its argument by exact arithmetic,
// where sincosf keeps a table in local memory for |x| > 105615 (which the SASS gate sees in a loop). The
// emulator takes the host's sin / cos (its bits may differ from the GPU's in the last place).
__device__ __forceinline__ void small_angle_sincos(float x, float& s, float& c) {
#if defined(__CUDA_ARCH__)
  sincospif(x * 0.318309886183790672f, &s, &c);
#else
  s = ::sinf(x);
  c = ::cosf(x);
#endif
}

// e^d for d = z - max <= 0 (one MUFU.EX2 and one multiply)
__device__ __forceinline__ float exp_diff(float d) { return fast_exp2(d * kLog2eF); }

template <typename scalar_t>
constexpr int kChunk = 16 / static_cast<int>(sizeof(scalar_t));

// The math runs on groups of 4 columns: a chunk is one group for fp32, two for the 2-byte types, so that a
// 2-byte chunk's 8 columns are never all live as floats at once (the 64 registers of 4 blocks per SM).
constexpr int kGroup = 4;
template <typename scalar_t>
constexpr int kGroups = kChunk<scalar_t> / kGroup;

// ---- moving a chunk: kChunk elements as four 32-bit words ------------------------------------------------

// The float of a 16-bit pattern (the low half of `bits`) of the 2-byte type scalar_t.
template <typename scalar_t>
__device__ __forceinline__ float half_bits_to_float(unsigned bits) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return __uint_as_float(bits << 16);
  } else {
    return static_cast<float>(scalar_t(static_cast<uint16_t>(bits), scalar_t::from_bits()));
  }
}

template <typename scalar_t>
__device__ __forceinline__ unsigned float_to_half_bits(float v) {
  return static_cast<unsigned>(static_cast<scalar_t>(v).x);
}

// A 32-bit word of the row as 4 / sizeof(scalar_t) floats at v[k] (k a constant once unrolled), and back.
template <typename scalar_t, int K>
__device__ __forceinline__ void unpack_word(unsigned w, int k, float (&v)[K]) {
  if constexpr (sizeof(scalar_t) == 4) {
    v[k] = __uint_as_float(w);
  } else {
    v[k] = half_bits_to_float<scalar_t>(w & 0xffffu);
    v[k + 1] = half_bits_to_float<scalar_t>(w >> 16);
  }
}

template <typename scalar_t, int K>
__device__ __forceinline__ unsigned pack_word(int k, const float (&v)[K]) {
  if constexpr (sizeof(scalar_t) == 4) {
    return __float_as_uint(v[k]);
  } else {
    return float_to_half_bits<scalar_t>(v[k]) | (float_to_half_bits<scalar_t>(v[k + 1]) << 16);
  }
}

// kW bytes of elements at p + k (kW-byte aligned; kW = 8, 4 or sizeof(scalar_t): the partial chunks' pieces)
// into v[k ...], and back.
template <int kW, typename scalar_t, int K>
__device__ __forceinline__ void load_piece(const scalar_t* __restrict__ p, int k, float (&v)[K]) {
  constexpr int E = 4 / static_cast<int>(sizeof(scalar_t));  // elements per word
  if constexpr (kW < 4) {
    v[k] = static_cast<float>(p[k]);
  } else if constexpr (kW == 4) {
    unpack_word<scalar_t>(__ldg(reinterpret_cast<const unsigned*>(p + k)), k, v);
  } else {
    static_assert(kW == 8, "a piece is 8, 4 bytes or one element (full chunks: load_words)");
    const uint2 r = __ldg(reinterpret_cast<const uint2*>(p + k));
    unpack_word<scalar_t>(r.x, k, v), unpack_word<scalar_t>(r.y, k + E, v);
  }
}

template <int kW, typename scalar_t, int K>
__device__ __forceinline__ void store_piece(scalar_t* __restrict__ p, int k, const float (&v)[K]) {
  constexpr int E = 4 / static_cast<int>(sizeof(scalar_t));
  if constexpr (kW < 4) {
    p[k] = static_cast<scalar_t>(v[k]);
  } else if constexpr (kW == 4) {
    *reinterpret_cast<unsigned*>(p + k) = pack_word<scalar_t>(k, v);
  } else {
    static_assert(kW == 8, "a piece is 8, 4 bytes or one element (full chunks: store_words)");
    store_vector(reinterpret_cast<uint2*>(p + k), make_uint2(pack_word<scalar_t>(k, v), pack_word<scalar_t>(k + E, v)));
  }
}

// A chunk as four 32-bit words: the 16 bytes at p (kWidth-byte aligned: 16, 8 or 4 bytes a piece, or one
// 2-byte element at a time). The
// load-ahead of for_each_chunk holds the words, not the floats: 4 registers, not 8 for the 2-byte types.
template <int kWidth, typename scalar_t>
__device__ __forceinline__ void load_words(const scalar_t* __restrict__ p, unsigned (&w)[4]) {
  if constexpr (kWidth == 16) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
  } else if constexpr (kWidth == 8) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const uint2 r = __ldg(reinterpret_cast<const uint2*>(p) + q);
      w[2 * q] = r.x, w[2 * q + 1] = r.y;
    }
  } else if constexpr (kWidth == 4) {
#pragma unroll
    for (int q = 0; q < 4; ++q) w[q] = __ldg(reinterpret_cast<const unsigned*>(p) + q);
  } else {  // 2-byte elements one at a time
    const uint16_t* __restrict__ e = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
    for (int q = 0; q < 4; ++q) w[q] = static_cast<unsigned>(e[2 * q]) | (static_cast<unsigned>(e[2 * q + 1]) << 16);
  }
}

// ---- who owns a row ----------------------------------------------------------------------------------------

// One row per block: T = blockDim.x threads, block-wide reductions (barriers).
struct RowPerBlock {
  float* red;  // 32 floats of shared scratch for the reductions
  __device__ __forceinline__ int lane() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ int slot() const { return 0; }
  __device__ __forceinline__ int64_t row() const { return blockIdx.x; }
  __device__ __forceinline__ float max(float v) const { return block_max(v, red); }
  __device__ __forceinline__ float sum(float v) const { return block_sum(v, red); }
};

// One row per warp, blockDim.x / 32 rows per block: warp-shuffle reductions, no barriers.
struct RowPerWarp {
  float* red;  // (unused: no shared scratch)
  __device__ __forceinline__ int lane() const { return static_cast<int>(threadIdx.x & 31); }
  __device__ __forceinline__ int size() const { return 32; }
  __device__ __forceinline__ int slot() const { return static_cast<int>(threadIdx.x >> 5); }
  __device__ __forceinline__ int64_t row() const {
    return static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + slot();
  }
  __device__ __forceinline__ float max(float v) const { return warp_max(v); }
  __device__ __forceinline__ float sum(float v) const { return warp_sum(v); }
};

// ---- the row's math ------------------------------------------------------------------------------------------

// One row's constants: what the element transform reads, and the target's margin.
template <int kFeat>
struct StreamRow {
  const float* __restrict__ r;      // col_scale
  const float* __restrict__ b;      // col_bias
  const float* __restrict__ beta;   // shift_coef
  const float* __restrict__ delta;  // cloud
  float S, t, noise_mul, m;
  uint64_t seed, offset, row;
  int y;
  float z_t, jac_t;  // kFeatArcFace: the target's logit S cos(theta + m) and its dz/dc, computed before pass 1

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
    if constexpr ((kFeat & kFeatArcFace) != 0) return c > 1.f ? 1.f : (c < -1.f ? -1.f : c);
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
  // dz/dc of non-target column j from its logit u (ArcFace: none at or beyond the clamp's bounds, where
  // u = +-S exactly: S c rounds to S only for c >= 1)
  __device__ __forceinline__ float jac(int j, float u) const {
    if constexpr ((kFeat & kFeatArcFace) != 0) return fabsf(u) == fabsf(S) ? 0.f : S;
    if constexpr ((kFeat & kFeatColScale) != 0) return S * r[j];
    return S;
  }
};

// Logits of the chunk at j0: u[k] = S x, the target's S (x - m) (ArcFace: row.z_t), also written to u_t;
// columns outside [0, C) (the head and tail chunks) are -inf. kFull: every
// column of the chunk is in the row. The target's logit comes from the chunk that holds it, so that no
// lane reads it (and waits for it) before pass 1.
template <bool kFull, int kFeat, int K>
__device__ __forceinline__ void chunk_logits(const StreamRow<kFeat>& row, int j0, int C, const float (&c)[K],
                                             float (&u)[K], float& u_t) {
  float nz[K];
  row.normals(j0, nz);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    // (outside the row the per-class vectors must not be read)
    const bool in_row = kFull || static_cast<unsigned>(j0 + k) < static_cast<unsigned>(C);
    u[k] = in_row ? row.x_of(j0 + k, c[k], (kFeat & kFeatCloud) ? nz[k] : 0.f) * row.S : -INFINITY;
  }
  if constexpr ((kFeat & kFeatArcFace) != 0) {
    // (the target's logit is the row's: a select, no branch whose angular math the loop would carry)
#pragma unroll
    for (int k = 0; k < K; ++k) u[k] = j0 + k == row.y ? row.z_t : u[k];
  } else if (static_cast<unsigned>(row.y - j0) < static_cast<unsigned>(K)) {  // the target's chunk: rare, so a branch
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (j0 + k != row.y) continue;
      u[k] = u_t = (row.x_of(j0 + k, c[k], (kFeat & kFeatCloud) ? nz[k] : 0.f) - row.m) * row.S;
    }
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

// The in-row columns [0, C) of the group at jg of a partial chunk (head or tail; p + jg 8-byte aligned when
// kWidth >= 8, else kWidth-byte aligned) in the widest aligned pieces that hold only in-row columns: 8 bytes,
// then 4, then single elements. f(width, k) moves the piece at column jg + k (width: a
// std::integral_constant). Two partial chunks per row at most, so a few requests, not one per element: a
// bf16 row of 100 columns ends in a 4-column tail, one 8-byte load.
template <int kWidth, typename scalar_t, class F>
__device__ __forceinline__ void for_each_partial_piece(int jg, int C, F&& f) {
  constexpr int S = static_cast<int>(sizeof(scalar_t));
  constexpr int E8 = 8 / S, E4 = 4 / S;
  const auto in_row = [C](int j) { return static_cast<unsigned>(j) < static_cast<unsigned>(C); };
#pragma unroll
  for (int k8 = 0; k8 < kGroup; k8 += E8) {
    if (kWidth >= 8 && in_row(jg + k8) && in_row(jg + k8 + E8 - 1)) {
      f(std::integral_constant<int, 8>{}, k8);
      continue;
    }
#pragma unroll
    for (int k4 = k8; k4 < k8 + E8; k4 += E4) {
      if (S == 2 && kWidth >= 4 && in_row(jg + k4) && in_row(jg + k4 + E4 - 1)) {
        f(std::integral_constant<int, 4>{}, k4);
        continue;
      }
#pragma unroll
      for (int k = k4; k < k4 + E4; ++k)
        if (in_row(jg + k)) f(std::integral_constant<int, S>{}, k);
    }
  }
}

// Loads the group at jg of a partial chunk (columns outside [0, C) read as 0).
template <int kWidth, typename scalar_t>
__device__ __forceinline__ void load_partial_group(const scalar_t* __restrict__ x, int jg, int C, float (&c)[kGroup]) {
#pragma unroll
  for (int k = 0; k < kGroup; ++k) c[k] = 0.f;
  for_each_partial_piece<kWidth, scalar_t>(jg, C, [&](auto w, int k) { load_piece<decltype(w)::value>(x + jg, k, c); });
}

// f(q, w) for the full chunks q = lane, lane + T, ... < full of the row whose full chunks start at x (w:
// chunk q's 16 bytes as words), each chunk's load issued before the previous chunk's math, except for
// 2-byte elements moved one at a time (rows aligned unlike their gradient, or cloud rows of odd C): their 8
// loads in flight would need 8 registers, the 4 more that spill under the 64-register bound.
template <int kWidth, typename scalar_t, class F>
__device__ __forceinline__ void for_each_chunk(const scalar_t* __restrict__ x, int full, int lane, int T, F&& f) {
  constexpr int K = kChunk<scalar_t>;
  if constexpr (kWidth < 4) {
    for (int q = lane; q < full; q += T) {
      unsigned w[4];
      load_words<kWidth>(x + q * K, w);
      f(q, w);
    }
  } else {
    unsigned w[4];
    int q = lane;
    if (q < full) load_words<kWidth>(x + q * K, w);
    for (; q < full; q += T) {
      unsigned cur[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) cur[k] = w[k];
      if (q + T < full) load_words<kWidth>(x + (q + T) * K, w);
      f(q, cur);
    }
  }
}

// f(p, c) for group p of a chunk's words w (c: its 4 columns as floats).
template <typename scalar_t, class F>
__device__ __forceinline__ void for_each_group(const unsigned (&w)[4], F&& f) {
  constexpr int E = 4 / static_cast<int>(sizeof(scalar_t)), WG = 4 / kGroups<scalar_t>;  // words per group
#pragma unroll
  for (int p = 0; p < kGroups<scalar_t>; ++p) {
    float c[kGroup];
#pragma unroll
    for (int q = 0; q < WG; ++q) unpack_word<scalar_t>(w[p * WG + q], q * E, c);
    f(p, c);
  }
}

// Group p's 4 floats into the chunk's words w, and the words to p (kWidth-byte aligned).
template <typename scalar_t>
__device__ __forceinline__ void pack_group(int p, const float (&d)[kGroup], unsigned (&w)[4]) {
  constexpr int E = 4 / static_cast<int>(sizeof(scalar_t)), WG = 4 / kGroups<scalar_t>;
#pragma unroll
  for (int q = 0; q < WG; ++q) w[p * WG + q] = pack_word<scalar_t>(q * E, d);
}

template <int kWidth, typename scalar_t>
__device__ __forceinline__ void store_words(scalar_t* __restrict__ p, const unsigned (&w)[4]) {
  if constexpr (kWidth == 16) {
    store_vector(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  } else if constexpr (kWidth == 8) {
#pragma unroll
    for (int q = 0; q < 2; ++q) store_vector(reinterpret_cast<uint2*>(p) + q, make_uint2(w[2 * q], w[2 * q + 1]));
  } else if constexpr (kWidth == 4) {
#pragma unroll
    for (int q = 0; q < 4; ++q) reinterpret_cast<unsigned*>(p)[q] = w[q];
  } else {
    uint16_t* __restrict__ e = reinterpret_cast<uint16_t*>(p);
#pragma unroll
    for (int q = 0; q < 4; ++q) e[2 * q] = static_cast<uint16_t>(w[q] & 0xffffu), e[2 * q + 1] = static_cast<uint16_t>(w[q] >> 16);
  }
}

// The cached logits of chunk slot q (row_cache_slots of them): group p of every slot in plane p (slots
// float4s apart), 16-byte shared accesses, so that 8 consecutive lanes touch 128 consecutive bytes, the
// conflict-free pattern, for the 2-byte types' two groups too.
__device__ __forceinline__ void cache_put_group(float* cache, int slots, int p, int q, const float (&u)[kGroup]) {
  store_vector(reinterpret_cast<float4*>(cache) + p * slots + q, make_float4(u[0], u[1], u[2], u[3]));
}

__device__ __forceinline__ void cache_get_group(const float* cache, int slots, int p, int q, float (&u)[kGroup]) {
  const float4 v = load_vector(reinterpret_cast<const float4*>(cache) + p * slots + q);
  u[0] = v.x, u[1] = v.y, u[2] = v.z, u[3] = v.w;
}

// Chunk slots of logit cache one row needs, whatever its alignment: its full chunks (at most C / K), then
// the tail and the head chunk; kChunk floats each.
template <typename scalar_t>
__host__ __device__ __forceinline__ int64_t row_cache_slots(int64_t C) {
  return C / kChunk<scalar_t> + 2;
}

template <typename scalar_t>
__host__ __device__ __forceinline__ int64_t row_cache_floats(int64_t C) {
  return row_cache_slots<scalar_t>(C) * kChunk<scalar_t>;
}

// Both passes over row i: full chunks at columns h + q K moved as kWidth-byte pieces, the head chunk
// (columns h - K .. h - 1, when h > 0) and the tail chunk element by element. kCached: pass 1 stores the
// chunks' logits at `cache` (row_cache_floats) and pass 2 reads them back: it reads no global memory but the
// per-class vectors of the gradient (class scale, shift coefficients).
template <int kWidth, bool kCached, int kFeat, class Rows, typename scalar_t>
__device__ __forceinline__ void stream_row(const MarginCeArgs<scalar_t, float>& a, const Rows& rows,
                                           const StreamRow<kFeat>& row, const scalar_t* __restrict__ x,
                                           scalar_t* __restrict__ g, int C, int h, float* cache) {
  constexpr int K = kChunk<scalar_t>;
  const int full = (C - h) / K;  // full chunks
  const int slots = static_cast<int>(row_cache_slots<scalar_t>(C));
  const int T = rows.size(), lane = rows.lane();
  // the partial chunks: the tail (if any) by the lane next in turn after the full chunks, the head by the
  // last lane
  const int tail_j0 = h + full * K < C ? h + full * K : -1;
  const bool my_tail = tail_j0 >= 0 && lane == full % T;
  const bool my_head = h > 0 && lane == T - 1;
  // u_t: the target's logit, in the lane whose chunk holds it (ArcFace: every lane, from before pass 1)
  float m = -INFINITY, s = 0.f, u_t = (kFeat & kFeatArcFace) != 0 ? row.z_t : -INFINITY;
  for_each_chunk<kWidth>(x + h, full, lane, T, [&](int q, const unsigned (&w)[4]) {
    for_each_group<scalar_t>(w, [&](int p, const float (&c)[kGroup]) {
      float u[kGroup];
      chunk_logits<true>(row, h + q * K + p * kGroup, C, c, u, u_t);
      if constexpr (kCached) cache_put_group(cache, slots, p, q, u);
      merge_chunk(u, m, s);
    });
  });
  // the partial chunk at j0 (cached: the tail's logits in slot `full`, the head's in slot full + 1)
  auto partial_logits = [&](int j0, int slot) {
#pragma unroll
    for (int p = 0; p < kGroups<scalar_t>; ++p) {
      const int jg = j0 + p * kGroup;
      float c[kGroup], u[kGroup];
      load_partial_group<kWidth>(x, jg, C, c);
      chunk_logits<false>(row, jg, C, c, u, u_t);
      if constexpr (kCached) cache_put_group(cache, slots, p, slot, u);
      merge_chunk(u, m, s);
    }
  };
  if (my_tail) partial_logits(tail_j0, full);
  if (my_head) partial_logits(h - K, full + 1);
  // (NaN propagates, as in the other lanes' statistics; ArcFace's every lane has it already)
  if constexpr ((kFeat & kFeatArcFace) == 0) u_t = rows.max(u_t);
  const float M = rows.max(m);
  // lanes that saw no (unmasked) column keep m = -inf, s = 0 and contribute nothing
  const float sum = rows.sum(m == -INFINITY ? 0.f : s * exp_diff(m - M));
  const float w_t = a.weight ? a.weight[row.y] : 1.f;
  constexpr bool kSmooth = (kFeat & kFeatSmooth) != 0;
  const float smoothing = kSmooth ? a.smoothing : 0.f;
  // (the gradient's coefficients do not depend on smoothing's sum_j w_j (z_j - M), which pass 2 adds up)
  const RowCoef<float> rc = row_coefficients<float>(logf(sum), u_t - M, 0.f, w_t, *a.weight_sum, smoothing, C,
                                                    a.focal, a.gamma);
  if constexpr (!kSmooth) {
    // the row's loss now, so that nothing of pass 1 but A, B and M stays live through pass 2
    if (lane == 0) store_row_loss(a, static_cast<int64_t>(row.row), rc.loss);
    if (!g && !a.grad_row_shift) return;
  }

  // ---- pass 2: the gradient, already divided by the reduction's denominator
  const float inv_denom = *a.inv_denom;
  const float A = rc.a / sum * inv_denom, B = rc.b * inv_denom, D = rc.d * inv_denom;
  float gshift = 0.f, swz = 0.f;  // swz: smoothing's sum_j w_j (z_j - M)
  // dz/dx of the n columns at j0 (a group or a partial chunk) into d, and their part of d loss / d t_i
  auto grads = [&](int j0, const auto& u, auto& d, bool full_chunk) {
    constexpr int n = static_cast<int>(sizeof(d) / sizeof(float));
#pragma unroll
    for (int k = 0; k < n; ++k) {
      const int j = j0 + k;
      if (!full_chunk && static_cast<unsigned>(j) >= static_cast<unsigned>(C)) {
        d[k] = 0.f;
        continue;
      }
      const bool tgt = j == row.y;
      float dz = A * exp_diff(u[k] - M) - (tgt ? B : 0.f);
      if constexpr (kSmooth) {
        const float w = (kFeat & kFeatClassWeight) != 0 ? a.weight[j] : 1.f;
        swz += w * (u[k] - M);
        dz -= D * w;
      }
      if constexpr ((kFeat & kFeatShift) != 0) gshift += dz * row.beta[j];
      if constexpr ((kFeat & kFeatArcFace) != 0) {
        d[k] = dz * (tgt ? row.jac_t : row.jac(j, u[k]));
      } else {
        d[k] = dz * row.jac(j, u[k]);  // (linear: the target's dz/dc is every column's)
      }
    }
  };
  // group p of full chunk q from its logits u, packed into the chunk's words wg
  auto group_grads = [&](int q, int p, const float (&u)[kGroup], unsigned (&wg)[4]) {
    float d[kGroup];
    grads(h + q * K + p * kGroup, u, d, true);
    pack_group<scalar_t>(p, d, wg);
  };
  if constexpr (kCached) {
    for (int q = lane; q < full; q += T) {
      unsigned wg[4];
#pragma unroll
      for (int p = 0; p < kGroups<scalar_t>; ++p) {
        float u[kGroup];
        cache_get_group(cache, slots, p, q, u);
        group_grads(q, p, u, wg);
      }
      if (g) store_words<kWidth>(g + h + q * K, wg);
    }
  } else {
    for_each_chunk<kWidth>(x + h, full, lane, T, [&](int q, const unsigned (&w)[4]) {
      unsigned wg[4];
      for_each_group<scalar_t>(w, [&](int p, const float (&c)[kGroup]) {
        float u[kGroup], unused;
        chunk_logits<true>(row, h + q * K + p * kGroup, C, c, u, unused);
        group_grads(q, p, u, wg);
      });
      if (g) store_words<kWidth>(g + h + q * K, wg);
    });
  }
  auto partial_grads = [&](int j0, int slot) {
    // (a loop, not unrolled: the 2-byte types' second group unrolled here spills 4 bytes on sm_80 with class
    // scale and bias, F = 3, streaming; it runs for two chunks a row at most)
#pragma unroll 1
    for (int p = 0; p < kGroups<scalar_t>; ++p) {
      const int jg = j0 + p * kGroup;
      float u[kGroup], d[kGroup];
      if constexpr (kCached) {
        cache_get_group(cache, slots, p, slot, u);
      } else {
        float c[kGroup], unused;
        load_partial_group<kWidth>(x, jg, C, c);
        chunk_logits<false>(row, jg, C, c, u, unused);
      }
      grads(jg, u, d, false);
      if (g) for_each_partial_piece<kWidth, scalar_t>(jg, C, [&](auto w, int k) { store_piece<decltype(w)::value>(g + jg, k, d); });
    }
  };
  if (my_tail) partial_grads(tail_j0, full);
  if (my_head) partial_grads(h - K, full + 1);
  if constexpr (kSmooth) {
    swz = rows.sum(swz);
    if (lane == 0) {
      store_row_loss(a, static_cast<int64_t>(row.row),
                     row_coefficients<float>(logf(sum), u_t - M, swz, w_t, *a.weight_sum, smoothing, C, a.focal,
                                             a.gamma).loss);
    }
  }
  if constexpr ((kFeat & kFeatShift) != 0) {
    if (a.grad_row_shift) {
      gshift = rows.sum(gshift);
      if (lane == 0) a.grad_row_shift[row.row] = gshift * row.S;
    }
  }
}

// Whether the kernel moves rows whose input and gradient are aligned differently mod 16 bytes (8-, 4- or
// 2-byte pieces from column 0), or cloud rows (which start at column 0 for whole Philox groups) that are not
// 16-byte aligned. The 2-byte types without the cloud do not: those paths would not fit in the 64 registers
// of 4 blocks per SM without spilling, and such calls (an input view at an odd offset: the gradient is a
// fresh allocation) take the generic kernel (stream_features).
constexpr bool has_narrow_paths(int feat, size_t elem_bytes) { return elem_bytes == 4 || (feat & kFeatCloud) != 0; }
template <int kFeat, typename scalar_t>
constexpr bool kNarrowPaths = has_narrow_paths(kFeat, sizeof(scalar_t));

// Row i of the call, by the threads `rows` names.
template <bool kCached, int kFeat, class Rows, typename scalar_t>
__device__ __forceinline__ void margin_ce_stream_row(const MarginCeArgs<scalar_t, float>& a, const Rows& rows,
                                                     int64_t i, float* cache) {
  const int C = static_cast<int>(a.C);
  const int64_t y = a.target[i];
  const scalar_t* __restrict__ x = a.input + i * a.C;
  scalar_t* __restrict__ g = a.grad ? a.grad + i * a.C : nullptr;
  if (y == a.ignore_index) {
    for (int j = rows.lane(); j < C && g; j += rows.size()) g[j] = scalar_t(0);
    if (rows.lane() == 0) {
      store_row_loss(a, i, 0.f);
      if (a.grad_row_shift) a.grad_row_shift[i] = 0.f;
    }
    return;
  }
  CUDA_KERNEL_ASSERT(y >= 0 && y < C);
  StreamRow<kFeat> row{a.col_scale, a.col_bias, a.shift_coef, a.cloud, 0.f, 0.f, a.noise_mul, 0.f, 0, 0,
                       static_cast<uint64_t>(i), static_cast<int>(y), 0.f, 0.f};
  row.S = a.target_scale ? a.target_scale[y] : a.scale;
  row.m = a.margin ? a.margin[y] : 0.f;
  if constexpr ((kFeat & kFeatArcFace) != 0) {
    // the target's logit by every lane (one broadcast load), before pass 1, so that the loops carry no angular
    // math: sin / cos of the margin without sincosf's huge-argument path (local memory; margins are small)
    float sm, cm;
    small_angle_sincos(row.m, sm, cm);
    const bool easy = a.angular == kArcFaceEasy;
    // cos(pi - m) = -cos m, sin(pi - m) = sin m: ArcFace's threshold and fallback (ltk/transform.h)
    const AngularConsts<float> angle{cm, sm, easy ? 0.f : -cm, easy ? 0.f : sm * row.m};
    const ElemOut<float> e = angular_logit_with<float>(static_cast<float>(a.input[i * a.C + y]), angle, a.angular, row.S);
    row.z_t = e.z;
    row.jac_t = e.dzdc;
  }
  if constexpr ((kFeat & kFeatShift) != 0) row.t = a.row_shift[i];
  if constexpr ((kFeat & kFeatCloud) != 0) philox_key(a, row.seed, row.offset);
  // Where the input row's first 16-byte boundary is one of the gradient row's too (and no cloud), full
  // chunks start there and move in 16-byte pieces, the columns before it in the head chunk (a row shorter
  // than the distance to the boundary lies wholly in it); else they start at column 0, in the widest aligned
  // pieces both rows allow. One branch per row.
  const uintptr_t ax = reinterpret_cast<uintptr_t>(x), ag = g ? reinterpret_cast<uintptr_t>(g) : ax;
  int h = static_cast<int>(((16 - (ax & 15)) & 15) / sizeof(scalar_t));
  if ((kFeat & kFeatCloud) != 0 || ((ag + h * sizeof(scalar_t)) & 15) != 0) h = 0;
  const uintptr_t off = h * sizeof(scalar_t);
  const uintptr_t mis = ((ax + off) | (ag + off)) & 15;
  if (mis == 0) {
    stream_row<16, kCached>(a, rows, row, x, g, C, h, cache);
  } else {
    if constexpr (kNarrowPaths<kFeat, scalar_t>) {
      if ((mis & 7) == 0) {
        stream_row<8, kCached>(a, rows, row, x, g, C, 0, cache);
      } else if ((mis & 3) == 0 && sizeof(scalar_t) == 2) {
        stream_row<4, kCached>(a, rows, row, x, g, C, 0, cache);
      } else {
        stream_row<static_cast<int>(sizeof(scalar_t)), kCached>(a, rows, row, x, g, C, 0, cache);
      }
    } else {
      CUDA_KERNEL_ASSERT(mis == 0 && "the host sends misaligned 2-byte rows to the generic kernel");
    }
  }
}


// Rows: RowPerBlock or RowPerWarp. kCached: dynamic shared memory holds row_cache_floats(C) floats per row
// of the block. Without the cloud, 4 blocks of 256 threads per SM (<= 64 registers: 50 % occupancy, what a
// memory-bound kernel needs to keep loads in flight); the cloud's Philox and Box-Muller need more registers
// than that without spilling.
template <int kFeat>
constexpr int kStreamMinBlocks = (kFeat & kFeatCloud) != 0 ? 1 : 4;

template <int kFeat, class Rows, bool kCached, typename scalar_t>
__global__ void __launch_bounds__(kStreamMaxThreads, kStreamMinBlocks<kFeat>)
    margin_ce_stream_kernel(MarginCeArgs<scalar_t, float> a) {
  __shared__ float red[32];
  __shared__ double dred[32];
  __shared__ unsigned last;
  const Rows rows{red};
  float* cache = nullptr;
  if constexpr (kCached) {
    LTK_DYNAMIC_SHARED(float, smem);
    cache = smem + rows.slot() * row_cache_floats<scalar_t>(a.C);
  }
  const int64_t i = rows.row();
  if (i < a.N) margin_ce_stream_row<kCached, kFeat>(a, rows, i, cache);
  reduce_when_last_block(a, dred, last);
}

// The row kernel for a call: its instantiation and launch configuration.
enum class StreamPath : int { kNone = 0, kWarpCached = 1, kBlockCached = 2, kBlockStreaming = 3 };

struct StreamPlan {
  int feat = -1;
  StreamPath path = StreamPath::kNone;
  unsigned blocks = 0, threads = 0;
  size_t smem = 0;  // dynamic shared memory bytes (the logit cache)
};

// The input types with stream kernels: fp32, fp16 and bf16, accumulating in fp32 (the 2-byte types move as
// 32-bit words, load_words / store_words). fp64 keeps the generic kernel: its accuracy, not its speed, is
// what it is for, and exp2 approximations would spend it.
template <typename scalar_t, typename acc_t>
constexpr bool kStreamTypes = std::is_same_v<acc_t, float> &&
    (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>);

// The kFeat of a call, or -1 when no stream kernel covers it (the generic kernel runs).
template <typename scalar_t, typename acc_t>
int stream_features(const MarginCeArgs<scalar_t, acc_t>& a) {
  if constexpr (!kStreamTypes<scalar_t, acc_t>) {
    return -1;
  } else {
    if (a.noise || a.C > 0x7fffffff - 16) return -1;
    if ((reinterpret_cast<uintptr_t>(a.input) | (a.grad ? reinterpret_cast<uintptr_t>(a.grad) : 0)) %
            sizeof(scalar_t) != 0)
      return -1;
    const int vectors = (a.col_scale ? kFeatColScale : 0) | (a.col_bias ? kFeatColBias : 0) |
                        (a.shift_coef ? kFeatShift : 0) | (a.cloud ? kFeatCloud : 0);
    // ArcFace with per-element vectors, and the other angular modes, take the generic kernel
    const int f = a.smoothing != acc_t(0)
                      ? (a.angular == kLinear && !vectors ? kFeatSmooth | (a.weight ? kFeatClassWeight : 0) : -1)
                  : arcface_clamps(a.angular) ? (vectors ? -1 : kFeatArcFace)
                  : a.angular == kLinear      ? vectors
                                              : -1;
    if (f < 0 || !stream_instantiated(f)) return -1;
    // (kNarrowPaths: without them every row's input and gradient must share their offset mod 16 bytes)
    if (!has_narrow_paths(f, sizeof(scalar_t)) && a.grad && (reinterpret_cast<uintptr_t>(a.input) - reinterpret_cast<uintptr_t>(a.grad)) % 16 != 0)
      return -1;
    return f;
  }
}

template <typename scalar_t, typename acc_t>
StreamPlan plan_margin_ce_stream(const MarginCeArgs<scalar_t, acc_t>& a) {
  StreamPlan p;
  p.feat = stream_features(a);
  if (p.feat < 0) return p;
  const int64_t cache_bytes = row_cache_floats<scalar_t>(a.C) * static_cast<int64_t>(sizeof(float));
  if (a.C <= kWarpMaxCols) {
    const int64_t rows = a.N < kWarpRowsPerBlock ? a.N : kWarpRowsPerBlock;
    p.path = StreamPath::kWarpCached;
    p.threads = static_cast<unsigned>(32 * rows);
    p.blocks = static_cast<unsigned>((a.N + rows - 1) / rows);
    p.smem = static_cast<size_t>(rows * cache_bytes);
  } else {
    p.path = cache_bytes <= kRowCacheMaxBytes ? StreamPath::kBlockCached : StreamPath::kBlockStreaming;
    p.threads = static_cast<unsigned>(row_threads((a.C + kChunk<scalar_t> - 1) / kChunk<scalar_t>, kStreamMaxThreads));
    p.blocks = static_cast<unsigned>(a.N);
    p.smem = p.path == StreamPath::kBlockCached ? static_cast<size_t>(cache_bytes) : 0;
  }
  return p;
}

template <int kFeat, typename scalar_t>
void launch_stream_path(const MarginCeArgs<scalar_t, float>& a, const StreamPlan& p, cudaStream_t stream) {
  const dim3 grid(p.blocks), block(p.threads);
  switch (p.path) {
    case StreamPath::kWarpCached:
      LTK_LAUNCH((margin_ce_stream_kernel<kFeat, RowPerWarp, true, scalar_t>), grid, block, p.smem, stream, a);
      break;
    case StreamPath::kBlockCached:
      LTK_LAUNCH((margin_ce_stream_kernel<kFeat, RowPerBlock, true, scalar_t>), grid, block, p.smem, stream, a);
      break;
    default:
      LTK_LAUNCH((margin_ce_stream_kernel<kFeat, RowPerBlock, false, scalar_t>), grid, block, 0, stream, a);
  }
}

// Launches the stream kernel for the call when one covers it; false: the caller runs the generic kernel.
template <typename scalar_t, typename acc_t>
bool launch_margin_ce_stream(const MarginCeArgs<scalar_t, acc_t>& a, cudaStream_t stream) {
  if constexpr (!kStreamTypes<scalar_t, acc_t>) {
    return false;
  } else {
    const StreamPlan p = plan_margin_ce_stream(a);
    switch (p.feat) {
#define LTK_STREAM_CASE(F) \
  case F: launch_stream_path<F>(a, p, stream); return true;
      LTK_STREAM_FEATURES(LTK_STREAM_CASE)
#undef LTK_STREAM_CASE
      default: return false;
    }
  }
}

}  // namespace cuda
}  // namespace ltk
