// CUDA entry point of margin_ce: the shared preparation (margin_ce_common), the Philox state of the cloud
// noise, and the forward's launches on the current stream (cuda/margin_ce_kernels.cuh: a prologue and the
// row kernel, which also reduces). No value computed on the device is read back: no host synchronisation.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

#include "cuda/margin_ce_grad_scale.cuh"
#include "cuda/margin_ce_kernels.cuh"
#include "margin_ce_common.h"
#include "margin_ce_op.h"

namespace ltk {
namespace {

// A cloud with neither injected noise nor a seed tensor draws from the CUDA generator (`generator`, or the
// device's default one), as PyTorch's dropout does: one Philox (seed, offset) per call, the offset advanced
// by the call, so torch.manual_seed reproduces a run. Under CUDA graph capture the state is a pair of device
// addresses plus an intra-graph offset that the kernel resolves when it runs (ltk::philox_key), so each
// replay of a captured graph draws fresh noise.
template <typename Args>
void take_generator_state(Args& a, const std::optional<at::Generator>& generator, int64_t offset) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(generator, at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState st;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st = gen->philox_cuda_state(4);  // the increment must be a multiple of 4; each offset is a new stream
  }
  if (st.captured_) {
    a.seed_ptr = st.seed_.ptr;
    a.offset_ptr = st.offset_.ptr;
    a.offset_intragraph = st.offset_intragraph_ + static_cast<uint64_t>(offset);
  } else {
    a.seed = st.seed_.val;
    a.offset = st.offset_.val + static_cast<uint64_t>(offset);
  }
}

}  // namespace

MarginCeResult margin_ce_cuda(LTK_MARGIN_CE_PARAMS) {
  const c10::cuda::CUDAGuard guard(input.device());
  TORCH_CHECK_VALUE(input.dim() != 2 || input.size(0) <= 0x7fffffff, "margin_ce: N = ", input.size(0),
                    " rows exceed the CUDA grid limit");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool from_generator = cloud.has_value() && cloud->defined() && !(noise.has_value() && noise->defined()) &&
                              !(seed.has_value() && seed->defined());
  return run_margin_ce(LTK_MARGIN_CE_INPUTS, [&](const auto& prepared) {
    auto a = prepared;
    if (from_generator) take_generator_state(a, generator, offset);
    cuda::launch_margin_ce(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void margin_ce_grad_scale_cuda(at::Tensor& grad, const at::Tensor& grad_output, bool per_row) {
  check_grad_scale_args(grad, grad_output, per_row);
  const c10::cuda::CUDAGuard guard(grad.device());
  // (a grad_output of another dtype is converted: one more small op, never in loss.backward())
  const at::Tensor go = grad_output.scalar_type() == grad.scalar_type() ? grad_output.contiguous()
                                                                        : grad_output.to(grad.scalar_type()).contiguous();
  const int64_t max_blocks = 8 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "margin_ce_grad_scale_", [&] {
    cuda::launch_margin_ce_grad_scale<scalar_t>(grad.data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(), grad.size(0),
                                                grad.size(1), per_row, max_blocks, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) {
  m.impl("margin_ce", &ltk::margin_ce_cuda);
  m.impl("margin_ce_grad_scale_", &ltk::margin_ce_grad_scale_cuda);
}
