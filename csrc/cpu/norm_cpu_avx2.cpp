// The CPU norm kernels compiled for AVX2 + FMA + F16C (CMake adds the flags on x86-64 only);
// norm_cpu.cpp runs them when ATen reports an AVX2 or AVX-512 CPU.
#ifdef TORCHGC_NORM_AVX2
#define TORCHGC_NORM_ISA avx2
#include "cpu/norm_cpu_kernel.h"
#endif
