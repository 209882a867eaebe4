// The CPU norm ops (their bodies are in norm.cpp). The kernels come from norm_kernels.cpp, compiled
// once per instruction set. Which copy runs follows ATen's CPU capability, which Python passes in
// through use_cpu_capability when it loads the library (so ATEN_CPU_CAPABILITY=default selects the
// baseline copy, as it does for torch's own kernels); until then, the baseline one.
#include <atomic>
#include <string>

#include "cpu/norm_kernels.h"

namespace torchgc {
namespace {

std::atomic<const NormKernels*> selected{nullptr};

const NormKernels& cpu_kernels() {
  const NormKernels* kernels = selected.load();
  return kernels != nullptr ? *kernels : norm_cpu::base::kernels();
}

void use_cpu_capability(std::string capability) {
#ifdef TORCHGC_NORM_AVX2
  if (capability == "AVX2" || capability == "AVX512") {
    selected.store(&norm_cpu::avx2::kernels());
    return;
  }
#endif
  selected.store(&norm_cpu::base::kernels());
}

using CpuNormOps = NormOps<&cpu_kernels>;

}  // namespace
}  // namespace torchgc

STABLE_TORCH_LIBRARY_IMPL(torchgc, CPU, m) { TORCHGC_REGISTER_NORM_OPS(m, torchgc::CpuNormOps); }

STABLE_TORCH_LIBRARY_IMPL(torchgc, CompositeExplicitAutograd, m) {
  m.impl("use_cpu_capability", TORCH_BOX(&torchgc::use_cpu_capability));
}
