// The fused norm ops' bodies, the same for every backend: argument checks, the contiguous inputs
// and allocated outputs the kernels expect, then a call to one backend's NormKernels.
#include "torchgc/norm.h"

#include <cmath>

namespace torchgc {

ScalarType norm_math_type(ScalarType x) { return x == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

namespace {

void check_tensor(const char* op, const char* name, const Tensor& t) {
  TORCHGC_CHECK(t.defined(), "torchgc::", op, ": expected argument '", name, "' to be a defined tensor, got an undefined one");
  TORCHGC_CHECK(t.layout() == Layout::Strided, "torchgc::", op, ": expected argument '", name,
                "' to be a strided tensor, got layout ", t.layout());
}

void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCHGC_CHECK(t.device() == x.device(), "torchgc::", op, ": expected argument '", name, "' to be on x's device ",
                x.device(), ", got one on ", t.device());
}

void check_param(const char* op, const char* name, const Tensor& p, const Tensor& x) {
  check_tensor(op, name, p);
  check_same_device(op, name, p, x);
  TORCHGC_CHECK(p.dim() == 1 && p.size(0) == x.size(-1), "torchgc::", op, ": expected argument '", name,
                "' to have shape [", x.size(-1), "] (x's last dimension), got ", p.sizes());
  TORCHGC_CHECK(p.scalar_type() == ScalarType::Float || p.scalar_type() == x.scalar_type(), "torchgc::", op,
                ": expected argument '", name, "' to have dtype Float or x's dtype (", x.scalar_type(), "), got ",
                p.scalar_type());
}

}  // namespace

ScalarType check_norm_forward(const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                              double eps) {
  check_tensor(op, "x", x);
  const auto xt = x.scalar_type();
  TORCHGC_CHECK(xt == ScalarType::BFloat16 || xt == ScalarType::Half || xt == ScalarType::Float || xt == ScalarType::Double,
                "torchgc::", op, ": expected argument 'x' to have dtype BFloat16, Half, Float or Double, got ", xt);
  TORCHGC_CHECK(x.dim() >= 1 && x.size(-1) > 0, "torchgc::", op,
                ": expected argument 'x' to have at least one dimension and a last dimension of size >= 1, got shape ",
                x.sizes());
  check_param(op, "weight", weight, x);
  if (bias.has_value()) {
    check_param(op, "bias", *bias, x);
    TORCHGC_CHECK(bias->scalar_type() == weight.scalar_type(), "torchgc::", op,
                  ": expected argument 'bias' to have weight's dtype (", weight.scalar_type(), "), got ",
                  bias->scalar_type());
  }
  TORCHGC_CHECK(std::isfinite(eps) && eps >= 0, "torchgc::", op, ": expected argument 'eps' to be finite and >= 0, got ",
                eps);
  return norm_math_type(xt);
}

namespace {

Shape rows_shape(const Tensor& x) { return x.sizes().slice(0, x.dim() - 1); }

ScalarType check_norm_backward(const char* op, const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                               std::initializer_list<std::pair<const char*, const Tensor*>> stats) {
  const auto math = check_norm_forward(op, x, weight, std::nullopt, 0.0);
  check_tensor(op, "grad_y", grad_y);
  check_same_device(op, "grad_y", grad_y, x);
  TORCHGC_CHECK(grad_y.sizes() == x.sizes(), "torchgc::", op, ": expected argument 'grad_y' to have x's shape ", x.sizes(),
                ", got ", grad_y.sizes());
  TORCHGC_CHECK(grad_y.scalar_type() == x.scalar_type() || grad_y.scalar_type() == ScalarType::Float, "torchgc::", op,
                ": expected argument 'grad_y' to have dtype Float or x's dtype (", x.scalar_type(), "), got ",
                grad_y.scalar_type());
  for (const auto& [name, t] : stats) {
    check_tensor(op, name, *t);
    check_same_device(op, name, *t, x);
    TORCHGC_CHECK(t->sizes() == rows_shape(x) && t->scalar_type() == math, "torchgc::", op, ": expected argument '", name,
                  "' to have shape ", rows_shape(x), " and dtype ", math, " (one value per row of x), got shape ",
                  t->sizes(), " and dtype ", t->scalar_type());
  }
  return math;
}

Tensor empty_on(const Tensor& like, Shape sizes, ScalarType dtype) {
  return torch::stable::empty(sizes, dtype, Layout::Strided, like.device());
}

// One value per row of x, in the math dtype.
Tensor norm_row_stats(const Tensor& x, ScalarType math) { return empty_on(x, rows_shape(x), math); }

// A parameter as the kernels read it: contiguous, in the math dtype.
Tensor norm_param(const Tensor& p, ScalarType math) { return torch::stable::contiguous(torch::stable::to(p, math)); }

// A backward output: allocated when the mask asks for it, else undefined (None in Python).
Tensor grad_output(bool wanted, const Tensor& x, Shape sizes, ScalarType dtype) {
  return wanted ? empty_on(x, sizes, dtype) : Tensor();
}

// dweight or dbias in the weight's dtype, or undefined when it was not asked for.
Tensor param_grad(const Tensor& g, const Tensor& weight) {
  return g.defined() ? torch::stable::to(g, weight.scalar_type()) : g;
}

void check_offset(const char* op, double offset) {
  TORCHGC_CHECK(std::isfinite(offset), "torchgc::", op, ": expected argument 'offset' to be finite, got ", offset);
}

void check_mask(const char* op, const std::vector<bool>& mask, size_t size) {
  TORCHGC_CHECK(mask.size() == size, "torchgc::", op, ": expected argument 'output_mask' to have ", size,
                " entries, got ", mask.size());
}

// x with no rows (a leading dimension of size 0): outputs are empty and parameter gradients zero.
// No kernel runs, since a CUDA launch of zero blocks is an error.
bool has_rows(const Tensor& x) { return x.numel() > 0; }

void zero_param_grads(std::initializer_list<Tensor*> grads) {
  for (Tensor* g : grads) {
    if (g->defined()) {
      torch::stable::zero_(*g);
    }
  }
}

}  // namespace

std::tuple<Tensor, Tensor> rms_norm_with(const NormKernels& kernels, const Tensor& x, const Tensor& weight, double eps,
                                         double offset, bool llama_cast, bool fp32_output) {
  const auto math = check_norm_forward("rms_norm", x, weight, std::nullopt, eps);
  check_offset("rms_norm", offset);
  const auto xc = torch::stable::contiguous(x);
  const auto w = norm_param(weight, math);
  auto y = empty_on(x, x.sizes(), fp32_output ? ScalarType::Float : x.scalar_type());
  auto rstd = norm_row_stats(x, math);
  if (has_rows(x)) {
    kernels.rms_forward(xc, w, y, rstd, eps, offset, llama_cast);
  }
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_backward_with(const NormKernels& kernels, const Tensor& grad_y, const Tensor& x,
                                                  const Tensor& weight, const Tensor& rstd, double offset,
                                                  bool llama_cast, const std::vector<bool>& output_mask) {
  const auto math = check_norm_backward("rms_norm_backward", grad_y, x, weight, {{"rstd", &rstd}});
  check_offset("rms_norm_backward", offset);
  check_mask("rms_norm_backward", output_mask, 2);
  const auto xc = torch::stable::contiguous(x);
  auto dx = grad_output(output_mask[0], x, x.sizes(), x.scalar_type());
  const int64_t hidden = x.size(-1);
  auto dw = grad_output(output_mask[1], x, Shape(&hidden, 1), math);
  if (has_rows(x)) {
    kernels.rms_backward(torch::stable::contiguous(grad_y), xc, norm_param(weight, math), torch::stable::contiguous(rstd),
                         dx, dw, offset, llama_cast);
  } else {
    zero_param_grads({&dw});
  }
  return {dx, param_grad(dw, weight)};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_with(const NormKernels& kernels, const Tensor& x, const Tensor& weight,
                                                   const std::optional<Tensor>& bias, double eps, bool fp32_output) {
  const auto math = check_norm_forward("layer_norm", x, weight, bias, eps);
  const auto xc = torch::stable::contiguous(x);
  const auto w = norm_param(weight, math);
  auto b = bias.has_value() ? norm_param(*bias, math) : torch::stable::new_zeros(w, w.sizes());
  auto y = empty_on(x, x.sizes(), fp32_output ? ScalarType::Float : x.scalar_type());
  auto mean = norm_row_stats(x, math);
  auto rstd = norm_row_stats(x, math);
  if (has_rows(x)) {
    kernels.layer_forward(xc, w, b, y, mean, rstd, eps);
  }
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_with(const NormKernels& kernels, const Tensor& grad_y,
                                                            const Tensor& x, const Tensor& weight, const Tensor& mean,
                                                            const Tensor& rstd, const std::vector<bool>& output_mask) {
  const auto math = check_norm_backward("layer_norm_backward", grad_y, x, weight, {{"mean", &mean}, {"rstd", &rstd}});
  check_mask("layer_norm_backward", output_mask, 3);
  const auto xc = torch::stable::contiguous(x);
  const int64_t hidden = x.size(-1);
  auto dx = grad_output(output_mask[0], x, x.sizes(), x.scalar_type());
  auto dw = grad_output(output_mask[1], x, Shape(&hidden, 1), math);
  auto db = grad_output(output_mask[2], x, Shape(&hidden, 1), math);
  if (has_rows(x)) {
    kernels.layer_backward(torch::stable::contiguous(grad_y), xc, norm_param(weight, math), torch::stable::contiguous(mean),
                           torch::stable::contiguous(rstd), dx, dw, db);
  } else {
    zero_param_grads({&dw, &db});
  }
  return {dx, param_grad(dw, weight), param_grad(db, weight)};
}

}  // namespace torchgc
