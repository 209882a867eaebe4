// The fused norm ops' bodies, the same for every backend: argument checks, the contiguous inputs
// and allocated outputs the kernels expect, then a call to one backend's NormKernels.
#include <ATen/ATen.h>

#include <cmath>

#include "torchgc/norm.h"

namespace torchgc {

at::ScalarType norm_math_type(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

namespace {

void check_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "torchgc::", op, ": expected argument '", name, "' to be a defined tensor, got an undefined one");
  TORCH_CHECK(t.layout() == at::kStrided, "torchgc::", op, ": expected argument '", name,
              "' to be a strided tensor, got layout ", t.layout());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "torchgc::", op, ": expected argument '", name, "' to be on x's device ",
              x.device(), ", got one on ", t.device());
}

void check_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x) {
  check_tensor(op, name, p);
  check_same_device(op, name, p, x);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(-1), "torchgc::", op, ": expected argument '", name, "' to have shape [",
              x.size(-1), "] (x's last dimension), got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == x.scalar_type(), "torchgc::", op,
              ": expected argument '", name, "' to have dtype Float or x's dtype (", x.scalar_type(), "), got ",
              p.scalar_type());
}

}  // namespace

at::ScalarType check_norm_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, double eps) {
  check_tensor(op, "x", x);
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kBFloat16 || xt == at::kHalf || xt == at::kFloat || xt == at::kDouble, "torchgc::", op,
              ": expected argument 'x' to have dtype BFloat16, Half, Float or Double, got ", xt);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "torchgc::", op,
              ": expected argument 'x' to have at least one dimension and a last dimension of size >= 1, got shape ",
              x.sizes());
  check_param(op, "weight", weight, x);
  if (bias.has_value()) {
    check_param(op, "bias", *bias, x);
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "torchgc::", op,
                ": expected argument 'bias' to have weight's dtype (", weight.scalar_type(), "), got ",
                bias->scalar_type());
  }
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "torchgc::", op, ": expected argument 'eps' to be finite and >= 0, got ",
              eps);
  return norm_math_type(xt);
}

namespace {

at::ScalarType check_norm_backward(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& weight,
                                   std::initializer_list<std::pair<const char*, const at::Tensor*>> stats) {
  const auto math = check_norm_forward(op, x, weight, std::nullopt, 0.0);
  check_tensor(op, "grad_y", grad_y);
  check_same_device(op, "grad_y", grad_y, x);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "torchgc::", op, ": expected argument 'grad_y' to have x's shape ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() || grad_y.scalar_type() == at::kFloat, "torchgc::", op,
              ": expected argument 'grad_y' to have dtype Float or x's dtype (", x.scalar_type(), "), got ",
              grad_y.scalar_type());
  const auto rows_shape = x.sizes().slice(0, x.dim() - 1);
  for (const auto& [name, t] : stats) {
    check_tensor(op, name, *t);
    check_same_device(op, name, *t, x);
    TORCH_CHECK(t->sizes() == rows_shape && t->scalar_type() == math, "torchgc::", op, ": expected argument '", name,
                "' to have shape ", rows_shape, " and dtype ", math, " (one value per row of x), got shape ",
                t->sizes(), " and dtype ", t->scalar_type());
  }
  return math;
}

// One value per row of x, in the math dtype.
at::Tensor norm_row_stats(const at::Tensor& x, at::ScalarType math) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(math));
}

// A parameter as the kernels read it: contiguous, in the math dtype.
at::Tensor norm_param(const at::Tensor& p, at::ScalarType math) { return p.to(math).contiguous(); }

// A backward output: allocated when the mask asks for it, else undefined (None in Python).
at::Tensor grad_output(bool wanted, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return wanted ? at::empty(sizes, options) : at::Tensor();
}

// dweight or dbias in the weight's dtype, or undefined when it was not asked for.
at::Tensor param_grad(const at::Tensor& g, const at::Tensor& weight) {
  return g.defined() ? g.to(weight.scalar_type()) : g;
}

void check_offset(const char* op, double offset) {
  TORCH_CHECK(std::isfinite(offset), "torchgc::", op, ": expected argument 'offset' to be finite, got ", offset);
}

// x with no rows (a leading dimension of size 0): outputs are empty and parameter gradients zero.
// No kernel runs, since a CUDA launch of zero blocks is an error.
bool has_rows(const at::Tensor& x) { return x.numel() > 0; }

void zero_param_grads(std::initializer_list<at::Tensor*> grads) {
  for (at::Tensor* g : grads) {
    if (g->defined()) {
      g->zero_();
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_with(const NormKernels& kernels, const at::Tensor& x,
                                                 const at::Tensor& weight, double eps, double offset, bool llama_cast,
                                                 bool fp32_output) {
  const auto math = check_norm_forward("rms_norm", x, weight, std::nullopt, eps);
  check_offset("rms_norm", offset);
  const auto xc = x.contiguous();
  const auto w = norm_param(weight, math);
  auto y = at::empty(x.sizes(), x.options().dtype(fp32_output ? at::kFloat : x.scalar_type()));
  auto rstd = norm_row_stats(x, math);
  if (has_rows(x)) {
    kernels.rms_forward(xc, w, y, rstd, eps, offset, llama_cast);
  }
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_with(const NormKernels& kernels, const at::Tensor& grad_y,
                                                          const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& rstd, double offset, bool llama_cast,
                                                          std::array<bool, 2> output_mask) {
  const auto math = check_norm_backward("rms_norm_backward", grad_y, x, weight, {{"rstd", &rstd}});
  check_offset("rms_norm_backward", offset);
  const auto xc = x.contiguous();
  auto dx = grad_output(output_mask[0], x.sizes(), x.options());
  auto dw = grad_output(output_mask[1], {x.size(-1)}, x.options().dtype(math));
  if (has_rows(x)) {
    kernels.rms_backward(grad_y.contiguous(), xc, norm_param(weight, math), rstd.contiguous(), dx, dw, offset,
                         llama_cast);
  } else {
    zero_param_grads({&dw});
  }
  return {dx, param_grad(dw, weight)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_with(const NormKernels& kernels, const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias, double eps,
                                                               bool fp32_output) {
  const auto math = check_norm_forward("layer_norm", x, weight, bias, eps);
  const auto xc = x.contiguous();
  const auto w = norm_param(weight, math);
  const auto b = bias.has_value() ? norm_param(*bias, math) : at::zeros_like(w);
  auto y = at::empty(x.sizes(), x.options().dtype(fp32_output ? at::kFloat : x.scalar_type()));
  auto mean = norm_row_stats(x, math);
  auto rstd = norm_row_stats(x, math);
  if (has_rows(x)) {
    kernels.layer_forward(xc, w, b, y, mean, rstd, eps);
  }
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_with(const NormKernels& kernels,
                                                                        const at::Tensor& grad_y, const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& mean,
                                                                        const at::Tensor& rstd,
                                                                        std::array<bool, 3> output_mask) {
  const auto math = check_norm_backward("layer_norm_backward", grad_y, x, weight, {{"mean", &mean}, {"rstd", &rstd}});
  const auto xc = x.contiguous();
  auto dx = grad_output(output_mask[0], x.sizes(), x.options());
  auto dw = grad_output(output_mask[1], {x.size(-1)}, x.options().dtype(math));
  auto db = grad_output(output_mask[2], {x.size(-1)}, x.options().dtype(math));
  if (has_rows(x)) {
    kernels.layer_backward(grad_y.contiguous(), xc, norm_param(weight, math), mean.contiguous(), rstd.contiguous(),
                           dx, dw, db);
  } else {
    zero_param_grads({&dw, &db});
  }
  return {dx, param_grad(dw, weight), param_grad(db, weight)};
}

}  // namespace torchgc
