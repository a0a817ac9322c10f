// Function table of the CPU row kernels, one instance per instruction set (isa_*.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ltk/margin_ce.h"

namespace ltk {
namespace cpu {

struct KernelTable {
  void (*margin_ce_f32)(const MarginCeArgs<float, float>&);
  void (*margin_ce_f64)(const MarginCeArgs<double, double>&);
  void (*margin_ce_f16)(const MarginCeArgs<c10::Half, float>&);
  void (*margin_ce_bf16)(const MarginCeArgs<c10::BFloat16, float>&);
};

const KernelTable& kernels_DEFAULT();
const KernelTable& kernels_AVX2();
const KernelTable& kernels_AVX512();

// The table for the best instruction set that both the CPU and ATEN_CPU_CAPABILITY allow.
const KernelTable& kernels();
const char* kernels_isa_name();

}  // namespace cpu
}  // namespace ltk
