// csrc/cuda/cosine_head_kernels.cuh through the emulator: the CPU-side counterpart of
// csrc/cuda/cosine_head_cuda.cu (which calls these same launch functions on device pointers).
#include "common.h"
#include "cuda/cosine_head_kernels.cuh"

namespace cc = ltk::cosine_cuda;

#define LTK_EMU_COSINE(T, sfx)                                                                                  \
  LTK_EMU_EXPORT int ltk_emu_cosine_vec_dot_##sfx(long long rows, long long cols, const T* a, const T* b,      \
                                                  int vec_rows, int sqrt_out, T* out) {                          \
    LTK_EMU_TRY(cc::launch_vec_dot<T>(rows, cols, a, b, vec_rows != 0, sqrt_out != 0, out, nullptr))           \
  }                                                                                                             \
  LTK_EMU_EXPORT int ltk_emu_cosine_norms_##sfx(long long rows, long long cols, const T* m, int vec_rows,       \
                                                T* out) {                                                       \
    LTK_EMU_TRY(cc::launch_norms<T>(rows, cols, m, vec_rows != 0, out, nullptr))                               \
  }                                                                                                             \
  LTK_EMU_EXPORT int ltk_emu_cosine_scale_##sfx(long long rows, long long cols, const T* src, long long s0,     \
                                                long long s1, const T* rn, const T* cn, double eps, T* out) {    \
    LTK_EMU_TRY(cc::launch_scale<T>(rows, cols, src, s0, s1, rn, cn, static_cast<T>(eps), out, nullptr))       \
  }                                                                                                             \
  LTK_EMU_EXPORT int ltk_emu_cosine_tangent_##sfx(long long rows, long long cols, T* g, const T* x,             \
                                                  int vec_rows, const T* norm, double eps, int prescaled,        \
                                                  const T* scale, T* workspace) {                                \
    LTK_EMU_TRY(cc::launch_tangent<T>(rows, cols, g, x, vec_rows != 0, norm, static_cast<T>(eps),              \
                                      prescaled != 0, scale, workspace, nullptr))                               \
  }

LTK_EMU_COSINE(float, f32)
LTK_EMU_COSINE(double, f64)
