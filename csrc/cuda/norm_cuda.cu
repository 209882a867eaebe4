// CUDA kernels of the fused norms. A row is handled by one warp (short rows) or one block (long
// rows); each thread reads 16-byte packs when every pointer is aligned and the row length is a
// multiple of the pack, and single elements otherwise. Sums are in the math type (fp32, or fp64
// for float64 x) with warp shuffles. The weight gradient is reduced in two stages with no
// atomics: each row group owns a row of a [groups, hidden] buffer, then a second kernel sums
// each column over the groups in a fixed pairwise order.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda/cuda_runtime.h"
#include "torchgc/norm.h"
#include "torchgc/norm_row.h"

namespace torchgc {
namespace {

// The most threads row_launch gives a block. Declared to the compiler so it keeps every kernel
// within the registers that a block this large can have (the backward kernels otherwise take up
// to 80 per thread, and a 1024-thread launch fails).
constexpr int kMaxThreads = 1024;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* base, int64_t i) {
  return reinterpret_cast<const Pack<T, N>*>(base)[i];
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* base, int64_t i, const Pack<T, N>& p) {
  reinterpret_cast<Pack<T, N>*>(base)[i] = p;
}

// Packs of an output the mask may have left out (null): loads give zeros, stores do nothing.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack_or_zero(const T* base, int64_t i) {
  return base == nullptr ? Pack<T, N>{} : load_pack<T, N>(base, i);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack_if(T* base, int64_t i, const Pack<T, N>& p) {
  if (base != nullptr) {
    store_pack<T, N>(base, i, p);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the threads sharing a row: one warp (tpr == 32) or the whole block. Every warp ends
// with the same total, summed in the same order.
template <typename A>
__device__ __forceinline__ A row_sum(A v, int tpr, A* shared) {
  v = warp_sum(v);
  if (tpr == 32) {
    return v;
  }
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) {
    shared[warp] = v;
  }
  __syncthreads();
  return warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : A(0));
}

// This thread's share of sum(term(x_j)) over a row: packs lane, lane + tpr, ...
template <typename A, int VEC, typename T, typename Term>
__device__ __forceinline__ A thread_row_sum(const T* xr, int64_t packs, int lane, int tpr, const Term& term) {
  A s = 0;
  for (int64_t i = lane; i < packs; i += tpr) {
    const auto p = load_pack<T, VEC>(xr, i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s += term(static_cast<A>(p.v[k]));
    }
  }
  return s;
}

// Calls body(row, lane) for each row of this thread's row group (a warp when tpr == 32, else
// the block), striding over the grid; lane is the thread's index within the group.
template <typename Body>
__device__ __forceinline__ void for_each_row(int64_t rows, int tpr, const Body& body) {
  const int rows_per_block = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr; row < rows;
       row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    body(row, lane);
  }
}

// Weight-gradient split: row group `group` (a warp or the block) takes rows
// [group * rows_per_group, ...) in order and calls body(group, row, lane) for each; it
// accumulates into row `group` of the part buffers, and each thread owns the same columns for
// every row, so there are no races and no atomics.
template <typename Body>
__device__ __forceinline__ void for_each_group_row(int64_t rows, int tpr, int64_t groups, int64_t rows_per_group,
                                                   const Body& body) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  if (group >= groups) {
    return;  // a whole warp (warp mode only: in block mode there is one group per block)
  }
  const int lane = threadIdx.x % tpr;
  const int64_t end = rows < (group + 1) * rows_per_group ? rows : (group + 1) * rows_per_group;
  for (int64_t row = group * rows_per_group; row < end; ++row) {
    body(group, row, lane);
  }
}

template <typename T, typename O, typename A, int VEC>
__global__ void __launch_bounds__(kMaxThreads) rms_forward_kernel(const T* __restrict__ x, const A* __restrict__ w, O* __restrict__ y,
                                   A* __restrict__ rstd, int64_t rows, int64_t n, A eps, A offset, bool llama,
                                   int tpr) {
  __shared__ A red[32];
  const int64_t packs = n / VEC;
  for_each_row(rows, tpr, [&](int64_t row, int lane) {
    const T* xr = x + row * n;
    const A ss = thread_row_sum<A, VEC>(xr, packs, lane, tpr, [](A v) { return v * v; });
    const A rs = norm::row_rstd(row_sum(ss, tpr, red), n, eps);
    if (lane == 0) {
      rstd[row] = rs;
    }
    for (int64_t i = lane; i < packs; i += tpr) {
      const auto p = load_pack<T, VEC>(xr, i);
      const auto wp = load_pack<A, VEC>(w, i);
      Pack<O, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        A xhat = static_cast<A>(p.v[k]) * rs;
        if (llama) {
          xhat = norm::round_to<T>(xhat);
        }
        out.v[k] = static_cast<O>(norm::rms_y(xhat, wp.v[k], offset));
      }
      store_pack<O, VEC>(y + row * n, i, out);
    }
  });
}

template <typename T, typename O, typename A, int VEC>
__global__ void __launch_bounds__(kMaxThreads) layer_forward_kernel(const T* __restrict__ x, const A* __restrict__ w, const A* __restrict__ b,
                                     O* __restrict__ y, A* __restrict__ mean, A* __restrict__ rstd, int64_t rows,
                                     int64_t n, A eps, int tpr) {
  __shared__ A red[32];
  const int64_t packs = n / VEC;
  for_each_row(rows, tpr, [&](int64_t row, int lane) {
    const T* xr = x + row * n;
    // Mean first, then squared deviations: no cancellation for rows with a large mean. The
    // second and third reads of the row hit L1/L2.
    const A s = thread_row_sum<A, VEC>(xr, packs, lane, tpr, [](A v) { return v; });
    const A mu = row_sum(s, tpr, red) / static_cast<A>(n);
    const A ss = thread_row_sum<A, VEC>(xr, packs, lane, tpr, [mu](A v) { return (v - mu) * (v - mu); });
    const A rs = norm::row_rstd(row_sum(ss, tpr, red), n, eps);
    if (lane == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
    for (int64_t i = lane; i < packs; i += tpr) {
      const auto p = load_pack<T, VEC>(xr, i);
      const auto wp = load_pack<A, VEC>(w, i);
      const auto bp = load_pack<A, VEC>(b, i);
      Pack<O, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.v[k] = static_cast<O>(norm::layer_y(static_cast<A>(p.v[k]), mu, rs, wp.v[k], bp.v[k]));
      }
      store_pack<O, VEC>(y + row * n, i, out);
    }
  });
}

template <typename T, typename G, typename A, int VEC>
__global__ void __launch_bounds__(kMaxThreads) rms_backward_kernel(const G* __restrict__ g, const T* __restrict__ x, const A* __restrict__ w,
                                    const A* __restrict__ rstd, T* __restrict__ dx, A* __restrict__ part,
                                    int64_t rows, int64_t n, A offset, bool llama, int tpr, int64_t groups,
                                    int64_t rows_per_group) {
  __shared__ A red[32];
  const int64_t packs = n / VEC;
  for_each_group_row(rows, tpr, groups, rows_per_group, [&](int64_t group, int64_t row, int lane) {
    A* pw = norm::offset_or_null(part, group * n);
    T* dxr = norm::offset_or_null(dx, row * n);
    const T* xr = x + row * n;
    const G* gr = g + row * n;
    const A rs = rstd[row];
    A c1 = 0;
    if (dxr != nullptr) {
      A dot = 0;
      for (int64_t i = lane; i < packs; i += tpr) {
        const auto xp = load_pack<T, VEC>(xr, i);
        const auto gp = load_pack<G, VEC>(gr, i);
        const auto wp = load_pack<A, VEC>(w, i);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dot += static_cast<A>(gp.v[k]) * (wp.v[k] + offset) * static_cast<A>(xp.v[k]);
        }
      }
      c1 = row_sum(dot, tpr, red) * rs / static_cast<A>(n);
    }
    for (int64_t i = lane; i < packs; i += tpr) {
      const auto xp = load_pack<T, VEC>(xr, i);
      const auto gp = load_pack<G, VEC>(gr, i);
      const auto wp = load_pack<A, VEC>(w, i);
      auto acc = load_pack_or_zero<A, VEC>(pw, i);
      Pack<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A gk = static_cast<A>(gp.v[k]);
        A xhat = static_cast<A>(xp.v[k]) * rs;
        out.v[k] = static_cast<T>(norm::norm_dx(gk * (wp.v[k] + offset), xhat, rs, A(0), c1));
        if (llama) {
          xhat = norm::round_to<T>(xhat);
        }
        acc.v[k] += gk * xhat;
      }
      store_pack_if<T, VEC>(dxr, i, out);
      store_pack_if<A, VEC>(pw, i, acc);
    }
  });
}

template <typename T, typename G, typename A, int VEC>
__global__ void __launch_bounds__(kMaxThreads) layer_backward_kernel(const G* __restrict__ g, const T* __restrict__ x, const A* __restrict__ w,
                                      const A* __restrict__ mean, const A* __restrict__ rstd, T* __restrict__ dx,
                                      A* __restrict__ part_w, A* __restrict__ part_b, int64_t rows, int64_t n,
                                      int tpr, int64_t groups, int64_t rows_per_group) {
  __shared__ A red[32];
  const int64_t packs = n / VEC;
  for_each_group_row(rows, tpr, groups, rows_per_group, [&](int64_t group, int64_t row, int lane) {
    A* pw = norm::offset_or_null(part_w, group * n);
    A* pb = norm::offset_or_null(part_b, group * n);
    T* dxr = norm::offset_or_null(dx, row * n);
    const T* xr = x + row * n;
    const G* gr = g + row * n;
    const A mu = mean[row];
    const A rs = rstd[row];
    A c0 = 0, c1 = 0;
    if (dxr != nullptr) {
      A sum_gw = 0, sum_gwx = 0;
      for (int64_t i = lane; i < packs; i += tpr) {
        const auto xp = load_pack<T, VEC>(xr, i);
        const auto gp = load_pack<G, VEC>(gr, i);
        const auto wp = load_pack<A, VEC>(w, i);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A gw = static_cast<A>(gp.v[k]) * wp.v[k];
          sum_gw += gw;
          sum_gwx += gw * ((static_cast<A>(xp.v[k]) - mu) * rs);
        }
      }
      c0 = row_sum(sum_gw, tpr, red) / static_cast<A>(n);
      c1 = row_sum(sum_gwx, tpr, red) / static_cast<A>(n);
    }
    for (int64_t i = lane; i < packs; i += tpr) {
      const auto xp = load_pack<T, VEC>(xr, i);
      const auto gp = load_pack<G, VEC>(gr, i);
      const auto wp = load_pack<A, VEC>(w, i);
      auto acc_w = load_pack_or_zero<A, VEC>(pw, i);
      auto acc_b = load_pack_or_zero<A, VEC>(pb, i);
      Pack<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A gk = static_cast<A>(gp.v[k]);
        const A xhat = (static_cast<A>(xp.v[k]) - mu) * rs;
        out.v[k] = static_cast<T>(norm::norm_dx(gk * wp.v[k], xhat, rs, c0, c1));
        acc_w.v[k] += gk * xhat;
        acc_b.v[k] += gk;
      }
      store_pack_if<T, VEC>(dxr, i, out);
      store_pack_if<A, VEC>(pw, i, acc_w);
      store_pack_if<A, VEC>(pb, i, acc_b);
    }
  });
}

template <typename A>
__global__ void sum_parts_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t parts, int64_t n) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < n) {
    out[j] = norm::pairwise_sum<A>(parts, norm::ColumnOf<A>{part + j, n});
  }
}

// Threads per row and per block: a warp per row while a lane has at most 4 packs to read, else a
// block per row with about 4 packs per thread.
struct RowLaunch {
  int threads;
  int tpr;
};

RowLaunch row_launch(int64_t packs) {
  if (packs <= 128) {
    return {128, 32};
  }
  int64_t t = ((packs + 3) / 4 + 31) / 32 * 32;
  t = t < 64 ? 64 : (t > kMaxThreads ? kMaxThreads : t);
  return {static_cast<int>(t), static_cast<int>(t)};
}

int grid_for(int64_t units) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 24;  // grid-stride loops cover the rest
  return static_cast<int>(units < kMaxBlocks ? units : kMaxBlocks);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls fn(std::integral_constant<int, VEC>) with VEC = 16 / sizeof(T) when n and every pointer
// allow whole 16-byte packs of T (and matching packs of the other types), else with VEC = 1.
template <typename T, typename Fn>
void dispatch_vec(int64_t n, const std::vector<std::pair<const void*, size_t>>& ptrs, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = n % kVec == 0;
  for (const auto& [p, elem] : ptrs) {
    ok = ok && aligned(p, elem * kVec);
  }
  if (ok) {
    fn(std::integral_constant<int, kVec>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

void check_launch(const char* op) { cuda::check(cudaGetLastError(), op, "the kernel launch"); }

template <typename A>
void sum_parts(const Tensor& part, Tensor& out, cudaStream_t stream) {
  const int64_t parts = part.size(0);
  const int64_t n = part.size(1);
  sum_parts_kernel<A><<<static_cast<int>((n + 255) / 256), 256, 0, stream>>>(data_of<A>(part), data_or_null<A>(out), parts, n);
  check_launch("norm backward");
}

// Row groups of the weight-gradient reduction. The split depends on the row count only, not on
// the launch shape (which depends on alignment), so dweight has the same bits for the same values.
// With nothing to reduce (frozen weights), every row is a group of its own, for parallelism; at
// most 2^24 groups, which grid_for's blocks cover in either launch mode.
norm::RowPartition cuda_partition(int64_t rows, bool reduce) {
  return reduce ? norm::partition_rows(rows, 4, 1024) : norm::partition_rows(rows, 1, int64_t{1} << 24);
}

// Where and how a launcher's kernel runs: grid, threads per block and per row, the problem
// size, the stream, and (backward only) the weight-gradient split with its zeroed buffers.
struct LaunchShape {
  dim3 grid;
  RowLaunch rl;
  int64_t rows;
  int64_t n;
  cudaStream_t stream;
  norm::RowPartition split{};
  std::vector<Tensor> parts{};
};

// Launchers, in the NormKernels shape: inputs contiguous, parameters in the math dtype, outputs
// allocated (norm.cpp's rms_norm_with and friends prepare them).
// Picks the types and pack width (x, y and `params`, in the math dtype, must allow whole packs)
// and the launch shape, then lets `launch` launch its forward kernel.
template <typename Launch>
void run_forward(const Tensor& x, const Tensor& y, std::initializer_list<const Tensor*> params, Launch&& launch) {
  cuda::DeviceGuard guard(x.get_device_index(), "norm forward");
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const cudaStream_t stream = cuda::current_stream(x.get_device_index());
  dispatch_norm_types(x.scalar_type(), y.scalar_type(), [&](auto t, auto o, auto acc) {
    std::vector<std::pair<const void*, size_t>> ptrs{{x.data_ptr(), sizeof(t)}, {y.data_ptr(), sizeof(o)}};
    for (const Tensor* p : params) {
      ptrs.emplace_back(p->data_ptr(), sizeof(acc));
    }
    dispatch_vec<decltype(t)>(n, ptrs, [&](auto vec) {
      const auto rl = row_launch(n / decltype(vec)::value);
      const int64_t rows_per_block = rl.threads / rl.tpr;
      const LaunchShape shape{dim3(grid_for((rows + rows_per_block - 1) / rows_per_block)), rl, rows, n, stream};
      launch(t, o, acc, vec, shape);
      check_launch("norm forward");
    });
  });
}

void rms_forward(const Tensor& x, const Tensor& w, Tensor& y, Tensor& rstd, double eps, double offset, bool llama) {
  run_forward(x, y, {&w}, [&](auto t, auto o, auto acc, auto vec, const LaunchShape& s) {
    using T = decltype(t);
    using O = decltype(o);
    using A = decltype(acc);
    rms_forward_kernel<T, O, A, decltype(vec)::value><<<s.grid, s.rl.threads, 0, s.stream>>>(
        data_of<T>(x), data_of<A>(w), data_or_null<O>(y), data_or_null<A>(rstd), s.rows,
        s.n, static_cast<A>(eps), static_cast<A>(offset), llama, s.rl.tpr);
  });
}

void layer_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y, Tensor& mean, Tensor& rstd,
                   double eps) {
  run_forward(x, y, {&w, &b}, [&](auto t, auto o, auto acc, auto vec, const LaunchShape& s) {
    using T = decltype(t);
    using O = decltype(o);
    using A = decltype(acc);
    layer_forward_kernel<T, O, A, decltype(vec)::value><<<s.grid, s.rl.threads, 0, s.stream>>>(
        data_of<T>(x), data_of<A>(w), data_of<A>(b), data_or_null<O>(y), data_or_null<A>(mean), data_or_null<A>(rstd),
        s.rows, s.n, static_cast<A>(eps), s.rl.tpr);
  });
}

// Picks the types and pack width, gives `launch` one zeroed [groups, hidden] buffer per output
// in `reduced` (shape.parts; an undefined one for an output the mask left out) to launch its
// kernel with, then reduces each into its output.
template <typename Launch>
void run_backward(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& dx,
                  std::initializer_list<Tensor*> reduced, Launch&& launch) {
  cuda::DeviceGuard guard(x.get_device_index(), "norm backward");
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const cudaStream_t stream = cuda::current_stream(x.get_device_index());
  dispatch_norm_types(x.scalar_type(), g.scalar_type(), [&](auto t, auto gt, auto acc) {
    using T = decltype(t);
    using G = decltype(gt);
    using A = decltype(acc);
    dispatch_vec<T>(n, {{x.data_ptr(), sizeof(T)}, {g.data_ptr(), sizeof(G)}, {w.data_ptr(), sizeof(A)},
                        {data_or_null<T>(dx), sizeof(T)}},
                    [&](auto vec) {
                      const auto rl = row_launch(n / decltype(vec)::value);
                      const bool reduce = std::any_of(reduced.begin(), reduced.end(),
                                                      [](const Tensor* out) { return out->defined(); });
                      const auto split = cuda_partition(rows, reduce);
                      const int64_t groups_per_block = rl.threads / rl.tpr;
                      LaunchShape shape{dim3(grid_for((split.parts + groups_per_block - 1) / groups_per_block)), rl,
                                        rows, n, stream, split};
                      const std::vector<int64_t> part_sizes{split.parts, n};
                      for (const Tensor* out : reduced) {
                        shape.parts.push_back(out->defined() ? torch::stable::new_zeros(*out, part_sizes) : Tensor());
                      }
                      launch(t, gt, acc, vec, shape);
                      check_launch("norm backward");
                      size_t i = 0;
                      for (Tensor* out : reduced) {
                        if (out->defined()) {
                          sum_parts<A>(shape.parts[i], *out, stream);
                        }
                        ++i;
                      }
                    });
  });
}

void rms_backward(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw,
                  double offset, bool llama) {
  run_backward(g, x, w, dx, {&dw}, [&](auto t, auto gt, auto acc, auto vec, const LaunchShape& s) {
    using T = decltype(t);
    using G = decltype(gt);
    using A = decltype(acc);
    rms_backward_kernel<T, G, A, decltype(vec)::value><<<s.grid, s.rl.threads, 0, s.stream>>>(
        data_of<G>(g), data_of<T>(x), data_of<A>(w), data_of<A>(rstd),
        data_or_null<T>(dx), data_or_null<A>(s.parts[0]), s.rows, s.n, static_cast<A>(offset), llama,
        s.rl.tpr, s.split.parts, s.split.rows_per_part);
  });
}

void layer_backward(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& mean, const Tensor& rstd,
                    Tensor& dx, Tensor& dw, Tensor& db) {
  run_backward(g, x, w, dx, {&dw, &db}, [&](auto t, auto gt, auto acc, auto vec, const LaunchShape& s) {
    using T = decltype(t);
    using G = decltype(gt);
    using A = decltype(acc);
    layer_backward_kernel<T, G, A, decltype(vec)::value><<<s.grid, s.rl.threads, 0, s.stream>>>(
        data_of<G>(g), data_of<T>(x), data_of<A>(w), data_of<A>(mean),
        data_of<A>(rstd), data_or_null<T>(dx), data_or_null<A>(s.parts[0]), data_or_null<A>(s.parts[1]),
        s.rows, s.n, s.rl.tpr, s.split.parts, s.split.rows_per_part);
  });
}

const NormKernels& cuda_kernels() {
  static const NormKernels kernels{&rms_forward, &rms_backward, &layer_forward, &layer_backward};
  return kernels;
}

using CudaNormOps = NormOps<&cuda_kernels>;

}  // namespace
}  // namespace torchgc

STABLE_TORCH_LIBRARY_IMPL(torchgc, CUDA, m) { TORCHGC_REGISTER_NORM_OPS(m, torchgc::CudaNormOps); }
