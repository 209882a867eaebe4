// The CPU norm ops (their bodies are in norm.cpp). The kernels come from norm_kernels.cpp, compiled
// once per instruction set; the copy to run is picked once, from ATen's CPU capability (so
// ATEN_CPU_CAPABILITY=default selects the baseline one, as it does for torch's own kernels).
#include <ATen/Version.h>
#include <torch/library.h>

#include "cpu/norm_kernels.h"

namespace torchgc {
namespace {

const NormKernels& cpu_kernels() {
  static const NormKernels& kernels = []() -> const NormKernels& {
#ifdef TORCHGC_NORM_AVX2
    const auto isa = at::get_cpu_capability();
    if (isa == "AVX2" || isa == "AVX512") {
      return norm_cpu::avx2::kernels();
    }
#endif
    return norm_cpu::base::kernels();
  }();
  return kernels;
}

}  // namespace
}  // namespace torchgc

TORCH_LIBRARY_IMPL(torchgc, CPU, m) { torchgc::register_norm_ops<&torchgc::cpu_kernels>(m); }
