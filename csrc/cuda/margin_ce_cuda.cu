// CUDA entry point of margin_ce: the shared preparation (margin_ce_common), one kernel launch on the
// current stream, the shared reduction of per-row losses.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/margin_ce_kernels.cuh"
#include "margin_ce_common.h"
#include "margin_ce_op.h"

namespace ltk {

MarginCeResult margin_ce_cuda(LTK_MARGIN_CE_PARAMS) {
  const c10::cuda::CUDAGuard guard(input.device());
  TORCH_CHECK_VALUE(input.dim() != 2 || input.size(0) <= 0x7fffffff, "margin_ce: N = ", input.size(0),
                    " rows exceed the CUDA grid limit");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  return run_margin_ce(LTK_MARGIN_CE_INPUTS, [&](const auto& a) {
    cuda::launch_margin_ce(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) { m.impl("margin_ce", &ltk::margin_ce_cuda); }
