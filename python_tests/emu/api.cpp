// Emulator control for the Python tests: options, the launch log, guarded buffers, the last error.
#include <cstring>

#include "common.h"

LTK_EMU_EXPORT const char* ltk_emu_last_error() { return ltk_emu_test::last_error().c_str(); }

// schedule: 0 random, 1 forward, 2 reverse. Negative / NaN arguments leave an option unchanged.
LTK_EMU_EXPORT int ltk_emu_set_options(long long seed, int schedule, double timeout_s, int sm_count, int poison,
                                       int shuffle_blocks, int stack_kb) {
  LTK_EMU_TRY({
    auto& o = ltk::emu::options();
    if (seed >= 0) o.seed = uint64_t(seed);
    if (schedule >= 0) o.schedule = static_cast<ltk::emu::Schedule>(schedule);
    if (timeout_s >= 0) o.timeout_s = timeout_s;
    if (sm_count > 0) o.sm_count = sm_count;
    if (poison >= 0) o.poison_shared = poison != 0;
    if (shuffle_blocks >= 0) o.shuffle_blocks = shuffle_blocks != 0;
    if (stack_kb > 0) o.stack_bytes = size_t(stack_kb) << 10;
  })
}

LTK_EMU_EXPORT int ltk_emu_get_options(long long* seed, int* schedule, double* timeout_s, int* sm_count) {
  LTK_EMU_TRY({
    const auto& o = ltk::emu::options();
    *seed = (long long)o.seed;
    *schedule = int(o.schedule);
    *timeout_s = o.timeout_s;
    *sm_count = o.sm_count;
  })
}

LTK_EMU_EXPORT long long ltk_emu_launch_count() { return (long long)ltk::emu::launch_log().size(); }
LTK_EMU_EXPORT void ltk_emu_clear_launch_log() { ltk::emu::launch_log().clear(); }

// Fills grid[3], block[3], smem, switches, failed and the kernel name of launch i (negative: from the end).
LTK_EMU_EXPORT int ltk_emu_launch_info(long long i, unsigned* grid, unsigned* block, long long* smem,
                                       long long* switches, int* failed, char* name, int name_len) {
  LTK_EMU_TRY({
    auto& log = ltk::emu::launch_log();
    long long n = (long long)log.size();
    if (i < 0) i += n;
    if (i < 0 || i >= n) throw std::out_of_range("launch index out of range");
    const auto& r = log[size_t(i)];
    grid[0] = r.grid.x, grid[1] = r.grid.y, grid[2] = r.grid.z;
    block[0] = r.block.x, block[1] = r.block.y, block[2] = r.block.z;
    *smem = (long long)r.dynamic_smem;
    *switches = (long long)r.context_switches;
    *failed = r.failed;
    std::strncpy(name, r.kernel.c_str(), size_t(name_len - 1));
    name[name_len - 1] = 0;
  })
}

LTK_EMU_EXPORT void* ltk_emu_guarded_alloc(long long bytes, long long align) {
  try {
    return ltk::emu::guarded_alloc(size_t(bytes), size_t(align));
  } catch (const std::exception& e) {
    ltk_emu_test::last_error() = e.what();
    return nullptr;
  }
}
LTK_EMU_EXPORT void ltk_emu_guarded_free(void* p) { ltk::emu::guarded_free(p); }

LTK_EMU_EXPORT int ltk_emu_register_static_shared(long long offset_from_marker, long long bytes) {
  LTK_EMU_TRY(ltk::emu::register_static_shared(ptrdiff_t(offset_from_marker), size_t(bytes)))
}

LTK_EMU_EXPORT int ltk_emu_set_clamp_grid(int n) { LTK_EMU_TRY(ltk::emu::options().clamp_grid = unsigned(n < 0 ? 0 : n)) }
LTK_EMU_EXPORT int ltk_emu_get_clamp_grid() { return int(ltk::emu::options().clamp_grid); }

LTK_EMU_EXPORT int ltk_emu_register_static_shared_named(long long offset_from_marker, long long bytes,
                                                        const char* name) {
  LTK_EMU_TRY(ltk::emu::register_static_shared(ptrdiff_t(offset_from_marker), size_t(bytes), name))
}

// Global and shared accesses the sanitizer checked in launch i (negative: from the end).
LTK_EMU_EXPORT long long ltk_emu_launch_checked(long long i) {
  auto& log = ltk::emu::launch_log();
  long long n = (long long)log.size();
  if (i < 0) i += n;
  if (i < 0 || i >= n) return -1;
  return (long long)log[size_t(i)].checked_accesses;
}
