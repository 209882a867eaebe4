// CPU kernels of the fused norms (the op bodies are in norm.cpp). The kernels are
// in norm_cpu_kernel.h, compiled here for the baseline instruction set and in
// norm_cpu_avx2.cpp for AVX2; the copy to run is picked once, from ATen's CPU capability (so
// ATEN_CPU_CAPABILITY=default selects the baseline one, as it does for torch's own kernels).
#include <ATen/Version.h>
#include <torch/library.h>

#include "torchgc/norm.h"

#define TORCHGC_NORM_ISA base
#include "cpu/norm_cpu_kernel.h"
#undef TORCHGC_NORM_ISA

#ifdef TORCHGC_NORM_AVX2
namespace torchgc::norm_cpu::avx2 {
void rms_norm_forward(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, at::Tensor& rstd, double eps,
                      double offset, bool llama);
void rms_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                       at::Tensor& dx, at::Tensor& dw, double offset, bool llama);
void layer_norm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& y,
                        at::Tensor& mean, at::Tensor& rstd, double eps);
void layer_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& mean,
                         const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dw, at::Tensor& db);
}  // namespace torchgc::norm_cpu::avx2
#endif

namespace torchgc {
namespace {

const NormKernels& cpu_kernels() {
  static const NormKernels kernels = [] {
#ifdef TORCHGC_NORM_AVX2
    const auto isa = at::get_cpu_capability();
    if (isa == "AVX2" || isa == "AVX512") {
      namespace k = norm_cpu::avx2;
      return NormKernels{&k::rms_norm_forward, &k::rms_norm_backward, &k::layer_norm_forward, &k::layer_norm_backward};
    }
#endif
    namespace k = norm_cpu::base;
    return NormKernels{&k::rms_norm_forward, &k::rms_norm_backward, &k::layer_norm_forward, &k::layer_norm_backward};
  }();
  return kernels;
}

}  // namespace
}  // namespace torchgc

TORCH_LIBRARY_IMPL(torchgc, CPU, m) { torchgc::register_norm_ops<&torchgc::cpu_kernels>(m); }
