// Every torchgc op schema, in one place. Kernels are registered per backend in cpu/ and cuda/;
// reload, which routes by its device argument, in offload.cpp.
#include <torch/library.h>

#include "torchgc/host_pool.h"

namespace torchgc {
namespace {

std::vector<int64_t> host_pool_stats() {
  const auto s = HostPool::instance().stats();
  return {s.reserved_bytes, s.in_use_bytes, s.limit_bytes, s.pinned_fallbacks, s.cached_bytes};
}

void set_host_pool_limit(int64_t bytes) { HostPool::instance().set_limit(bytes); }

void empty_host_pool() { HostPool::instance().empty_cache(); }

// What the library was built against: [torch version, "cuda" or "cpu", CUDA architectures,
// "openmp" when at::parallel_for runs its OpenMP loops in parallel here, else "none"].
std::vector<std::string> build_info() {
#ifdef TORCHGC_WITH_CUDA
  const char* backends = "cuda";
#else
  const char* backends = "cpu";
#endif
#ifdef _OPENMP
  const char* parallel = "openmp";
#else
  const char* parallel = "none";
#endif
  return {TORCHGC_TORCH_VERSION, backends, TORCHGC_CUDA_ARCHS, parallel};
}

}  // namespace
}  // namespace torchgc

TORCH_LIBRARY(torchgc, m) {
  // Activation offloading. offload copies x to host memory (asynchronously on CUDA); reload
  // starts the copy back to `device` and returns at once; wait makes the current stream wait
  // for a pending reload into x, just before its first use.
  m.def("offload(Tensor x) -> Tensor");
  m.def("reload(Tensor host, Device device) -> Tensor");
  m.def("wait(Tensor(a!) x) -> ()");

  // Host pool bookkeeping: [reserved_bytes, in_use_bytes, limit_bytes, pinned_fallbacks, cached_bytes].
  // set_host_pool_limit caps the cached bytes; -1 is the automatic limit (the peak in use).
  m.def("host_pool_stats() -> int[]", &torchgc::host_pool_stats);
  m.def("set_host_pool_limit(int bytes) -> ()", &torchgc::set_host_pool_limit);
  m.def("empty_host_pool() -> ()", &torchgc::empty_host_pool);
  m.def("build_info() -> str[]", &torchgc::build_info);

  // Fused norms over x's last dimension, fp32 math (float64 for float64 x). y is in x's dtype,
  // or float32 with fp32_output. rstd (and mean) hold one value per row, in the math dtype, for
  // the backward. rms_norm: y = x * rstd * (offset + weight); llama_cast rounds x * rstd to x's
  // dtype before the weight multiplies it, as HF's LlamaRMSNorm does.
  // The backward ops compute only the gradients output_mask asks for (a frozen weight, as under
  // LoRA, skips the weight-gradient reduction) and return the others undefined: None in Python.
  // Their outputs are Tensor, not Tensor?, as in ATen's native_layer_norm_backward: both passed
  // opcheck, aot_eager and inductor with None outputs (torch 2.14), and Tensor keeps ATen's
  // convention for C++ callers.
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset, bool llama_cast, bool fp32_output) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, float offset, bool llama_cast, bool[2] output_mask) -> (Tensor dx, Tensor dweight)");
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps, bool fp32_output) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor rstd, bool[3] output_mask) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}

// Offloading moves saved tensors' bytes; it is not part of the differentiated computation, so
// its outputs carry no autograd history.
TORCH_LIBRARY_IMPL(torchgc, Autograd, m) {
  m.impl("offload", torch::CppFunction::makeFallthrough());
  m.impl("reload", torch::CppFunction::makeFallthrough());
  m.impl("wait", torch::CppFunction::makeFallthrough());
}
