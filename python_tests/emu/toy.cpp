// Toy kernels through the emulator (see toy_kernels.cuh). toy_mutant*.cpp build the same source with
// mutations into other namespaces.
#include "common.h"
#include "toy_kernels.cuh"

#ifndef LTK_TOY_PREFIX
#define LTK_TOY_PREFIX ltk_emu_toy_
#endif
#define LTK_CAT2(a, b) a##b
#define LTK_CAT(a, b) LTK_CAT2(a, b)
#define LTK_TOY_FN(name) LTK_CAT(LTK_TOY_PREFIX, name)

namespace t = LTK_TOY_NS;

LTK_EMU_EXPORT int LTK_TOY_FN(row_sum_f32)(const float* x, float* out, int N, int C, int threads) {
  LTK_EMU_TRY(t::launch_row_sum<float>(x, out, N, C, threads, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(row_sum_f64)(const double* x, double* out, int N, int C, int threads) {
  LTK_EMU_TRY(t::launch_row_sum<double>(x, out, N, C, threads, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(row_sum_i32)(const int* x, int* out, int N, int C, int threads) {
  LTK_EMU_TRY(t::launch_row_sum<int>(x, out, N, C, threads, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(row_stats_f64)(const double* x, double* out, int N, int C) {
  LTK_EMU_TRY(t::launch_row_stats<double>(x, out, N, C, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(axpy_f32)(long long n, float a, const float* x, float* y, int max_blocks) {
  LTK_EMU_TRY(t::launch_axpy<float>(n, a, x, y, max_blocks, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(sum_atomic_f32)(long long n, const float* x, float* out, int blocks) {
  LTK_EMU_TRY(t::launch_sum_atomic<float>(n, x, out, blocks, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(sum_atomic_f64)(long long n, const double* x, double* out, int blocks) {
  LTK_EMU_TRY(t::launch_sum_atomic<double>(n, x, out, blocks, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(shared_histogram)(long long n, const int* x, int* hist, int blocks) {
  LTK_EMU_TRY(t::launch_shared_histogram(n, x, hist, blocks, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(row_sum_warp_f32)(long long rows, long long cols, const float* x, float* out) {
  LTK_EMU_TRY(t::launch_row_sum_warp<float>(rows, cols, x, out, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(row_sum_warp_i32)(long long rows, long long cols, const int* x, int* out) {
  LTK_EMU_TRY(t::launch_row_sum_warp<int>(rows, cols, x, out, nullptr))
}
LTK_EMU_EXPORT int LTK_TOY_FN(warp_broadcast)(const float* x, float* out, int blocks, int threads) {
  LTK_EMU_TRY(LTK_LAUNCH(t::warp_broadcast_kernel, dim3(blocks), dim3(threads), 0, nullptr, x, out))
}
LTK_EMU_EXPORT int LTK_TOY_FN(tile_reverse_f32)(long long n, const float* x, float* y, int bx, int by) {
  LTK_EMU_TRY(t::launch_tile_reverse<float>(n, x, y, bx, by, nullptr))
}

#ifndef LTK_TOY_MUTANT
LTK_EMU_EXPORT int ltk_emu_toy_vote(const int* pred, unsigned* ballot, int* any_all, int* count, int blocks,
                                    int threads) {
  LTK_EMU_TRY(LTK_LAUNCH(t::vote_kernel, dim3(blocks), dim3(threads), 0, nullptr, pred, ballot, any_all, count))
}

LTK_EMU_EXPORT int ltk_emu_toy_transpose(int n, const float* x, float* y, int pad) {
  LTK_EMU_TRY({
    const dim3 grid(unsigned(n / 32), unsigned(n / 32)), block(32, 8);
    if (pad) LTK_LAUNCH(t::transpose_kernel<1>, grid, block, 0, nullptr, n, x, y);
    else LTK_LAUNCH(t::transpose_kernel<0>, grid, block, 0, nullptr, n, x, y);
  })
}

LTK_EMU_EXPORT int ltk_emu_toy_shfl(int* out, int threads, int arg) {
  LTK_EMU_TRY(LTK_LAUNCH(t::shfl_kernel, dim3(1), dim3(threads), 0, nullptr, out, arg))
}

// Broken kernels by name; each must fail with an emulator error.
LTK_EMU_EXPORT int ltk_emu_toy_bad(const char* which, void* a, void* b, int n) {
  LTK_EMU_TRY({
    std::string w(which);
    cudaStream_t s = nullptr;
    (void)s;
    if (w == "divergent_barrier") LTK_LAUNCH(t::bad_divergent_barrier_kernel, 1, 64, 0, s, (float*)a);
    else if (w == "early_return") LTK_LAUNCH(t::bad_early_return_kernel, 1, 64, 0, s, (float*)a, n);
    else if (w == "two_barriers") LTK_LAUNCH(t::bad_two_barriers_kernel, 1, 64, 0, s, (float*)a);
    else if (w == "shfl_exited_lane") LTK_LAUNCH(t::bad_shfl_exited_lane_kernel, 1, 32, 0, s, (float*)a);
    else if (w == "shfl_divergent") LTK_LAUNCH(t::bad_shfl_divergent_kernel, 1, 32, 0, s, (float*)a);
    else if (w == "shfl_vs_barrier") LTK_LAUNCH(t::bad_shfl_vs_barrier_kernel, 1, 64, 0, s, (float*)a);
    else if (w == "smem_oob") LTK_LAUNCH(t::bad_smem_oob_kernel, 1, n, (n - 1) * sizeof(float), s, (float*)a, n);
    else if (w == "global_oob") LTK_LAUNCH(t::bad_global_oob_kernel, (n + 31) / 32, 32, 0, s, (const float*)a, (float*)b, n);
    else if (w == "spin") LTK_LAUNCH(t::bad_spin_kernel, 1, 32, 0, s, (volatile int*)a, (int*)b);
    else if (w == "assert") LTK_LAUNCH(t::bad_assert_kernel, 1, 32, 0, s, (const int*)a);
    else if (w == "stack_overflow") LTK_LAUNCH(t::bad_stack_overflow_kernel, 1, 32, 0, s, (int*)a, n);
    else if (w == "div_zero") LTK_LAUNCH(t::bad_div_zero_kernel, 1, 32, 0, s, (const int*)a, (int*)b);
    else if (w == "partial_warp") LTK_LAUNCH(t::bad_partial_warp_kernel, 1, 48, 0, s, (float*)a);
    else if (w == "zero_grid") LTK_LAUNCH(t::noop_kernel, 0, 32, 0, s, 1);
    else if (w == "big_block") LTK_LAUNCH(t::noop_kernel, 1, 2048, 0, s, 1);
    else if (w == "grid_y") LTK_LAUNCH(t::noop_kernel, dim3(1, 70000), 32, 0, s, 1);
    else if (w == "smem_limit") LTK_LAUNCH(t::noop_kernel, 1, 32, 64 << 10, s, 1);
    else throw std::invalid_argument("unknown bad kernel " + w);
  })
}
#endif
