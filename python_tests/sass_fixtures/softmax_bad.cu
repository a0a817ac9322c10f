// SASS-gate fixtures (python_tests/test_cuda_sass_gate.py): variants of softmax_good.cu, each breaking one
// gate of the fixture gates, and nothing else (softmax_bad_spill: two, see there):
//   softmax_bad_expf       expf (range reduction + MUFU.EX2 + scaling): too many instructions per element
//   softmax_bad_scalar     four 4-byte loads / stores per four elements: no LDG.E.128 / STG.E.128
//   softmax_bad_local      a per-thread array at a run-time index: local memory (LDL / STL) in the loop
//   softmax_bad_ex2_twice  two MUFU.EX2 per element
//   softmax_bad_occupancy  a 128-element row slice held in registers: > 128 registers, 1 block of 256 per SM
//   softmax_bad_spill      a 64-element slice under __launch_bounds__(256, 4) (64 registers): spills, which are
//                          local memory in the loop too, so it fails max_spills and forbid_local_in_loops
// Standalone: no torch headers. One block per row; row pointers 16-byte aligned.
#define LTK_FIXTURE_HELPERS_ONLY
#include "softmax_good.cu"  // fixture_ex2, softmax4, LTK_FIXTURE_ARGS / LTK_FIXTURE_ROW

extern "C" __global__ void __launch_bounds__(256) softmax_bad_expf(LTK_FIXTURE_ARGS) {
  LTK_FIXTURE_ROW;
  (void)m;
  const float me = row_max[row];
#pragma unroll 1
  for (int q = threadIdx.x; q < C4; q += blockDim.x) {
    float4 v = xr[q];
    v.x = expf(v.x - me) * inv;
    v.y = expf(v.y - me) * inv;
    v.z = expf(v.z - me) * inv;
    v.w = expf(v.w - me) * inv;
    yr[q] = v;
  }
}

extern "C" __global__ void __launch_bounds__(256) softmax_bad_scalar(LTK_FIXTURE_ARGS) {
  const long row = blockIdx.x;
  const float m = row_max[row] * LTK_FIXTURE_LOG2E, inv = row_inv[row];
  const float* __restrict__ xs = x + row * 4 * C4;
  float* __restrict__ ys = y + row * 4 * C4;
#pragma unroll 1
  for (int q = threadIdx.x; q < C4; q += blockDim.x) {
    // scalar accesses, which the compiler does not widen (it knows no 16-byte alignment of xs + 4 q)
#pragma unroll
    for (int k = 0; k < 4; ++k) ys[4 * q + k] = fixture_ex2(xs[4 * q + k] * LTK_FIXTURE_LOG2E - m) * inv;
  }
}

extern "C" __global__ void __launch_bounds__(256) softmax_bad_local(LTK_FIXTURE_ARGS) {
  LTK_FIXTURE_ROW;
  float hist[64] = {};  // a per-thread histogram updated at a run-time index: local memory (LDL + STL)
#pragma unroll 1
  for (int q = threadIdx.x; q < C4; q += blockDim.x) {
    const float4 v = softmax4(xr[q], m, inv);
    hist[__float_as_uint(v.x) & 63] += v.x;
    yr[q] = v;
  }
#pragma unroll
  for (int k = 0; k < 64; ++k) y[row * 4 * C4 + k] += hist[k];  // (keeps hist alive; never launched)
}

extern "C" __global__ void __launch_bounds__(256) softmax_bad_ex2_twice(LTK_FIXTURE_ARGS) {
  LTK_FIXTURE_ROW;
#pragma unroll 1
  for (int q = threadIdx.x; q < C4; q += blockDim.x) {
    float4 v = xr[q];
    // 2^d + 2^-d: the second exponential is one more MUFU.EX2 (the negation is an operand modifier)
    float d[4] = {v.x * LTK_FIXTURE_LOG2E - m, v.y * LTK_FIXTURE_LOG2E - m, v.z * LTK_FIXTURE_LOG2E - m,
                  v.w * LTK_FIXTURE_LOG2E - m};
#pragma unroll
    for (int k = 0; k < 4; ++k) d[k] = (fixture_ex2(d[k]) + fixture_ex2(-d[k])) * inv;
    yr[q] = make_float4(d[0], d[1], d[2], d[3]);
  }
}

// Each thread normalises its own slice of kVec float4 in one pass (max, sum, scale), the slice in registers.
template <int kVec>
__device__ __forceinline__ void slice_softmax(const float4* __restrict__ xr, float4* __restrict__ yr, int C4) {
#pragma unroll 1
  for (int q = threadIdx.x * kVec; q + kVec <= C4; q += blockDim.x * kVec) {
    float4 v[kVec];
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      v[k] = xr[q + k];
      mx = fmaxf(mx, fmaxf(fmaxf(v[k].x, v[k].y), fmaxf(v[k].z, v[k].w)));
    }
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      v[k].x = fixture_ex2(v[k].x - mx);
      v[k].y = fixture_ex2(v[k].y - mx);
      v[k].z = fixture_ex2(v[k].z - mx);
      v[k].w = fixture_ex2(v[k].w - mx);
      s += (v[k].x + v[k].y) + (v[k].z + v[k].w);
    }
    const float r = 1.f / s;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      v[k].x *= r;
      v[k].y *= r;
      v[k].z *= r;
      v[k].w *= r;
      yr[q + k] = v[k];
    }
  }
}

// 128 live floats a thread: > 128 registers, so one block of 256 threads per SM (12.5 %).
extern "C" __global__ void __launch_bounds__(256) softmax_bad_occupancy(LTK_FIXTURE_ARGS) {
  LTK_FIXTURE_ROW;
  (void)m;
  (void)inv;
  slice_softmax<32>(xr, yr, C4);
}

// A 64-element slice with 4 blocks of 256 per SM demanded (at most 64 registers): ptxas spills it.
extern "C" __global__ void __launch_bounds__(256, 4) softmax_bad_spill(LTK_FIXTURE_ARGS) {
  LTK_FIXTURE_ROW;
  (void)m;
  (void)inv;
  slice_softmax<16>(xr, yr, C4);
}
