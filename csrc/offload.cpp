// Reload, the offload op that dispatches on its host (CPU) argument and so is routed here to its
// target device's kernel, and the CPU library's C interface to the CUDA library (offload.h).
#include <array>
#include <atomic>

#include "torchgc/host_pool.h"
#include "torchgc/offload.h"

namespace torchgc {
namespace {

std::array<std::atomic<torchgc_device_reload>, static_cast<size_t>(DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> device_reloads{};

Tensor reload(Tensor host, Device device) {
  TORCHGC_CHECK(host.defined(), "torchgc::reload: expected argument 'host' to be a defined tensor, got an undefined one");
  TORCHGC_CHECK(host.is_cpu(), "torchgc::reload: expected argument 'host' to be a CPU tensor, got one on ", host.device());
  TORCHGC_CHECK(host.layout() == Layout::Strided, "torchgc::reload: expected argument 'host' to be a strided tensor, got layout ",
                host.layout());
  if (device.is_cpu()) {
    return reload_cpu(host);
  }
  const auto type = static_cast<size_t>(device.type());
  const torchgc_device_reload device_reload = type < device_reloads.size() ? device_reloads[type].load() : nullptr;
  TORCHGC_CHECK(device_reload != nullptr, "torchgc::reload: expected argument 'device' to be cpu",
                device_reloads[static_cast<size_t>(DeviceType::CUDA)].load()
                    ? " or cuda"
                    : " (this build of torchgc has no CUDA kernels loaded: torch is a CPU-only build, or torchgc was built without them)",
                ", got ", device);
  return Tensor(device_reload(host.get(), device.index(), device.has_index()));
}

}  // namespace
}  // namespace torchgc

void torchgc_set_device_reload(int32_t device_type, torchgc_device_reload reload) {
  torchgc::device_reloads.at(static_cast<size_t>(device_type)).store(reload);
}

AtenTensorHandle torchgc_host_pool_adopt(AtenTensorHandle block) {
  return torchgc::to_caller(torchgc::HostPool::instance().adopt(torchgc::from_borrowed(block)));
}

AtenTensorHandle torchgc_host_pool_empty_like(AtenTensorHandle like) {
  return torchgc::to_caller(torchgc::HostPool::instance().empty_like(torchgc::from_borrowed(like)));
}

void torchgc_host_pool_note_pinned_fallback() { torchgc::HostPool::instance().note_pinned_fallback(); }

STABLE_TORCH_LIBRARY_IMPL(torchgc, CompositeExplicitAutograd, m) { m.impl("reload", TORCH_BOX(&torchgc::reload)); }
