#pragma once
// Argument checks and buffers shared by the CPU and CUDA kernels of the fused norms (defined in
// cpu/norm_cpu.cpp). The schemas are in ops.cpp; the per-row math is in norm_row.h.
#include <ATen/ATen.h>

#include <optional>

namespace torchgc {

// The math dtype for x's dtype: float32, or float64 for float64 x (gradcheck runs in float64).
at::ScalarType norm_math_type(at::ScalarType x);

// Checks a forward call's arguments and returns the math dtype. Errors name the op, the
// argument, what was expected and what was given.
at::ScalarType check_norm_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, double eps);

// Checks a backward call: grad_y against x, weight as in forward, each saved row statistic
// (name, tensor) against x's leading shape and the math dtype.
at::ScalarType check_norm_backward(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& weight,
                                   std::initializer_list<std::pair<const char*, const at::Tensor*>> stats);

// One value per row of x, in the math dtype.
at::Tensor norm_row_stats(const at::Tensor& x, at::ScalarType math);

// A parameter as the kernels read it: contiguous, in the math dtype.
at::Tensor norm_param(const at::Tensor& p, at::ScalarType math);

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
