// CUDA kernels of the offload ops: the protocol of copy_engine.h on the CUDA runtime. One copy
// stream per device, created on the first copy to or from that device; copies are ordered against
// the compute stream by events only, and nothing here synchronizes the host. Built by the host
// compiler: no nvcc needed.
#include <array>
#include <memory>
#include <mutex>
#include <vector>

#include "cuda/cuda_runtime.h"
#include "torchgc/copy_engine.h"
#include "torchgc/offload.h"

namespace torchgc {
namespace {

// The CUDA runtime as copy_engine.h's Device, for one device. Buffers are tensors: holding one
// keeps its memory from going back to torch's allocators.
struct CudaRuntime {
  using Stream = cudaStream_t;
  using Event = cudaEvent_t;
  using Buffer = Tensor;

  int32_t device_index;
  std::vector<cudaEvent_t> free_events;

  Event new_event() {
    if (!free_events.empty()) {
      Event event = free_events.back();
      free_events.pop_back();
      return event;
    }
    Event event = nullptr;
    cuda::check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "offload", "cudaEventCreateWithFlags");
    return event;
  }
  void recycle(Event event) { free_events.push_back(event); }
  void record(Event event, Stream stream) { cuda::check(cudaEventRecord(event, stream), "offload", "cudaEventRecord"); }
  void wait(Stream stream, Event event) { cuda::check(cudaStreamWaitEvent(stream, event, 0), "offload", "cudaStreamWaitEvent"); }
  bool done(Event event) {
    const cudaError_t status = cudaEventQuery(event);
    if (status == cudaErrorNotReady) {
      return false;
    }
    cuda::check(status, "offload", "cudaEventQuery");
    return true;
  }
  void copy(const Buffer& dst, const Buffer& src, size_t nbytes, Stream stream) {
    cuda::check(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), nbytes, cudaMemcpyDefault, stream), "offload",
                "cudaMemcpyAsync");
  }
  static const void* key(const Buffer& buffer) { return buffer.data_ptr(); }
};

using Engine = CopyEngine<CudaRuntime>;

// The engine of a device, made with its copy stream on first use, so that only devices tensors
// live on get one (Unsloth's allocations on every visible GPU gave users "device busy" errors).
Engine& engine(int32_t device_index) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<Engine>> engines;
  std::lock_guard<std::mutex> lock(mutex);
  if (engines.size() <= static_cast<size_t>(device_index)) {
    engines.resize(device_index + 1);
  }
  auto& slot = engines[device_index];
  if (!slot) {
    cudaStream_t copy_stream = nullptr;
    cuda::check(cudaStreamCreateWithFlags(&copy_stream, cudaStreamNonBlocking), "offload", "cudaStreamCreateWithFlags");
    slot = std::make_unique<Engine>(CudaRuntime{device_index, {}}, copy_stream);
  }
  return *slot;
}

// Pinned memory from torch's caching host allocator; pageable memory if pinning fails (WSL2
// caps pinned memory), with one warning. The engine holds the block until its copy is done, so
// torch's allocator never hands it out while the copy runs.
Tensor host_buffer(const Tensor& like) {
  try {
    const Tensor pinned = torch::stable::empty(like.sizes(), like.scalar_type(), Layout::Strided, Device(DeviceType::CPU), true);
    return Tensor(torchgc_host_pool_adopt(pinned.get()));
  } catch (const std::exception& error) {
    torchgc_host_pool_note_pinned_fallback();
    static std::once_flag warned;
    std::call_once(warned, [&] {
      const std::string message = std::string("torchgc::offload: pinning host memory failed (") + error.what() +
                                  "); falling back to pageable memory, which makes the copies synchronous";
      aoti_torch_warn(__func__, __FILE__, __LINE__, message.c_str());
    });
    return Tensor(torchgc_host_pool_empty_like(like.get()));
  }
}

size_t nbytes_of(const Tensor& t) { return static_cast<size_t>(t.numel()) * t.element_size(); }

Tensor offload_cuda(Tensor x) {
  check_offload_input(x, "offload");
  const int32_t index = x.get_device_index();
  cuda::DeviceGuard guard(index, "offload");
  const cudaStream_t compute = cuda::current_stream(index);
  const Tensor src = torch::stable::contiguous(x);
  Tensor host = host_buffer(src);
  if (nbytes_of(src) > 0) {
    engine(index).copy(host, src, nbytes_of(src), compute, /*awaited=*/false);
  }
  return host;
}

void wait_cuda(Tensor x) {
  check_offload_input(x, "wait");
  const int32_t index = x.get_device_index();
  cuda::DeviceGuard guard(index, "wait");
  engine(index).wait(x, cuda::current_stream(index));
}

int32_t available_device(int32_t index, bool has_index) {
  const Device device(DeviceType::CUDA, has_index ? index : -1);
  int count = 0;
  // Asked before any other CUDA call, which would fail with a bare driver error without a GPU.
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear it: the runtime keeps the error of a failed call
    fail("torchgc::reload: expected argument 'device' to name an available device, got ", device,
         " but no CUDA GPU is available (torch.cuda.is_available() is False)");
  }
  if (!has_index) {
    cuda::check(cudaGetDevice(&index), "reload", "cudaGetDevice");
  }
  TORCHGC_CHECK(index < count, "torchgc::reload: expected argument 'device' to name one of the ", count,
                " CUDA devices, got ", device);
  return index;
}

Tensor reload_cuda(const Tensor& host, int32_t device_index, bool has_index) {
  const int32_t index = available_device(device_index, has_index);
  cuda::DeviceGuard guard(index, "reload");
  const cudaStream_t compute = cuda::current_stream(index);
  const Tensor src = torch::stable::contiguous(host);
  // Allocated on the compute stream: its block may still be read by kernels queued there, which
  // the engine's copy waits for.
  Tensor out = torch::stable::empty(src.sizes(), src.scalar_type(), Layout::Strided, Device(DeviceType::CUDA, index));
  if (nbytes_of(src) > 0) {
    engine(index).copy(out, src, nbytes_of(src), compute, /*awaited=*/true);
  }
  return out;
}

AtenTensorHandle reload_cuda_handle(AtenTensorHandle host, int32_t device_index, int32_t has_index) {
  return to_caller(reload_cuda(from_borrowed(host), device_index, has_index != 0));
}

// Registers reload's CUDA path with the CPU library when this library loads.
const bool registered = [] {
  torchgc_set_device_reload(static_cast<int32_t>(DeviceType::CUDA), &reload_cuda_handle);
  return true;
}();

}  // namespace
}  // namespace torchgc

STABLE_TORCH_LIBRARY_IMPL(torchgc, CUDA, m) {
  m.impl("offload", TORCH_BOX(&torchgc::offload_cuda));
  m.impl("wait", TORCH_BOX(&torchgc::wait_cuda));
}
