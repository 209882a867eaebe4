#pragma once
// Per-row arithmetic of the fused norms, shared by the CPU kernels (scalar and SIMD) and the
// CUDA kernels, so the C++ tests check the formulas the GPU runs. `A` is the math type (float,
// or double for float64 inputs); `V` is A or a SIMD vector of A.
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TORCHGC_NORM_HD __host__ __device__ __forceinline__
#else
#define TORCHGC_NORM_HD inline
#endif

namespace torchgc::norm {
// Internal linkage on purpose: the CPU kernels are compiled once per instruction set, and each
// copy must keep its own instantiations (a shared one could run AVX2 code on a CPU without it).
namespace {

template <typename A>
TORCHGC_NORM_HD A inv_sqrt(A v) {
#if defined(__CUDA_ARCH__)
  // Not rsqrtf: it is approximate, and rstd feeds every output of the row.
  return A(1) / sqrt(v);
#else
  return A(1) / std::sqrt(v);
#endif
}

// rstd of a row from its sum of squares (RMSNorm) or of squared deviations (LayerNorm), as
// rsqrt(mean + eps), the order HF and torch use.
template <typename A>
TORCHGC_NORM_HD A row_rstd(A sum_sq, int64_t n, A eps) {
  return inv_sqrt(sum_sq / static_cast<A>(n) + eps);
}

// x rounded to T and back: the llama casting mode rounds the normalized row to x's dtype before
// the weight multiplies it, as HF's LlamaRMSNorm does.
template <typename T, typename A>
TORCHGC_NORM_HD A round_to(A v) {
  return static_cast<A>(static_cast<T>(v));
}

// RMSNorm forward: y = (x * rstd) * (offset + w). In llama mode `xhat` arrives rounded.
template <typename V>
TORCHGC_NORM_HD V rms_y(V xhat, V w, V offset) {
  return xhat * (w + offset);
}

// LayerNorm forward: y = (x - mean) * rstd * w + b.
template <typename V>
TORCHGC_NORM_HD V layer_y(V x, V mean, V rstd, V w, V b) {
  return (x - mean) * rstd * w + b;
}

// dx of both norms, from the row coefficients of the backward pass:
//   RMSNorm:   dx = rstd * (g*w' - xhat * mean(g*w'*xhat)),                 w' = offset + w
//   LayerNorm: dx = rstd * (g*w  - mean(g*w) - xhat * mean(g*w*xhat))
// `c0` is mean(g*w) (0 for RMSNorm) and `c1` is mean(g*w*xhat).
template <typename V>
TORCHGC_NORM_HD V norm_dx(V gw, V xhat, V rstd, V c0, V c1) {
  return rstd * (gw - (c0 + xhat * c1));
}

// p + offset, or null for an output the mask left out (null + offset is undefined behaviour).
template <typename P>
TORCHGC_NORM_HD P* offset_or_null(P* p, int64_t offset) {
  return p == nullptr ? nullptr : p + offset;
}

// Rows [part * rows_per_part, ...) form one part of the weight-gradient reduction. The split
// depends on the row count only, never on thread or SM counts, so dweight has the same bits on
// every run.
struct RowPartition {
  int64_t parts;
  int64_t rows_per_part;
};

TORCHGC_NORM_HD RowPartition partition_rows(int64_t rows, int64_t min_rows_per_part, int64_t max_parts) {
  int64_t per = (rows + max_parts - 1) / max_parts;
  per = per < min_rows_per_part ? min_rows_per_part : per;
  return {(rows + per - 1) / per, per};
}

// Sums load(0), ..., load(n - 1) in a fixed pairwise order: rounding error grows with log(n)
// rather than n, and the order never depends on the hardware. Leaves of 8 are summed in turn;
// complete subtrees are merged like a binary counter.
template <typename V, typename Load>
TORCHGC_NORM_HD V pairwise_sum(int64_t n, const Load& load) {
  constexpr int64_t kLeaf = 8;
  V stack[64];
  int top = 0;
  for (int64_t block = 0; block * kLeaf < n; ++block) {
    const int64_t begin = block * kLeaf;
    const int64_t end = begin + kLeaf < n ? begin + kLeaf : n;
    V s = load(begin);
    for (int64_t i = begin + 1; i < end; ++i) {
      s = s + load(i);
    }
    for (int64_t done = block; done & 1; done >>= 1) {
      s = stack[--top] + s;
    }
    stack[top++] = s;
  }
  if (top == 0) {
    return V{};
  }
  V total = stack[top - 1];
  for (int i = top - 2; i >= 0; --i) {
    total = stack[i] + total;
  }
  return total;
}

// Column j of a [parts, n] row-major buffer of per-part sums.
template <typename A>
struct ColumnOf {
  const A* base;
  int64_t stride;
  TORCHGC_NORM_HD A operator()(int64_t part) const { return base[part * stride]; }
};

}  // namespace
}  // namespace torchgc::norm
