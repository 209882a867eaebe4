#pragma once
// The offload ops' shared parts and device-specific halves. ops.cpp holds the schemas; each
// backend file registers its kernels; offload.cpp routes reload, which dispatches on its host
// (CPU) argument, to the reload_* of its target device.
#include <ATen/ATen.h>

namespace torchgc {

// Defined in offload.cpp.
void check_offload_input(const at::Tensor& x, const char* op);
// Defined in cpu/offload_cpu.cpp.
at::Tensor reload_cpu(const at::Tensor& host);
#ifdef TORCHGC_WITH_CUDA
// Defined in cuda/offload_cuda.cu.
at::Tensor reload_cuda(const at::Tensor& host, c10::Device device);
#endif

}  // namespace torchgc
