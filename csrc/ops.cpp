// The one place where every ltkernels op schema is defined. Device implementations register
// themselves next to their code (CPU here, CUDA in cuda/*.cu); Python adds fake kernels and autograd
// (ltkernels/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels_table.h"
#include "ltk/margin_ce.h"
#include "margin_ce_op.h"

namespace {

// dict[key] = value (a new reference, stolen); false on a Python error.
bool set_item(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return rc == 0;
}

// {"reduction": {"none": 0, ...}, "focal": {...}, "angular": {...}}: the codes of ltk/margin_ce.h.
PyObject* margin_ce_codes() {
  PyObject* codes = PyDict_New();
  if (codes == nullptr) return nullptr;
  bool ok = true;
  PyObject* table = nullptr;
#define LTK_CODE_ITEM(enumerator, name, value) ok = ok && set_item(table, #name, PyLong_FromLong(ltk::enumerator));
#define LTK_CODE_TABLE(key, list)                      \
  table = PyDict_New();                                \
  if (table != nullptr) list(LTK_CODE_ITEM);           \
  ok = ok && set_item(codes, key, table);
  LTK_CODE_TABLE("reduction", LTK_REDUCTION_CODES)
  LTK_CODE_TABLE("focal", LTK_FOCAL_CODES)
  LTK_CODE_TABLE("angular", LTK_ANGULAR_CODES)
#undef LTK_CODE_TABLE
#undef LTK_CODE_ITEM
  if (!ok) Py_CLEAR(codes);
  return codes;
}

// {"col_scale": "C", ..., "row_shift": "N", ...}: margin_ce's vector arguments and their lengths, in order.
PyObject* margin_ce_vectors() {
  PyObject* vectors = PyDict_New();
  if (vectors == nullptr) return nullptr;
  bool ok = true;
#define LTK_VECTOR_ITEM(kind, name, len) ok = ok && set_item(vectors, #name, PyUnicode_FromString(#len));
  LTK_MARGIN_CE_VECTOR_ARGS(LTK_VECTOR_ITEM, LTK_MCE_NOSEP)
#undef LTK_VECTOR_ITEM
  if (!ok) Py_CLEAR(vectors);
  return vectors;
}

}  // namespace

// Importing ltkernels._C as a Python module runs the static registrations below. The module's attributes
// margin_ce_codes and margin_ce_vectors give Python the tables it would otherwise spell again.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyObject* codes = margin_ce_codes();
  PyObject* vectors = codes ? margin_ce_vectors() : nullptr;
  if (vectors == nullptr || PyModule_AddObject(m, "margin_ce_codes", codes) != 0) {
    Py_XDECREF(codes);
    Py_XDECREF(vectors);
    Py_DECREF(m);
    return nullptr;
  }
  if (PyModule_AddObject(m, "margin_ce_vectors", vectors) != 0) {
    Py_DECREF(vectors);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY(ltkernels, m) {
  // Fused "transform the logits, then softmax cross-entropy" (csrc/include/ltk/margin_ce.h). Returns
  // (loss, grad, grad_row_shift): grad = d loss / d input for grad_output = 1 (empty unless
  // compute_grad), grad_row_shift = d loss / d row_shift (empty unless row_shift and compute_grad).
  // seed: a one-element int64 CPU tensor keying the in-kernel Philox noise (drawn from a torch generator
  // by the caller, so the op stays traceable); offset selects an independent stream for the same seed.
  // The arguments are declared once, in ltk/margin_ce_args.h.
  m.def(LTK_MARGIN_CE_SCHEMA);
  // margin_ce's backward in place: grad *= grad_output (a scalar, or (N,) per row when per_row). The CUDA
  // kernel reads grad_output on the device and leaves grad untouched when it is a scalar 1 (loss.backward()),
  // so the backward costs one launch and, in the common case, no pass over N x C (margin_ce_autograd.cpp).
  m.def("margin_ce_grad_scale_(Tensor(a!) grad, Tensor grad_output, bool per_row) -> ()");
  // Plain softmax cross-entropy (class weights, ignore_index, label smoothing): margin_ce with only these
  // arguments (cross_entropy_op.cpp), for a cheaper call from Python at small shapes. Returns the loss.
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight, int reduction, int ignore_index, "
      "float label_smoothing, bool compute_grad) -> Tensor");
  // Cosine classifier head (docs/methods.md §1.1; cosine_head_common.cpp, cpu/ and cuda/cosine_head_*):
  // logits = normalize(features, dim=1) @ normalize(weight, dim=0), weight (D, C), F.normalize eps semantics.
  // Returns (logits, |features_i|, |weight_j|), the norms raw (not clamped). The backward gives (grad_features,
  // grad_weight), each empty when not needed; path 0 picks its temporaries by size, 1 / 2 force one (tests).
  // `logits` (the forward's output) lets the backward take the tangent dot products from sum grad * logits.
  // cosine_norms: raw L2 norms of the vectors of a 2-D input lying along dim (dim 1: one per row).
  // cosine_scale_: self[i, j] /= max(row_norm[i], eps) max(col_norm[j], eps) (the forward's epilogue).
  // cosine_grad_prep_: the same on a logit gradient, returning the row / column sums of grad * logits
  // (before scaling), the tangent dot products of both operands.
  // cosine_tangent_: grad <- s (grad - proj_x grad) / max(|x|, eps) per vector of `vectors` along dim
  // (without the division when prescaled), the backward's epilogue; scale s: a one-element tensor or None;
  // dots: the vectors' x · grad if known.
  m.def("cosine_logits(Tensor features, Tensor weight, float eps=1e-12) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cosine_logits_backward(Tensor grad, Tensor features, Tensor weight, Tensor feature_norm, "
      "Tensor weight_norm, float eps, bool need_features, bool need_weight, int path=0, Tensor? logits=None) "
      "-> (Tensor, Tensor)");
  m.def("cosine_norms(Tensor input, int dim) -> Tensor");
  m.def("cosine_scale_(Tensor(a!) self, Tensor? row_norm, Tensor? col_norm, float eps=1e-12) -> ()");
  m.def(
      "cosine_grad_prep_(Tensor(a!) grad, Tensor logits, Tensor row_norm, Tensor col_norm, float eps=1e-12) "
      "-> (Tensor, Tensor)");
  m.def(
      "cosine_tangent_(Tensor(a!) grad, Tensor vectors, Tensor norm, float eps, int dim, bool prescaled, "
      "Tensor? scale=None, Tensor? dots=None) -> ()");
  // Hyperspherical uniformity of the normalised class weights (RECONSTRUCTED FROM THE ABSTRACT of Gao et al.,
  // CAAI TIT 2025; ltk/uniformity.h, cpu/uniformity_cpu.cpp, cuda/uniformity_*): weight (C, D) rows,
  // kernel 0 gaussian log mean exp(-param d^2), 1 riesz mean d^-param, 2 log mean -log d, over pairs j != k,
  // d^2 clamped at dist_eps; tiled (block x block Gram tiles, 0 = auto), C x C never materialised. Returns
  // (value (0-dim), grad = dU/dweight for grad_output 1 (C, D), empty unless compute_grad).
  m.def(
      "uniformity(Tensor weight, int kernel, float param, float eps=1e-12, float dist_eps=1e-12, int block=0, "
      "bool compute_grad=False) -> (Tensor, Tensor)");
  // Which instruction-set build of the CPU kernels runs here ("avx512", "avx2" or "default").
  m.def("cpu_isa() -> str", [] { return std::string(ltk::cpu::kernels_isa_name()); });
}

namespace {
void margin_ce_grad_scale_cpu(at::Tensor& grad, const at::Tensor& grad_output, bool per_row) {
  ltk::check_grad_scale_args(grad, grad_output, per_row);
  grad.mul_(per_row ? grad_output.unsqueeze(1) : grad_output);
}
}  // namespace

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  m.impl("margin_ce", &ltk::margin_ce_cpu);
  m.impl("margin_ce_grad_scale_", &margin_ce_grad_scale_cpu);
}
