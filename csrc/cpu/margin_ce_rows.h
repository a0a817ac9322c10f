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
// against double exp. 9 vector operations, because the exp is most of pass 2 and a CPU with one 512-bit FMA
// port is bound by them (docs/cpu_kernel.md has the measured table). x is clamped at -127 (max(c, x) keeps
// NaN), so -inf gives 0 instead of inf - inf.
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
// 1.25 MiB-per-core L2 anyway, and a plain store would first read every output line (read-for-ownership),
// a third more memory traffic for a kernel bound by it.
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

// The row loop's step functions are force-inlined, so that the loop compiles as one function (a
// call per row cost 3-6% at 128 x 100), and each step keeps a name and a comment.
#define LTK_ROW_STEP inline __attribute__((always_inline))

// What margin_ce_rows decides once per call: which instantiations the rows take and which scratch rows a
// thread needs. What the types decide is constexpr, so that its branches fold away.
template <typename scalar_t, typename acc_t>
struct RowPlan {
  static constexpr bool cast_input = !std::is_same_v<scalar_t, acc_t>;  // 16-bit input: rows converted first
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr bool can_fuse_cloud = std::is_same_v<acc_t, float>;  // avx512::cloud_logits_row
#else
  static constexpr bool can_fuse_cloud = false;
#endif
  int64_t C, Cpad;
  bool cloud, smoothing, want_grad;
  bool generic;  // angular + cloud perturbs every element non-linearly: its jacobian is stored in pass 1
  bool clamp_c;  // ArcFace clamps the cosine to [-1, 1]
  bool stream;   // the gradient goes out through non-temporal stores (kStreamOutputBytes)
  // Linear logits (no ArcFace clamp): the hot loops are template instantiations without per-element
  // option tests, which cost about as many instructions as the arithmetic (20-38% of the fp32 kernel).
  bool affine;
  bool pert_only;  // linear, a cloud and no other offset (GCL)
  bool fused_;     // GCL, AVX-512, float: pass 1 draws the offsets itself (read through fused_cloud_offsets)
  constexpr bool fused_cloud_offsets() const { return can_fuse_cloud && fused_; }
  // Streamed linear rows without the FBL row shift: each row's gradient is written during the next row's
  // pass 2 (exp_pass_with_prev), two rows of scratch per thread.
  bool pipelined;
  bool draws_normals;  // a cloud drawn here row by row (not given as noise, not drawn by pass 1)
};

template <typename scalar_t, typename acc_t>
RowPlan<scalar_t, acc_t> row_plan(const MarginCeArgs<scalar_t, acc_t>& a) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  RowPlan<scalar_t, acc_t> p;
  p.C = a.C;
  p.Cpad = (a.C + V - 1) / V * V;
  p.cloud = a.cloud != nullptr;
  p.smoothing = a.smoothing != acc_t(0);
  p.want_grad = a.grad != nullptr;
  p.generic = a.angular != kLinear && p.cloud;
  p.clamp_c = arcface_clamps(a.angular);
  p.stream = !p.cast_input && a.N * a.C * int64_t(sizeof(acc_t)) > kStreamOutputBytes;
  p.affine = a.angular == kLinear;
  p.pert_only = p.affine && p.cloud && !a.col_bias && !a.shift_coef;
  p.fused_ = p.pert_only && !a.noise;
  p.pipelined = p.stream && p.affine && p.want_grad && !a.grad_row_shift;
  p.draws_normals = p.cloud && !a.noise && !p.fused_cloud_offsets();
  return p;
}

// A thread's scratch rows, sized by the plan.
template <typename scalar_t, typename acc_t>
struct RowScratch {
  std::vector<acc_t> z;  // logits, then exponentials (two rows when pipelined)
  std::vector<acc_t> c;  // the row converted from 16-bit input
  std::vector<acc_t> pert;
  std::vector<acc_t> jac;  // generic rows: dz/dc of every element
  std::vector<acc_t> q;    // linear rows: the gathered offsets b_j + t beta_j - pert_j
  std::vector<acc_t> g;    // the gradient in acc_t before its conversion to 16 bits
  std::vector<float> normals;

  explicit RowScratch(const RowPlan<scalar_t, acc_t>& p)
      : z(p.pipelined ? 2 * p.Cpad : p.Cpad),
        c(p.cast_input ? p.Cpad : 0),
        pert(p.cloud ? p.Cpad : 0),
        jac(p.generic ? p.Cpad : 0),
        q(p.affine && !p.fused_cloud_offsets() ? p.Cpad : 0),
        g((p.want_grad && p.cast_input) ? p.Cpad : 0),
        normals(p.draws_normals ? (p.C + 3) / 4 * 4 : 0) {}
};

// The values of row i that every pass reads.
template <typename acc_t>
struct RowState {
  int64_t i, y;
  acc_t S, t;          // the row's scale and FBL shift
  const acc_t* c;      // cosines in acc_t
  const acc_t* pert;   // cloud perturbation, or null
  acc_t z_t, jac_y;    // the target's logit and dz/dc
};

// An ignored row: zero loss, zero gradient, zero row-shift gradient.
template <typename scalar_t, typename acc_t>
LTK_ROW_STEP void ignored_row(const MarginCeArgs<scalar_t, acc_t>& a, int64_t i, scalar_t* grow) {
  a.row_loss[i] = 0;
  if (grow) std::fill(grow, grow + a.C, scalar_t(0));
  if (a.grad_row_shift) a.grad_row_shift[i] = 0;
}

// The row's cosines in acc_t: the input itself, or its conversion from 16 bits in scratch.
template <typename scalar_t, typename acc_t>
LTK_ROW_STEP const acc_t* row_cosines(const MarginCeArgs<scalar_t, acc_t>& a, const RowPlan<scalar_t, acc_t>& p,
                                      RowScratch<scalar_t, acc_t>& s, int64_t i) {
  const scalar_t* in_row = a.input + i * a.C;
  if (p.cast_input) {
    at::vec::convert(in_row, s.c.data(), a.C);
    return s.c.data();
  }
  return reinterpret_cast<const acc_t*>(in_row);
}

// The cloud's perturbation of row i (null without a cloud). Linear mode subtracts
// noise_mul |clamp(eps, -1, 1)| delta_j; GCLAng adds the angle (pi/2) epsilon delta_j |clamp(eps, -1, 1)|
// to the margin. GCL (pert_only) also writes the offsets of pass 1, -pert, in the same loop; with
// fused_cloud_offsets pass 1 draws them itself and only the target's perturbation is computed here.
template <typename scalar_t, typename acc_t>
LTK_ROW_STEP const acc_t* row_perturbation(const MarginCeArgs<scalar_t, acc_t>& a, const RowPlan<scalar_t, acc_t>& p,
                                           RowScratch<scalar_t, acc_t>& s, int64_t i, int64_t y) {
  if (!p.cloud) return nullptr;
  const int64_t C = a.C;
  acc_t* pt = s.pert.data();
  if (a.noise) {
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) pt[j] = cloud_perturbation(a, j, a.noise[i * C + j]);
  } else if (p.fused_cloud_offsets()) {
    pt[y] = cloud_perturbation(a, y,
                               scale_noise<acc_t>(philox::normal_at(a.seed, a.offset, static_cast<uint64_t>(i), y)));
  } else {
    float* nz = s.normals.data();
    fill_row_normals(a.seed, a.offset, static_cast<uint64_t>(i), (C + 3) / 4, nz);
    if (p.pert_only) {
      acc_t* qb = s.q.data();
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const acc_t pj = cloud_perturbation(a, j, scale_noise<acc_t>(nz[j]));
        pt[j] = pj;
        qb[j] = -pj;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) pt[j] = cloud_perturbation(a, j, scale_noise<acc_t>(nz[j]));
    }
  }
  return pt;
}

// Pass 1 of a linear row: z_j = S (r_j c_j + q_j) with q_j = b_j + t beta_j - pert_j gathered first, so
// that the hot loop is one of four instantiations with no per-element option tests. Returns the lane-wise
// max (the target at its margin-free value).
template <typename scalar_t, typename acc_t>
LTK_ROW_STEP Vectorized<acc_t> linear_logits_pass(const MarginCeArgs<scalar_t, acc_t>& a, const RowPlan<scalar_t,
                                                  acc_t>& p, RowScratch<scalar_t, acc_t>& s, const RowState<acc_t>& r,
                                                  acc_t* z) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = a.C;
  const Vec vS(r.S);
  if (p.fused_cloud_offsets()) {  // GCL: z_j = S (c_j + q_j) with the offsets q drawn in the same loop
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      return avx512::cloud_logits_row(a.seed, a.offset, static_cast<uint64_t>(r.i), C, a.noise_mul, a.cloud, r.c,
                                      r.S, z);
    }
#endif
    return Vec(-std::numeric_limits<acc_t>::infinity());  // not reached: the plan sets it for AVX-512 float only
  }
  const acc_t* q = nullptr;
  if (a.col_bias && !a.shift_coef && !r.pert) {
    q = a.col_bias;
  } else if (p.pert_only && !a.noise) {
    q = s.q.data();  // filled with -perturbation by row_perturbation
  } else if (a.col_bias || a.shift_coef || r.pert) {
    acc_t* qb = s.q.data();
    if (a.col_bias) std::copy(a.col_bias, a.col_bias + C, qb);
    else std::fill(qb, qb + C, acc_t(0));
    const acc_t t = r.t;
    if (a.shift_coef) at::vec::map2([t](Vec v, Vec b) { return v + Vec(t) * b; }, qb, qb, a.shift_coef, C);
    if (r.pert) at::vec::map2([](Vec v, Vec pv) { return v - pv; }, qb, qb, r.pert, C);
    q = qb;
  }
  return a.col_scale ? (q ? logits_row<true, true>(r.c, a.col_scale, q, vS, z, C)
                          : logits_row<true, false>(r.c, a.col_scale, q, vS, z, C))
                     : (q ? logits_row<false, true>(r.c, a.col_scale, q, vS, z, C)
                          : logits_row<false, false>(r.c, a.col_scale, q, vS, z, C));
}

// Pass 1 of an angular row (ArcFace, GCLAng): the non-target columns carry no margin, so without a cloud
// they are the clamped (ArcFace) cosine scaled; with a cloud every element takes the angular transform and
// its jacobian is stored for pass 3. Returns the lane-wise max.
template <typename scalar_t, typename acc_t>
LTK_ROW_STEP Vectorized<acc_t> angular_logits_pass(const MarginCeArgs<scalar_t, acc_t>& a, const RowPlan<scalar_t,
                                                   acc_t>& p, RowScratch<scalar_t, acc_t>& s, const RowState<acc_t>& r,
                                                   acc_t* z) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = a.C;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const Vec vS(r.S), vt(r.t);
  Vec vmax(ninf);
  for (int64_t j = 0; j < C; j += V) {
    const int64_t n = std::min<int64_t>(V, C - j);
    Vec zv;
    if (!p.generic) {
      Vec x = Vec::loadu(r.c + j, n);
      if (p.clamp_c) x = at::vec::clamp(x, Vec(-1), Vec(1));
      if (a.col_scale) x = x * Vec::loadu(a.col_scale + j, n);
      if (a.col_bias) x = x + Vec::loadu(a.col_bias + j, n);
      if (a.shift_coef) x = x + vt * Vec::loadu(a.shift_coef + j, n);
      if (r.pert) x = x - Vec::loadu(r.pert + j, n);
      zv = x * vS;
    } else {
      Vec jac;
      angular_nontarget_vec(Vec::loadu(r.c + j, n), Vec::loadu(r.pert + j, n), a.angular, vS, zv, jac);
      jac.store(s.jac.data() + j);
    }
    if (n < V) zv = Vec::set(Vec(ninf), zv, n);
    zv.store(z + j);
    vmax = at::vec::maximum(vmax, zv);
  }
  return vmax;
}

// Label smoothing's sum_j w_j (z_j - shift), in the shifted frame like the log-sum-exp so that a large
// common offset of the logits cancels exactly.
template <typename scalar_t, typename acc_t>
LTK_ROW_STEP acc_t smoothing_sum(const MarginCeArgs<scalar_t, acc_t>& a, const acc_t* z, acc_t shift) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec vswz(0);
  const Vec vshift(shift);
  for (int64_t j = 0; j < a.C; j += V) {
    const int64_t n = std::min<int64_t>(V, a.C - j);
    const Vec zs = Vec::set(Vec(0), Vec::loadu(z + j, n) - vshift, n);
    vswz = vswz + (a.weight ? zs * Vec::loadu(a.weight + j, n) : zs);
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, vswz);
}

// Pass 2: e_j = exp(z_j - shift) in place; returns the sum. While it computes from L1 it pulls the next
// row's input into L2 (one line per vector for 512-bit float; prefetches past the end of the tensor are
// harmless: 6-15% of the fp32 kernel), and a pending pipelined gradient (prev_out) is written meanwhile.
template <typename acc_t>
LTK_ROW_STEP acc_t exp_pass(acc_t* z, int64_t Cpad, acc_t shift, const char* next_row, int64_t in_elem,
                            const GradRow<acc_t>& prev, acc_t*& prev_out, int64_t C) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
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
  return at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, vsum);
}

// Pass 3 of an angular row: dL/dc_j = (A e_j - D w_j) dz_j/dc_j with the jacobian stored by pass 1
// (generic) or S r_j masked by ArcFace's clamp, gy at the target; returns the lane-wise FBL row-shift sum.
template <typename scalar_t, typename acc_t>
LTK_ROW_STEP Vectorized<acc_t> angular_gradient_pass(const MarginCeArgs<scalar_t, acc_t>& a, const RowPlan<scalar_t,
                                                     acc_t>& p, const RowScratch<scalar_t, acc_t>& s,
                                                     const RowState<acc_t>& r, const acc_t* z, acc_t A, acc_t D,
                                                     acc_t gy, acc_t* g) {
  using Vec = Vectorized<acc_t>;
  const Vec vA(A), vD(D), vS(r.S);
  Vec vgshift(0);
  auto grad_vec = [&](int64_t j, int64_t n) {
    Vec gz = vA * Vec::loadu(z + j, n);  // lanes >= n load as 0
    if (D != acc_t(0)) gz = gz - vD * (a.weight ? Vec::loadu(a.weight + j, n) : Vec(1));
    if (a.grad_row_shift) vgshift = vgshift + gz * Vec::loadu(a.shift_coef + j, n);
    Vec jac;
    if (p.generic) {
      jac = Vec::loadu(s.jac.data() + j, n);
    } else {
      jac = a.col_scale ? vS * Vec::loadu(a.col_scale + j, n) : vS;
      if (p.clamp_c) {
        const Vec cv = Vec::loadu(r.c + j, n);
        jac = Vec::blendv(Vec(0), jac, (cv > Vec(-1)) & (cv < Vec(1)));
      }
    }
    Vec out = gz * jac;
    // the target's own derivative
    if (static_cast<uint64_t>(r.y - j) < static_cast<uint64_t>(n)) out = with_lane(out, r.y - j, gy);
    return out;
  };
  (store_row<acc_t>)(g, a.C, grad_vec, p.stream);
  return vgshift;
}

// dL/dt_i without a gradient output (FBL's row shift alone): sum_j (A e_j - D w_j) beta_j lane-wise.
template <typename scalar_t, typename acc_t>
LTK_ROW_STEP Vectorized<acc_t> row_shift_sum(const MarginCeArgs<scalar_t, acc_t>& a, const acc_t* z, acc_t A,
                                             acc_t D) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vA(A), vD(D);
  Vec vgshift(0);
  for (int64_t j = 0; j < a.C; j += V) {
    const int64_t n = std::min<int64_t>(V, a.C - j);
    Vec gz = vA * Vec::loadu(z + j, n);
    if (D != acc_t(0)) gz = gz - vD * (a.weight ? Vec::loadu(a.weight + j, n) : Vec(1));
    vgshift = vgshift + gz * Vec::loadu(a.shift_coef + j, n);
  }
  return vgshift;
}

// One row: the three passes, the loss, and the gradient (or, pipelined, the gradient left in `prev` for
// the next row's pass 2, with z switched to the other scratch row).
template <typename scalar_t, typename acc_t>
LTK_ROW_STEP void margin_ce_row(const MarginCeArgs<scalar_t, acc_t>& a, const RowPlan<scalar_t, acc_t>& p,
                                RowScratch<scalar_t, acc_t>& s, int64_t i, int64_t end, acc_t*& z, GradRow<acc_t>& prev,
                                acc_t*& prev_out) {
  using Vec = Vectorized<acc_t>;
  const int64_t C = a.C;
  RowState<acc_t> r;
  r.i = i;
  r.y = a.target[i];
  scalar_t* grow = p.want_grad ? a.grad + i * C : nullptr;
  if (r.y == a.ignore_index) {
    ignored_row(a, i, grow);
    return;
  }
  const int64_t y = r.y;
  r.S = a.target_scale ? a.target_scale[y] : a.scale;
  r.t = a.row_shift ? a.row_shift[i] : acc_t(0);
  r.c = row_cosines(a, p, s, i);
  r.pert = row_perturbation(a, p, s, i, y);

  // ---- pass 1: logits (and, for angular + cloud, the jacobian) and max
  const Vec vmax = p.affine ? linear_logits_pass(a, p, s, r, z) : angular_logits_pass(a, p, s, r, z);
  acc_t zmax = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& q) { return at::vec::maximum(x, q); }, vmax);
  // The target element (margin, angular transform) is recomputed with the scalar formula; the vector
  // max saw its margin-free value.
  const acc_t z_free = z[y];
  const ElemOut<acc_t> ty = element_logit(a, y, y, r.S, r.t, r.pert ? r.pert[y] : acc_t(0), r.c[y]);
  z[y] = ty.z;
  r.jac_y = ty.dzdc;
  r.z_t = ty.z;
  const acc_t shift = softmax_shift(z, p.Cpad, zmax, z_free, r.z_t);
  const acc_t swz = p.smoothing ? smoothing_sum(a, z, shift) : acc_t(0);

  // ---- pass 2: exp and sum
  const char* next_row = (i + 1 < end) ? reinterpret_cast<const char*>(a.input + (i + 1) * C) : nullptr;
  const acc_t sum = exp_pass(z, p.Cpad, shift, next_row, int64_t(sizeof(scalar_t)), prev, prev_out, C);
  const acc_t w_t = a.weight ? a.weight[y] : acc_t(1);
  // log-sum-exp, target logit and smoothing sum all relative to the shift (see row_coefficients)
  const RowCoef<acc_t> rc = row_coefficients<acc_t>(std::log(sum), r.z_t - shift, swz, w_t, *a.weight_sum,
                                                    a.smoothing, C, a.focal, a.gamma);
  a.row_loss[i] = rc.loss;
  if (!p.want_grad && !a.grad_row_shift) return;

  // ---- pass 3: gradient, already divided by the reduction denominator:
  // dL/dz_j = A e_j - D w_j - B [j = y]; the target's -B enters through gz_y.
  const acc_t inv_denom = *a.inv_denom;
  const acc_t A = rc.a / sum * inv_denom, B = rc.b * inv_denom, D = rc.d * inv_denom;
  const acc_t gz_y = A * z[y] - D * (a.weight ? a.weight[y] : acc_t(1)) - B;
  // FBL: dL/dt_i = S sum_j dL/dz_j beta_j, accumulated in the gradient pass.
  Vec vgshift(0);
  if (!p.want_grad) {
    vgshift = row_shift_sum(a, z, A, D);
  } else {
    acc_t* g = p.cast_input ? s.g.data() : reinterpret_cast<acc_t*>(grow);
    const acc_t gy = gz_y * r.jac_y;
    if (p.affine) {
      // dL/dc_j = S r_j (A e_j - D w_j) off the target; templated on r, D != 0 and the row shift
      const GradRow<acc_t> gr{z, a.col_scale, a.weight, a.shift_coef, A, D, r.S, y, gy};
      if (p.pipelined) {  // written by the next row's pass 2, or after the thread's last row
        prev = gr;
        prev_out = g;
        z = (z == s.z.data()) ? s.z.data() + p.Cpad : s.z.data();
      } else {
        vgshift = gr.store(g, C, p.stream, a.grad_row_shift != nullptr);
      }
    } else {
      vgshift = angular_gradient_pass(a, p, s, r, z, A, D, gy, g);
    }
    if (p.cast_input) at::vec::convert(g, grow, C);
  }
  if (a.grad_row_shift) {
    // the vector sum used A e_y - D w_y for the target; its true derivative has -B as well
    const acc_t vs = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& q) { return x + q; }, vgshift);
    a.grad_row_shift[i] = (vs - B * a.shift_coef[y]) * r.S;
  }
}

template <typename scalar_t, typename acc_t>
void margin_ce_rows(const MarginCeArgs<scalar_t, acc_t>& a) {
  const auto p = row_plan(a);
  // ~4096 elements per task: a task (~5 us) is then worth the fork/join (~1-2 us), so 128 x 100 runs on two
  // threads, as ATen's log_softmax does
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(a.C, 1));
  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals ftz;
    RowScratch<scalar_t, acc_t> s(p);
    acc_t* z = s.z.data();
    // pipelined: the previous row's gradient (exponentials in the other half of s.z), written by pass 2
    GradRow<acc_t> prev{};
    acc_t* prev_out = nullptr;
    for (int64_t i = begin; i < end; ++i) margin_ce_row(a, p, s, i, end, z, prev, prev_out);
    if (prev_out) prev.store(prev_out, a.C, p.stream, /*shift=*/false);  // the last row's gradient
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (p.stream) _mm_sfence();  // non-temporal stores are visible to other threads after this
#endif
  });
}

#undef LTK_ROW_STEP

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace ltk
