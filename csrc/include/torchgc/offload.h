#pragma once
// Device-specific halves of the offload ops. ops.cpp holds the schemas; each backend file
// registers its kernels; reload is routed here by its target device, since it dispatches on
// its host (CPU) argument.
#include <ATen/ATen.h>

namespace torchgc {

void check_offload_input(const at::Tensor& x, const char* op);
at::Tensor reload_cpu(const at::Tensor& host);
#ifdef TORCHGC_WITH_CUDA
at::Tensor reload_cuda(const at::Tensor& host, c10::Device device);
#endif

}  // namespace torchgc
