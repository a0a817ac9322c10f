// csrc/cuda/margin_ce_kernels.cuh through the emulator: the thin CPU-side counterpart of
// csrc/cuda/margin_ce_cuda.cu. Python (test_emulation_kernels.py) prepares the arguments as
// margin_ce_common.cpp does (accumulation-typed vectors, the seed, the device buffers for the scalars and
// the reduced loss) and passes raw pointers in one flat struct; this fills MarginCeArgs and calls the real
// launch function (the prologue kernel, then the row kernel).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"
#include "cuda/margin_ce_grad_scale.cuh"
#include "cuda/margin_ce_kernels.cuh"
#include "ltk/margin_ce_args.h"

namespace {

// The fields of FlatMarginCe, as F(ctype, name) with a macro F of the user's: the vectors of
// ltk/margin_ce_args.h among them. Python builds its ctypes mirror from ltk_emu_margin_ce_layout().
#define LTK_EMU_VECTOR_FIELD(kind, name, len) F(ptr, name)
#define LTK_EMU_FLAT_FIELDS                                                                         \
  F(ptr, input) F(ptr, target) LTK_MARGIN_CE_VECTOR_ARGS(LTK_EMU_VECTOR_FIELD, LTK_MCE_NOSEP)        \
  F(ptr, noise) F(ptr, row_loss) F(ptr, grad) F(ptr, grad_row_shift) F(ptr, loss_out) F(ptr, scalars)     \
  F(ptr, seed_ptr) F(ptr, offset_ptr) F(f64, scale) F(f64, noise_mul) F(f64, angular_eps) F(f64, gamma)    \
  F(f64, smoothing) F(u64, seed) F(u64, offset) F(u64, offset_intragraph) F(i64, angular) F(i64, focal)    \
  F(i64, ignore_index) F(i64, reduction) F(i64, N) F(i64, C)

using ptr = const void*;
using f64 = double;
using u64 = uint64_t;
using i64 = int64_t;

struct FlatMarginCe {
#define F(ctype, name) ctype name;
  LTK_EMU_FLAT_FIELDS
#undef F
};

template <typename scalar_t, typename acc_t>
void fill_args(const FlatMarginCe& f, ltk::MarginCeArgs<scalar_t, acc_t>& a) {
  auto v = [](const void* p) { return static_cast<const acc_t*>(p); };
  a.input = static_cast<const scalar_t*>(f.input);
  a.target = static_cast<const int64_t*>(f.target);
#define LTK_EMU_SET_VECTOR(kind, name, len) a.name = v(f.name);
  LTK_MARGIN_CE_VECTOR_ARGS(LTK_EMU_SET_VECTOR, LTK_MCE_NOSEP)
#undef LTK_EMU_SET_VECTOR
  a.noise = v(f.noise);
  a.scale = static_cast<acc_t>(f.scale);
  a.noise_mul = static_cast<acc_t>(f.noise_mul);
  a.angular_eps = static_cast<acc_t>(f.angular_eps);
  a.seed = f.seed;
  a.offset = f.offset;
  a.seed_ptr = static_cast<const int64_t*>(f.seed_ptr);
  a.offset_ptr = static_cast<const int64_t*>(f.offset_ptr);
  a.offset_intragraph = f.offset_intragraph;
  a.angular = static_cast<int>(f.angular);
  a.focal = static_cast<int>(f.focal);
  a.gamma = static_cast<acc_t>(f.gamma);
  a.ignore_index = f.ignore_index;
  a.smoothing = static_cast<acc_t>(f.smoothing);
  a.reduction = static_cast<int>(f.reduction);
  auto* scalars = static_cast<ltk::MarginCeScalars<acc_t>*>(const_cast<void*>(f.scalars));
  a.scalars = scalars;
  a.inv_denom = &scalars->inv_denom;
  a.weight_sum = &scalars->weight_sum;
  a.N = f.N;
  a.C = f.C;
  a.row_loss = static_cast<acc_t*>(const_cast<void*>(f.row_loss));
  a.grad = static_cast<scalar_t*>(const_cast<void*>(f.grad));
  a.grad_row_shift = static_cast<acc_t*>(const_cast<void*>(f.grad_row_shift));
  a.loss_out = static_cast<scalar_t*>(const_cast<void*>(f.loss_out));
}

template <typename scalar_t, typename acc_t>
void run(const FlatMarginCe& f) {
  ltk::MarginCeArgs<scalar_t, acc_t> a;
  fill_args(f, a);
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

// The row kernel launch_margin_ce picks for a call: *path the StreamPath (0: the generic kernel, 1 one warp
// per row with the logit cache, 2 one block per row with it, 3 one block per row streaming), *blocks and
// *threads its grid and block sizes and *smem its dynamic shared memory bytes.
LTK_EMU_EXPORT int ltk_emu_margin_ce_plan(int dtype, const FlatMarginCe* f, int* path, long long* blocks, int* threads,
                                          long long* smem) {
  *path = 0;
  *smem = 0;
  LTK_EMU_TRY({
    auto plan = [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      ltk::MarginCeArgs<scalar_t, acc_t> a;
      fill_args(*f, a);
      const ltk::cuda::StreamPlan p = ltk::cuda::plan_margin_ce_stream(a);
      *path = static_cast<int>(p.path);
      *blocks = p.feat >= 0 ? static_cast<long long>(p.blocks) : f->N;
      *threads = p.feat >= 0 ? static_cast<int>(p.threads) : ltk::cuda::margin_ce_threads(f->C);
      *smem = static_cast<long long>(p.smem);
    };
    switch (dtype) {
      case 0: plan(float()); break;
      case 1: plan(double()); break;
      case 2: plan(c10::Half()); break;
      case 3: plan(c10::BFloat16()); break;
      default: throw std::invalid_argument("ltk_emu_margin_ce_plan: unknown dtype code");
    }
  })
}

// sizeof(MarginCeScalars<acc_t>) for dtype code `dtype` (the device buffer the prologue kernel writes).
LTK_EMU_EXPORT int ltk_emu_margin_ce_scalars_bytes(int dtype) {
  return dtype == 1 ? int(sizeof(ltk::MarginCeScalars<double>)) : int(sizeof(ltk::MarginCeScalars<float>));
}

// "input:ptr,target:ptr,...": FlatMarginCe's fields in order, for the ctypes mirror.
LTK_EMU_EXPORT const char* ltk_emu_margin_ce_layout() {
#define F(ctype, name) #name ":" #ctype ","
  return LTK_EMU_FLAT_FIELDS;
#undef F
}

// cuda/margin_ce_grad_scale.cuh's launch: grad (N, C) of dtype code `dtype` *= go (dtype too).
LTK_EMU_EXPORT int ltk_emu_margin_ce_grad_scale(int dtype, void* grad, const void* go, long long N, long long C,
                                                int per_row, long long max_blocks) {
  LTK_EMU_TRY({
    auto run_scale = [&](auto tag) {
      using scalar_t = decltype(tag);
      ltk::cuda::launch_margin_ce_grad_scale<scalar_t>(static_cast<scalar_t*>(grad), static_cast<const scalar_t*>(go),
                                                       N, C, per_row != 0, max_blocks, nullptr);
    };
    switch (dtype) {
      case 0: run_scale(float()); break;
      case 1: run_scale(double()); break;
      case 2: run_scale(c10::Half()); break;
      case 3: run_scale(c10::BFloat16()); break;
      default: throw std::invalid_argument("ltk_emu_margin_ce_grad_scale: unknown dtype code");
    }
  })
}
