// SIMT emulator runtime: fibers, the block scheduler, barriers, warp collectives, fault handling.
//
// Internal header of csrc/emu/simt.h; see docs/emulator.md. One kernel launch runs its blocks one at a
// time on the calling host thread. Every CUDA thread of the block is a fiber with its own stack; a fiber
// runs until it reaches a synchronisation point (__syncthreads, a warp collective, an atomic, exit), then
// the scheduler picks the next runnable fiber (seeded random order by default). Misuse that would hang or
// be undefined on a GPU (divergent barriers, exited threads, divergent or incomplete warp collectives,
// deadlock, stack overflow, faults, spin-waits) ends the launch with ltk::emu::Error instead of hanging.
#pragma once

#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cxxabi.h>
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

// ---------------------------------------------------------------------------------------------------
// Builtin index types (CUDA's vector_types.h equivalents needed by the builtins).
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace ltk {
namespace emu {

// Every emulator diagnostic is thrown from launch() (or the API below) as this type.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Random: per block, a seeded coin flip between Uniform and WarpPriority (the default).
// Uniform: the next thread is drawn uniformly from the runnable ones: all threads progress at about the
//   same rate, which exposes reads of data that other threads have not written yet.
// WarpPriority: every warp gets a random priority, re-drawn whenever the block passes a __syncthreads
//   (PCT-style change points); the runnable thread of the highest-priority warp runs. Some warps race
//   ahead while others lag, which exposes writes that overtake another warp's pending reads (e.g. a
//   missing barrier before shared memory is reused).
// Forward / Reverse: thread order, deterministic.
enum class Schedule { Random, Forward, Reverse, Uniform, WarpPriority };

// Process-wide options. Initialised from the environment on first use:
//   LTK_EMU_SEED (integer), LTK_EMU_SCHEDULE (random|uniform|warps|forward|reverse), LTK_EMU_TIMEOUT_S (seconds, 0 = off),
//   LTK_EMU_SM_COUNT, LTK_EMU_STACK_KB, LTK_EMU_POISON (0/1), LTK_EMU_SHUFFLE_BLOCKS (0/1).
struct Options {
  uint64_t seed = 0x5EEDull;
  Schedule schedule = Schedule::Random;
  bool shuffle_blocks = true;     // run the blocks of a grid in a seeded random order
  bool yield_on_atomic = true;    // an atomic is also a scheduling point (random schedule only)
  bool poison_shared = true;      // fill static and dynamic shared memory with 0xFF bytes (NaN) before each block
  bool catch_signals = true;      // SIGSEGV/SIGBUS/SIGFPE in device code -> Error (not a crash)
  double timeout_s = 60.0;        // watchdog per launch (spin-waits never yield); 0 disables
  int sm_count = 4;               // what cudaDeviceGetAttribute(MultiProcessorCount) reports
  size_t stack_bytes = 256 << 10; // per emulated thread
  size_t max_dynamic_smem = 48 << 10;        // default limit per block without cudaFuncSetAttribute
  size_t max_dynamic_smem_optin = 227 << 10; // H100 opt-in limit
  // Stress option for grid-stride kernels (any grid size valid): run at most this many blocks along x
  // and y (0 = the launch's grid), so that their loops wrap even at small test sizes. Never use it for
  // kernels that map one block to one work item.
  unsigned clamp_grid = 0;
  // Sanitizer (csrc/emu/sanitizer.h; needs a library built with the access instrumentation, which
  // python_tests/emu builds by default): every global and shared memory access of device code is checked
  // for races (racecheck), out-of-bounds addresses (memcheck) and reads of never-written output or shared
  // memory (initcheck). LTK_EMU_SANITIZE=0 turns it off.
  bool sanitize = true;
  // Memory-access model: record every access and aggregate warp-level requests (sectors, lanes, width,
  // bank conflicts) per launch. Off unless asked for (ltk::emu::model_json, python_tests/emu/model.py).
  bool model = false;
};

struct LaunchRecord {
  std::string kernel;  // demangled symbol when it is visible to dladdr, else an address
  dim3 grid, block;
  size_t dynamic_smem = 0;
  uint64_t context_switches = 0;
  uint64_t checked_accesses = 0;  // global and shared accesses the sanitizer checked (0: not instrumented / off)
  bool failed = false;
};

namespace detail {

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline Options options_from_env();
inline Options& options_ref() {
  static Options o = options_from_env();
  return o;
}

inline Options options_from_env() {
  Options o;
  if (const char* s = std::getenv("LTK_EMU_SEED")) o.seed = std::strtoull(s, nullptr, 0);
  if (const char* s = std::getenv("LTK_EMU_SCHEDULE")) {
    std::string v(s);
    if (v == "forward") o.schedule = Schedule::Forward;
    else if (v == "reverse") o.schedule = Schedule::Reverse;
    else if (v == "uniform") o.schedule = Schedule::Uniform;
    else if (v == "warps") o.schedule = Schedule::WarpPriority;
    else o.schedule = Schedule::Random;
  }
  if (const char* s = std::getenv("LTK_EMU_TIMEOUT_S")) o.timeout_s = std::strtod(s, nullptr);
  if (const char* s = std::getenv("LTK_EMU_SM_COUNT")) o.sm_count = std::max(1, std::atoi(s));
  if (const char* s = std::getenv("LTK_EMU_STACK_KB")) o.stack_bytes = size_t(std::max(16, std::atoi(s))) << 10;
  if (const char* s = std::getenv("LTK_EMU_POISON")) o.poison_shared = std::atoi(s) != 0;
  if (const char* s = std::getenv("LTK_EMU_SHUFFLE_BLOCKS")) o.shuffle_blocks = std::atoi(s) != 0;
  if (const char* s = std::getenv("LTK_EMU_CLAMP_GRID")) o.clamp_grid = unsigned(std::max(0, std::atoi(s)));
  if (const char* s = std::getenv("LTK_EMU_SANITIZE")) o.sanitize = std::atoi(s) != 0;
  return o;
}

// ---------------------------------------------------------------------------------------------------
// Context switching. x86-64: a hand-rolled switch of the callee-saved registers (no syscalls);
// elsewhere: ucontext.
#if defined(__x86_64__) && !defined(LTK_EMU_USE_UCONTEXT)
extern "C" void ltk_emu_ctx_swap(void** save_sp, void* load_sp);
extern "C" void ltk_emu_ctx_start();
// One comdat copy per shared object however many translation units include this header.
__asm__(
    ".pushsection .text.ltk_emu_ctx,\"axG\",@progbits,ltk_emu_ctx,comdat\n"
    ".globl ltk_emu_ctx_swap\n.hidden ltk_emu_ctx_swap\n.type ltk_emu_ctx_swap,@function\n"
    "ltk_emu_ctx_swap:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size ltk_emu_ctx_swap,.-ltk_emu_ctx_swap\n"
    ".globl ltk_emu_ctx_start\n.hidden ltk_emu_ctx_start\n.type ltk_emu_ctx_start,@function\n"
    "ltk_emu_ctx_start:\n"
    "  movq %r12, %rdi\n  andq $-16, %rsp\n  callq *%r13\n  ud2\n"
    ".size ltk_emu_ctx_start,.-ltk_emu_ctx_start\n"
    ".popsection\n");

struct Ctx {
  void* sp = nullptr;
};
inline void ctx_make(Ctx& c, char* lo, size_t size, void (*fn)(void*), void* arg) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(lo) + size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                        // alignment pad
  *--sp = reinterpret_cast<void*>(&ltk_emu_ctx_start);    // popped by ret
  *--sp = nullptr;                                        // rbp
  *--sp = nullptr;                                        // rbx
  *--sp = arg;                                            // r12
  *--sp = reinterpret_cast<void*>(fn);                    // r13
  *--sp = nullptr;                                        // r14
  *--sp = nullptr;                                        // r15
  c.sp = sp;
}
inline void ctx_switch(Ctx& from, Ctx& to) { ltk_emu_ctx_swap(&from.sp, to.sp); }
#else
struct Ctx {
  ucontext_t uc;
};
inline void ctx_make(Ctx& c, char* lo, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  // makecontext passes int arguments: split the pointer.
  uintptr_t a = reinterpret_cast<uintptr_t>(arg);
  uintptr_t f = reinterpret_cast<uintptr_t>(fn);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(+[](unsigned fl, unsigned fh, unsigned al, unsigned ah) {
                reinterpret_cast<void (*)(void*)>((uintptr_t(fh) << 32) | fl)(
                    reinterpret_cast<void*>((uintptr_t(ah) << 32) | al));
              }),
              4, unsigned(f), unsigned(f >> 32), unsigned(a), unsigned(a >> 32));
}
inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------------------------------------------
enum class TS : uint8_t { Runnable, Barrier, Warp, Done };

struct Thread {
  Ctx ctx;
  TS st = TS::Done;
  uint3 idx{0, 0, 0};
  unsigned lin = 0;
  const char* file = "";  // where the thread waits
  int line = 0;
  const char* what = "";
  char* stack_lo = nullptr;  // usable stack [stack_lo, stack_lo + stack_bytes); guard page below
  uint32_t syncs = 0;        // barriers and warp collectives this thread has passed (the model's intervals)
};

enum WKind : int {
  kShflIdx, kShflUp, kShflDown, kShflXor, kSyncWarp, kBallot, kAny, kAll, kReduceAdd, kReduceMin,
  kReduceMax, kReduceAddI, kReduceMinI, kReduceMaxI, kMatchAny
};
inline const char* wkind_name(int k) {
  static const char* n[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                            "__syncwarp", "__ballot_sync", "__any_sync", "__all_sync",
                            "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync",
                            "__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync",
                            "__match_any_sync"};
  return (k >= 0 && k <= kMatchAny) ? n[k] : "?";
}

struct Warp {
  int kind = -1;
  const char* file = "";
  int line = 0;
  unsigned mask = 0;
  unsigned arrived = 0;  // lanes waiting in the pending collective
  unsigned live = 0;     // lanes that exist and have not exited
  int width = 32;
  uint64_t val[32];
  uint64_t out[32];
  int arg[32];
  // Participants of every collective this warp completed since the block's last barrier: two lanes are
  // ordered by a collective both took part in (the sanitizer's happens-before, sanitizer.h).
  std::vector<uint32_t> hist;
};

struct GuardedRegion {
  char* map = nullptr;
  size_t map_bytes = 0;
  char* lo = nullptr;  // user bytes [lo, hi)
  char* hi = nullptr;
};

enum FaultKind : int { kFaultNone = 0, kFaultSignal = 1, kFaultTimeout = 2 };

struct Runtime {
  std::mutex mu;
  std::thread::id owner;
  bool in_launch = false;
  Options opt;
  // current launch
  std::string kernel;
  dim3 grid, block;
  size_t smem = 0;
  unsigned nthreads = 0, nwarps = 0;
  void (*invoke)(void*) = nullptr;
  void* invoke_ctx = nullptr;
  // current block
  uint3 block_idx{0, 0, 0};
  std::vector<Thread> th;
  std::vector<Warp> warps;
  Thread* cur = nullptr;
  Ctx sched;
  std::deque<unsigned> runq;
  uint64_t rng = 0;
  bool warp_priority = false;         // this block runs under the WarpPriority schedule
  std::vector<uint64_t> warp_prio;    // per warp
  unsigned bar_arrived = 0;
  const char* bar_file = "";
  int bar_line = 0;
  int bar_kind = 0;
  int bar_acc = 0;
  int bar_result = 0;
  unsigned done = 0;
  bool failed = false;
  std::string err;
  uint64_t switches = 0;
  // faults (written by signal handlers)
  volatile sig_atomic_t in_fiber = 0;
  volatile sig_atomic_t timed_out = 0;
  volatile sig_atomic_t fault_kind = kFaultNone;
  volatile sig_atomic_t fault_sig = 0;
  void* volatile fault_addr = nullptr;
  volatile unsigned fault_thread = 0;
  // memory
  size_t page = 4096;
  std::vector<char*> stacks;  // each: guard page + stack_bytes
  size_t stack_bytes = 0;
  GuardedRegion smem_region;
  char* smem_base = nullptr;
  size_t smem_rounded = 0;
  std::vector<GuardedRegion> guarded;  // test buffers from guarded_alloc
  std::map<const void*, int> max_dyn_smem_attr;
  char* altstack = nullptr;
  size_t altstack_bytes = 0;
  std::vector<LaunchRecord> log;
  std::vector<std::pair<ptrdiff_t, size_t>> static_shared;  // static __shared__: offset from g_tls_marker, bytes
  std::vector<std::string> static_shared_names;             // same order (for diagnostics)
  // sanitizer state (csrc/emu/sanitizer.h)
  volatile int in_rt = 0;      // 1 while the emulator's own code runs inside a fiber: its accesses are not device accesses
  volatile int atomic_access = 0;  // 1 inside an emulated atomic: its accesses are atomic
  uint32_t launch_id = 0;      // incremented per launch: accesses of earlier launches are ordered (stream order)
  uint32_t block_lin = 0;      // linear index of the running block
  uint32_t epoch = 0;          // barriers the running block has passed
  uint64_t checked = 0;        // accesses checked in this launch
};

inline Runtime g_rt;

// A compiler barrier: the instrumentation calls are inserted after optimisation, so without it the
// optimiser may move device accesses across the flag stores below (and drop a store of 1 followed by 0).
#define LTK_EMU_COMPILER_BARRIER() __asm__ __volatile__("" ::: "memory")

// Marks the emulator's own code while it runs on a fiber (barriers, collectives, scheduling, failure
// paths): the sanitizer ignores its memory accesses, which are not device accesses. Restores the previous
// value, so nesting is harmless; the scheduler sets in_rt = 1 before resuming a fiber, because every fiber
// resumes inside emulator code.
struct RtScope {
  int prev;
  RtScope() : prev(g_rt.in_rt) {
    g_rt.in_rt = 1;
    LTK_EMU_COMPILER_BARRIER();
  }
  ~RtScope() {
    LTK_EMU_COMPILER_BARRIER();
    g_rt.in_rt = prev;
  }
  RtScope(const RtScope&) = delete;
  RtScope& operator=(const RtScope&) = delete;
};
// Reference point in this shared object's thread-local block: static __shared__ variables are registered
// by their TLS offset relative to it.
inline thread_local char g_tls_marker __attribute__((used)) = 0;
inline uint3 g_thread_idx{0, 0, 0};
inline uint3 g_block_idx{0, 0, 0};
inline dim3 g_block_dim{1, 1, 1};
inline dim3 g_grid_dim{1, 1, 1};

}  // namespace detail
}  // namespace emu
}  // namespace ltk

// Events the runtime reports to the sanitizer (defined once per library by csrc/emu/sanitizer_impl.h,
// which python_tests/emu/sanitizer.cpp compiles without instrumentation).
extern "C" void ltk_emu_san_launch_begin();
extern "C" void ltk_emu_san_launch_end();
extern "C" void ltk_emu_san_block_begin();
extern "C" void ltk_emu_san_block_end(int ok);
// Replaces the {{pc:HEX}} markers of a sanitizer message by source locations (addr2line).
extern "C" void ltk_emu_san_symbolize(std::string* msg);

namespace ltk {
namespace emu {
namespace detail {

inline const char* short_path(const char* f) {
  // keep the last two path components: "cuda/margin_ce_kernels.cuh"
  const char* last = f;
  const char* prev = f;
  for (const char* p = f; *p; ++p)
    if (*p == '/') {
      prev = last;
      last = p + 1;
    }
  return prev;
}

inline std::string site(const char* f, int l) { return std::string(short_path(f)) + ":" + std::to_string(l); }

inline std::string thread_desc(const Thread& t) {
  std::ostringstream s;
  s << "thread (" << t.idx.x << "," << t.idx.y << "," << t.idx.z << ") [warp " << (t.lin >> 5) << " lane "
    << (t.lin & 31) << "]";
  return s.str();
}

inline std::string lanes_desc(unsigned m) {
  std::ostringstream s;
  s << "{";
  bool first = true;
  for (int i = 0; i < 32;) {
    if (!(m >> i & 1)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && (m >> (j + 1) & 1)) ++j;
    s << (first ? "" : ",") << i;
    if (j > i) s << "-" << j;
    first = false;
    i = j + 1;
  }
  s << "}";
  return s.str();
}

inline std::string launch_desc() {
  const Runtime& r = g_rt;
  std::ostringstream s;
  s << "ltk::emu: kernel " << r.kernel << " <<<(" << r.grid.x << "," << r.grid.y << "," << r.grid.z << "), ("
    << r.block.x << "," << r.block.y << "," << r.block.z << "), " << r.smem << ">>>";
  return s.str();
}

inline std::string block_desc() {
  const Runtime& r = g_rt;
  std::ostringstream s;
  s << "block (" << r.block_idx.x << "," << r.block_idx.y << "," << r.block_idx.z << ")";
  return s.str();
}

// ---------------------------------------------------------------------------------------------------
// Leaving and entering fibers.
inline void switch_out() {
  Runtime& r = g_rt;
  Thread* t = r.cur;
  r.in_fiber = 0;
  r.cur = nullptr;
  ctx_switch(t->ctx, r.sched);
  // resumed by the scheduler, which set cur/in_fiber and threadIdx
}

[[noreturn]] inline void switch_out_forever() {
  switch_out();
  std::fprintf(stderr, "ltk::emu: internal error: an abandoned fiber was resumed\n");
  std::abort();
}

inline void make_runnable(unsigned i) {
  Runtime& r = g_rt;
  r.th[i].st = TS::Runnable;
  r.runq.push_back(i);
}

// Ends the current thread's participation with a diagnostic; the launch throws Error. Called from
// device code (a fiber) or, outside a launch, throws directly.
[[noreturn]] inline void fail(const std::string& msg) {
  RtScope rt;
  Runtime& r = g_rt;
  Thread* t = r.cur;
  if (!t || !r.in_launch) throw Error("ltk::emu: " + msg);
  if (!r.failed) {
    r.failed = true;
    r.err = launch_desc() + ", " + block_desc() + " " + thread_desc(*t) + ": " + msg;
  }
  t->st = TS::Done;
  switch_out_forever();
}

inline void yield_current() {
  RtScope rt;
  Runtime& r = g_rt;
  r.runq.push_back(r.cur->lin);
  switch_out();
}

// A lane that is named in its warp's pending collective must not go elsewhere first.
inline void check_no_pending_warp_op(const Thread& t, const char* what, const char* file, int line) {
  Runtime& r = g_rt;
  const Warp& w = r.warps[t.lin >> 5];
  unsigned lane = t.lin & 31;
  if (w.arrived && (w.mask >> lane & 1)) {
    fail(std::string("divergent warp: this lane reached ") + what + " at " + site(file, line) + " while lanes " +
         lanes_desc(w.arrived) + " of its warp wait for it in " + wkind_name(w.kind) + " at " +
         site(w.file, w.line) + " (mask 0x" + [&] {
           char b[16];
           std::snprintf(b, sizeof b, "%08x", w.mask);
           return std::string(b);
         }() + ")");
  }
}

// PTX shfl semantics (see the PTX ISA, "shfl.sync"), with c as the CUDA headers compute it.
inline int shfl_source(int kind, int lane, int b, int width) {
  int segmask = (32 - width) & 31;
  int cval = (kind == kShflUp) ? 0 : 0x1f;
  int maxLane = (lane & segmask) | (cval & ~segmask);
  int minLane = lane & segmask;
  int bval = b & 31;
  int j;
  bool p;
  switch (kind) {
    case kShflUp: j = lane - bval; p = j >= maxLane; break;
    case kShflDown: j = lane + bval; p = j <= maxLane; break;
    case kShflXor: j = lane ^ bval; p = j <= maxLane; break;
    default: j = minLane | (bval & ~segmask); p = j <= maxLane; break;
  }
  return p ? j : lane;
}

inline std::string hex32(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

// Completes the pending collective of warp w if every live lane of its mask has arrived.
inline void maybe_complete_warp(unsigned wi) {
  Runtime& r = g_rt;
  Warp& w = r.warps[wi];
  if (!w.arrived) return;
  unsigned need = w.mask & w.live;
  if ((w.arrived & need) != need) return;
  unsigned part = w.arrived;
  switch (w.kind) {
    case kShflIdx:
    case kShflUp:
    case kShflDown:
    case kShflXor:
      for (int l = 0; l < 32; ++l) {
        if (!(part >> l & 1)) continue;
        int j = shfl_source(w.kind, l, w.arg[l], w.width);
        if (!(part >> j & 1)) {
          std::string why = (j >= 0 && unsigned(wi * 32 + j) >= r.nthreads)
                                ? "does not exist (blockDim is not a multiple of 32)"
                                : ((w.live >> j & 1) ? "is not in the mask" : "has exited");
          fail(std::string(wkind_name(w.kind)) + " at " + site(w.file, w.line) + ": lane " + std::to_string(l) +
               " of warp " + std::to_string(wi) + " reads lane " + std::to_string(j) + ", which " + why +
               "; the value would be undefined on a GPU (mask " + hex32(w.mask) + ")");
        }
        w.out[l] = w.val[j];
      }
      break;
    case kSyncWarp:
      for (int l = 0; l < 32; ++l) w.out[l] = 0;
      break;
    case kBallot:
    case kAny:
    case kAll: {
      unsigned b = 0;
      for (int l = 0; l < 32; ++l)
        if ((part >> l & 1) && w.val[l]) b |= 1u << l;
      uint64_t res = w.kind == kBallot ? b : (w.kind == kAny ? (b != 0) : (b == part));
      for (int l = 0; l < 32; ++l) w.out[l] = res;
      break;
    }
    case kReduceAdd:
    case kReduceMin:
    case kReduceMax: {
      uint64_t acc = w.kind == kReduceMin ? 0xFFFFFFFFull : 0;
      for (int l = 0; l < 32; ++l) {
        if (!(part >> l & 1)) continue;
        uint32_t v = uint32_t(w.val[l]);
        if (w.kind == kReduceAdd) acc = uint32_t(acc + v);
        else if (w.kind == kReduceMin) acc = std::min<uint64_t>(acc, v);
        else acc = std::max<uint64_t>(acc, v);
      }
      for (int l = 0; l < 32; ++l) w.out[l] = acc;
      break;
    }
    case kReduceAddI:
    case kReduceMinI:
    case kReduceMaxI: {
      int32_t acc = w.kind == kReduceMinI ? INT32_MAX : (w.kind == kReduceMaxI ? INT32_MIN : 0);
      for (int l = 0; l < 32; ++l) {
        if (!(part >> l & 1)) continue;
        int32_t v = int32_t(uint32_t(w.val[l]));
        if (w.kind == kReduceAddI) acc = int32_t(uint32_t(acc) + uint32_t(v));
        else if (w.kind == kReduceMinI) acc = std::min(acc, v);
        else acc = std::max(acc, v);
      }
      for (int l = 0; l < 32; ++l) w.out[l] = uint32_t(acc);
      break;
    }
    case kMatchAny:
      for (int l = 0; l < 32; ++l) {
        if (!(part >> l & 1)) continue;
        unsigned m = 0;
        for (int k = 0; k < 32; ++k)
          if ((part >> k & 1) && w.val[k] == w.val[l]) m |= 1u << k;
        w.out[l] = m;
      }
      break;
  }
  w.arrived = 0;
  w.kind = -1;
  w.hist.push_back(part);  // the participants are now ordered with each other
  for (int l = 0; l < 32; ++l)
    if (part >> l & 1) {
      ++r.th[wi * 32 + l].syncs;
      make_runnable(wi * 32 + l);
    }
}

inline uint64_t warp_collective(int kind, unsigned mask, uint64_t val, int arg, int width, const char* file,
                                int line) {
  RtScope rt;
  Runtime& r = g_rt;
  Thread* tp = r.cur;
  if (!tp) throw Error(std::string("ltk::emu: ") + wkind_name(kind) + " called outside a kernel");
  Thread& t = *tp;
  unsigned lane = t.lin & 31, wi = t.lin >> 5;
  Warp& w = r.warps[wi];
  if (!(mask >> lane & 1))
    fail(std::string(wkind_name(kind)) + " at " + site(file, line) + ": the calling lane is not in mask " +
         hex32(mask));
  if (kind <= kShflXor && (width < 1 || width > 32 || (width & (width - 1))))
    fail(std::string(wkind_name(kind)) + " at " + site(file, line) + ": width " + std::to_string(width) +
         " is not a power of two in [1, 32]");
  if (r.bar_arrived) {
    // somebody waits at __syncthreads: fine unless it is a lane of this collective (checked below)
  }
  if (w.arrived == 0) {
    w.kind = kind;
    w.file = file;
    w.line = line;
    w.mask = mask;
    w.width = width;
  } else if (w.kind != kind || w.line != line || std::strcmp(w.file, file) != 0 || w.mask != mask ||
             w.width != width) {
    fail(std::string("divergent warp collective: this lane calls ") + wkind_name(kind) + " at " + site(file, line) +
         " (mask " + hex32(mask) + ", width " + std::to_string(width) + ") while lanes " + lanes_desc(w.arrived) +
         " wait in " + wkind_name(w.kind) + " at " + site(w.file, w.line) + " (mask " + hex32(w.mask) +
         ", width " + std::to_string(w.width) + ")");
  }
  // a lane of the mask that waits at a block barrier can never join
  for (int l = 0; l < 32; ++l) {
    if (!((mask & w.live) >> l & 1) || unsigned(l) == lane) continue;
    const Thread& o = r.th[wi * 32 + l];
    if (o.st == TS::Barrier)
      fail(std::string(wkind_name(kind)) + " at " + site(file, line) + " waits for lane " + std::to_string(l) +
           ", which waits at __syncthreads at " + site(o.file, o.line) + ": divergent warp");
  }
  w.val[lane] = val;
  w.arg[lane] = arg;
  w.arrived |= 1u << lane;
  t.st = TS::Warp;
  t.file = file;
  t.line = line;
  t.what = wkind_name(kind);
  maybe_complete_warp(wi);
  switch_out();
  return w.out[lane];
}

// kind: 0 __syncthreads, 1 _count, 2 _and, 3 _or
inline int block_barrier(int kind, int pred, const char* file, int line) {
  static const char* names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and", "__syncthreads_or"};
  RtScope rt;
  Runtime& r = g_rt;
  Thread* tp = r.cur;
  if (!tp) throw Error("ltk::emu: __syncthreads called outside a kernel");
  Thread& t = *tp;
  check_no_pending_warp_op(t, names[kind], file, line);
  if (r.done > 0) {
    const Thread* ex = nullptr;
    for (const Thread& o : r.th)
      if (o.st == TS::Done) {
        ex = &o;
        break;
      }
    fail(std::string(names[kind]) + " at " + site(file, line) + " is reached after " + std::to_string(r.done) +
         " thread(s) of the block exited (e.g. " + (ex ? thread_desc(*ex) : std::string("?")) +
         "): every thread of the block must reach every barrier (no early return before a __syncthreads)");
  }
  if (r.bar_arrived == 0) {
    r.bar_file = file;
    r.bar_line = line;
    r.bar_kind = kind;
    r.bar_acc = 0;
  } else if (r.bar_line != line || std::strcmp(r.bar_file, file) != 0 || r.bar_kind != kind) {
    fail(std::string("divergent barriers: this thread reached ") + names[kind] + " at " + site(file, line) +
         " while " + std::to_string(r.bar_arrived) + " thread(s) wait at " + names[r.bar_kind] + " at " +
         site(r.bar_file, r.bar_line));
  }
  if (kind == 1) r.bar_acc += pred != 0;
  else if (kind == 2) r.bar_acc += pred == 0;  // count of false
  else if (kind == 3) r.bar_acc += pred != 0;
  ++r.bar_arrived;
  t.st = TS::Barrier;
  t.file = file;
  t.line = line;
  t.what = names[kind];
  if (r.bar_arrived == r.nthreads) {
    r.bar_result = kind == 1 ? r.bar_acc : (kind == 2 ? (r.bar_acc == 0) : (r.bar_acc != 0));
    r.bar_arrived = 0;
    if (r.warp_priority)  // a change point: another warp may lead the next phase
      for (auto& p : r.warp_prio) p = splitmix64(r.rng);
    ++r.epoch;  // everything before this barrier is ordered before everything after it
    for (auto& w : r.warps) w.hist.clear();
    for (unsigned i = 0; i < r.nthreads; ++i) {
      ++r.th[i].syncs;
      make_runnable(i);
    }
  }
  switch_out();
  return r.bar_result;
}

[[noreturn]] inline void thread_exit() {
  RtScope rt;
  Runtime& r = g_rt;
  Thread& t = *r.cur;
  // An exiting lane leaves the mask of a pending warp collective (CUDA: "all non-exited threads named in
  // mask must execute the same intrinsic"); reading its value is reported by maybe_complete_warp.
  if (r.bar_arrived > 0)
    fail(std::string("this thread exits while ") + std::to_string(r.bar_arrived) + " thread(s) of the block wait at " +
         (r.bar_kind == 0 ? "__syncthreads" : "__syncthreads_*") + " at " + site(r.bar_file, r.bar_line) +
         ": every thread of the block must reach every barrier (no early return before a __syncthreads)");
  t.st = TS::Done;
  ++r.done;
  unsigned wi = t.lin >> 5;
  r.warps[wi].live &= ~(1u << (t.lin & 31));
  maybe_complete_warp(wi);  // exited lanes leave the mask of a pending collective
  switch_out_forever();
}

inline void fiber_main(void* p) {
  Runtime& r = g_rt;
  (void)p;
  std::string exc;
  bool threw = false;
  try {
    r.invoke(r.invoke_ctx);  // clears in_rt around the kernel body (LaunchPack::invoke)
  } catch (const std::exception& e) {
    threw = true;
    exc = e.what();
  } catch (...) {
    threw = true;
    exc = "unknown exception";
  }
  r.in_rt = 1;
  if (threw) fail("a C++ exception escaped device code: " + exc);
  thread_exit();
}

// ---------------------------------------------------------------------------------------------------
// Memory: fiber stacks, dynamic shared memory and test buffers, each bordered by PROT_NONE pages.
inline char* map_pages(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw Error("ltk::emu: mmap failed");
  return static_cast<char*>(p);
}

inline void ensure_stacks(unsigned n) {
  Runtime& r = g_rt;
  if (r.stack_bytes != r.opt.stack_bytes) {
    for (char* s : r.stacks) munmap(s, r.stack_bytes + r.page);
    r.stacks.clear();
    r.stack_bytes = r.opt.stack_bytes;
  }
  while (r.stacks.size() < n) {
    char* m = map_pages(r.stack_bytes + r.page);
    mprotect(m, r.page, PROT_NONE);  // stacks grow down: guard below
    r.stacks.push_back(m);
  }
}

inline GuardedRegion make_guarded(size_t bytes, size_t align) {
  Runtime& r = g_rt;
  size_t rounded = (bytes + align - 1) / align * align;
  size_t data_pages = (rounded + r.page - 1) / r.page;
  if (data_pages == 0) data_pages = 1;
  GuardedRegion g;
  g.map_bytes = (data_pages + 2) * r.page;
  g.map = map_pages(g.map_bytes);
  mprotect(g.map, r.page, PROT_NONE);
  mprotect(g.map + (data_pages + 1) * r.page, r.page, PROT_NONE);
  char* end = g.map + (data_pages + 1) * r.page;
  g.lo = end - rounded;
  g.hi = g.lo + bytes;
  std::memset(g.map + r.page, 0xFF, data_pages * r.page);
  return g;
}

inline void ensure_smem(size_t bytes) {
  Runtime& r = g_rt;
  size_t rounded = (bytes + 15) / 16 * 16;
  if (!r.smem_region.map || r.smem_rounded != rounded) {
    if (r.smem_region.map) munmap(r.smem_region.map, r.smem_region.map_bytes);
    r.smem_region = make_guarded(bytes, 16);
    r.smem_rounded = rounded;
  }
  r.smem_region.hi = r.smem_region.lo + bytes;
  r.smem_base = r.smem_region.lo;
}

// ---------------------------------------------------------------------------------------------------
// Signals: faults and the watchdog inside device code become an Error for the launch.
struct SignalState {
  struct sigaction old_segv, old_bus, old_fpe, old_timer;
  stack_t old_alt;
  bool installed = false;
  timer_t timer;
  bool timer_on = false;
};
inline SignalState g_sig;
inline int timer_signal() { return SIGRTMIN + 7; }

inline uintptr_t saved_sp(void* ucv) {
  auto* uc = static_cast<ucontext_t*>(ucv);
#if defined(__x86_64__)
  return uintptr_t(uc->uc_mcontext.gregs[REG_RSP]);
#elif defined(__aarch64__)
  return uintptr_t(uc->uc_mcontext.sp);
#else
  (void)uc;
  return 0;
#endif
}

__attribute__((no_sanitize_thread)) inline void on_signal(int sig, siginfo_t* si, void* ucv) {
  Runtime& r = g_rt;
  const int saved_in_rt = r.in_rt;
  r.in_rt = 1;  // the handler's accesses (its frame may be on the alternate stack) are not device accesses
  Thread* t = r.cur;
  bool ours = false;
  if (r.in_fiber && t) {
    uintptr_t sp = saved_sp(ucv);
    uintptr_t lo = uintptr_t(t->stack_lo) - r.page, hi = uintptr_t(t->stack_lo) + r.stack_bytes;
    ours = sp == 0 || (sp >= lo && sp < hi);
  }
  if (!ours) {
    if (sig == timer_signal()) {
      r.timed_out = 1;  // noticed by the scheduler between fibers
      r.in_rt = saved_in_rt;
      return;
    }
    // not device code: give the fault back to whoever handled it before (the re-executed access
    // faults again under the previous disposition)
    struct sigaction* old = sig == SIGSEGV ? &g_sig.old_segv : (sig == SIGBUS ? &g_sig.old_bus : &g_sig.old_fpe);
    sigaction(sig, old, nullptr);
    r.in_rt = saved_in_rt;
    return;
  }
  r.fault_kind = sig == timer_signal() ? kFaultTimeout : kFaultSignal;
  r.fault_sig = sig;
  r.fault_addr = si ? si->si_addr : nullptr;
  r.fault_thread = t->lin;
  r.failed = true;
  t->st = TS::Done;
  r.in_fiber = 0;
  r.cur = nullptr;
  ctx_switch(t->ctx, r.sched);  // abandon the faulting fiber; never resumed
}

inline void install_signals() {
  Runtime& r = g_rt;
  if (!r.opt.catch_signals && r.opt.timeout_s <= 0) return;
  if (!r.altstack) {
    r.altstack_bytes = 256 << 10;
    r.altstack = map_pages(r.altstack_bytes);
  }
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = &on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
  if (r.opt.catch_signals) {
    stack_t ss;
    ss.ss_sp = r.altstack;
    ss.ss_size = r.altstack_bytes;
    ss.ss_flags = 0;
    sigaltstack(&ss, &g_sig.old_alt);
    sigaction(SIGSEGV, &sa, &g_sig.old_segv);
    sigaction(SIGBUS, &sa, &g_sig.old_bus);
    sigaction(SIGFPE, &sa, &g_sig.old_fpe);
  }
  g_sig.installed = r.opt.catch_signals;
  g_sig.timer_on = false;
  if (r.opt.timeout_s > 0) {
    struct sigaction st = sa;
    st.sa_flags = SA_SIGINFO | SA_NODEFER;  // runs on the interrupted (fiber) stack
    sigaction(timer_signal(), &st, &g_sig.old_timer);
    struct sigevent sev;
    std::memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = timer_signal();
    sev._sigev_un._tid = gettid();  // glibc spells sigev_notify_thread_id this way
    if (timer_create(CLOCK_MONOTONIC, &sev, &g_sig.timer) == 0) {
      struct itimerspec its;
      std::memset(&its, 0, sizeof its);
      double s = r.opt.timeout_s;
      its.it_value.tv_sec = time_t(s);
      its.it_value.tv_nsec = long((s - double(time_t(s))) * 1e9);
      if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
      // repeat so that a signal landing between fibers is followed by one inside the spinning fiber
      its.it_interval.tv_nsec = 50 * 1000 * 1000;
      timer_settime(g_sig.timer, 0, &its, nullptr);
      g_sig.timer_on = true;
    } else {
      sigaction(timer_signal(), &g_sig.old_timer, nullptr);
    }
  }
}

inline void remove_signals() {
  Runtime& r = g_rt;
  if (g_sig.timer_on) {
    timer_delete(g_sig.timer);
    g_sig.timer_on = false;
    sigaction(timer_signal(), &g_sig.old_timer, nullptr);
  }
  if (g_sig.installed) {
    sigaction(SIGSEGV, &g_sig.old_segv, nullptr);
    sigaction(SIGBUS, &g_sig.old_bus, nullptr);
    sigaction(SIGFPE, &g_sig.old_fpe, nullptr);
    sigaltstack(&g_sig.old_alt, nullptr);
    g_sig.installed = false;
  }
  (void)r;
}

inline std::string describe_fault() {
  Runtime& r = g_rt;
  const Thread& t = r.th[r.fault_thread];
  std::string who = launch_desc() + ", " + block_desc() + " " + thread_desc(t) + ": ";
  if (r.fault_kind == kFaultTimeout) {
    std::ostringstream s;
    s << who << "timeout: the launch ran longer than " << r.opt.timeout_s
      << " s (LTK_EMU_TIMEOUT_S). A thread probably spins on memory that another thread writes with no "
         "barrier in between: the emulator switches threads only at barriers, warp collectives, atomics "
         "and exit.";
    return s.str();
  }
  uintptr_t a = reinterpret_cast<uintptr_t>(r.fault_addr);
  if (r.fault_sig == SIGFPE) return who + "arithmetic exception (SIGFPE): integer division by zero or overflow in device code";
  std::ostringstream s;
  s << who;
  for (const Thread& o : r.th)
    if (o.stack_lo && a >= uintptr_t(o.stack_lo) - r.page && a < uintptr_t(o.stack_lo)) {
      s << "stack overflow of an emulated thread (" << (r.stack_bytes >> 10)
        << " KiB, LTK_EMU_STACK_KB): large local arrays or deep recursion in device code";
      return s.str();
    }
  const GuardedRegion& g = r.smem_region;
  if (g.map && a >= uintptr_t(g.map) && a < uintptr_t(g.map + g.map_bytes)) {
    long off = long(a) - long(uintptr_t(r.smem_base));
    s << "out-of-bounds dynamic shared memory access at byte offset " << off << " (the launch passed " << r.smem
      << " bytes)";
    return s.str();
  }
  for (const GuardedRegion& b : r.guarded)
    if (a >= uintptr_t(b.map) && a < uintptr_t(b.map + b.map_bytes)) {
      long off = long(a) - long(uintptr_t(b.lo));
      s << "out-of-bounds global memory access at byte offset " << off << " of a guarded buffer of "
        << (b.hi - b.lo) << " bytes";
      return s.str();
    }
  s << "illegal memory access (" << (r.fault_sig == SIGBUS ? "SIGBUS" : "SIGSEGV") << ") at address " << r.fault_addr;
  return s.str();
}

inline std::string deadlock_report() {
  Runtime& r = g_rt;
  std::ostringstream s;
  s << launch_desc() << ", " << block_desc() << ": deadlock: no thread can make progress (" << r.done << " of "
    << r.nthreads << " exited).";
  // group waiting threads by (what, site)
  std::map<std::string, std::vector<unsigned>> groups;
  for (const Thread& t : r.th)
    if (t.st == TS::Barrier || t.st == TS::Warp) groups[std::string(t.what) + " at " + site(t.file, t.line)].push_back(t.lin);
  for (auto& g : groups) {
    s << " " << g.second.size() << " thread(s) wait in " << g.first << " (first: " << g.second.front() << ");";
  }
  return s.str();
}

inline std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname) {
    int st = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
    std::string n = (st == 0 && d) ? d : info.dli_sname;
    std::free(d);
    return n;
  }
  char b[32];
  std::snprintf(b, sizeof b, "%p", fn);
  return b;
}

inline void check_config(const void* fn, dim3 grid, dim3 block, size_t smem) {
  Runtime& r = g_rt;
  auto bad = [&](const std::string& m) {
    throw Error(launch_desc() + ": invalid launch configuration (cudaErrorInvalidConfiguration on a GPU): " + m);
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0)
    bad("a grid dimension is 0 (guard empty inputs on the host instead of launching)");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) bad("gridDim exceeds (2^31-1, 65535, 65535)");
  if (block.x == 0 || block.y == 0 || block.z == 0) bad("a block dimension is 0");
  if (block.x > 1024 || block.y > 1024 || block.z > 64) bad("blockDim exceeds (1024, 1024, 64)");
  if (uint64_t(block.x) * block.y * block.z > 1024) bad("more than 1024 threads per block");
  size_t limit = r.opt.max_dynamic_smem;
  auto it = r.max_dyn_smem_attr.find(fn);
  if (it != r.max_dyn_smem_attr.end()) limit = size_t(it->second);
  if (smem > limit)
    bad(std::to_string(smem) + " bytes of dynamic shared memory exceed the limit of " + std::to_string(limit) +
        " (above 48 KiB a kernel needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize))");
}

inline void run_block(uint3 bidx) {
  Runtime& r = g_rt;
  r.block_idx = bidx;
  g_block_idx = bidx;
  r.rng = r.opt.seed ^ (0xD1B54A32D192ED03ull * (1 + bidx.x + uint64_t(bidx.y) * r.grid.x +
                                                   uint64_t(bidx.z) * r.grid.x * r.grid.y));
  splitmix64(r.rng);
  r.bar_arrived = 0;
  r.done = 0;
  r.runq.clear();
  r.block_lin = unsigned(bidx.x + uint64_t(bidx.y) * r.grid.x + uint64_t(bidx.z) * r.grid.x * r.grid.y);
  r.epoch = 0;
  r.warp_priority = r.opt.schedule == Schedule::WarpPriority ||
                    (r.opt.schedule == Schedule::Random && (splitmix64(r.rng) & 1));
  r.warp_prio.resize(r.nwarps);
  for (auto& p : r.warp_prio) p = splitmix64(r.rng);
  for (unsigned w = 0; w < r.nwarps; ++w) {
    Warp& wp = r.warps[w];
    wp.arrived = 0;
    wp.kind = -1;
    unsigned n = std::min(32u, r.nthreads - w * 32);
    wp.live = n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1);
    wp.hist.clear();
  }
  for (unsigned i = 0; i < r.nthreads; ++i) {
    Thread& t = r.th[i];
    t.lin = i;
    t.idx = uint3{i % r.block.x, (i / r.block.x) % r.block.y, i / (r.block.x * r.block.y)};
    t.st = TS::Runnable;
    t.stack_lo = r.stacks[i] + r.page;
    t.what = "";
    t.syncs = 0;
    ctx_make(t.ctx, t.stack_lo, r.stack_bytes, &fiber_main, &t);
    r.runq.push_back(i);
  }
  if (r.opt.poison_shared)
    for (const auto& reg : r.static_shared) std::memset(&g_tls_marker + reg.first, 0xFF, reg.second);
  if (r.smem_region.map) {
    if (r.opt.poison_shared) std::memset(r.smem_region.lo, 0xFF, r.smem_rounded);
    else std::memset(r.smem_region.lo, 0, r.smem);
    std::memset(r.smem_region.lo + r.smem, 0xFF, r.smem_rounded - r.smem);  // canary up to the guard page
  }
  ltk_emu_san_block_begin();
  while (!r.failed && !r.runq.empty()) {
    if (r.timed_out) {
      r.failed = true;
      r.err = launch_desc() + ", " + block_desc() + ": timeout: the launch ran longer than " +
              std::to_string(r.opt.timeout_s) + " s (LTK_EMU_TIMEOUT_S)";
      break;
    }
    unsigned i;
    if (r.warp_priority) {
      // the highest-priority warp with a runnable lane; a random lane of it
      uint64_t best = 0;
      size_t k = 0, ties = 0;
      for (size_t q = 0; q < r.runq.size(); ++q) {
        uint64_t p = r.warp_prio[r.runq[q] >> 5];
        if (ties == 0 || p > best) {
          best = p;
          k = q;
          ties = 1;
        } else if (p == best && splitmix64(r.rng) % ++ties == 0) {
          k = q;
        }
      }
      i = r.runq[k];
      r.runq[k] = r.runq.back();
      r.runq.pop_back();
    } else if (r.opt.schedule == Schedule::Random || r.opt.schedule == Schedule::Uniform) {
      size_t k = size_t(splitmix64(r.rng) % r.runq.size());
      i = r.runq[k];
      r.runq[k] = r.runq.back();
      r.runq.pop_back();
    } else if (r.opt.schedule == Schedule::Forward) {
      i = r.runq.front();
      r.runq.pop_front();
    } else {
      i = r.runq.back();
      r.runq.pop_back();
    }
    Thread& t = r.th[i];
    r.cur = &t;
    g_thread_idx = t.idx;
    r.in_rt = 1;  // the fiber resumes inside emulator code
    r.in_fiber = 1;
    ctx_switch(r.sched, t.ctx);
    r.in_fiber = 0;
    r.cur = nullptr;
    ++r.switches;
  }
  r.in_rt = 0;
  if (r.fault_kind != kFaultNone) {
    r.err = describe_fault();
    ltk_emu_san_block_end(0);
    return;
  }
  if (!r.failed && r.done != r.nthreads) {
    r.failed = true;
    r.err = deadlock_report();
  }
  ltk_emu_san_block_end(!r.failed);
  if (r.failed) return;
  if (r.smem_region.map) {
    for (size_t k = r.smem; k < r.smem_rounded; ++k)
      if (static_cast<unsigned char>(r.smem_region.lo[k]) != 0xFF) {
        r.failed = true;
        r.err = launch_desc() + ", " + block_desc() + ": out-of-bounds write to dynamic shared memory at byte offset " +
                std::to_string(k) + " (the launch passed " + std::to_string(r.smem) + " bytes)";
        return;
      }
  }
}

inline void run_launch(const void* fn, dim3 grid, dim3 block, size_t smem, void (*invoke)(void*), void* ctx) {
  Runtime& r = g_rt;
  if (r.in_launch && r.owner == std::this_thread::get_id())
    throw Error("ltk::emu: a kernel launch from device code (dynamic parallelism) is not supported");
  std::lock_guard<std::mutex> lock(r.mu);
  r.owner = std::this_thread::get_id();
  r.opt = options_ref();
  r.page = size_t(sysconf(_SC_PAGESIZE));
  r.kernel = kernel_name(fn);
  r.grid = grid;
  r.block = block;
  r.smem = smem;
  LaunchRecord rec;
  rec.kernel = r.kernel;
  rec.grid = grid;
  rec.block = block;
  rec.dynamic_smem = smem;
  check_config(fn, grid, block, smem);
  if (r.opt.clamp_grid) {
    grid.x = std::min(grid.x, r.opt.clamp_grid);
    grid.y = std::min(grid.y, r.opt.clamp_grid);
    r.grid = grid;
    rec.grid = grid;
  }
  r.nthreads = block.x * block.y * block.z;
  r.nwarps = (r.nthreads + 31) / 32;
  r.invoke = invoke;
  r.invoke_ctx = ctx;
  r.th.assign(r.nthreads, Thread{});
  r.warps.assign(r.nwarps, Warp{});
  ensure_stacks(r.nthreads);
  ensure_smem(smem);
  g_block_dim = block;
  g_grid_dim = grid;
  r.failed = false;
  r.err.clear();
  r.switches = 0;
  r.checked = 0;
  r.timed_out = 0;
  r.fault_kind = kFaultNone;
  // block order
  uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t b = 0; b < nblocks; ++b) order[b] = b;
  if (r.opt.shuffle_blocks && r.opt.schedule != Schedule::Forward && r.opt.schedule != Schedule::Reverse) {
    uint64_t s = r.opt.seed * 0x2545F4914F6CDD1Dull + 17;
    for (uint64_t b = nblocks; b > 1; --b) std::swap(order[b - 1], order[splitmix64(s) % b]);
  } else if (r.opt.schedule == Schedule::Reverse) {
    std::reverse(order.begin(), order.end());
  }
  ++r.launch_id;
  ltk_emu_san_launch_begin();
  r.in_launch = true;
  install_signals();
  for (uint64_t b : order) {
    uint3 bi{unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
    run_block(bi);
    if (r.failed) break;
  }
  remove_signals();
  r.in_launch = false;
  ltk_emu_san_launch_end();
  rec.context_switches = r.switches;
  rec.checked_accesses = r.checked;
  rec.failed = r.failed;
  r.log.push_back(rec);
  if (r.log.size() > 10000) r.log.erase(r.log.begin(), r.log.begin() + 5000);
  if (r.failed) {
    std::string e = r.err.empty() ? launch_desc() + ": launch failed" : r.err;
    ltk_emu_san_symbolize(&e);
    throw Error(e);
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------
// Public host API.
inline Options& options() { return detail::options_ref(); }
inline std::vector<LaunchRecord>& launch_log() { return detail::g_rt.log; }

// Dynamic shared memory of the running block (what `extern __shared__` names on a GPU).
inline unsigned char* dynamic_shared_memory() {
  detail::RtScope rt;
  if (!detail::g_rt.cur) throw Error("ltk::emu: dynamic shared memory used outside a kernel");
  return reinterpret_cast<unsigned char*>(detail::g_rt.smem_base);
}

// A test buffer whose last byte is followed by a PROT_NONE page (and preceded, after < 1 page of
// 0xFF-filled slack, by another): kernels that read or write past its end fail with an Error that
// names the byte offset. Free with guarded_free.
inline void* guarded_alloc(size_t bytes, size_t align = 16) {
  std::lock_guard<std::mutex> lock(detail::g_rt.mu);
  detail::g_rt.page = size_t(sysconf(_SC_PAGESIZE));
  detail::GuardedRegion g = detail::make_guarded(bytes, align);
  // make the buffer end exactly at the guard page when bytes is a multiple of align
  detail::g_rt.guarded.push_back(g);
  return g.lo;
}
inline void guarded_free(void* p) {
  std::lock_guard<std::mutex> lock(detail::g_rt.mu);
  auto& v = detail::g_rt.guarded;
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i].lo == p) {
      munmap(v[i].map, v[i].map_bytes);
      v.erase(v.begin() + long(i));
      return;
    }
}

// Registers a static __shared__ variable by its offset (bytes) from ltk::emu::detail::g_tls_marker in the
// thread-local block of this shared object (ELF st_value of the variable minus that of the marker), so
// that it is poisoned before every block like dynamic shared memory.
inline void register_static_shared(ptrdiff_t offset_from_marker, size_t bytes, const char* name = "") {
  std::lock_guard<std::mutex> lock(detail::g_rt.mu);
  for (const auto& r : detail::g_rt.static_shared)
    if (r.first == offset_from_marker) return;
  detail::g_rt.static_shared.emplace_back(offset_from_marker, bytes);
  detail::g_rt.static_shared_names.emplace_back(name ? name : "");
}

namespace detail {
template <class To>
inline To implicit_convert(To v) {
  return v;
}
template <class F, class Tuple>
struct LaunchPack {
  F fn;
  Tuple params;
  static void invoke(void* p) {
    auto* self = static_cast<LaunchPack*>(p);
    // each emulated thread gets its own copy of the parameters, as on a GPU (on its own stack: copied
    // while in_rt is still set, because the pack lives on the launching thread's stack)
    F fn = self->fn;
    Tuple params(self->params);
    LTK_EMU_COMPILER_BARRIER();
    g_rt.in_rt = 0;  // device code from here
    LTK_EMU_COMPILER_BARRIER();
    std::apply([fn](auto&... a) { fn(a...); }, params);
    LTK_EMU_COMPILER_BARRIER();
    g_rt.in_rt = 1;
  }
};
}  // namespace detail

// Runs kernel<<<grid, block, smem>>>(args...) on the CPU; throws Error on any detected misuse.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "ltk::emu::launch: wrong number of kernel arguments");
  static_assert((!std::is_reference<KArgs>::value && ...), "kernel parameters must be passed by value");
  using Tuple = std::tuple<std::decay_t<KArgs>...>;
  detail::LaunchPack<void (*)(KArgs...), Tuple> pack{
      kernel, Tuple(detail::implicit_convert<std::decay_t<KArgs>>(std::forward<Args>(args))...)};
  detail::run_launch(reinterpret_cast<const void*>(kernel), grid, block, smem, &decltype(pack)::invoke, &pack);
}

}  // namespace emu
}  // namespace ltk
