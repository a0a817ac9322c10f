// The one place where every ltkernels op schema is defined. Device implementations register
// themselves next to their code (CPU here, CUDA in cuda/*.cu); Python adds fake kernels and autograd
// (ltkernels/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels_table.h"
#include "margin_ce_op.h"

// Importing ltkernels._C as a Python module runs the static registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(ltkernels, m) {
  // Fused "transform the logits, then softmax cross-entropy" (csrc/include/ltk/margin_ce.h). Returns
  // (loss, grad, grad_row_shift): grad = d loss / d input for grad_output = 1 (empty unless
  // compute_grad), grad_row_shift = d loss / d row_shift (empty unless row_shift and compute_grad).
  // seed: a one-element int64 CPU tensor keying the in-kernel Philox noise (drawn from a torch generator
  // by the caller, so the op stays traceable); offset selects an independent stream for the same seed.
  m.def(
      "margin_ce(Tensor input, Tensor target, Tensor? col_scale, Tensor? col_bias, Tensor? margin, "
      "Tensor? target_scale, Tensor? weight, Tensor? row_shift, Tensor? shift_coef, Tensor? cloud, "
      "Tensor? noise, Tensor? seed, float scale, float noise_mul, float angular_eps, int offset, int angular, "
      "int reduction, int focal, float gamma, int ignore_index, float label_smoothing, bool compute_grad) "
      "-> (Tensor, Tensor, Tensor)");
  // Which instruction-set build of the CPU kernels runs here ("avx512", "avx2" or "default").
  m.def("cpu_isa() -> str", [] { return std::string(ltk::cpu::kernels_isa_name()); });
}

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) { m.impl("margin_ce", &ltk::margin_ce_cpu); }
