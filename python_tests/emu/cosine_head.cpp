// csrc/cuda/cosine_head_kernels.cuh through the emulator: the CPU-side counterpart of
// csrc/cuda/cosine_head_cuda.cu (which calls these same launch functions on device pointers).
#include "common.h"
#include "cuda/cosine_head_kernels.cuh"

namespace cc = ltk::cosine_cuda;

// T: the storage type, A: the math type of norms, dot products and the scale (cosine_acc_t<T>).
#define LTK_EMU_COSINE(T, A, sfx)                                                                                      \
  LTK_EMU_EXPORT int ltk_emu_cosine_vec_dot_##sfx(long long rows, long long cols, const T* a, const T* b,              \
                                                  int vec_rows, int sqrt_out, A* out) {                                \
    LTK_EMU_TRY(cc::launch_vec_dot<T, A>(rows, cols, a, b, vec_rows != 0, sqrt_out != 0, out, nullptr))                \
  }                                                                                                                    \
  LTK_EMU_EXPORT int ltk_emu_cosine_norms_##sfx(long long rows, long long cols, const T* m, int vec_rows,              \
                                                A* out) {                                                              \
    LTK_EMU_TRY(cc::launch_norms<T, A>(rows, cols, m, vec_rows != 0, out, nullptr))                                    \
  }                                                                                                                    \
  LTK_EMU_EXPORT int ltk_emu_cosine_norms_pair_##sfx(long long a_rows, long long a_cols, const T* a, int a_vec_rows,   \
                                                     A* a_out, long long b_rows, long long b_cols, const T* b,         \
                                                     int b_vec_rows, A* b_out) {                                       \
    LTK_EMU_TRY(cc::launch_norms_pair<T, A>(a_rows, a_cols, a, a_vec_rows != 0, a_out, b_rows, b_cols, b,              \
                                            b_vec_rows != 0, b_out, nullptr))                                          \
  }                                                                                                                    \
  LTK_EMU_EXPORT int ltk_emu_cosine_scale_dots_##sfx(long long rows, long long cols, const T* src, const T* c,         \
                                                     const A* rn, const A* cn, double eps, T* out, A* row_parts,       \
                                                     A* col_parts) {                                                   \
    LTK_EMU_TRY(cc::launch_scale_dots<T, A>(rows, cols, src, c, rn, cn, static_cast<A>(eps), out, row_parts,           \
                                            col_parts, nullptr))                                                       \
  }                                                                                                                    \
  LTK_EMU_EXPORT int ltk_emu_cosine_tangent_dots_##sfx(long long rows, long long cols, T* g, const T* x,               \
                                                       int vec_rows, const A* norm, const A* dots,                     \
                                                       long long n_parts,                                              \
                                                       double eps, int prescaled, const A* scale) {                    \
    LTK_EMU_TRY(cc::launch_tangent_dots<T, A>(rows, cols, g, x, vec_rows != 0, norm, dots, n_parts,                    \
                                              static_cast<A>(eps), prescaled != 0, scale, nullptr))                    \
  }                                                                                                                    \
  LTK_EMU_EXPORT int ltk_emu_cosine_scale_##sfx(long long rows, long long cols, const T* src, long long s0,            \
                                                long long s1, const A* rn, const A* cn, double eps, T* out) {          \
    LTK_EMU_TRY(cc::launch_scale<T, A>(rows, cols, src, s0, s1, rn, cn, static_cast<A>(eps), out, nullptr))            \
  }                                                                                                                    \
  LTK_EMU_EXPORT int ltk_emu_cosine_tangent_##sfx(long long rows, long long cols, T* g, const T* x,                    \
                                                  int vec_rows, const A* norm, double eps, int prescaled,              \
                                                  const A* scale, A* workspace) {                                      \
    LTK_EMU_TRY(cc::launch_tangent<T, A>(rows, cols, g, x, vec_rows != 0, norm, static_cast<A>(eps),                   \
                                      prescaled != 0, scale, workspace, nullptr))                                      \
  }

LTK_EMU_COSINE(float, float, f32)
LTK_EMU_COSINE(double, double, f64)
LTK_EMU_COSINE(c10::Half, float, f16)
LTK_EMU_COSINE(c10::BFloat16, float, bf16)

// Partial-sum counts of launch_scale_dots (the shapes of its row_parts / col_parts).
LTK_EMU_EXPORT long long ltk_emu_cosine_scale_dots_row_parts(long long cols) { return cc::scale_dots_row_parts(cols); }
LTK_EMU_EXPORT long long ltk_emu_cosine_scale_dots_col_parts(long long rows) { return cc::scale_dots_col_parts(rows); }
