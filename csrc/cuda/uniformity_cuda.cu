// CUDA back end of the uniformity op: the at::Tensor side of uniformity_kernels.cuh (the tiled
// orchestration, cuBLAS GEMMs and reductions are shared with the CPU in cpu/uniformity_cpu.cpp).
// RECONSTRUCTED FROM THE ABSTRACT of Gao et al. (CAAI TIT 2025).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/uniformity_kernels.cuh"
#include "ltk/uniformity_op.h"

namespace ltk {
namespace {

struct CudaUniformityOps final : UniformityDeviceOps {
  // Larger tiles keep cuBLAS busy; 4096^2 floats = 64 MiB per tile buffer (three live).
  int64_t default_block(int64_t /*C*/, int64_t /*D*/) const override { return 4096; }
  void pair_transform(at::Tensor& g, at::Tensor& f, const at::Tensor& nI, const at::Tensor& nK, bool diag,
                      int64_t kernel, double param, double dist_eps) const override {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "uniformity_pair_transform_cuda", [&] {
      uniformity_cuda::launch_pair_transform<scalar_t>(
          g.size(0), g.size(1), g.mutable_data_ptr<scalar_t>(), f.defined() ? f.mutable_data_ptr<scalar_t>() : nullptr,
          nI.const_data_ptr<scalar_t>(), nK.const_data_ptr<scalar_t>(), diag, static_cast<int>(kernel),
          static_cast<scalar_t>(param), static_cast<scalar_t>(dist_eps), stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void exp_shift(const at::Tensor& a, const at::Tensor& mI, const at::Tensor& mK, at::Tensor& prow,
                 at::Tensor& pcol) const override {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "uniformity_exp_shift_cuda", [&] {
      uniformity_cuda::launch_exp_shift<scalar_t>(a.size(0), a.size(1), a.const_data_ptr<scalar_t>(),
                                                  mI.const_data_ptr<scalar_t>(), mK.const_data_ptr<scalar_t>(),
                                                  prow.mutable_data_ptr<scalar_t>(),
                                                  pcol.defined() ? pcol.mutable_data_ptr<scalar_t>() : nullptr, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

const UniformityDeviceOps& cuda_uniformity_ops() {
  static const CudaUniformityOps ops;
  return ops;
}

}  // namespace
}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) {
  m.impl("uniformity", [](const at::Tensor& weight, int64_t kernel, double param, double eps, double dist_eps,
                          int64_t block, bool compute_grad) {
    const c10::cuda::CUDAGuard guard(weight.device());
    return ltk::uniformity_impl(ltk::cuda_uniformity_ops(), weight, kernel, param, eps, dist_eps, block, compute_grad);
  });
}
