// CPU entry point of margin_ce: prepare, pick the instruction-set build, run the row kernel, reduce.
#include <ATen/OpMathType.h>
#include <cctype>
#include <cstdlib>
#include <string>

#include "cpu/kernels_table.h"
#include "margin_ce_common.h"
#include "margin_ce_op.h"

namespace ltk {
namespace cpu {

namespace {

// Best instruction set the CPU supports, capped by ATEN_CPU_CAPABILITY (default / avx2 / avx512) like
// ATen's own kernels, so tests and users can force the portable build.
const KernelTable& select_kernels() {
  std::string cap = std::getenv("ATEN_CPU_CAPABILITY") ? std::getenv("ATEN_CPU_CAPABILITY") : "";
  for (auto& ch : cap) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  const bool allow512 = cap.empty() || cap == "avx512";
  const bool allow2 = allow512 || cap == "avx2";
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return kernels_AVX512();
  }
  if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kernels_AVX2();
#endif
  return kernels_DEFAULT();
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& k = select_kernels();
  return k;
}

const char* kernels_isa_name() {
  const KernelTable* t = &kernels();
  return t == &kernels_AVX512() ? "avx512" : t == &kernels_AVX2() ? "avx2" : "default";
}

inline void run(const KernelTable& k, const MarginCeArgs<float, float>& a) { k.margin_ce_f32(a); }
inline void run(const KernelTable& k, const MarginCeArgs<double, double>& a) { k.margin_ce_f64(a); }
inline void run(const KernelTable& k, const MarginCeArgs<c10::Half, float>& a) { k.margin_ce_f16(a); }
inline void run(const KernelTable& k, const MarginCeArgs<c10::BFloat16, float>& a) { k.margin_ce_bf16(a); }

}  // namespace cpu

MarginCeResult margin_ce_cpu(LTK_MARGIN_CE_PARAMS) {
  const cpu::KernelTable& k = cpu::kernels();
  return run_margin_ce(LTK_MARGIN_CE_INPUTS, [&](const auto& a) { cpu::run(k, a); });
}

}  // namespace ltk
