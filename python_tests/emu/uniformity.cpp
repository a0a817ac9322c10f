// csrc/cuda/uniformity_kernels.cuh through the emulator: the CPU-side counterpart of
// csrc/cuda/uniformity_cuda.cu (which calls these same launch functions on device pointers).
#include "common.h"
#include "cuda/uniformity_kernels.cuh"

namespace uc = ltk::uniformity_cuda;

#define LTK_EMU_UNIFORMITY(T, sfx)                                                                              \
  LTK_EMU_EXPORT int ltk_emu_uniformity_pair_transform_##sfx(long long bi, long long bk, T* g, T* f,            \
                                                             const T* nI, const T* nK, int diag, int kernel,    \
                                                             double param, double dist_eps) {                    \
    LTK_EMU_TRY(uc::launch_pair_transform<T>(bi, bk, g, f, nI, nK, diag != 0, kernel, static_cast<T>(param),    \
                                             static_cast<T>(dist_eps), nullptr))                                \
  }                                                                                                             \
  LTK_EMU_EXPORT int ltk_emu_uniformity_exp_shift_##sfx(long long bi, long long bk, const T* a, const T* mI,    \
                                                        const T* mK, T* prow, T* pcol) {                        \
    LTK_EMU_TRY(uc::launch_exp_shift<T>(bi, bk, a, mI, mK, prow, pcol, nullptr))                               \
  }

LTK_EMU_UNIFORMITY(float, f32)
LTK_EMU_UNIFORMITY(double, f64)
