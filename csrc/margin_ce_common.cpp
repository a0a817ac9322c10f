#include "margin_ce_common.h"

#include <c10/util/Exception.h>

namespace ltk {
namespace {

at::Tensor class_vector(const std::optional<at::Tensor>& v, const char* name, const at::Tensor& input,
                        int64_t len, const char* len_name, at::ScalarType acc) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == len, "margin_ce: ", name, " must have shape (", len_name,
                    ",) = (", len, ",), got ", v->sizes());
  TORCH_CHECK_VALUE(v->device() == input.device(), "margin_ce: ", name, " is on ", v->device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(at::isFloatingType(v->scalar_type()), "margin_ce: ", name,
                    " must be a floating-point tensor, got ", v->scalar_type());
  return v->to(acc).contiguous();
}

// The input, the target and the scalar options (codes, ranges, combinations).
void check_inputs(const MarginCeInputs& in) {
  const at::Tensor& x = in.input;
  TORCH_CHECK_VALUE(x.dim() == 2, "margin_ce: input must be 2-D (N, C), got shape ", x.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "margin_ce: input must be floating point, got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(in.target.dim() == 1 && in.target.size(0) == x.size(0),
                    "margin_ce: target must have shape (N,) = (", x.size(0), ",), got ", in.target.sizes());
  TORCH_CHECK_VALUE(in.target.scalar_type() == at::kLong, "margin_ce: target must be int64, got ",
                    in.target.scalar_type());
  TORCH_CHECK_VALUE(in.target.device() == x.device(), "margin_ce: target is on ", in.target.device(),
                    " but input is on ", x.device());
  TORCH_CHECK_VALUE(in.reduction >= kReduceNone && in.reduction <= kReduceBatchMean,
                    "margin_ce: unknown reduction code ", in.reduction);
  TORCH_CHECK_VALUE(in.focal >= kFocalOff && in.focal <= kFocalFull, "margin_ce: unknown focal code ", in.focal);
  TORCH_CHECK_VALUE(in.angular >= kLinear && in.angular <= kGclAngEasy, "margin_ce: unknown angular code ",
                    in.angular);
  TORCH_CHECK_VALUE(!(in.focal != kFocalOff && in.label_smoothing != 0.0),
                    "margin_ce: focal loss and label smoothing cannot be combined");
  TORCH_CHECK_VALUE(in.label_smoothing >= 0.0 && in.label_smoothing <= 1.0,
                    "margin_ce: label_smoothing must be in [0, 1], got ", in.label_smoothing);
  TORCH_CHECK_VALUE(in.gamma >= 0.0, "margin_ce: focal gamma must be >= 0, got ", in.gamma);
  TORCH_CHECK_VALUE(x.size(1) >= 1 || x.size(0) == 0, "margin_ce: input needs at least one class (C >= 1)");
}

// The per-class vectors: checked, cast to the accumulation type, and their combinations.
void prepare_class_vectors(const MarginCeInputs& in, MarginCePrepared& p) {
  const at::Tensor& x = in.input;
  const auto acc = p.acc_type;
#define LTK_MCE_CHECK_VECTOR(kind, name, len) p.name = class_vector(in.name, #name, x, p.len, #len, acc);
  LTK_MARGIN_CE_VECTOR_ARGS(LTK_MCE_CHECK_VECTOR, LTK_MCE_NOSEP)
#undef LTK_MCE_CHECK_VECTOR
  TORCH_CHECK_VALUE(p.row_shift.defined() == p.shift_coef.defined(),
                    "margin_ce: row_shift and shift_coef must be given together");
  // The angular modes transform the cosine itself (ltk/transform.h): a class scale, bias or row shift has no
  // defined place in cos(theta + M), and the CPU and CUDA kernels would disagree on one, so none is taken.
  TORCH_CHECK_VALUE(in.angular == kLinear || !(p.col_scale.defined() || p.col_bias.defined() || p.row_shift.defined()),
                    "margin_ce: col_scale, col_bias and row_shift / shift_coef apply to the linear transform only, "
                    "not to angular=", in.angular);
}

// The Gaussian cloud's randomness: injected noise, or the Philox seed (read on the host: a CPU tensor).
void prepare_noise(const MarginCeInputs& in, MarginCePrepared& p) {
  const at::Tensor& x = in.input;
  const auto acc = p.acc_type;
  if (in.noise.has_value() && in.noise->defined()) {
    TORCH_CHECK_VALUE(p.cloud.defined(), "margin_ce: noise was given without cloud sizes");
    TORCH_CHECK_VALUE(in.noise->sizes() == x.sizes(), "margin_ce: noise must have the input's shape ", x.sizes(),
                      ", got ", in.noise->sizes());
    TORCH_CHECK_VALUE(in.noise->device() == x.device(), "margin_ce: noise is on ", in.noise->device(),
                      " but input is on ", x.device());
    p.noise = in.noise->to(acc).contiguous();
  } else if (p.cloud.defined() && x.is_cpu()) {
    // (on CUDA the Philox state may instead come from the CUDA generator, cuda/margin_ce_cuda.cu)
    TORCH_CHECK_VALUE(in.seed.has_value() && in.seed->defined(),
                      "margin_ce: the Gaussian cloud needs either injected noise or a seed tensor");
  }
  if (in.seed.has_value() && in.seed->defined()) {
    TORCH_CHECK_VALUE(in.seed->numel() == 1 && in.seed->scalar_type() == at::kLong && in.seed->is_cpu(),
                      "margin_ce: seed must be a one-element int64 CPU tensor");
    // read in place (a host tensor: no device sync; item() would be a dispatched op)
    p.seed = static_cast<uint64_t>(*in.seed->const_data_ptr<int64_t>());
  }
}

// CPU: the target range and the reduction's denominator (and label smoothing's weight sum) in one host
// loop over the prepared vectors, so the CPU path issues no ATen reduction. (On a device the range is
// asserted inside the kernel, like PyTorch, and the prologue kernel computes the scalars.)
void cpu_scalars(const MarginCeInputs& in, MarginCePrepared& p) {
  const int64_t N = p.N, C = p.C;
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  const bool w_double = p.weight.defined() && p.weight.scalar_type() == at::kDouble;
  const double* wd = w_double ? p.weight.const_data_ptr<double>() : nullptr;
  const float* wf = p.weight.defined() && !w_double ? p.weight.const_data_ptr<float>() : nullptr;
  const bool w = wd || wf;
  auto weight_at = [&](int64_t j) { return wd ? wd[j] : static_cast<double>(wf[j]); };
  double denom_w = 0;
  int64_t valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (t[i] == in.ignore_index) continue;
    TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < C, "margin_ce: target ", t[i], " at row ", i,
                      " is out of range for ", C, " classes (ignore_index=", in.ignore_index, ")");
    ++valid;
    denom_w += w ? weight_at(t[i]) : 1.0;
  }
  double denom = 1.0;
  if (in.reduction == kReduceMean) denom = w ? denom_w : static_cast<double>(valid);
  if (in.reduction == kReduceBatchMean) denom = static_cast<double>(N);
  p.inv_denom_host = 1.0 / denom;
  p.inv_denom_host_f = static_cast<float>(p.inv_denom_host);
  if (in.label_smoothing != 0.0) {
    double ws = 0;
    for (int64_t j = 0; j < C && w; ++j) ws += weight_at(j);
    p.weight_sum_host = w ? ws : static_cast<double>(C);
  }
  p.weight_sum_host_f = static_cast<float>(p.weight_sum_host);
}

}  // namespace

MarginCePrepared prepare_margin_ce(const MarginCeInputs& in) {
  check_inputs(in);
  const at::Tensor& x = in.input;
  MarginCePrepared p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.input = x.contiguous();
  p.target = in.target.contiguous();
  prepare_class_vectors(in, p);
  prepare_noise(in, p);
  if (x.is_cpu()) {
    cpu_scalars(in, p);
  } else {
    // written by the prologue kernel (denominator, weight sum, the main kernel's block counter)
    p.scalars = at::empty({static_cast<int64_t>(sizeof(MarginCeScalars<double>))}, x.options().dtype(at::kByte));
  }
  return p;
}

}  // namespace ltk
