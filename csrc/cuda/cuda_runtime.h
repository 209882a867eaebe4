#pragma once
// The CUDA runtime calls the CUDA library makes, with torchgc's error messages: the compute stream
// torch uses, a device guard, and the status check. Host code only, so the offload kernels build
// with the host compiler against the CUDA headers that pip's nvidia packages ship (no nvcc).
#include <cuda_runtime_api.h>

#include "torchgc/stable.h"

namespace torchgc::cuda {

inline void check(cudaError_t status, const char* op, const char* what) {
  TORCHGC_CHECK(status == cudaSuccess, "torchgc::", op, ": ", what, " failed: ", cudaGetErrorString(status));
}

// The stream torch queues this device's work on now (torch.cuda.current_stream()).
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  TORCHGC_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
                "torchgc: cannot get torch's current CUDA stream of device ", device_index);
  return static_cast<cudaStream_t>(stream);
}

// Makes `device_index` the current device until the guard goes out of scope.
class DeviceGuard {
 public:
  DeviceGuard(int32_t device_index, const char* op) {
    check(cudaGetDevice(&previous_), op, "cudaGetDevice");
    if (previous_ != device_index) {
      check(cudaSetDevice(device_index), op, "cudaSetDevice");
    }
    current_ = device_index;
  }
  ~DeviceGuard() {
    if (previous_ != current_) {
      cudaSetDevice(previous_);
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  int current_ = 0;
};

}  // namespace torchgc::cuda
