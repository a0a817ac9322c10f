// SASS-gate fixture (python_tests/test_cuda_sass_gate.py): the "good" kernel, the second pass of a row
// softmax, y = 2^((x - max) log2 e) / sum, as the margin_ce stream kernel moves it: one 16-byte load and
// store per four elements (float4 via reinterpret_cast), one MUFU.EX2 per element (ex2.approx.ftz, inline
// PTX), __launch_bounds__(256). Standalone: no torch headers. One block per row; rows 16-byte aligned.
// softmax_bad.cu includes this file for its helpers (LTK_FIXTURE_HELPERS_ONLY: without the kernel).
#define LTK_FIXTURE_LOG2E 1.4426950408889634f

__device__ __forceinline__ float fixture_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Four elements: 2^(x log2 e - m) * inv, m the row max already scaled by log2 e.
__device__ __forceinline__ float4 softmax4(float4 v, float m, float inv) {
  v.x = fixture_ex2(v.x * LTK_FIXTURE_LOG2E - m) * inv;
  v.y = fixture_ex2(v.y * LTK_FIXTURE_LOG2E - m) * inv;
  v.z = fixture_ex2(v.z * LTK_FIXTURE_LOG2E - m) * inv;
  v.w = fixture_ex2(v.w * LTK_FIXTURE_LOG2E - m) * inv;
  return v;
}

// The kernels' arguments, and the row's constants and float4 views.
#define LTK_FIXTURE_ARGS                                                                                 \
  const float* __restrict__ x, const float* __restrict__ row_max, const float* __restrict__ row_inv, \
      float* __restrict__ y, int C4
#define LTK_FIXTURE_ROW                                                                  \
  const long row = blockIdx.x;                                                           \
  const float m = row_max[row] * LTK_FIXTURE_LOG2E, inv = row_inv[row];                  \
  const float4* __restrict__ xr = reinterpret_cast<const float4*>(x) + row * C4;         \
  float4* __restrict__ yr = reinterpret_cast<float4*>(y) + row * C4

#ifndef LTK_FIXTURE_HELPERS_ONLY
extern "C" __global__ void __launch_bounds__(256) softmax_good(LTK_FIXTURE_ARGS) {
  LTK_FIXTURE_ROW;
#pragma unroll 1
  for (int q = threadIdx.x; q < C4; q += blockDim.x) yr[q] = softmax4(xr[q], m, inv);
}
#endif
