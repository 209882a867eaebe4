#pragma once
// The fused norm ops' bodies and argument checks, shared by the CPU and CUDA kernels (defined in
// norm.cpp). The schemas are in ops.cpp; the per-row math is in norm_row.h; each backend's
// NormKernels is in cpu/norm_cpu.cpp or cuda/norm_cuda.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>

namespace torchgc {

// The math dtype for x's dtype: float32, or float64 for float64 x (gradcheck runs in float64).
at::ScalarType norm_math_type(at::ScalarType x);

// Checks a forward call's arguments and returns the math dtype. Errors name the op, the
// argument, what was expected and what was given.
at::ScalarType check_norm_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, double eps);

// The kernels of one backend. They receive x, grad_y and the row statistics contiguous, the
// weight and bias contiguous in the math dtype, and every output allocated (dweight and dbias in
// the math dtype), except the backward outputs the caller's output_mask left out: those are
// undefined, and the kernels compute nothing for them.
struct NormKernels {
  void (*rms_forward)(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, at::Tensor& rstd, double eps,
                      double offset, bool llama);
  void (*rms_backward)(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                       at::Tensor& dx, at::Tensor& dw, double offset, bool llama);
  void (*layer_forward)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& y,
                        at::Tensor& mean, at::Tensor& rstd, double eps);
  void (*layer_backward)(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& mean,
                         const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dw, at::Tensor& db);
};

// The ops, for any backend: check the arguments, prepare the inputs and outputs, run `kernels`.
std::tuple<at::Tensor, at::Tensor> rms_norm_with(const NormKernels& kernels, const at::Tensor& x,
                                                 const at::Tensor& weight, double eps, double offset, bool llama_cast,
                                                 bool fp32_output);
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_with(const NormKernels& kernels, const at::Tensor& grad_y,
                                                          const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& rstd, double offset, bool llama_cast,
                                                          std::array<bool, 2> output_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_with(const NormKernels& kernels, const at::Tensor& x,
                                                               const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias, double eps,
                                                               bool fp32_output);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_with(const NormKernels& kernels,
                                                                        const at::Tensor& grad_y, const at::Tensor& x,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& mean,
                                                                        const at::Tensor& rstd,
                                                                        std::array<bool, 3> output_mask);

// Registers the four ops in a TORCH_LIBRARY_IMPL block with the kernels `Kernels()` returns.
template <const NormKernels& (*Kernels)()>
void register_norm_ops(torch::Library& m) {
  m.impl("rms_norm", [](const at::Tensor& x, const at::Tensor& w, double eps, double offset, bool llama,
                        bool fp32_output) { return rms_norm_with(Kernels(), x, w, eps, offset, llama, fp32_output); });
  m.impl("rms_norm_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& rstd, double offset, bool llama, std::array<bool, 2> mask) {
    return rms_norm_backward_with(Kernels(), g, x, w, rstd, offset, llama, mask);
  });
  m.impl("layer_norm", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, double eps,
                          bool fp32_output) { return layer_norm_with(Kernels(), x, w, b, eps, fp32_output); });
  m.impl("layer_norm_backward", [](const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& mean, const at::Tensor& rstd, std::array<bool, 3> mask) {
    return layer_norm_backward_with(Kernels(), g, x, w, mean, rstd, mask);
  });
}

// An output's data as P*, or null for an output the mask left undefined.
template <typename P>
P* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<P>() : nullptr;
}

// Calls fn(T{}, O{}, A{}) with x's C++ type T, the output's (or incoming gradient's) type O,
// which is T or float, and the math type A.
template <typename Fn>
void dispatch_norm_types(at::ScalarType xt, at::ScalarType ot, Fn&& fn) {
  auto with_out = [&](auto t, auto acc) {
    using T = decltype(t);
    if (ot == c10::CppTypeToScalarType<T>::value) {
      fn(t, T{}, acc);
    } else {
      TORCH_INTERNAL_ASSERT(ot == at::kFloat, "torchgc: unexpected output dtype ", ot);
      fn(t, float{}, acc);
    }
  };
  switch (xt) {
    case at::kBFloat16: return with_out(c10::BFloat16{}, float{});
    case at::kHalf: return with_out(c10::Half{}, float{});
    case at::kFloat: return with_out(float{}, float{});
    case at::kDouble: return with_out(double{}, double{});
    default: TORCH_INTERNAL_ASSERT(false, "torchgc: unexpected dtype ", xt);
  }
}

}  // namespace torchgc
