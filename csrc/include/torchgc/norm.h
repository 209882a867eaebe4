#pragma once
// The fused norm ops' bodies and argument checks, shared by the CPU and CUDA kernels (defined in
// norm.cpp). The schemas are in ops.cpp; the per-row math is in norm_row.h; each backend's
// NormKernels is in cpu/norm_cpu.cpp or cuda/norm_cuda.cu.
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <optional>
#include <tuple>
#include <vector>

#include "torchgc/stable.h"

namespace torchgc {

// The math dtype for x's dtype: float32, or float64 for float64 x (gradcheck runs in float64).
ScalarType norm_math_type(ScalarType x);

// Checks a forward call's arguments and returns the math dtype. Errors name the op, the
// argument, what was expected and what was given.
ScalarType check_norm_forward(const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                              double eps);

// The kernels of one backend. They receive x, grad_y and the row statistics contiguous, the
// weight and bias contiguous in the math dtype, and every output allocated (dweight and dbias in
// the math dtype), except the backward outputs the caller's output_mask left out: those are
// undefined, and the kernels compute nothing for them.
struct NormKernels {
  void (*rms_forward)(const Tensor& x, const Tensor& w, Tensor& y, Tensor& rstd, double eps, double offset, bool llama);
  void (*rms_backward)(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                       double offset, bool llama);
  void (*layer_forward)(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y, Tensor& mean, Tensor& rstd,
                        double eps);
  void (*layer_backward)(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                         Tensor& dx, Tensor& dw, Tensor& db);
};

// The ops, for any backend: check the arguments, prepare the inputs and outputs, run `kernels`.
std::tuple<Tensor, Tensor> rms_norm_with(const NormKernels& kernels, const Tensor& x, const Tensor& weight, double eps,
                                         double offset, bool llama_cast, bool fp32_output);
std::tuple<Tensor, Tensor> rms_norm_backward_with(const NormKernels& kernels, const Tensor& grad_y, const Tensor& x,
                                                  const Tensor& weight, const Tensor& rstd, double offset,
                                                  bool llama_cast, const std::vector<bool>& output_mask);
std::tuple<Tensor, Tensor, Tensor> layer_norm_with(const NormKernels& kernels, const Tensor& x, const Tensor& weight,
                                                   const std::optional<Tensor>& bias, double eps, bool fp32_output);
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward_with(const NormKernels& kernels, const Tensor& grad_y,
                                                            const Tensor& x, const Tensor& weight, const Tensor& mean,
                                                            const Tensor& rstd, const std::vector<bool>& output_mask);

// The four ops with the kernels `Kernels()` returns, as functions a STABLE_TORCH_LIBRARY_IMPL
// block boxes (TORCH_BOX) and registers.
template <const NormKernels& (*Kernels)()>
struct NormOps {
  static std::tuple<Tensor, Tensor> rms_norm(Tensor x, Tensor w, double eps, double offset, bool llama, bool fp32_output) {
    return rms_norm_with(Kernels(), x, w, eps, offset, llama, fp32_output);
  }
  static std::tuple<Tensor, Tensor> rms_norm_backward(Tensor g, Tensor x, Tensor w, Tensor rstd, double offset, bool llama,
                                                      std::vector<bool> mask) {
    return rms_norm_backward_with(Kernels(), g, x, w, rstd, offset, llama, mask);
  }
  static std::tuple<Tensor, Tensor, Tensor> layer_norm(Tensor x, Tensor w, std::optional<Tensor> b, double eps,
                                                       bool fp32_output) {
    return layer_norm_with(Kernels(), x, w, b, eps, fp32_output);
  }
  static std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(Tensor g, Tensor x, Tensor w, Tensor mean, Tensor rstd,
                                                                std::vector<bool> mask) {
    return layer_norm_backward_with(Kernels(), g, x, w, mean, rstd, mask);
  }
};

#define TORCHGC_REGISTER_NORM_OPS(m, Ops)                               \
  m.impl("rms_norm", TORCH_BOX(&Ops::rms_norm));                       \
  m.impl("rms_norm_backward", TORCH_BOX(&Ops::rms_norm_backward));     \
  m.impl("layer_norm", TORCH_BOX(&Ops::layer_norm));                   \
  m.impl("layer_norm_backward", TORCH_BOX(&Ops::layer_norm_backward))

// An output's data as P*, or null for an output the mask left undefined.
template <typename P>
P* data_or_null(const Tensor& t) {
  return t.defined() ? static_cast<P*>(t.data_ptr()) : nullptr;
}

template <typename P>
const P* data_of(const Tensor& t) {
  return static_cast<const P*>(t.data_ptr());
}

// Calls fn(T{}, O{}, A{}) with x's C++ type T, the output's (or incoming gradient's) type O,
// which is T or float, and the math type A. The norm functions have checked both dtypes.
template <typename Fn>
void dispatch_norm_types(ScalarType xt, ScalarType ot, Fn&& fn) {
  auto with_out = [&](auto t, auto acc) {
    using T = decltype(t);
    if (ot == ScalarType::Float) {
      fn(t, float{}, acc);
    } else {
      fn(t, T{}, acc);
    }
  };
  switch (xt) {
    case ScalarType::BFloat16: return with_out(c10::BFloat16{}, float{});
    case ScalarType::Half: return with_out(c10::Half{}, float{});
    case ScalarType::Float: return with_out(float{}, float{});
    case ScalarType::Double: return with_out(double{}, double{});
    default: fail("torchgc: unexpected dtype ", xt);
  }
}

}  // namespace torchgc
