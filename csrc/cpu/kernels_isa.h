// Per-ISA instantiation of every CPU kernel: each isa_*.cpp includes this with its CPU_CAPABILITY and
// exports one function table, which kernels_table.h declares and the op wrappers pick from at run time.
#pragma once

#include "cpu/cosine_head_kernels.h"
#include "cpu/kernels_table.h"
#include "cpu/margin_ce_rows.h"

#define LTK_DEFINE_CPU_KERNELS(ISA)                                                                           \
  namespace ltk {                                                                                             \
  namespace cpu {                                                                                             \
  const KernelTable& kernels_##ISA() {                                                                        \
    static const KernelTable t{                                                                               \
        &margin_ce_rows<float, float>,                                                                        \
        &margin_ce_rows<double, double>,                                                                      \
        &margin_ce_rows<c10::Half, float>,                                                                    \
        &margin_ce_rows<c10::BFloat16, float>,                                                                \
        {&norms_kernel<float>, &scale_kernel<float>, &scale_dots_kernel<float>, &tangent_kernel<float>},      \
        {&norms_kernel<double>, &scale_kernel<double>, &scale_dots_kernel<double>, &tangent_kernel<double>},  \
        {&norms_kernel<c10::Half>, &scale_kernel<c10::Half>, &scale_dots_kernel<c10::Half>,                  \
         &tangent_kernel<c10::Half>},                                                                         \
        {&norms_kernel<c10::BFloat16>, &scale_kernel<c10::BFloat16>, &scale_dots_kernel<c10::BFloat16>,      \
         &tangent_kernel<c10::BFloat16>},                                                                     \
    };                                                                                                        \
    return t;                                                                                                 \
  }                                                                                                           \
  }                                                                                                           \
  }
