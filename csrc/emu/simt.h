// SIMT emulation of the CUDA device-side language for g++: lets the unchanged csrc/cuda/*.cuh kernel
// sources compile on the host and run on the CPU with their real launch configuration.
//
// Included by csrc/include/ltk/launch.cuh when LTK_EMULATE is defined (never by nvcc). Provides:
//   * qualifiers: __global__ __device__ __host__ __forceinline__ __launch_bounds__ __align__ __constant__,
//     and __shared__ (a function-local static: one copy per kernel, valid because blocks run one at a time)
//   * builtins threadIdx blockIdx blockDim gridDim warpSize, dim3/uint3 and the vector types
//   * __syncthreads (+ _count/_and/_or), __syncwarp, __shfl{,_up,_down,_xor}_sync, __ballot_sync,
//     __any_sync, __all_sync, __reduce_{add,min,max}_sync, __match_any_sync, __activemask
//   * atomics, __ldg and friends, the fast-math and rounding intrinsics, bit intrinsics, global min/max
//   * dynamic shared memory through LTK_DYNAMIC_SHARED(type, name) (see launch.cuh)
//   * cudaStream_t, cudaError_t, cudaGetLastError, cudaFuncSetAttribute, cudaDeviceGetAttribute stubs
//   * ltk::emu::launch(kernel, grid, block, smem, args...) and ltk::emu::options()
// Limits and the error model: docs/emulator.md.
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "csrc/emu/simt.h emulates CUDA on the host; it must not be compiled by nvcc"
#endif
#ifndef LTK_EMULATE
#define LTK_EMULATE 1
#endif

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simt_runtime.h"

// ---------------------------------------------------------------------------------------------------
// Qualifiers. __restrict__ is already a GNU keyword.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
// Static __shared__ variables become function-local thread_local statics: one copy per kernel
// instantiation (right, as blocks run one at a time on the launching thread), and thread-local storage
// tells them apart from ordinary host statics. A loader registers them from the symbol table
// (ltk::emu::register_static_shared, python_tests/emu does it) so that the runtime poisons them with 0xFF
// bytes before every block, like dynamic shared memory: a read of shared memory that no thread of this
// block wrote returns NaN / -1 instead of a stale value from the previous block.
#define __shared__ static thread_local
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __CUDA_EMULATED__ 1

// ---------------------------------------------------------------------------------------------------
// Builtin variables. threadIdx names the running fiber's index (updated at every context switch).
inline const uint3& threadIdx = ::ltk::emu::detail::g_thread_idx;
inline const uint3& blockIdx = ::ltk::emu::detail::g_block_idx;
inline const dim3& blockDim = ::ltk::emu::detail::g_block_dim;
inline const dim3& gridDim = ::ltk::emu::detail::g_grid_dim;
inline constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------------
// Vector types (same alignment as CUDA's vector_types.h).
#define LTK_EMU_VEC2(T, N, A)                                      \
  struct __attribute__((aligned(A))) N {                           \
    T x, y;                                                        \
  };                                                               \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define LTK_EMU_VEC3(T, N)                                         \
  struct N {                                                       \
    T x, y, z;                                                     \
  };                                                               \
  inline N make_##N(T x, T y, T z) { return N{x, y, z}; }
#define LTK_EMU_VEC4(T, N, A)                                      \
  struct __attribute__((aligned(A))) N {                           \
    T x, y, z, w;                                                  \
  };                                                               \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
LTK_EMU_VEC2(float, float2, 8)
LTK_EMU_VEC3(float, float3)
LTK_EMU_VEC4(float, float4, 16)
LTK_EMU_VEC2(double, double2, 16)
LTK_EMU_VEC2(int, int2, 8)
LTK_EMU_VEC3(int, int3)
LTK_EMU_VEC4(int, int4, 16)
LTK_EMU_VEC2(unsigned int, uint2, 8)
LTK_EMU_VEC4(unsigned int, uint4, 16)
LTK_EMU_VEC2(long long, longlong2, 16)
LTK_EMU_VEC2(unsigned long long, ulonglong2, 16)
LTK_EMU_VEC2(short, short2, 4)
LTK_EMU_VEC2(unsigned short, ushort2, 4)
LTK_EMU_VEC4(unsigned short, ushort4, 8)
LTK_EMU_VEC4(unsigned char, uchar4, 4)
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
#undef LTK_EMU_VEC2
#undef LTK_EMU_VEC3
#undef LTK_EMU_VEC4

// ---------------------------------------------------------------------------------------------------
// Runtime API stubs that raw-pointer launch functions may call.
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719
};
typedef enum cudaError cudaError_t;
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int /*device*/) {
  const auto& o = ::ltk::emu::options();
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxBlockDimX: *v = 1024; break;
    case cudaDevAttrMaxGridDimX: *v = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *v = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = int(o.max_dynamic_smem); break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMultiProcessorCount: *v = o.sm_count; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *v = 2048; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(o.max_dynamic_smem_optin); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename... KArgs>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(KArgs...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) > ::ltk::emu::options().max_dynamic_smem_optin) return cudaErrorInvalidValue;
    ::ltk::emu::detail::g_rt.max_dyn_smem_attr[reinterpret_cast<const void*>(kernel)] = value;
  }
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// ---------------------------------------------------------------------------------------------------
// Synchronisation. The trailing defaulted arguments record the call site for diagnostics.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::ltk::emu::detail::block_barrier(0, 0, file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::ltk::emu::detail::block_barrier(1, pred, file, line);
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::ltk::emu::detail::block_barrier(2, pred, file, line);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::ltk::emu::detail::block_barrier(3, pred, file, line);
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::ltk::emu::detail::warp_collective(::ltk::emu::detail::kSyncWarp, mask, 0, 0, 32, file, line);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned) {
  if (::ltk::emu::detail::g_rt.cur) ::ltk::emu::detail::yield_current();
}
inline unsigned __activemask() {
  ::ltk::emu::detail::RtScope rt;
  const auto& r = ::ltk::emu::detail::g_rt;
  return r.cur ? r.warps[r.cur->lin >> 5].live : 0u;
}
[[noreturn]] inline void __trap() { ::ltk::emu::detail::fail("__trap() called"); }
inline long long clock64() { return static_cast<long long>(::ltk::emu::detail::g_rt.switches); }

namespace ltk {
namespace emu {
namespace detail {
template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp shuffles move trivially copyable values of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <class T>
inline T shfl(int kind, unsigned mask, const T& v, int arg, int width, const char* f, int l) {
  return from_bits<T>(warp_collective(kind, mask, to_bits(v), arg, width, f, l));
}
}  // namespace detail
}  // namespace emu
}  // namespace ltk

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return ::ltk::emu::detail::shfl(::ltk::emu::detail::kShflIdx, mask, var, srcLane, width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return ::ltk::emu::detail::shfl(::ltk::emu::detail::kShflUp, mask, var, int(delta), width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::ltk::emu::detail::shfl(::ltk::emu::detail::kShflDown, mask, var, int(delta), width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return ::ltk::emu::detail::shfl(::ltk::emu::detail::kShflXor, mask, var, laneMask, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return unsigned(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kBallot, mask, pred != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return int(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kAny, mask, pred != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return int(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kAll, mask, pred != 0, 0, 32, file, line));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return unsigned(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kReduceAdd, mask, v, 0, 32, file, line));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return unsigned(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kReduceMin, mask, v, 0, 32, file, line));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return unsigned(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kReduceMax, mask, v, 0, 32, file, line));
}
inline int __reduce_add_sync(unsigned mask, int v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return int(uint32_t(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kReduceAddI, mask, uint32_t(v), 0, 32, file, line)));
}
inline int __reduce_min_sync(unsigned mask, int v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return int(uint32_t(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kReduceMinI, mask, uint32_t(v), 0, 32, file, line)));
}
inline int __reduce_max_sync(unsigned mask, int v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return int(uint32_t(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kReduceMaxI, mask, uint32_t(v), 0, 32, file, line)));
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return unsigned(::ltk::emu::detail::warp_collective(::ltk::emu::detail::kMatchAny, mask,
                                                      ::ltk::emu::detail::to_bits(v), 0, 32, file, line));
}

// ---------------------------------------------------------------------------------------------------
// Atomics: the emulator runs one thread at a time, so plain read-modify-writes are atomic. Under the
// random schedule each atomic is also a scheduling point. AtomicScope marks the read and the write of the
// emulated read-modify-write as atomic for the sanitizer (two atomics never race) and names the caller's
// line (the trailing defaulted arguments), since the accesses themselves are inside these templates.
namespace ltk {
namespace emu {
namespace detail {
inline void atomic_point() {
  Runtime& r = g_rt;
  if (r.cur && r.opt.yield_on_atomic && r.opt.schedule != Schedule::Forward && r.opt.schedule != Schedule::Reverse)
    yield_current();
}
struct AtomicScope {
  AtomicScope(const char* file, int line) {
    g_atomic_file = file;
    g_atomic_line = line;
    g_rt.atomic_access = 1;
    LTK_EMU_COMPILER_BARRIER();
  }
  ~AtomicScope() {
    LTK_EMU_COMPILER_BARRIER();
    g_rt.atomic_access = 0;
    atomic_point();
  }
  static inline const char* g_atomic_file = nullptr;
  static inline int g_atomic_line = 0;
};
}  // namespace detail
}  // namespace emu
}  // namespace ltk
#define LTK_EMU_ATOMIC_SITE const char *ltk_file = __builtin_FILE(), int ltk_line = __builtin_LINE()
#define LTK_EMU_ATOMIC_BEGIN ::ltk::emu::detail::AtomicScope ltk_atomic_scope(ltk_file, ltk_line)

template <class T, class U>
inline T atomicAdd(T* address, U val, LTK_EMU_ATOMIC_SITE) {
  T old;
  {
    LTK_EMU_ATOMIC_BEGIN;
    old = *address;
    *address = static_cast<T>(old + static_cast<T>(val));
  }
  return old;
}
template <class T, class U>
inline T atomicSub(T* address, U val, LTK_EMU_ATOMIC_SITE) {
  T old;
  {
    LTK_EMU_ATOMIC_BEGIN;
    old = *address;
    *address = static_cast<T>(old - static_cast<T>(val));
  }
  return old;
}
template <class T, class U>
inline T atomicExch(T* address, U val, LTK_EMU_ATOMIC_SITE) {
  T old;
  {
    LTK_EMU_ATOMIC_BEGIN;
    old = *address;
    *address = static_cast<T>(val);
  }
  return old;
}
template <class T, class U>
inline T atomicMax(T* address, U val, LTK_EMU_ATOMIC_SITE) {
  T old;
  {
    LTK_EMU_ATOMIC_BEGIN;
    old = *address;
    *address = old < static_cast<T>(val) ? static_cast<T>(val) : old;
  }
  return old;
}
template <class T, class U>
inline T atomicMin(T* address, U val, LTK_EMU_ATOMIC_SITE) {
  T old;
  {
    LTK_EMU_ATOMIC_BEGIN;
    old = *address;
    *address = static_cast<T>(val) < old ? static_cast<T>(val) : old;
  }
  return old;
}
template <class T, class U, class V>
inline T atomicCAS(T* address, U compare, V val, LTK_EMU_ATOMIC_SITE) {
  T old;
  {
    LTK_EMU_ATOMIC_BEGIN;
    old = *address;
    if (old == static_cast<T>(compare)) *address = static_cast<T>(val);
  }
  return old;
}
template <class T, class U>
inline T atomicAnd(T* address, U val, LTK_EMU_ATOMIC_SITE) {
  T old;
  {
    LTK_EMU_ATOMIC_BEGIN;
    old = *address;
    *address = old & static_cast<T>(val);
  }
  return old;
}
template <class T, class U>
inline T atomicOr(T* address, U val, LTK_EMU_ATOMIC_SITE) {
  T old;
  {
    LTK_EMU_ATOMIC_BEGIN;
    old = *address;
    *address = old | static_cast<T>(val);
  }
  return old;
}
template <class T, class U>
inline T atomicXor(T* address, U val, LTK_EMU_ATOMIC_SITE) {
  T old;
  {
    LTK_EMU_ATOMIC_BEGIN;
    old = *address;
    *address = old ^ static_cast<T>(val);
  }
  return old;
}
template <class T, class U>
inline T atomicAdd_block(T* a, U v, LTK_EMU_ATOMIC_SITE) { return atomicAdd(a, v, ltk_file, ltk_line); }
template <class T, class U>
inline T atomicAdd_system(T* a, U v, LTK_EMU_ATOMIC_SITE) { return atomicAdd(a, v, ltk_file, ltk_line); }

// ---------------------------------------------------------------------------------------------------
// Cache-hinted loads and stores. An 8- or 16-byte vector (uint2, float4, ...) moves as one access, as on
// the GPU (LDG.E.64 / .128): the compiler would otherwise split the struct copy into its fields, and the
// sanitizer and the memory model would see four 4-byte accesses.
namespace ltk {
namespace emu {
namespace detail {
template <class T>
__forceinline__ T whole_load(const T* p) {
  if constexpr (sizeof(T) == 16 && alignof(T) == 16) {
    const unsigned __int128 raw = *reinterpret_cast<const unsigned __int128*>(p);
    T v;
    __builtin_memcpy(&v, &raw, 16);
    return v;
  } else if constexpr (sizeof(T) == 8 && alignof(T) == 8) {
    const unsigned long long raw = *reinterpret_cast<const unsigned long long*>(p);
    T v;
    __builtin_memcpy(&v, &raw, 8);
    return v;
  } else {
    return *p;
  }
}
template <class T>
__forceinline__ void whole_store(T* p, const T& v) {
  if constexpr (sizeof(T) == 16 && alignof(T) == 16) {
    unsigned __int128 raw;
    __builtin_memcpy(&raw, &v, 16);
    *reinterpret_cast<unsigned __int128*>(p) = raw;
  } else if constexpr (sizeof(T) == 8 && alignof(T) == 8) {
    unsigned long long raw;
    __builtin_memcpy(&raw, &v, 8);
    *reinterpret_cast<unsigned long long*>(p) = raw;
  } else {
    *p = v;
  }
}
}  // namespace detail
}  // namespace emu
}  // namespace ltk
template <class T>
__forceinline__ T __ldg(const T* p) { return ::ltk::emu::detail::whole_load(p); }
template <class T>
__forceinline__ T __ldcg(const T* p) { return ::ltk::emu::detail::whole_load(p); }
template <class T>
__forceinline__ T __ldca(const T* p) { return ::ltk::emu::detail::whole_load(p); }
template <class T>
__forceinline__ T __ldcs(const T* p) { return ::ltk::emu::detail::whole_load(p); }
template <class T>
__forceinline__ T __ldlu(const T* p) { return ::ltk::emu::detail::whole_load(p); }
template <class T>
__forceinline__ T __ldcv(const T* p) { return ::ltk::emu::detail::whole_load(p); }
template <class T>
__forceinline__ void __stcg(T* p, T v) { ::ltk::emu::detail::whole_store(p, v); }
template <class T>
__forceinline__ void __stcs(T* p, T v) { ::ltk::emu::detail::whole_store(p, v); }
template <class T>
__forceinline__ void __stwb(T* p, T v) { ::ltk::emu::detail::whole_store(p, v); }
template <class T>
__forceinline__ void __stwt(T* p, T v) { ::ltk::emu::detail::whole_store(p, v); }

// ---------------------------------------------------------------------------------------------------
// Arithmetic intrinsics. *_rn are exact IEEE operations (the build uses -ffp-contract=off, so no implicit
// fma). Fast-math ones follow the GPU's formulation (ex2/lg2 of a scaled argument) without its
// approximation error: tests must use tolerances that hold for the real approximations too.
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __fmaf_rz(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __drcp_rn(double a) { return 1.0 / a; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp2(x * 1.4426950408889634f); }
inline float __exp10f(float x) { return std::exp2(x * 3.3219280948873623f); }
inline float __logf(float x) { return std::log2(x) * 0.6931471805599453f; }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log2(x) * 0.3010299956639812f; }
inline float __powf(float x, float y) { return std::exp2(y * std::log2(x)); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) {
  *s = std::sin(x);
  *c = std::cos(x);
}
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752); }

inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline int __float2int_rd(float x) { return int(std::floor(x)); }
inline int __float2int_ru(float x) { return int(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return unsigned(std::nearbyint(x)); }
inline unsigned __float2uint_rz(float x) { return unsigned(x); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __double2float_rn(double x) { return float(x); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }
inline double __longlong_as_double(long long i) { double x; std::memcpy(&x, &i, 8); return x; }
inline int __double2hiint(double x) { return int(uint64_t(__double_as_longlong(x)) >> 32); }
inline int __double2loint(double x) { return int(uint32_t(uint64_t(__double_as_longlong(x)))); }
inline double __hiloint2double(int hi, int lo) {
  return __longlong_as_double((long long)((uint64_t(uint32_t(hi)) << 32) | uint32_t(lo)));
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline int __mul24(int a, int b) { return int(int32_t(a << 8) >> 8) * int(int32_t(b << 8) >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xFFFFFFu) * (b & 0xFFFFFFu); }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  return unsigned(((uint64_t(hi) << 32 | lo) << (s & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  return unsigned((uint64_t(hi) << 32 | lo) >> (s & 31));
}

// CUDA's global min/max overloads.
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(int a, unsigned b) { return max(unsigned(a), b); }
inline unsigned min(int a, unsigned b) { return min(unsigned(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, unsigned(b)); }
inline unsigned min(unsigned a, int b) { return min(a, unsigned(b)); }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(float a, double b) { return std::fmax(double(a), b); }
inline double min(float a, double b) { return std::fmin(double(a), b); }
inline double max(double a, float b) { return std::fmax(a, double(b)); }
inline double min(double a, float b) { return std::fmin(a, double(b)); }

// Device-side assert(): a build that passes -D__assert_fail=ltk_emu_assert_fail routes glibc's assert()
// and c10's CUDA_KERNEL_ASSERT here, so that a failed device assertion ends the launch with an Error
// (on a GPU it is a device-side assert) instead of aborting the process.
#if defined(__assert_fail)
extern "C" __attribute__((weak, noreturn)) void __assert_fail(const char* expr, const char* file, unsigned int line,
                                                              const char* func) noexcept {
  if (::ltk::emu::detail::g_rt.cur && ::ltk::emu::detail::g_rt.in_launch) {
    ::ltk::emu::detail::fail(std::string("device-side assertion `") + expr + "' failed at " +
                             ::ltk::emu::detail::site(file, int(line)) + " in " + func);
  }
  std::fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, func, expr);
  std::abort();
}
#endif
