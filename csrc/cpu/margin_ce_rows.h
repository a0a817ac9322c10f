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
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "ltk/margin_ce.h"
#if defined(CPU_CAPABILITY_AVX512)
#include "cpu/philox_avx512.h"
#endif
#include "ltk/philox.h"
#include "ltk/transform.h"

namespace ltk {
namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// exp(x) for the softmax's x = z - max <= 0 (NaN propagates). The AVX-512 float version: n = round(x / ln2)
// by the 1.5 * 2^23 shifter (one FMA and a subtraction, where vrndscaleps is two uops), r = x - n ln2 with
// a single-float ln2 (its 1.9e-9 error times |n| <= 127: at most 2.4e-7 relative, and only far below the
// max), a degree-5 polynomial fitted for relative error on |r| <= ln2 / 2 (1.4e-7 with its float
// coefficients) and vscalefps for the exact 2^n. Measured over [-87, 0]: at most 4.3e-7 relative error
// against double exp. This machine has one 512-bit FMA port and the exp is most of pass 2: 9 operations
// against the previous 12 (Cody-Waite with a split ln2 and a degree-6 Taylor polynomial) made the fp32
// 512x8142 LDAM kernel 7-9% faster (C++ A/B harness). x is clamped at -127 (max(c, x) keeps NaN), so -inf
// gives 0 instead of inf - inf.
template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m512 v = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);
    const __m512 shifter = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: v / ln2 + shifter rounds to an integer
    const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), v);
    __m512 q = _mm512_set1_ps(0.008301300927996635f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.041915588080883026f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.16667520999908447f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.4999889135360718f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.9999997019767761f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0000001192092896f));
    return _mm512_scalef_ps(q, n);
  }
#endif
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();  // 20 ulp: far below the 1e-5 relative tolerance of fp32 losses
  } else {
    return x.exp();
  }
}

// Output rows larger than this (in total) are written with non-temporal stores: they cannot stay in the
// 1.25 MiB-per-core L2 anyway, and skipping the read-for-ownership of every output line cut the fp32
// 512x8142 kernel by ~20% here (bench/, side by side).
constexpr int64_t kStreamOutputBytes = int64_t(8) << 20;

// One full vector through a non-temporal store (AVX-512 / AVX2; the caller issues the sfence), a plain
// store on the portable build.
template <typename acc_t>
inline void stream_vec(acc_t* p, const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) _mm512_stream_ps(p, v);
  else _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) _mm256_stream_ps(p, v);
  else _mm256_stream_pd(p, v);
#else
  v.store(p);
#endif
}

// A streamed output row written in three parts: the head up to out's first 64-byte boundary (plain
// masked stores, less than one line), the aligned body one non-temporal vector per step(), the tail.
// f(j, n) is the vector of columns [j, j + n).
template <typename acc_t, typename F>
struct StreamedRow {
  static constexpr int64_t V = Vectorized<acc_t>::size();
  acc_t* out;
  int64_t C;
  const F& f;
  int64_t j = 0;

  void head() {
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % 64) / int64_t(sizeof(acc_t));
    const int64_t h = mis ? std::min<int64_t>(C, 64 / int64_t(sizeof(acc_t)) - mis) : 0;
    for (; j < h; j += V) f(j, std::min<int64_t>(V, h - j)).store(out + j, std::min<int64_t>(V, h - j));
    j = h;
  }
  void step() {
    if (j + V <= C) {
      stream_vec(out + j, f(j, V));
      j += V;
    }
  }
  void rest() {
    for (; j + V <= C; j += V) stream_vec(out + j, f(j, V));
    for (; j < C; j += V) f(j, std::min<int64_t>(V, C - j)).store(out + j, std::min<int64_t>(V, C - j));
  }
};

// Writes f(j, n) (a vector of n <= V valid lanes) for j = 0, V, ... < C into out. With stream, the
// 64-byte-aligned body goes through non-temporal stores; the caller issues the sfence.
template <typename acc_t, typename F>
inline void store_row(acc_t* out, int64_t C, const F& f, bool stream) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  if (stream) {
    StreamedRow<acc_t, F> w{out, C, f};
    w.head();
    w.rest();
    return;
  }
  for (int64_t j = 0; j < C; j += V) {
    const int64_t n = std::min<int64_t>(V, C - j);
    f(j, n).store(out + j, n);
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

// Standard normals of one row, columns [0, 4 groups). AVX-512: hand-vectorised (cpu/philox_avx512.h);
// otherwise philox::normals_groups, vectorised by the compiler.
inline void fill_row_normals(uint64_t seed, uint64_t offset, uint64_t row, int64_t groups, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  avx512::fill_row_normals(seed, offset, row, groups, out);  // same bits, 1.7x faster
#else
  philox::normals_groups(seed, offset, row, 0, groups, out);
#endif
}

// v with lane k replaced by value.
template <typename acc_t>
inline Vectorized<acc_t> with_lane(const Vectorized<acc_t>& v, int64_t k, acc_t value) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  lanes[k] = value;
  return Vectorized<acc_t>::loadu(lanes);
}

// Pass 1 of a linear row: z_j = S (r_j c_j + q_j) (r, q optional at compile time) into z, lanes past C
// set to -inf up to the vector-padded length; returns the lane-wise max. noinline: inlined four times into
// the row loop, the register allocation of the whole kernel got 20% slower.
template <bool kR, bool kQ, typename acc_t>
__attribute__((noinline)) Vectorized<acc_t> logits_row(const acc_t* c, const acc_t* r, const acc_t* q, const Vectorized<acc_t>& vS,
                                    acc_t* z, int64_t C) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec vmax(-std::numeric_limits<acc_t>::infinity());
  auto logit = [&](int64_t j, int64_t n) {
    Vec x = Vec::loadu(c + j, n);
    if constexpr (kR) x = x * Vec::loadu(r + j, n);
    if constexpr (kQ) x = x + Vec::loadu(q + j, n);
    return x * vS;
  };
  // Four independent max chains: at::vec::maximum propagates NaN (max, compare, mask-to-vector, or), a
  // loop-carried chain of ~8 cycles per vector that bounded this pass when it had one accumulator.
  Vec m1 = vmax, m2 = vmax, m3 = vmax;
  int64_t j = 0;
  for (; j + 4 * V <= C; j += 4 * V) {
    const Vec z0 = logit(j, V), z1 = logit(j + V, V), z2 = logit(j + 2 * V, V), z3 = logit(j + 3 * V, V);
    z0.store(z + j);
    z1.store(z + j + V);
    z2.store(z + j + 2 * V);
    z3.store(z + j + 3 * V);
    vmax = at::vec::maximum(vmax, z0);
    m1 = at::vec::maximum(m1, z1);
    m2 = at::vec::maximum(m2, z2);
    m3 = at::vec::maximum(m3, z3);
  }
  vmax = at::vec::maximum(at::vec::maximum(vmax, m1), at::vec::maximum(m2, m3));
  for (; j + V <= C; j += V) {
    const Vec zv = logit(j, V);
    zv.store(z + j);
    vmax = at::vec::maximum(vmax, zv);
  }
  if (j < C) {
    const Vec zv = Vec::set(Vec(-std::numeric_limits<acc_t>::infinity()), logit(j, C - j), C - j);
    zv.store(z + j);
    vmax = at::vec::maximum(vmax, zv);
  }
  return vmax;
}

// Pass 3 of a linear row: grad_j = S r_j (A e_j - D w_j) for j != y and gy at the target, optionally
// accumulating sum_j (A e_j - D w_j) beta_j for the FBL row shift (returned lane-wise).
template <typename acc_t>
struct GradRow {
  const acc_t *e, *r, *w, *beta;
  acc_t A, D, S;
  int64_t y;
  acc_t gy;

  // grad_j of columns [j, j + n) when there is no row-shift sum: S r_j (A e_j - D w_j), gy at the target
  template <bool kR, bool kD>
  auto values() const {
    using Vec = Vectorized<acc_t>;
    return [this, vAS = Vec(A * S), vDS = Vec(D * S)](int64_t j, int64_t n) {
      Vec out = vAS * Vec::loadu(e + j, n);
      if constexpr (kD) out = out - vDS * (w ? Vec::loadu(w + j, n) : Vec(1));
      if constexpr (kR) out = out * Vec::loadu(r + j, n);
      if (static_cast<uint64_t>(y - j) < static_cast<uint64_t>(n)) out = with_lane(out, y - j, gy);
      return out;
    };
  }

  // store<kR, kD, kShift> picked at run time: r given, D != 0, and whether the row-shift sum is wanted
  Vectorized<acc_t> store(acc_t* g, int64_t C, bool stream, bool shift) const {
    const bool R = r != nullptr, DW = D != acc_t(0);
    if (!R && !DW && !shift) return store<false, false, false>(g, C, stream);
    if (R && !DW && !shift) return store<true, false, false>(g, C, stream);
    if (!R && DW && !shift) return store<false, true, false>(g, C, stream);
    if (R && DW && !shift) return store<true, true, false>(g, C, stream);
    if (!R && !DW) return store<false, false, true>(g, C, stream);
    if (R && !DW) return store<true, false, true>(g, C, stream);
    if (!R) return store<false, true, true>(g, C, stream);
    return store<true, true, true>(g, C, stream);
  }

  template <bool kR, bool kD, bool kShift>
  __attribute__((noinline)) Vectorized<acc_t> store(acc_t* g, int64_t C, bool stream) const {
    using Vec = Vectorized<acc_t>;
    if constexpr (!kShift) {
      (store_row<acc_t>)(g, C, values<kR, kD>(), stream);
      return Vec(0);
    } else {
      const Vec vA(A), vD(D), vS(S);
      Vec vshift(0);
      auto f = [&](int64_t j, int64_t n) {
        Vec gz = vA * Vec::loadu(e + j, n);
        if constexpr (kD) gz = gz - vD * (w ? Vec::loadu(w + j, n) : Vec(1));
        vshift = vshift + gz * Vec::loadu(beta + j, n);
        Vec out = gz * vS;
        if constexpr (kR) out = out * Vec::loadu(r + j, n);
        if (static_cast<uint64_t>(y - j) < static_cast<uint64_t>(n)) out = with_lane(out, y - j, gy);
        return out;
      };
      (store_row<acc_t>)(g, C, f, stream);
      return vshift;
    }
  }
};

// One vector of pass 2: e = exp(z - shift) in place, added to vsum, while one line of the next row's input
// is pulled into L2 (T1). Prefetches past the end of the tensor are harmless.
template <typename acc_t>
inline void exp_vec(acc_t* z, int64_t j, const Vectorized<acc_t>& vshift, const char* next_row, int64_t in_elem,
                    Vectorized<acc_t>& vsum) {
  if (next_row) __builtin_prefetch(next_row + j * in_elem, 0, 2);
  const Vectorized<acc_t> e = vexp<acc_t>(Vectorized<acc_t>::loadu(z + j) - vshift);
  e.store(z + j);
  vsum = vsum + e;
}

// Pass 2 of a row (exp(z - shift) in place, returns the lane-wise sum, prefetches the next row's input
// into L2) fused with the previous row's streamed gradient: one non-temporal vector of it per exp vector
// (software pipelining: the stores drain to memory while the exp computes, instead of stalling a pass of
// their own). prev's exponentials are in the other scratch buffer. Rows without a pending gradient keep the
// inline loop in margin_ce_rows (a call per row cost 3-6% at 128 x 100).
template <bool kR, bool kD, typename acc_t>
__attribute__((noinline)) Vectorized<acc_t> exp_pass_with_prev(acc_t* z, int64_t Cpad, acc_t shift, const char* next_row,
                                                               int64_t in_elem, const GradRow<acc_t>& prev,
                                                               acc_t* prev_out, int64_t C) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const auto f = prev.template values<kR, kD>();
  StreamedRow<acc_t, decltype(f)> w{prev_out, C, f};
  w.head();
  Vec vsum(0);
  const Vec vshift(shift);
  for (int64_t j = 0; j < Cpad; j += V) {
    exp_vec(z, j, vshift, next_row, in_elem, vsum);
    w.step();
  }
  w.rest();
  return vsum;
}

// Vector twin of ltk::angular_logit for non-target columns, whose angle M is the cloud's alone (m = 0):
// z = S (phi or the fallback) and dz/dc. The fallback threshold cos(pi - M) and the GCLAng fallback
// c - sin(pi - M) are written as -cos M and c - sin M (equal up to rounding); the ArcFace fallback
// c - sin(pi) * 0 is c. At M = 0 this reduces to the clamp-only logit of element_logit.
template <typename acc_t>
inline void angular_nontarget_vec(const Vectorized<acc_t>& c_in, const Vectorized<acc_t>& M, int mode,
                                  const Vectorized<acc_t>& vS, Vectorized<acc_t>& z, Vectorized<acc_t>& jac) {
  using Vec = Vectorized<acc_t>;
  const Vec one(1), zero(0);
  const bool arc = arcface_clamps(mode);
  const Vec c = arc ? at::vec::clamp(c_in, Vec(-1), one) : c_in;
  const Vec cosM = M.cos(), sinM = M.sin();
  const Vec sine = at::vec::maximum(one - c * c, zero).sqrt();
  const Vec phi = c * cosM - sine * sinM;
  const Vec dphi = Vec::blendv(cosM, cosM + c / sine * sinM, sine > zero);
  const bool easy = mode == kArcFaceEasy || mode == kGclAngEasy;
  const Vec use_phi = easy ? (c > zero) : (c > zero - cosM);
  const Vec alt = (easy || mode == kArcFace) ? c : c - sinM;
  z = vS * Vec::blendv(alt, phi, use_phi);
  jac = vS * Vec::blendv(one, dphi, use_phi);
  // torch.clamp passes no gradient at or beyond its bounds
  if (arc) jac = Vec::blendv(jac, zero, (c_in >= one) | (c_in <= Vec(-1)));
}

// The softmax shift of a row whose vector max zmax saw the target's margin-free logit z_free, now that the
// target holds z_t (z[y] = z_t already). Any shift at or above the true max keeps the log-sum-exp exact as
// long as exp(true max - shift) stays far from underflow: when the target held the max and its margin took
// it more than kShiftSlack below (s m > 60, e.g. C = 1 or a large scale), the max of the finished row is
// taken again, which would otherwise make every exponential 0 and the loss -inf. A rare row costs one
// more read of the L1-resident row; e^-60 keeps exp(max - shift) >= 1e-26, above the denormals that are
// flushed to zero, and what the larger shift flushes is below e^-27 of the max term.
template <typename acc_t>
inline acc_t softmax_shift(const acc_t* z, int64_t Cpad, acc_t zmax, acc_t z_free, acc_t z_t) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kShiftSlack = std::is_same_v<acc_t, float> ? acc_t(60) : acc_t(600);
  if (std::isnan(z_t) || z_t > zmax) return z_t;  // a larger (or NaN) target: NaN makes the row NaN
  if (!(z_free >= zmax && zmax - z_t > kShiftSlack)) return zmax;
  Vec m(-std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < Cpad; j += Vec::size()) m = at::vec::maximum(m, Vec::loadu(z + j));
  return at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, m);
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
  // Angular + cloud perturbs every element non-linearly: its jacobian is stored in pass 1.
  const bool generic = a.angular != kLinear && cloud;
  const bool clamp_c = arcface_clamps(a.angular);
  const acc_t inv_denom = *a.inv_denom;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  // ~4096 elements per task: at 128 x 100 two threads beat one by 8-15% of a training step (fork/join is
  // ~1-2 us, a task ~5 us), and ATen's log_softmax goes parallel there too (A/B, bench harness)
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1));
  const bool stream = !cast_input && a.N * C * int64_t(sizeof(acc_t)) > kStreamOutputBytes;
  // Linear logits (no ArcFace clamp): the hot loops are template instantiations without per-element
  // option tests, which cost about as many instructions as the arithmetic (20-38% of the fp32 kernel).
  const bool affine = a.angular == kLinear;
  const bool pert_only = affine && cloud && !a.col_bias && !a.shift_coef;
#if defined(CPU_CAPABILITY_AVX512)
  const bool fused_cloud_offsets = pert_only && !a.noise && std::is_same_v<acc_t, float>;
#else
  const bool fused_cloud_offsets = false;
#endif

  // Streamed linear rows without the FBL row shift: each row's gradient is written during the next row's
  // pass 2 (exp_pass_with_prev), two rows of scratch per thread.
  const bool pipelined = stream && affine && want_grad && !a.grad_row_shift;
  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    std::vector<acc_t> zbuf(pipelined ? 2 * Cpad : Cpad), cbuf(cast_input ? Cpad : 0), pbuf(cloud ? Cpad : 0),
        jbuf(generic ? Cpad : 0), qbuf(affine && !fused_cloud_offsets ? Cpad : 0), gbuf((want_grad && cast_input) ? Cpad : 0);
    std::vector<float> nbuf((cloud && !a.noise && !fused_cloud_offsets) ? (C + 3) / 4 * 4 : 0);
    acc_t* z = zbuf.data();
    // pipelined: the previous row's gradient (exponentials in the other half of zbuf), written by pass 2
    GradRow<acc_t> prev{};
    acc_t* prev_out = nullptr;
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
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) p[j] = cloud_perturbation(a, j, a.noise[i * C + j]);
        } else if (fused_cloud_offsets) {
          // GCL, AVX-512, float: pass 1 draws the offsets itself (avx512::cloud_logits_row); of the
          // perturbation only the target's is read (by elem(y))
          p[y] = cloud_perturbation(
              a, y, scale_noise<acc_t>(philox::normal_at(a.seed, a.offset, static_cast<uint64_t>(i), y)));
        } else {
          float* nz = nbuf.data();
          fill_row_normals(a.seed, a.offset, static_cast<uint64_t>(i), (C + 3) / 4, nz);
          if (pert_only) {  // GCL: the offset vector of pass 1 is -pert, written in the same loop
            acc_t* qb = qbuf.data();
#pragma omp simd
            for (int64_t j = 0; j < C; ++j) {
              const acc_t pj = cloud_perturbation(a, j, scale_noise<acc_t>(nz[j]));
              p[j] = pj;
              qb[j] = -pj;
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < C; ++j) p[j] = cloud_perturbation(a, j, scale_noise<acc_t>(nz[j]));
          }
        }
        pert = p;
      }
      auto elem = [&](int64_t j) { return element_logit(a, j, y, S, t, pert ? pert[j] : acc_t(0), c[j]); };

      // ---- pass 1: logits (and, for angular + cloud, the jacobian) and max
      Vec vmax(ninf);
      const Vec vS(S);
      if (fused_cloud_offsets) {  // GCL: z_j = S (c_j + q_j) with the offsets q drawn in the same loop
#if defined(CPU_CAPABILITY_AVX512)
        if constexpr (std::is_same_v<acc_t, float>) {
          vmax = avx512::cloud_logits_row(a.seed, a.offset, static_cast<uint64_t>(i), C, a.noise_mul, a.cloud, c, S,
                                          z);
        }
#endif
      } else if (affine) {
        // z_j = S (r_j c_j + q_j) with q_j = b_j + t beta_j - pert_j gathered first, so that the hot loop
        // is one of four instantiations with no per-element option tests
        const acc_t* q = nullptr;
        if (a.col_bias && !a.shift_coef && !pert) {
          q = a.col_bias;
        } else if (pert_only && !a.noise) {
          q = qbuf.data();  // filled with -perturbation above
        } else if (a.col_bias || a.shift_coef || pert) {
          acc_t* qb = qbuf.data();
          if (a.col_bias) std::copy(a.col_bias, a.col_bias + C, qb);
          else std::fill(qb, qb + C, acc_t(0));
          if (a.shift_coef) at::vec::map2([t](Vec v, Vec b) { return v + Vec(t) * b; }, qb, qb, a.shift_coef, C);
          if (pert) at::vec::map2([](Vec v, Vec p) { return v - p; }, qb, qb, pert, C);
          q = qb;
        }
        vmax = a.col_scale ? (q ? logits_row<true, true>(c, a.col_scale, q, vS, z, C)
                                : logits_row<true, false>(c, a.col_scale, q, vS, z, C))
                           : (q ? logits_row<false, true>(c, a.col_scale, q, vS, z, C)
                                : logits_row<false, false>(c, a.col_scale, q, vS, z, C));
      } else {
        const Vec vt(t);
        for (int64_t j = 0; j < C; j += V) {
          const int64_t n = std::min<int64_t>(V, C - j);
          Vec zv;
          if (!generic) {
            Vec x = Vec::loadu(c + j, n);
            if (clamp_c) x = at::vec::clamp(x, Vec(-1), Vec(1));
            if (a.col_scale) x = x * Vec::loadu(a.col_scale + j, n);
            if (a.col_bias) x = x + Vec::loadu(a.col_bias + j, n);
            if (a.shift_coef) x = x + vt * Vec::loadu(a.shift_coef + j, n);
            if (pert) x = x - Vec::loadu(pert + j, n);
            zv = x * vS;
          } else {
            Vec jac;
            angular_nontarget_vec(Vec::loadu(c + j, n), Vec::loadu(pert + j, n), a.angular, vS, zv, jac);
            jac.store(jbuf.data() + j);
          }
          if (n < V) zv = Vec::set(Vec(ninf), zv, n);
          zv.store(z + j);
          vmax = at::vec::maximum(vmax, zv);
        }
      }
      acc_t zmax = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vmax);
      // The target element (margin, angular transform) is recomputed with the scalar formula; the vector
      // max saw its margin-free value.
      const acc_t z_free = z[y];
      const ElemOut<acc_t> ty = elem(y);
      z[y] = ty.z;
      const acc_t jac_y = ty.dzdc;
      const acc_t z_t = ty.z;
      zmax = softmax_shift(z, Cpad, zmax, z_free, z_t);
      const acc_t shift = zmax;
      // label smoothing's sum_j w_j (z_j - shift), in the shifted frame like the log-sum-exp so that a large
      // common offset of the logits cancels exactly
      acc_t swz = 0;
      if (smoothing) {
        Vec vswz(0);
        const Vec vshift(shift);
        for (int64_t j = 0; j < C; j += V) {
          const int64_t n = std::min<int64_t>(V, C - j);
          const Vec zs = Vec::set(Vec(0), Vec::loadu(z + j, n) - vshift, n);
          vswz = vswz + (a.weight ? zs * Vec::loadu(a.weight + j, n) : zs);
        }
        swz = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, vswz);
      }

      // ---- pass 2: exp and sum
      // While this pass computes from L1, pull the next row's input into L2 (one line per vector for
      // 512-bit float; prefetches past the end of the tensor are harmless): 6-15% of the fp32 kernel.
      const char* next_row = (i + 1 < end) ? reinterpret_cast<const char*>(a.input + (i + 1) * C) : nullptr;
      constexpr int64_t in_elem = sizeof(scalar_t);
      Vec vsum(0);
      if (prev_out) {
        const bool pD = prev.D != acc_t(0);
        auto pass = prev.r ? (pD ? exp_pass_with_prev<true, true, acc_t> : exp_pass_with_prev<true, false, acc_t>)
                           : (pD ? exp_pass_with_prev<false, true, acc_t> : exp_pass_with_prev<false, false, acc_t>);
        vsum = pass(z, Cpad, shift, next_row, in_elem, prev, prev_out, C);
        prev_out = nullptr;
      } else {
        const Vec vshift(shift);
        for (int64_t j = 0; j < Cpad; j += V) exp_vec(z, j, vshift, next_row, in_elem, vsum);
      }
      const acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, vsum);
      const acc_t w_t = a.weight ? a.weight[y] : acc_t(1);
      // log-sum-exp, target logit and smoothing sum all relative to the shift (see row_coefficients)
      const RowCoef<acc_t> rc = row_coefficients<acc_t>(std::log(sum), z_t - shift, swz, w_t, *a.weight_sum,
                                                        a.smoothing, C, a.focal, a.gamma);
      a.row_loss[i] = rc.loss;
      if (!want_grad && !a.grad_row_shift) continue;

      // ---- pass 3: gradient, already divided by the reduction denominator
      const acc_t A = rc.a / sum * inv_denom, B = rc.b * inv_denom, D = rc.d * inv_denom;
      const Vec vA(A), vD(D);
      // dL/dz_j = A e_j - D w_j - B [j = y]; the target's -B enters through gz_y below.
      auto dz_vec = [&](int64_t j, int64_t n) {
        Vec gz = vA * Vec::loadu(z + j, n);  // lanes >= n load as 0
        if (D != acc_t(0)) gz = gz - vD * (a.weight ? Vec::loadu(a.weight + j, n) : Vec(1));
        return gz;
      };
      const acc_t gz_y = A * z[y] - D * (a.weight ? a.weight[y] : acc_t(1)) - B;
      // FBL: dL/dt_i = S sum_j dL/dz_j beta_j, accumulated in the gradient pass.
      Vec vgshift(0);
      if (!want_grad) {
        for (int64_t j = 0; j < C; j += V) {
          const int64_t n = std::min<int64_t>(V, C - j);
          vgshift = vgshift + dz_vec(j, n) * Vec::loadu(a.shift_coef + j, n);
        }
      } else {
        acc_t* g = cast_input ? gbuf.data() : reinterpret_cast<acc_t*>(grow);
        const acc_t gy = gz_y * jac_y;
        if (affine) {
          // dL/dc_j = S r_j (A e_j - D w_j) off the target; templated on r, D != 0 and the row shift
          const GradRow<acc_t> gr{z, a.col_scale, a.weight, a.shift_coef, A, D, S, y, gy};
          if (pipelined) {  // written by the next row's pass 2, or after the thread's last row
            prev = gr;
            prev_out = g;
            z = (z == zbuf.data()) ? zbuf.data() + Cpad : zbuf.data();
          } else {
            vgshift = gr.store(g, C, stream, a.grad_row_shift != nullptr);
          }
        } else {
          auto grad_vec = [&](int64_t j, int64_t n) {
            const Vec gz = dz_vec(j, n);
            if (a.grad_row_shift) vgshift = vgshift + gz * Vec::loadu(a.shift_coef + j, n);
            Vec jac;
            if (generic) {
              jac = Vec::loadu(jbuf.data() + j, n);
            } else {
              jac = a.col_scale ? vS * Vec::loadu(a.col_scale + j, n) : vS;
              if (clamp_c) {
                const Vec cv = Vec::loadu(c + j, n);
                jac = Vec::blendv(Vec(0), jac, (cv > Vec(-1)) & (cv < Vec(1)));
              }
            }
            Vec out = gz * jac;
            // the target's own derivative
            if (static_cast<uint64_t>(y - j) < static_cast<uint64_t>(n)) out = with_lane(out, y - j, gy);
            return out;
          };
          (store_row<acc_t>)(g, C, grad_vec, stream);
        }
        if (cast_input) at::vec::convert(g, grow, C);
      }
      if (a.grad_row_shift) {
        // the vector sum used A e_y - D w_y for the target; its true derivative has -B as well
        const acc_t vs = at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, vgshift);
        a.grad_row_shift[i] = (vs - B * a.shift_coef[y]) * S;
      }
    }
    if (prev_out) prev.store(prev_out, C, stream, /*shift=*/false);  // the last row's gradient
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (stream) _mm_sfence();  // non-temporal stores are visible to other threads after this
#endif
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace ltk
