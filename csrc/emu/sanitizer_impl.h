// SIMT emulator sanitizer and memory-access model: racecheck, memcheck and initcheck for every global and
// shared memory access of device code, and a warp-level request model (sectors, lanes, width, bank
// conflicts) from the same trace. docs/emulator.md, "Sanitizer" and "Memory-access model", describes
// what it finds and its limits.
//
// How accesses are seen: the translation units with device code are compiled with GCC's ThreadSanitizer
// instrumentation (-fsanitize=thread), which calls __tsan_readN / __tsan_writeN(addr) before every memory
// access that the optimiser kept. No TSan runtime is linked: this file provides those hooks. A hook only
// looks at an access when a fiber runs device code (g_rt.in_fiber, not g_rt.in_rt); accesses to the
// thread's own stack (locals) and to the library image (threadIdx, constants) are local or read-only and
// pass. Everything else must fall into a *region*: a global buffer the host registered (every
// emu.guarded() allocation, every tensor passed through emu.ptr()), the launch's dynamic shared memory or
// a static __shared__ variable. An address outside every region is a memcheck error.
//
// Include this header in exactly one translation unit of the library, compiled WITHOUT -fsanitize=thread
// (python_tests/emu/sanitizer.cpp): the hooks must not instrument themselves.
#pragma once

#include <link.h>

#include <algorithm>
#include <array>
#include <cinttypes>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "simt.h"

namespace ltk {
namespace emu {
namespace san {

using detail::g_rt;
using detail::Runtime;
using detail::Thread;

enum Space : uint8_t { kGlobal = 0, kDynShared = 1, kStaticShared = 2 };

// One access for the happens-before check. launch == 0: no access recorded.
struct Stamp {
  uint64_t pc = 0;       // return address in device code, or kSiteBit | index into State::sites
  uint32_t launch = 0;
  uint32_t block = 0;    // linear block index
  uint32_t epoch = 0;    // barriers the block had passed
  uint32_t wgen = 0;     // collectives the warp had completed since that barrier
  uint16_t thread = 0;   // linear thread index in the block
  uint8_t atomic = 0;
  uint8_t write = 0;
};
constexpr uint64_t kSiteBit = 1ull << 63;

// Shadow of one byte: the last write and the last two reads by different threads (FastTrack-style
// sampling: a race with an older read that two later readers have superseded can be missed).
struct Cell {
  Stamp w, r1, r2;
};

struct Region {
  char* lo = nullptr;
  size_t bytes = 0;
  Space space = kGlobal;
  bool guarded = false;     // an emu.guarded() allocation
  bool transient = false;   // registered for one entry-point call (emu.ptr of a plain tensor)
  bool track_init = false;  // bytes start uninitialised (output buffers, shared memory)
  std::string name;
  std::vector<uint8_t> init;  // per byte, when track_init
  std::vector<Cell> cells;    // per byte, allocated on first access
  bool dirty = false;
  int index = 0;  // position in State::sorted during a launch (the model's trace refers to it)
  uintptr_t end() const { return uintptr_t(lo) + bytes; }
};

// The model's record of one access (only while Options::model is on).
struct Access {
  uint64_t pc;
  uintptr_t addr;
  uint32_t size;
  uint32_t syncs;
  uint16_t thread;
  uint8_t write, atomic;
  int region;  // index into State::sorted
};

// Aggregated warp-level requests of one instruction on one region.
struct SiteStats {
  uint64_t requests = 0, lanes = 0, bytes_used = 0, sectors = 0, wavefronts = 0, min_wavefronts = 0;
  uint32_t width = 0;  // largest access of a lane, bytes
};
struct RegionTotals {
  std::string name;
  Space space = kGlobal;
  uint64_t bytes = 0;
  uint64_t read_sectors = 0, write_sectors = 0, read_used = 0, write_used = 0, requests = 0;
};
struct LaunchModel {
  std::string kernel;
  dim3 grid, block;
  std::map<std::tuple<std::string, uint64_t, int>, SiteStats> sites;  // (region name, pc, op 0 r / 1 w / 2 atomic)
  std::map<std::string, RegionTotals> regions;
};

// A block's atomic write to a global address (the release / acquire points of cross-block ordering).
struct AtomicMark {
  uintptr_t addr;
  uint32_t epoch;
  uint64_t seq;  // the atomics' order of execution in this launch
};

struct State {
  std::unordered_map<uint32_t, std::vector<AtomicMark>> atomics;  // this launch's, by linear block index
  uint64_t atomic_seq = 0;
  std::vector<std::unique_ptr<Region>> buffers;  // global buffers registered by the host
  std::vector<std::unique_ptr<Region>> shared;   // this launch's shared memory
  std::vector<Region*> sorted;                   // all regions of the launch, by address
  std::vector<std::pair<uintptr_t, uintptr_t>> image;  // loaded segments of this library
  bool image_done = false;
  std::vector<std::pair<const char*, int>> sites;      // atomics' call sites (file, line)
  std::map<std::pair<const char*, int>, uint64_t> site_index;
  std::vector<Access> trace;
  std::vector<LaunchModel> model;
  bool model_on = false;
};

inline State& state() {
  static State s;
  return s;
}


// ---- regions ----------------------------------------------------------------------------------------
inline void collect_image(State& S) {
  if (S.image_done) return;
  S.image_done = true;
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&collect_image), &info)) return;
  struct Ctx {
    State* S;
    void* base;
  } ctx{&S, info.dli_fbase};
  dl_iterate_phdr(
      [](struct dl_phdr_info* pi, size_t, void* data) -> int {
        auto* c = static_cast<Ctx*>(data);
        bool ours = false;
        for (int k = 0; k < pi->dlpi_phnum; ++k)
          if (pi->dlpi_phdr[k].p_type == PT_LOAD && pi->dlpi_addr + pi->dlpi_phdr[k].p_vaddr - pi->dlpi_phdr[k].p_offset ==
                                                         reinterpret_cast<uintptr_t>(c->base))
            ours = true;
        if (!ours && reinterpret_cast<uintptr_t>(c->base) != pi->dlpi_addr) return 0;
        for (int k = 0; k < pi->dlpi_phnum; ++k) {
          const auto& ph = pi->dlpi_phdr[k];
          if (ph.p_type != PT_LOAD) continue;
          uintptr_t lo = pi->dlpi_addr + ph.p_vaddr;
          c->S->image.emplace_back(lo, lo + ph.p_memsz);
        }
        return 1;
      },
      &ctx);
}

inline bool in_image(const State& S, uintptr_t a) {
  for (const auto& seg : S.image)
    if (a >= seg.first && a < seg.second) return true;
  return false;
}

inline Region* find_region(const State& S, uintptr_t a) {
  const auto& v = S.sorted;
  auto it = std::upper_bound(v.begin(), v.end(), a, [](uintptr_t x, const Region* r) { return x < uintptr_t(r->lo); });
  if (it == v.begin()) return nullptr;
  Region* r = *(it - 1);
  return a < r->end() ? r : nullptr;
}

inline void reset_shadow(Region& R) {
  if (!R.dirty) return;
  R.cells.clear();
  if (R.track_init) std::fill(R.init.begin(), R.init.end(), 0);
  R.dirty = false;
}

// ---- descriptions -----------------------------------------------------------------------------------
inline std::string hexaddr(uintptr_t a) {
  char b[32];
  std::snprintf(b, sizeof b, "0x%" PRIxPTR, a);
  return b;
}

inline std::string site_marker(const State& S, uint64_t pc) {
  if (pc & kSiteBit) {
    const auto& s = S.sites[size_t(pc & ~kSiteBit)];
    return detail::site(s.first, s.second);
  }
  char b[48];
  std::snprintf(b, sizeof b, "{{pc:%" PRIx64 "}}", pc);
  return b;
}

inline std::string region_desc(const Region& R, uintptr_t a) {
  std::string s;
  long off = long(a) - long(uintptr_t(R.lo));
  if (R.space == kGlobal)
    s = std::string(R.guarded ? "guarded" : "") + (R.guarded ? " " : "") + "global buffer" +
        (R.name.empty() ? "" : " '" + R.name + "'");
  else if (R.space == kDynShared)
    s = "dynamic shared memory";
  else
    s = "shared memory `" + R.name + "`";
  return s + " (" + std::to_string(R.bytes) + " bytes) at byte offset " + std::to_string(off) + " (address " +
         hexaddr(a) + ")";
}

inline std::string thread_of(const Stamp& st) {
  const Runtime& r = g_rt;
  unsigned b = st.block, t = st.thread;
  std::ostringstream s;
  s << "block (" << b % r.grid.x << "," << (b / r.grid.x) % r.grid.y << "," << b / (r.grid.x * r.grid.y)
    << ") thread (" << t % r.block.x << "," << (t / r.block.x) % r.block.y << "," << t / (r.block.x * r.block.y)
    << ") [warp " << (t >> 5) << " lane " << (t & 31) << "]";
  return s.str();
}

inline std::string access_desc(const State& S, const Stamp& st, uint32_t size) {
  std::string op = st.atomic ? "atomic " : "";
  op += st.write ? "write" : "read";
  std::string sz = size ? std::to_string(size) + "-byte " : "";
  return sz + op + " by " + thread_of(st) + " at " + site_marker(S, st.pc);
}

// ---- happens-before -----------------------------------------------------------------------------------
// Within one launch, two accesses of different blocks are ordered only through an atomic on one global
// address (the "last block" ticket of a grid reduction): block P's access is released by an atomic of P
// at a later barrier epoch, block C's is acquired by an atomic of C on the same address that ran after P's,
// at an earlier epoch than C's access. So a barrier must separate the published stores from the ticket
// and the ticket from the reads. Memory fences are not modelled (the emulator's memory is sequentially
// consistent): a missing __threadfence is not detected, only a missing barrier or ticket.
inline bool ordered_by_atomics(const Stamp& p, const Stamp& c) {
  const State& S = state();
  const auto ip = S.atomics.find(p.block), ic = S.atomics.find(c.block);
  if (ip == S.atomics.end() || ic == S.atomics.end()) return false;
  for (const AtomicMark& rel : ip->second) {
    if (p.epoch >= rel.epoch) continue;
    for (const AtomicMark& acq : ic->second)
      if (acq.addr == rel.addr && acq.seq > rel.seq && c.epoch > acq.epoch) return true;
  }
  return false;
}
// Otherwise, accesses of different blocks are never ordered (blocks may run concurrently); in one block, a __syncthreads between them orders them (every thread passes every barrier, so the
// block's barrier count is a global clock); in one warp, a completed warp collective in which both lanes
// took part orders them; program order orders a thread's own accesses. Launches are ordered (one stream).
inline bool ordered(const Stamp& p, const Stamp& c) {
  if (p.launch != c.launch) return true;
  if (p.block != c.block) return ordered_by_atomics(p, c);
  if (p.thread == c.thread) return true;
  if (p.epoch != c.epoch) return true;
  if ((p.thread >> 5) != (c.thread >> 5)) return false;
  const auto& h = g_rt.warps[c.thread >> 5].hist;
  const unsigned l1 = p.thread & 31, l2 = c.thread & 31;
  for (uint32_t g = p.wgen; g < c.wgen && g < h.size(); ++g)
    if ((h[g] >> l1 & 1) && (h[g] >> l2 & 1)) return true;
  return false;
}
inline bool conflicts(const Stamp& p, const Stamp& c) {
  return p.launch != 0 && !(p.atomic && c.atomic) && !ordered(p, c);
}
inline bool same_thread(const Stamp& a, const Stamp& b) {
  return a.launch == b.launch && a.block == b.block && a.thread == b.thread;
}

[[noreturn]] inline void race(const State& S, const Region& R, uintptr_t a, const Stamp& prev, const Stamp& cur,
                              uint32_t size) {
  detail::fail("data race on " + region_desc(R, a) + ": " + access_desc(S, prev, 0) + " and " +
               access_desc(S, cur, size) +
               " are not ordered by a barrier, a warp collective or an atomic (racecheck)");
}

// ---- the access hook ------------------------------------------------------------------------------------
inline void check_access(void* p, uint32_t size, bool write, void* ret) {
  Runtime& r = g_rt;
  Thread* t = r.cur;
  if (!t || !r.in_fiber || r.in_rt || !r.opt.sanitize || !r.in_launch) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t slo = reinterpret_cast<uintptr_t>(t->stack_lo);
  if (a >= slo - r.page && a < slo + r.stack_bytes) return;  // the thread's own stack (its guard page faults)
  State& S = state();
  if (in_image(S, a)) return;  // threadIdx & co., constants, string literals
  r.in_rt = 1;
  Stamp cur;
  const bool atomic = r.atomic_access != 0;
  if (atomic && detail::AtomicScope::g_atomic_file) {
    // atomics name their caller's line (the accesses themselves are inside atomicAdd & co.)
    auto key = std::make_pair(detail::AtomicScope::g_atomic_file, detail::AtomicScope::g_atomic_line);
    auto it = S.site_index.find(key);
    if (it == S.site_index.end()) {
      it = S.site_index.emplace(key, kSiteBit | S.sites.size()).first;
      S.sites.push_back(key);
    }
    cur.pc = it->second;
  } else {
    cur.pc = reinterpret_cast<uint64_t>(ret) - 1;  // inside the access's call instruction
  }
  cur.launch = r.launch_id;
  cur.block = r.block_lin;
  cur.epoch = r.epoch;
  cur.wgen = uint32_t(r.warps[t->lin >> 5].hist.size());
  cur.thread = uint16_t(t->lin);
  cur.atomic = atomic;
  cur.write = write;
  Region* R = find_region(S, a);
  if (!R || a + size > R->end()) {
    // memcheck: outside every region (or straddling a region's end); describe it against the nearest one
    const Region* best = R;
    long best_d = 0;
    if (!best)
      for (const Region* q : S.sorted) {
        long d = a < uintptr_t(q->lo) ? long(uintptr_t(q->lo) - a) : long(a - q->end() + 1);
        if (!best || d < best_d) best = q, best_d = d;
      }
    std::string what = std::to_string(size) + "-byte " + (atomic ? "atomic " : "") + (write ? "write" : "read") +
                       " at address " + hexaddr(a) + " at " + site_marker(S, cur.pc);
    const long off = best ? long(a) - long(uintptr_t(best->lo)) : 0;
    if (best && best->space == kDynShared && best_d < long(r.page))
      detail::fail("out-of-bounds dynamic shared memory access at byte offset " + std::to_string(off) +
                   " (the launch passed " + std::to_string(r.smem) + " bytes): " + what + " (memcheck)");
    if (best && best->space == kStaticShared && best_d < 64)
      detail::fail("out-of-bounds access at byte offset " + std::to_string(off) + " of shared memory `" + best->name +
                   "` (" + std::to_string(best->bytes) + " bytes): " + what + " (memcheck)");
    if (best && best->space == kGlobal && best_d < (64 << 10))
      detail::fail("out-of-bounds global memory access at byte offset " + std::to_string(off) + " of a " +
                   (best->guarded ? "guarded buffer" : "buffer") + " of " + std::to_string(best->bytes) + " bytes" +
                   (best->name.empty() ? "" : " ('" + best->name + "')") + ": " + what +
                   " (memcheck; the nearest buffer the kernel received)");
    detail::fail("illegal memory access: " + what + " is in no buffer the kernel received (" +
                 std::to_string(S.buffers.size()) +
                 " registered), in no shared memory and not on the thread's stack (memcheck)");
  }
  const size_t off = a - uintptr_t(R->lo);
  ++r.checked;
  if (atomic && write && R->space == kGlobal) S.atomics[cur.block].push_back(AtomicMark{a, cur.epoch, S.atomic_seq++});
  if (R->track_init && !write) {
    for (uint32_t k = 0; k < size; ++k)
      if (!R->init[off + k]) {
        if (R->space == kGlobal)
          detail::fail("uninitialised read: " + std::to_string(size) + "-byte " + (atomic ? "atomic " : "") +
                       "read of " + region_desc(*R, a + k) + ", which neither the host nor a kernel has written, at " +
                       site_marker(S, cur.pc) +
                       " (initcheck; the buffer was registered as unwritten: init=False, or a guarded tensor that was "
                       "all NaN; pass init=True for an input that is NaN on purpose)");
        detail::fail("uninitialised read: " + std::to_string(size) + "-byte read of " + region_desc(*R, a + k) +
                     ", which no thread of this block has written, at " + site_marker(S, cur.pc) + " (initcheck)");
      }
  }
  if (R->cells.empty()) R->cells.resize(R->bytes);
  R->dirty = true;
  for (uint32_t k = 0; k < size; ++k) {
    Cell& c = R->cells[off + k];
    if (conflicts(c.w, cur)) race(S, *R, a + k, c.w, cur, size);
    if (write) {
      if (conflicts(c.r1, cur)) race(S, *R, a + k, c.r1, cur, size);
      if (conflicts(c.r2, cur)) race(S, *R, a + k, c.r2, cur, size);
      c.w = cur;
      c.r1 = Stamp{};
      c.r2 = Stamp{};
      if (R->track_init) R->init[off + k] = 1;
    } else if (c.r1.launch == 0 || same_thread(c.r1, cur)) {
      c.r1 = cur;
    } else {
      c.r2 = c.r1;
      c.r1 = cur;
    }
  }
  if (S.model_on) S.trace.push_back(Access{cur.pc, a, size, t->syncs, cur.thread, uint8_t(write), uint8_t(atomic), R->index});
  r.in_rt = 0;
}

// ---- the model: warp-level requests from the per-lane trace ------------------------------------------------
// Threads switch only at synchronisation points, so the lanes of a warp do not execute an instruction
// together here. A warp-level request is reconstructed as: the k-th execution of one instruction (pc) by
// each lane of a warp within the same synchronisation interval (between two barriers / collectives the lane
// passed). Lanes that diverge inside an interval (different trip counts) are grouped by k all the same,
// which approximates the hardware's reconvergence.
inline void aggregate_block(State& S) {
  Runtime& r = g_rt;
  if (S.trace.empty()) return;
  LaunchModel& L = S.model.back();
  struct Ctr {
    uint32_t syncs = ~0u;
    std::unordered_map<uint64_t, uint32_t> occ;
  };
  std::vector<Ctr> ctr(r.nthreads);
  struct Key {
    uint64_t pc;
    uint32_t warp, syncs, k;
    bool operator<(const Key& o) const {
      return std::tie(pc, warp, syncs, k) < std::tie(o.pc, o.warp, o.syncs, o.k);
    }
  };
  std::map<Key, std::vector<uint32_t>> groups;
  for (uint32_t i = 0; i < S.trace.size(); ++i) {
    const Access& a = S.trace[i];
    Ctr& c = ctr[a.thread];
    if (c.syncs != a.syncs) {
      c.syncs = a.syncs;
      c.occ.clear();
    }
    const uint32_t k = c.occ[a.pc]++;
    groups[Key{a.pc, uint32_t(a.thread >> 5), a.syncs, k}].push_back(i);
  }
  for (const auto& g : groups) {
    const Access& a0 = S.trace[g.second.front()];
    const Region& R = *S.sorted[size_t(a0.region)];
    std::set<uintptr_t> bytes, sectors;
    std::map<uint32_t, std::set<uintptr_t>> banks;  // bank -> distinct 4-byte words
    uint32_t lanes = 0, width = 0;
    for (uint32_t i : g.second) {
      const Access& a = S.trace[i];
      lanes |= 1u << (a.thread & 31);
      width = std::max(width, a.size);
      for (uint32_t b = 0; b < a.size; ++b) {
        bytes.insert(a.addr + b);
        sectors.insert((a.addr + b) >> 5);
        const uintptr_t word = (a.addr + b - uintptr_t(R.lo)) >> 2;  // shared memory banks: 4-byte words
        banks[uint32_t(word % 32)].insert(word);
      }
    }
    const int op = a0.atomic ? 2 : (a0.write ? 1 : 0);
    SiteStats& st = L.sites[std::make_tuple(R.name, a0.pc, op)];
    st.requests += 1;
    st.lanes += uint64_t(__builtin_popcount(lanes));
    st.bytes_used += bytes.size();
    st.width = std::max(st.width, width);
    RegionTotals& T = L.regions[R.name];
    T.name = R.name;
    T.space = R.space;
    T.bytes = R.bytes;
    T.requests += 1;
    if (R.space == kGlobal) {
      st.sectors += sectors.size();
      (op == 0 ? T.read_sectors : T.write_sectors) += sectors.size();
      if (op == 2) T.read_sectors += sectors.size();
    } else {
      size_t wf = 0;
      for (const auto& b : banks) wf = std::max(wf, b.second.size());
      st.wavefronts += wf;
      st.min_wavefronts += (bytes.size() + 127) / 128;
    }
    (op == 0 ? T.read_used : T.write_used) += bytes.size();
  }
  S.trace.clear();
}

// ---- symbolisation ------------------------------------------------------------------------------------
// "void ns::kernel<float, 256>(float const*, int)" -> "ns::kernel<float, 256>" (no return type, no arguments)
inline std::string strip_args(std::string f) {
  int depth = 0;
  size_t name_start = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    if (f[i] == '<') ++depth;
    else if (f[i] == '>') --depth;
    else if (f[i] == ' ' && depth == 0) name_start = i + 1;
    else if (f[i] == '(' && depth == 0 && i > 0) return f.substr(name_start, i - name_start);
  }
  return f.substr(name_start);
}

// pc -> "file:line (function), inlined into function at file:line, ..." via addr2line on this library.
inline std::map<uint64_t, std::string> symbolize(const std::vector<uint64_t>& pcs) {
  std::map<uint64_t, std::string> out;
  std::map<std::string, std::vector<std::pair<uint64_t, uintptr_t>>> by_file;
  for (uint64_t pc : pcs) {
    if (pc & kSiteBit) continue;
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(pc), &info) && info.dli_fname)
      by_file[info.dli_fname].emplace_back(pc, uintptr_t(pc) - uintptr_t(info.dli_fbase));
    out[pc] = hexaddr(uintptr_t(pc));
  }
  for (const auto& f : by_file) {
    std::string cmd = "addr2line -C -f -i -a -e '" + f.first + "'";
    for (const auto& p : f.second) cmd += " " + hexaddr(p.second);
    cmd += " 2>/dev/null";
    FILE* fp = popen(cmd.c_str(), "r");
    if (!fp) continue;
    std::vector<std::string> lines;
    char buf[8192];
    while (std::fgets(buf, sizeof buf, fp)) {
      std::string l(buf);
      while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
      lines.push_back(l);
    }
    pclose(fp);
    size_t idx = 0;
    std::vector<std::pair<std::string, std::string>> frames;  // (function, file:line), innermost first
    auto flush = [&]() {
      if (idx == 0 || idx > f.second.size()) return;
      std::string s;
      for (size_t k = 0; k < frames.size(); ++k) {
        std::string loc = frames[k].second;
        const size_t disc = loc.find(" (discriminator");
        if (disc != std::string::npos) loc = loc.substr(0, disc);
        loc = detail::short_path(loc.c_str());
        const std::string fn = strip_args(frames[k].first);
        if (k == 0) s = loc + " (" + fn + ")";
        else s += ", inlined into " + fn + " at " + loc;
      }
      if (!s.empty() && frames[0].second.rfind("??", 0) != 0) out[f.second[idx - 1].first] = s;
      frames.clear();
    };
    for (size_t k = 0; k < lines.size(); ++k) {
      if (lines[k].rfind("0x", 0) == 0) {
        flush();
        ++idx;
        continue;
      }
      if (k + 1 < lines.size()) {
        std::string fn = lines[k];
        const std::string loc = lines[k + 1];
        if (fn.rfind(" (inlined by) ", 0) == 0) fn = fn.substr(14);
        frames.emplace_back(fn, loc.rfind(" (inlined by) ", 0) == 0 ? loc.substr(14) : loc);
        ++k;
      }
    }
    flush();
  }
  return out;
}

}  // namespace san
}  // namespace emu
}  // namespace ltk

// ---- runtime events ---------------------------------------------------------------------------------------
extern "C" void ltk_emu_san_launch_begin() {
  using namespace ltk::emu::san;
  State& S = state();
  Runtime& r = g_rt;
  collect_image(S);
  S.atomics.clear();
  S.atomic_seq = 0;
  S.shared.clear();
  if (r.smem && r.smem_region.map) {
    auto R = std::make_unique<Region>();
    R->lo = r.smem_region.lo;
    R->bytes = r.smem;
    R->space = kDynShared;
    R->track_init = true;
    R->name = "dynamic shared memory";
    S.shared.push_back(std::move(R));
  }
  for (size_t i = 0; i < r.static_shared.size(); ++i) {
    auto R = std::make_unique<Region>();
    R->lo = &ltk::emu::detail::g_tls_marker + r.static_shared[i].first;
    R->bytes = r.static_shared[i].second;
    R->space = kStaticShared;
    R->track_init = true;
    R->name = i < r.static_shared_names.size() ? r.static_shared_names[i] : "";
    S.shared.push_back(std::move(R));
  }
  for (auto& R : S.shared) R->init.assign(R->bytes, 0);
  S.sorted.clear();
  for (auto& R : S.buffers) S.sorted.push_back(R.get());
  for (auto& R : S.shared) S.sorted.push_back(R.get());
  std::sort(S.sorted.begin(), S.sorted.end(), [](const Region* a, const Region* b) { return a->lo < b->lo; });
  for (size_t i = 0; i < S.sorted.size(); ++i) S.sorted[i]->index = int(i);
  S.model_on = r.opt.model && r.opt.sanitize;
  S.trace.clear();
  if (S.model_on) {
    LaunchModel L;
    L.kernel = r.kernel;
    L.grid = r.grid;
    L.block = r.block;
    S.model.push_back(std::move(L));
  }
}

extern "C" void ltk_emu_san_launch_end() {
  using namespace ltk::emu::san;
  State& S = state();
  S.sorted.clear();
  S.shared.clear();
  S.trace.clear();
}

extern "C" void ltk_emu_san_block_begin() {
  using namespace ltk::emu::san;
  for (auto& R : state().shared) reset_shadow(*R);  // shared memory is per block
  state().trace.clear();
}

extern "C" void ltk_emu_san_block_end(int ok) {
  using namespace ltk::emu::san;
  State& S = state();
  if (ok && S.model_on) aggregate_block(S);
  S.trace.clear();
}

extern "C" void ltk_emu_san_symbolize(std::string* msg) {
  using namespace ltk::emu::san;
  std::vector<uint64_t> pcs;
  size_t p = 0;
  while ((p = msg->find("{{pc:", p)) != std::string::npos) {
    pcs.push_back(std::strtoull(msg->c_str() + p + 5, nullptr, 16));
    p += 5;
  }
  if (pcs.empty()) return;
  auto names = symbolize(pcs);
  for (uint64_t pc : pcs) {
    char b[48];
    std::snprintf(b, sizeof b, "{{pc:%" PRIx64 "}}", pc);
    const size_t q = msg->find(b);
    if (q != std::string::npos) msg->replace(q, std::strlen(b), names[pc]);
  }
}

// ---- host API (ctypes, python_tests/emu/__init__.py) --------------------------------------------------------
// Registers a global buffer. initialised: 0 = its bytes count as unwritten until device code writes them
// (initcheck), 1 = host data. transient: dropped by ltk_emu_buffer_clear_transient (after one call).
extern "C" __attribute__((visibility("default"))) int ltk_emu_buffer_register(void* p, long long bytes, int initialised,
                                                                            const char* name, int guarded, int transient) {
  using namespace ltk::emu::san;
  std::lock_guard<std::mutex> lock(g_rt.mu);  // not during a launch (ctypes releases the GIL)
  State& S = state();
  if (!p || bytes <= 0) return 0;
  const uintptr_t a = uintptr_t(p);
  for (auto& R : S.buffers)
    if (a >= uintptr_t(R->lo) && a + uint64_t(bytes) <= R->end()) {  // already known (a view of a registered buffer)
      if (name && *name && R->name.empty()) R->name = name;
      if (!initialised && a == uintptr_t(R->lo) && uint64_t(bytes) == R->bytes && !R->track_init) {
        R->track_init = true;
        R->init.assign(R->bytes, 0);
      }
      return 0;
    }
  // Overlapping transient registrations (views of one tensor passed as several arguments) become one
  // region, their union: regions must not overlap for the lookup. Its bytes count as initialised if any
  // part was (host data); an output view registered with init=False next to input views is rare.
  uintptr_t lo = a, hi = a + uint64_t(bytes);
  bool any_init = initialised != 0;
  std::string nm = name ? name : "";
  for (bool merged = transient != 0; merged;) {
    merged = false;
    for (auto it = S.buffers.begin(); it != S.buffers.end(); ++it) {
      Region& R = **it;
      if (R.transient && uintptr_t(R.lo) < hi && R.end() > lo) {
        lo = std::min(lo, uintptr_t(R.lo));
        hi = std::max(hi, R.end());
        any_init = any_init || !R.track_init;
        if (nm.empty()) nm = R.name;
        S.buffers.erase(it);
        merged = true;
        break;
      }
    }
  }
  if (lo != a || hi != a + uint64_t(bytes)) initialised = any_init;
  auto R = std::make_unique<Region>();
  R->lo = reinterpret_cast<char*>(lo);
  R->bytes = size_t(hi - lo);
  R->space = kGlobal;
  R->guarded = guarded != 0;
  R->transient = transient != 0;
  R->track_init = !initialised;
  if (R->track_init) R->init.assign(R->bytes, 0);
  R->name = nm;
  S.buffers.push_back(std::move(R));
  return 0;
}

extern "C" __attribute__((visibility("default"))) void ltk_emu_buffer_unregister(void* p) {
  using namespace ltk::emu::san;
  std::lock_guard<std::mutex> lock(g_rt.mu);
  auto& v = state().buffers;
  v.erase(std::remove_if(v.begin(), v.end(), [&](const std::unique_ptr<Region>& R) { return R->lo == p; }), v.end());
}

extern "C" __attribute__((visibility("default"))) void ltk_emu_buffer_clear_transient() {
  using namespace ltk::emu::san;
  std::lock_guard<std::mutex> lock(g_rt.mu);
  auto& v = state().buffers;
  v.erase(std::remove_if(v.begin(), v.end(), [](const std::unique_ptr<Region>& R) { return R->transient; }), v.end());
}

extern "C" __attribute__((visibility("default"))) long long ltk_emu_buffer_count() {
  return (long long)ltk::emu::san::state().buffers.size();
}

// 1 when this library's device code was compiled with the access instrumentation.
extern "C" __attribute__((visibility("default"))) int ltk_emu_sanitizer_instrumented();

extern "C" __attribute__((visibility("default"))) void ltk_emu_set_sanitize(int on, int model) {
  auto& o = ltk::emu::options();
  if (on >= 0) o.sanitize = on != 0;
  if (model >= 0) o.model = model != 0;
}
extern "C" __attribute__((visibility("default"))) int ltk_emu_get_sanitize() {
  return (ltk::emu::options().sanitize ? 1 : 0) | (ltk::emu::options().model ? 2 : 0);
}

// The model of every launch since the last ltk_emu_model_clear, as JSON.
extern "C" __attribute__((visibility("default"))) const char* ltk_emu_model_json() {
  using namespace ltk::emu::san;
  static std::string out;
  State& S = state();
  std::vector<uint64_t> pcs;
  for (const auto& L : S.model)
    for (const auto& s : L.sites) pcs.push_back(std::get<1>(s.first));
  auto names = symbolize(pcs);
  auto esc = [](const std::string& s) {
    std::string o;
    for (char c : s) {
      if (c == '"' || c == '\\') o += '\\';
      o += c;
    }
    return o;
  };
  std::ostringstream j;
  j << "[";
  for (size_t i = 0; i < S.model.size(); ++i) {
    const auto& L = S.model[i];
    j << (i ? "," : "") << "{\"kernel\":\"" << esc(L.kernel) << "\",\"grid\":[" << L.grid.x << "," << L.grid.y << ","
      << L.grid.z << "],\"block\":[" << L.block.x << "," << L.block.y << "," << L.block.z << "],\"regions\":[";
    bool first = true;
    for (const auto& rt : L.regions) {
      const auto& T = rt.second;
      j << (first ? "" : ",") << "{\"name\":\"" << esc(T.name) << "\",\"space\":\""
        << (T.space == kGlobal ? "global" : "shared") << "\",\"bytes\":" << T.bytes << ",\"requests\":" << T.requests
        << ",\"read_sectors\":" << T.read_sectors << ",\"write_sectors\":" << T.write_sectors
        << ",\"read_used\":" << T.read_used << ",\"write_used\":" << T.write_used << "}";
      first = false;
    }
    j << "],\"sites\":[";
    first = true;
    for (const auto& s : L.sites) {
      const auto& st = s.second;
      const uint64_t pc = std::get<1>(s.first);
      std::string where = (pc & kSiteBit) ? site_marker(S, pc) : names[pc];
      static const char* ops[] = {"read", "write", "atomic"};
      j << (first ? "" : ",") << "{\"region\":\"" << esc(std::get<0>(s.first)) << "\",\"site\":\"" << esc(where)
        << "\",\"op\":\"" << ops[std::get<2>(s.first)] << "\",\"requests\":" << st.requests << ",\"lanes\":" << st.lanes
        << ",\"bytes_used\":" << st.bytes_used << ",\"sectors\":" << st.sectors << ",\"wavefronts\":" << st.wavefronts
        << ",\"min_wavefronts\":" << st.min_wavefronts << ",\"width\":" << st.width << "}";
      first = false;
    }
    j << "]}";
  }
  j << "]";
  out = j.str();
  return out.c_str();
}

extern "C" __attribute__((visibility("default"))) void ltk_emu_model_clear() { ltk::emu::san::state().model.clear(); }

// ---- the instrumentation's entry points (GCC -fsanitize=thread, no TSan runtime) ---------------------------
#define LTK_SAN_HOOK extern "C" __attribute__((visibility("default"), noinline))
#define LTK_SAN_RW(n)                                                                                              \
  LTK_SAN_HOOK void __tsan_read##n(void* p) { ltk::emu::san::check_access(p, n, false, __builtin_return_address(0)); } \
  LTK_SAN_HOOK void __tsan_write##n(void* p) { ltk::emu::san::check_access(p, n, true, __builtin_return_address(0)); } \
  LTK_SAN_HOOK void __tsan_unaligned_read##n(void* p) {                                                            \
    ltk::emu::san::check_access(p, n, false, __builtin_return_address(0));                                         \
  }                                                                                                                \
  LTK_SAN_HOOK void __tsan_unaligned_write##n(void* p) {                                                           \
    ltk::emu::san::check_access(p, n, true, __builtin_return_address(0));                                          \
  }                                                                                                                \
  LTK_SAN_HOOK void __tsan_volatile_read##n(void* p) {                                                             \
    ltk::emu::san::check_access(p, n, false, __builtin_return_address(0));                                         \
  }                                                                                                                \
  LTK_SAN_HOOK void __tsan_volatile_write##n(void* p) {                                                            \
    ltk::emu::san::check_access(p, n, true, __builtin_return_address(0));                                          \
  }
LTK_SAN_RW(1)
LTK_SAN_RW(2)
LTK_SAN_RW(4)
LTK_SAN_RW(8)
LTK_SAN_RW(16)
#undef LTK_SAN_RW
LTK_SAN_HOOK void __tsan_read_range(void* p, unsigned long n) {
  ltk::emu::san::check_access(p, uint32_t(n), false, __builtin_return_address(0));
}
LTK_SAN_HOOK void __tsan_write_range(void* p, unsigned long n) {
  ltk::emu::san::check_access(p, uint32_t(n), true, __builtin_return_address(0));
}
LTK_SAN_HOOK void __tsan_init() {}
LTK_SAN_HOOK void __tsan_func_entry(void*) {}
LTK_SAN_HOOK void __tsan_func_exit() {}
LTK_SAN_HOOK void __tsan_vptr_update(void**, void*) {}
LTK_SAN_HOOK void __tsan_vptr_read(void**) {}

// C++ atomics in instrumented code (static-local guards, std::atomic in library headers) become
// __tsan_atomic* calls: performed here as the plain atomic operation. They are host-side bookkeeping
// (CUDA's atomicAdd & co. are emulated in simt.h), so they are not checked.
#define LTK_SAN_ATOMICS(n, T)                                                                                       \
  LTK_SAN_HOOK T __tsan_atomic##n##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  LTK_SAN_HOOK void __tsan_atomic##n##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  LTK_SAN_HOOK T __tsan_atomic##n##_exchange(volatile T* a, T v, int) {                                            \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                            \
  }                                                                                                                 \
  LTK_SAN_HOOK T __tsan_atomic##n##_fetch_add(volatile T* a, T v, int) {                                           \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                             \
  }                                                                                                                 \
  LTK_SAN_HOOK T __tsan_atomic##n##_fetch_sub(volatile T* a, T v, int) {                                           \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                             \
  }                                                                                                                 \
  LTK_SAN_HOOK T __tsan_atomic##n##_fetch_and(volatile T* a, T v, int) {                                           \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                             \
  }                                                                                                                 \
  LTK_SAN_HOOK T __tsan_atomic##n##_fetch_or(volatile T* a, T v, int) {                                            \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                              \
  }                                                                                                                 \
  LTK_SAN_HOOK T __tsan_atomic##n##_fetch_xor(volatile T* a, T v, int) {                                           \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                             \
  }                                                                                                                 \
  LTK_SAN_HOOK T __tsan_atomic##n##_fetch_nand(volatile T* a, T v, int) {                                          \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                            \
  }                                                                                                                 \
  LTK_SAN_HOOK int __tsan_atomic##n##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {               \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
  }                                                                                                                 \
  LTK_SAN_HOOK int __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                 \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                         \
  }                                                                                                                 \
  LTK_SAN_HOOK T __tsan_atomic##n##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                     \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                              \
    return c;                                                                                                       \
  }
LTK_SAN_ATOMICS(8, uint8_t)
LTK_SAN_ATOMICS(16, uint16_t)
LTK_SAN_ATOMICS(32, uint32_t)
LTK_SAN_ATOMICS(64, uint64_t)
#undef LTK_SAN_ATOMICS
LTK_SAN_HOOK void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
LTK_SAN_HOOK void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
