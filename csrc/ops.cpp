// Every torchgc op schema, in one place: Python derives its list of ops from what is defined
// here. Kernels are registered per backend in cpu/ and cuda/; reload, which routes by its device
// argument, in offload.cpp; the ops without tensor arguments below.
#include "torchgc/host_pool.h"

namespace torchgc {
namespace {

std::vector<int64_t> host_pool_stats() {
  const auto s = HostPool::instance().stats();
  return {s.reserved_bytes, s.in_use_bytes, s.limit_bytes, s.pinned_fallbacks, s.cached_bytes};
}

void set_host_pool_limit(int64_t bytes) { HostPool::instance().set_limit(bytes); }

void empty_host_pool() { HostPool::instance().empty_cache(); }

}  // namespace
}  // namespace torchgc

STABLE_TORCH_LIBRARY(torchgc, m) {
  // Activation offloading. offload copies x to host memory (asynchronously on CUDA); reload
  // starts the copy back to `device` and returns at once; wait makes the current stream wait
  // for a pending reload into x, just before its first use.
  m.def("offload(Tensor x) -> Tensor");
  m.def("reload(Tensor host, Device device) -> Tensor");
  m.def("wait(Tensor(a!) x) -> ()");

  // Host pool bookkeeping: [reserved_bytes, in_use_bytes, limit_bytes, pinned_fallbacks, cached_bytes].
  // set_host_pool_limit caps the cached bytes; -1 is the automatic limit (the peak in use).
  m.def("host_pool_stats() -> int[]");
  m.def("set_host_pool_limit(int bytes) -> ()");
  m.def("empty_host_pool() -> ()");

  // Which copy of the CPU norm kernels runs: torch.backends.cpu.get_cpu_capability()'s answer
  // ("DEFAULT", "AVX2", "AVX512", ...), which Python passes in when it loads the library, since
  // ATen's own function is not part of the stable ABI.
  m.def("use_cpu_capability(str capability) -> ()");

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

STABLE_TORCH_LIBRARY_IMPL(torchgc, CompositeExplicitAutograd, m) {
  m.impl("host_pool_stats", TORCH_BOX(&torchgc::host_pool_stats));
  m.impl("set_host_pool_limit", TORCH_BOX(&torchgc::set_host_pool_limit));
  m.impl("empty_host_pool", TORCH_BOX(&torchgc::empty_host_pool));
}
