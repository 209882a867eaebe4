// CPU kernels of the offload ops. They run the same bookkeeping as CUDA with real copies into
// the host pool, so CPU tests cover everything above the device copy itself.
#include <torch/library.h>

#include "torchgc/host_pool.h"
#include "torchgc/offload.h"

namespace torchgc {

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
