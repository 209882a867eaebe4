// The offload ops' parts that are the same for every backend: the input check, and reload, which
// dispatches on its host (CPU) argument and so is routed here to its target device's kernel.
#include <torch/library.h>

#include "torchgc/offload.h"

namespace torchgc {

void check_offload_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.defined(), "torchgc::", op, ": expected argument 'x' to be a defined tensor, got an undefined one");
  TORCH_CHECK(x.layout() == at::kStrided, "torchgc::", op, ": expected argument 'x' to be a strided tensor, got layout ", x.layout());
}

namespace {

// Routed by the target device: reload always dispatches on its host argument.
at::Tensor reload(const at::Tensor& host, c10::Device device) {
  TORCH_CHECK(host.defined(), "torchgc::reload: expected argument 'host' to be a defined tensor, got an undefined one");
  TORCH_CHECK(host.device().is_cpu(), "torchgc::reload: expected argument 'host' to be a CPU tensor, got one on ", host.device());
  TORCH_CHECK(host.layout() == at::kStrided, "torchgc::reload: expected argument 'host' to be a strided tensor, got layout ", host.layout());
  if (device.is_cpu()) {
    return reload_cpu(host);
  }
#ifdef TORCHGC_WITH_CUDA
  if (device.is_cuda()) {
    return reload_cuda(host, device);
  }
#endif
  TORCH_CHECK(false, "torchgc::reload: expected argument 'device' to be cpu",
#ifdef TORCHGC_WITH_CUDA
              " or cuda",
#else
              " (this build of torchgc has no CUDA kernels)",
#endif
              ", got ", device);
}

}  // namespace
}  // namespace torchgc

TORCH_LIBRARY_IMPL(torchgc, CompositeExplicitAutograd, m) {
  m.impl("reload", &torchgc::reload);
}
