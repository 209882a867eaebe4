// CPU kernels of the offload ops. They run the same bookkeeping as CUDA with real copies into
// the host pool, so CPU tests cover everything above the device copy itself.
#include "torchgc/host_pool.h"
#include "torchgc/offload.h"

namespace torchgc {

Tensor reload_cpu(const Tensor& host) {
  auto out = torch::stable::empty(host.sizes(), host.scalar_type());
  torch::stable::copy_(out, host);
  return out;
}

namespace {

Tensor offload_cpu(Tensor x) {
  check_offload_input(x, "offload");
  auto host = HostPool::instance().empty_like(x);
  torch::stable::copy_(host, x);
  return host;
}

void wait_cpu(Tensor x) {
  // CPU copies are synchronous: nothing is pending.
  check_offload_input(x, "wait");
}

}  // namespace
}  // namespace torchgc

STABLE_TORCH_LIBRARY_IMPL(torchgc, CPU, m) {
  m.impl("offload", TORCH_BOX(&torchgc::offload_cpu));
  m.impl("wait", TORCH_BOX(&torchgc::wait_cpu));
}
