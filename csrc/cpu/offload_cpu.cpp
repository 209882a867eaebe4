// CPU kernels of the offload ops. They run the same bookkeeping as CUDA with real copies into
// the host pool, so CPU tests cover everything above the device copy itself.
#include <torch/library.h>

#include "torchgc/host_pool.h"
#include "torchgc/offload.h"

namespace torchgc {

void check_offload_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.defined(), "torchgc::", op, ": expected argument 'x' to be a defined tensor, got an undefined one");
  TORCH_CHECK(x.layout() == at::kStrided, "torchgc::", op, ": expected argument 'x' to be a strided tensor, got layout ", x.layout());
}

at::Tensor reload_cpu(const at::Tensor& host) {
  auto out = at::empty(host.sizes(), host.options());
  out.copy_(host);
  return out;
}

namespace {

at::Tensor offload_cpu(const at::Tensor& x) {
  check_offload_input(x, "offload");
  auto host = HostPool::instance().empty(x.sizes(), x.scalar_type());
  host.copy_(x);
  return host;
}

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

void wait_cpu(at::Tensor& x) {
  // CPU copies are synchronous: nothing is pending.
  check_offload_input(x, "wait");
}

}  // namespace
}  // namespace torchgc

TORCH_LIBRARY_IMPL(torchgc, CPU, m) {
  m.impl("offload", &torchgc::offload_cpu);
  m.impl("wait", &torchgc::wait_cpu);
}

TORCH_LIBRARY_IMPL(torchgc, CompositeExplicitAutograd, m) {
  m.impl("reload", &torchgc::reload);
}
