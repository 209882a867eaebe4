#pragma once
// The CPU norm kernels of norm_kernels.cpp, which CMake compiles once per instruction set; each
// copy is defined in its own namespace. avx2 is built on x86-64 only (TORCHGC_NORM_AVX2).
#include "torchgc/norm.h"

namespace torchgc::norm_cpu {

namespace base {
const NormKernels& kernels();
}  // namespace base

namespace avx2 {
const NormKernels& kernels();
}  // namespace avx2

}  // namespace torchgc::norm_cpu
