// csrc/cuda/margin_ce_kernels.cuh through the emulator: the thin CPU-side counterpart of
// csrc/cuda/margin_ce_cuda.cu. Python (test_emulation_kernels.py) prepares the arguments as
// margin_ce_common.cpp does (accumulation-typed vectors, 1 / denominator, weight sum, seed) and passes
// raw pointers in one flat struct; this fills MarginCeArgs and calls the real launch function.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"
#include "cuda/margin_ce_kernels.cuh"

namespace {

struct FlatMarginCe {  // mirrored by MarginCeFlat (ctypes) in the tests
  const void *input, *target, *col_scale, *col_bias, *margin, *target_scale, *weight, *row_shift, *shift_coef,
      *cloud, *noise, *inv_denom;
  void *row_loss, *grad, *grad_row_shift;
  double scale, noise_mul, angular_eps, gamma, smoothing, weight_sum;
  uint64_t seed, offset;
  int64_t angular, focal, ignore_index, N, C;
};

template <typename scalar_t, typename acc_t>
void run(const FlatMarginCe& f) {
  ltk::MarginCeArgs<scalar_t, acc_t> a;
  auto v = [](const void* p) { return static_cast<const acc_t*>(p); };
  a.input = static_cast<const scalar_t*>(f.input);
  a.target = static_cast<const int64_t*>(f.target);
  a.col_scale = v(f.col_scale);
  a.col_bias = v(f.col_bias);
  a.margin = v(f.margin);
  a.target_scale = v(f.target_scale);
  a.weight = v(f.weight);
  a.row_shift = v(f.row_shift);
  a.shift_coef = v(f.shift_coef);
  a.cloud = v(f.cloud);
  a.noise = v(f.noise);
  a.scale = static_cast<acc_t>(f.scale);
  a.noise_mul = static_cast<acc_t>(f.noise_mul);
  a.angular_eps = static_cast<acc_t>(f.angular_eps);
  a.seed = f.seed;
  a.offset = f.offset;
  a.angular = static_cast<int>(f.angular);
  a.focal = static_cast<int>(f.focal);
  a.gamma = static_cast<acc_t>(f.gamma);
  a.ignore_index = f.ignore_index;
  a.smoothing = static_cast<acc_t>(f.smoothing);
  a.weight_sum = static_cast<acc_t>(f.weight_sum);
  a.inv_denom = v(f.inv_denom);
  a.N = f.N;
  a.C = f.C;
  a.row_loss = static_cast<acc_t*>(f.row_loss);
  a.grad = static_cast<scalar_t*>(f.grad);
  a.grad_row_shift = static_cast<acc_t*>(f.grad_row_shift);
  ltk::cuda::launch_margin_ce<scalar_t, acc_t>(a, nullptr);
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (acc: float64 for float64, else float32)
LTK_EMU_EXPORT int ltk_emu_margin_ce(int dtype, const FlatMarginCe* f) {
  LTK_EMU_TRY({
    switch (dtype) {
      case 0: run<float, float>(*f); break;
      case 1: run<double, double>(*f); break;
      case 2: run<c10::Half, float>(*f); break;
      case 3: run<c10::BFloat16, float>(*f); break;
      default: throw std::invalid_argument("ltk_emu_margin_ce: unknown dtype code");
    }
  })
}

LTK_EMU_EXPORT int ltk_emu_margin_ce_threads(long long C) { return ltk::cuda::margin_ce_threads(C); }
