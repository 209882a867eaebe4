// CUDA kernels of the offload ops. Copies run on one side stream per device and are ordered
// against the compute stream by events only: nothing here synchronizes the host.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/core/CachingHostAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "torchgc/host_pool.h"
#include "torchgc/offload.h"

namespace torchgc {
namespace {

// Per-device state, created on first use so that only devices tensors live on get a stream.
struct DeviceCopyState {
  std::once_flag init;
  std::optional<c10::cuda::CUDAStream> copy_stream;
  std::mutex pending_mutex;
  // Done-events of reloads not yet waited for, keyed by the device buffer.
  std::unordered_map<const void*, std::shared_ptr<at::cuda::CUDAEvent>> pending;
};

DeviceCopyState& device_state(c10::DeviceIndex index) {
  static std::array<DeviceCopyState, C10_COMPILE_TIME_MAX_GPUS> states;
  TORCH_CHECK(index >= 0 && index < C10_COMPILE_TIME_MAX_GPUS, "torchgc: CUDA device index out of range: ", index);
  auto& state = states[index];
  std::call_once(state.init, [&] { state.copy_stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index); });
  return state;
}

// Makes `waiter` wait for the work queued so far on `producer`.
void order_after(const c10::cuda::CUDAStream& producer, const c10::cuda::CUDAStream& waiter) {
  at::cuda::CUDAEvent ready;
  ready.record(producer);
  ready.block(waiter);
}

// Pinned memory from torch's caching host allocator; pageable memory if pinning fails (WSL2
// caps pinned memory), with one warning.
at::Tensor host_buffer(const at::Tensor& like, size_t nbytes) {
  try {
    auto block = at::getHostAllocator(at::kCUDA)->allocate(nbytes);
    return HostPool::instance().adopt(std::move(block), nbytes, like.sizes(), like.scalar_type());
  } catch (const c10::Error& e) {
    HostPool::instance().note_pinned_fallback();
    TORCH_WARN_ONCE("torchgc::offload: pinning ", nbytes, " bytes of host memory failed (", e.what_without_backtrace(),
                    "); falling back to pageable memory, which makes the copies synchronous");
    return HostPool::instance().empty(like.sizes(), like.scalar_type());
  }
}

// The pinned block must not be handed out again until the copy on `stream` that uses it is done.
// Blocks the pool adopted are recorded by their own pointer; any other host tensor (one from
// pin_memory(), or pageable memory) by its storage's, which the allocator ignores if not its own.
void record_host_use(const at::Tensor& host, const c10::cuda::CUDAStream& stream) {
  const c10::DataPtr* data = HostPool::adopted_block(host);
  if (data == nullptr) {
    data = &host.storage().data_ptr();
  }
  at::getHostAllocator(at::kCUDA)->record_event(data->get(), data->get_context(), stream.unwrap());
}

at::Tensor offload_cuda(const at::Tensor& x) {
  check_offload_input(x, "offload");
  c10::cuda::CUDAGuard guard(x.device());
  auto compute = c10::cuda::getCurrentCUDAStream(x.device().index());
  auto& state = device_state(x.device().index());
  auto src = x.contiguous();
  const size_t nbytes = src.numel() * src.element_size();
  auto host = host_buffer(src, nbytes);
  if (nbytes == 0) {
    return host;
  }
  order_after(compute, *state.copy_stream);
  C10_CUDA_CHECK(cudaMemcpyAsync(host.data_ptr(), src.data_ptr(), nbytes, cudaMemcpyDeviceToHost, *state.copy_stream));
  record_host_use(host, *state.copy_stream);
  // The compute stream may free and reuse src's block as soon as the caller drops it; this
  // delays reuse until the copy stream has read it.
  c10::cuda::CUDACachingAllocator::recordStream(src.storage().data_ptr(), *state.copy_stream);
  return host;
}

void wait_cuda(at::Tensor& x) {
  check_offload_input(x, "wait");
  auto& state = device_state(x.device().index());
  std::shared_ptr<at::cuda::CUDAEvent> done;
  {
    std::lock_guard<std::mutex> lock(state.pending_mutex);
    auto it = state.pending.find(x.storage().data_ptr().get());
    if (it == state.pending.end()) {
      return;
    }
    done = std::move(it->second);
    state.pending.erase(it);
  }
  done->block(c10::cuda::getCurrentCUDAStream(x.device().index()));
}

}  // namespace

at::Tensor reload_cuda(const at::Tensor& host, c10::Device device) {
  // Asked before any CUDA call, which would fail with a bare driver error without a usable GPU.
  const auto count = c10::cuda::device_count();
  TORCH_CHECK(count > 0, "torchgc::reload: expected argument 'device' to name an available device, got ", device,
              " but no CUDA GPU is available (torch.cuda.is_available() is False)");
  TORCH_CHECK(!device.has_index() || device.index() < count, "torchgc::reload: expected argument 'device' to name one of the ",
              count, " CUDA devices, got ", device);
  c10::cuda::CUDAGuard guard(device);
  const auto index = c10::cuda::current_device();
  auto compute = c10::cuda::getCurrentCUDAStream(index);
  auto& state = device_state(index);
  auto src = host.contiguous();
  // Allocated on the compute stream: its block may still be read by kernels queued there.
  auto out = at::empty(src.sizes(), src.options().device(c10::Device(c10::kCUDA, index)));
  const size_t nbytes = src.numel() * src.element_size();
  if (nbytes == 0) {
    return out;
  }
  order_after(compute, *state.copy_stream);
  C10_CUDA_CHECK(cudaMemcpyAsync(out.data_ptr(), src.data_ptr(), nbytes, cudaMemcpyHostToDevice, *state.copy_stream));
  record_host_use(src, *state.copy_stream);
  c10::cuda::CUDACachingAllocator::recordStream(out.storage().data_ptr(), *state.copy_stream);
  auto done = std::make_shared<at::cuda::CUDAEvent>();
  done->record(*state.copy_stream);
  std::lock_guard<std::mutex> lock(state.pending_mutex);
  state.pending[out.storage().data_ptr().get()] = std::move(done);
  return out;
}

}  // namespace torchgc

TORCH_LIBRARY_IMPL(torchgc, CUDA, m) {
  m.impl("offload", &torchgc::offload_cuda);
  m.impl("wait", &torchgc::wait_cuda);
}
