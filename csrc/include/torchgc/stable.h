#pragma once
// What every torchgc kernel takes from PyTorch's stable ABI (torch/csrc/stable), and the helpers
// that write torchgc's own error messages. Nothing here may use a c10/at/torch C++ symbol: the
// library must load on every torch from the target version on (TORCH_TARGET_VERSION, set by CMake).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Layout.h>
#include <torch/headeronly/core/ScalarType.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace torchgc {

using torch::headeronly::DeviceType;
using torch::headeronly::Layout;
using torch::headeronly::ScalarType;
using torch::stable::Device;
using torch::stable::Tensor;
using Shape = torch::headeronly::IntHeaderOnlyArrayRef;

// "cpu", "cuda:0", "meta": the names torch prints.
std::string device_name(const Device& device);
const char* layout_name(Layout layout);
std::string shape_text(Shape shape);

inline std::ostream& operator<<(std::ostream& out, const Device& device) { return out << device_name(device); }
inline std::ostream& operator<<(std::ostream& out, Layout layout) { return out << layout_name(layout); }
inline std::ostream& operator<<(std::ostream& out, Shape shape) { return out << shape_text(shape); }

#define TORCHGC_CHECK(cond, ...) \
  if (!(cond)) {                 \
    ::torchgc::fail(__VA_ARGS__); \
  }

// Throws the RuntimeError that Python shows: the message is the arguments, in order. Not
// STD_TORCH_CHECK, which puts the C++ function, file and line before the message.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream message;
  ((message << args), ...);
  throw std::runtime_error(message.str());
}

// Strides of a contiguous tensor of `sizes`.
std::vector<int64_t> contiguous_strides(Shape sizes);

// Tensors across a C interface between torchgc's two libraries: an argument's handle is borrowed,
// a returned handle is a new reference that the caller owns.
inline Tensor from_borrowed(AtenTensorHandle handle) {
  AtenTensorHandle own = nullptr;
  TORCHGC_CHECK(aoti_torch_new_tensor_handle(handle, &own) == AOTI_TORCH_SUCCESS, "torchgc: cannot take a tensor handle");
  return Tensor(own);
}

inline AtenTensorHandle to_caller(const Tensor& tensor) {
  AtenTensorHandle handle = nullptr;
  TORCHGC_CHECK(aoti_torch_new_tensor_handle(tensor.get(), &handle) == AOTI_TORCH_SUCCESS, "torchgc: cannot make a tensor handle");
  return handle;
}

}  // namespace torchgc
