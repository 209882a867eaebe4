#pragma once
// The offload ops' shared parts. ops.cpp holds the schemas; each library registers its offload and
// wait kernels; offload.cpp routes reload, which dispatches on its host (CPU) argument, to the
// reload of its target device.
#include "torchgc/stable.h"

namespace torchgc {

inline void check_offload_input(const Tensor& x, const char* op) {
  TORCHGC_CHECK(x.defined(), "torchgc::", op, ": expected argument 'x' to be a defined tensor, got an undefined one");
  TORCHGC_CHECK(x.layout() == Layout::Strided, "torchgc::", op, ": expected argument 'x' to be a strided tensor, got layout ",
                x.layout());
}

// Defined in cpu/offload_cpu.cpp.
Tensor reload_cpu(const Tensor& host);

}  // namespace torchgc

// What the CPU library gives the CUDA library, which loads after it as a separate object: the host
// pool (one per process, whose counts host_pool_stats reports) and reload's CUDA path. Plain C
// types only, since the stable ABI's C++ types are private to each library (hidden visibility).
// Tensors pass as AtenTensorHandle; a returned handle is a new reference the caller owns.
extern "C" {
typedef AtenTensorHandle (*torchgc_device_reload)(AtenTensorHandle host, int32_t device_index, int32_t has_index);
__attribute__((visibility("default"))) void torchgc_set_device_reload(int32_t device_type, torchgc_device_reload reload);
// A tensor on `block`'s memory whose bytes count as in use while it lives (HostPool::adopt).
__attribute__((visibility("default"))) AtenTensorHandle torchgc_host_pool_adopt(AtenTensorHandle block);
// A pageable tensor like `like` from the pool (HostPool::empty_like).
__attribute__((visibility("default"))) AtenTensorHandle torchgc_host_pool_empty_like(AtenTensorHandle like);
__attribute__((visibility("default"))) void torchgc_host_pool_note_pinned_fallback();
}
