// Function table of the CPU kernels, one instance per instruction set (isa_*.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "ltk/cosine_head.h"
#include "ltk/margin_ce.h"

namespace ltk {
namespace cpu {

// The cosine head's kernels (cpu/cosine_head_kernels.h) for one storage type T; norms, dot products and
// scalars are in A (float for the 16-bit types).
template <typename T, typename A = cosine_acc_t<T>>
struct CosineKernels {
  void (*norms)(const T* m, int64_t rows, int64_t cols, bool vec_rows, A* out);
  void (*scale)(const T* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, const A* rn, const A* cn, A eps,
                T* out);
  void (*scale_dots)(const T* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols, const T* c, const A* rn,
                     const A* cn, A eps, T* out, A* rd, A* cd);
  void (*tangent)(T* g, const T* x, int64_t rows, int64_t cols, bool vec_rows, const A* norm, A eps, bool prescaled,
                  A s, const A* dots);
};

struct KernelTable {
  void (*margin_ce_f32)(const MarginCeArgs<float, float>&);
  void (*margin_ce_f64)(const MarginCeArgs<double, double>&);
  void (*margin_ce_f16)(const MarginCeArgs<c10::Half, float>&);
  void (*margin_ce_bf16)(const MarginCeArgs<c10::BFloat16, float>&);
  CosineKernels<float> cosine_f32;
  CosineKernels<double> cosine_f64;
  CosineKernels<c10::Half> cosine_f16;
  CosineKernels<c10::BFloat16> cosine_bf16;

  template <typename T>
  const CosineKernels<T>& cosine() const {
    if constexpr (std::is_same_v<T, float>) return cosine_f32;
    else if constexpr (std::is_same_v<T, double>) return cosine_f64;
    else if constexpr (std::is_same_v<T, c10::Half>) return cosine_f16;
    else return cosine_bf16;
  }
};

const KernelTable& kernels_DEFAULT();
const KernelTable& kernels_AVX2();
const KernelTable& kernels_AVX512();

// The table for the best instruction set that both the CPU and ATEN_CPU_CAPABILITY allow.
const KernelTable& kernels();
const char* kernels_isa_name();

}  // namespace cpu
}  // namespace ltk
