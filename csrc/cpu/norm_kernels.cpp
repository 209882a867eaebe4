// CPU kernels of the fused norms. CMake compiles this file once per instruction set, each copy
// with its own TORCHGC_NORM_ISA namespace and flags (baseline; AVX2 + FMA + F16C on x86-64), and
// norm_cpu.cpp picks one at run time. Inputs arrive validated, contiguous and with the weight
// (and bias) already in the math type A. Rows run in parallel on torch's own thread pool.
#include <algorithm>
#include <array>
#include <type_traits>

#include "cpu/norm_kernels.h"
#include "cpu/simd.h"
#include "torchgc/norm.h"
#include "torchgc/norm_row.h"

#ifndef TORCHGC_NORM_ISA
#error "CMake defines TORCHGC_NORM_ISA, the namespace of this copy of the kernels"
#endif

namespace torchgc::norm_cpu::TORCHGC_NORM_ISA {
namespace {

using norm::norm_dx;
using norm::row_rstd;
using fVec = simd::f32x8;
using simd::fmadd;
using simd::hsum;
constexpr int64_t kF = simd::kLanes;
// Elements per SIMD step: two float vectors, for two independent chains of adds.
constexpr int64_t kStep = 2 * kF;

inline fVec loadu(const float* p) { return simd::load(p); }

template <typename T>
inline void load2(const T* p, fVec& a, fVec& b) {
  a = simd::load(p);
  b = simd::load(p + kF);
}

template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b) {
  simd::store(p, a);
  simd::store(p + kF, b);
}

// a and b rounded to T and back (the llama casting mode).
template <typename T>
inline void round2(fVec& a, fVec& b) {
  a = simd::round_to<T>(a);
  b = simd::round_to<T>(b);
}

template <typename F>
inline void parallel_rows(int64_t begin, int64_t end, int64_t grain, const F& f) {
  torch::stable::parallel_for(begin, end, grain, f);
}

// Elements [0, vec_end) take the SIMD path; the rest (all of them for float64) the scalar one.
template <typename T, typename A>
inline int64_t vec_end(int64_t n) {
  return std::is_same_v<A, float> ? n - n % kStep : 0;
}

// Rows per parallel task: enough elements to amortize the task.
inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// Sum over a row of term(x_j): SIMD lanes first, then the scalar tail. `term` takes fVec or A.
template <typename A, typename T, typename Term>
A row_sum(const T* xr, int64_t n, const Term& term) {
  const int64_t nv = vec_end<T, A>(n);
  A s = 0;
  if constexpr (std::is_same_v<A, float>) {
    fVec s0 = simd::splat(0.f), s1 = simd::splat(0.f), a, b;
    for (int64_t j = 0; j < nv; j += kStep) {
      load2(xr + j, a, b);
      s0 = s0 + term(a);
      s1 = s1 + term(b);
    }
    s = hsum(s0 + s1);
  }
  for (int64_t j = nv; j < n; ++j) {
    s += term(static_cast<A>(xr[j]));
  }
  return s;
}

template <bool LLAMA, typename T, typename O, typename A>
void rms_forward_rows(const T* x, const A* w, O* y, A* rstd, int64_t rows, int64_t n, A eps, A offset) {
  parallel_rows(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      O* yr = y + r * n;
      const int64_t nv = vec_end<T, A>(n);
      const A rs = row_rstd(row_sum<A>(xr, n, [](auto v) { return v * v; }), n, eps);
      rstd[r] = rs;
      if constexpr (std::is_same_v<A, float>) {
        const fVec rv = simd::splat(rs), ov = simd::splat(offset);
        for (int64_t j = 0; j < nv; j += kStep) {
          fVec a, b;
          load2(xr + j, a, b);
          a = a * rv;
          b = b * rv;
          if constexpr (LLAMA) {
            round2<T>(a, b);
          }
          store2(yr + j, norm::rms_y(a, loadu(w + j), ov), norm::rms_y(b, loadu(w + j + kF), ov));
        }
      }
      for (int64_t j = nv; j < n; ++j) {
        A xhat = static_cast<A>(xr[j]) * rs;
        if constexpr (LLAMA) {
          xhat = norm::round_to<T>(xhat);
        }
        yr[j] = static_cast<O>(norm::rms_y(xhat, w[j], offset));
      }
    }
  });
}

template <typename T, typename O, typename A>
void layer_forward_rows(const T* x, const A* w, const A* bias, O* y, A* mean, A* rstd, int64_t rows, int64_t n, A eps) {
  parallel_rows(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      O* yr = y + r * n;
      const int64_t nv = vec_end<T, A>(n);
      // Two passes (mean, then squared deviations): no cancellation for rows with a large mean.
      const A mu = row_sum<A>(xr, n, [](auto v) { return v; }) / static_cast<A>(n);
      const A rs = row_rstd(row_sum<A>(xr, n, [mu](auto v) {
                              const auto d = v - mu;
                              return d * d;
                            }),
                            n, eps);
      mean[r] = mu;
      rstd[r] = rs;
      if constexpr (std::is_same_v<A, float>) {
        const fVec mv = simd::splat(mu), rv = simd::splat(rs);
        fVec a, b;
        for (int64_t j = 0; j < nv; j += kStep) {
          load2(xr + j, a, b);
          store2(yr + j, norm::layer_y(a, mv, rv, loadu(w + j), loadu(bias + j)),
                 norm::layer_y(b, mv, rv, loadu(w + j + kF), loadu(bias + j + kF)));
        }
      }
      for (int64_t j = nv; j < n; ++j) {
        yr[j] = static_cast<O>(norm::layer_y(static_cast<A>(xr[j]), mu, rs, w[j], bias[j]));
      }
    }
  });
}

// Second stage of the weight-gradient reduction: out[j] = pairwise sum over parts of
// part[p][j]. Columns run in parallel; each column's order is fixed.
template <typename A>
void sum_parts(const A* part, A* out, int64_t parts, int64_t n) {
  constexpr int64_t kCols = 256;
  parallel_rows(0, (n + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t j0 = c * kCols;
      const int64_t j1 = std::min(n, j0 + kCols);
      int64_t j = j0;
      if constexpr (std::is_same_v<A, float>) {
        for (; j + kF <= j1; j += kF) {
          const float* col = part + j;
          simd::store(out + j, norm::pairwise_sum<fVec>(parts, [&](int64_t p) { return loadu(col + p * n); }));
        }
      }
      for (; j < j1; ++j) {
        out[j] = norm::pairwise_sum<A>(parts, norm::ColumnOf<A>{part + j, n});
      }
    }
  });
}

// Rows are cut into fixed parts (by row count only); each part accumulates its dweight (and
// dbias) row by row into its own row of `part`, so the result does not depend on threads.
inline norm::RowPartition cpu_partition(int64_t rows) { return norm::partition_rows(rows, 32, 256); }

// Calls row(r, acc) for every row, where acc[k] is the k-th accumulator row (length n) of r's
// part, then sums each accumulator over the parts into outs[k]. A null outs[k] (an output the
// mask left out) gets no accumulator (acc[k] is null); with none, the rows just run in parallel.
template <size_t K, typename A, typename Row>
void reduce_rows_by_part(int64_t rows, int64_t n, const std::array<A*, K>& outs, const Row& row) {
  if (std::all_of(outs.begin(), outs.end(), [](const A* out) { return out == nullptr; })) {
    parallel_rows(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        row(r, std::array<A*, K>{});
      }
    });
    return;
  }
  const auto split = cpu_partition(rows);
  std::array<std::vector<A>, K> part;
  for (size_t k = 0; k < K; ++k) {
    if (outs[k] != nullptr) {
      part[k].assign(static_cast<size_t>(split.parts * n), A(0));
    }
  }
  parallel_rows(0, split.parts, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t p = pbegin; p < pend; ++p) {
      std::array<A*, K> acc{};
      for (size_t k = 0; k < K; ++k) {
        acc[k] = outs[k] != nullptr ? part[k].data() + p * n : nullptr;
      }
      const int64_t rend = std::min(rows, (p + 1) * split.rows_per_part);
      for (int64_t r = p * split.rows_per_part; r < rend; ++r) {
        row(r, acc);
      }
    }
  });
  for (size_t k = 0; k < K; ++k) {
    if (outs[k] != nullptr) {
      sum_parts(part[k].data(), outs[k], split.parts, n);
    }
  }
}

// The backward kernels compute dx only with DX, and accumulate dweight (dbias) only with DW
// (DB); each flag is a template argument, so the loops for a frozen weight carry no trace of it.
template <bool LLAMA, bool DX, bool DW, typename T, typename G, typename A>
void rms_backward_rows(const G* g, const T* x, const A* w, const A* rstd, T* dx, A* dw, int64_t rows, int64_t n,
                       A offset) {
  reduce_rows_by_part<1>(rows, n, std::array<A*, 1>{dw}, [&](int64_t r, const std::array<A*, 1>& acc) {
    A* pw = acc[0];
    const T* xr = x + r * n;
    const G* gr = g + r * n;
    T* dxr = norm::offset_or_null(dx, r * n);
    const A rs = rstd[r];
    const int64_t nv = vec_end<T, A>(n);
    // mean(g * w' * xhat) = sum(g * w' * x) * rstd / n.
    A dot = 0;
    if constexpr (DX && std::is_same_v<A, float>) {
      const fVec ov = simd::splat(offset);
      fVec s0 = simd::splat(0.f), s1 = s0, a, b, ga, gb;
      for (int64_t j = 0; j < nv; j += kStep) {
        load2(xr + j, a, b);
        load2(gr + j, ga, gb);
        s0 = fmadd(ga * (loadu(w + j) + ov), a, s0);
        s1 = fmadd(gb * (loadu(w + j + kF) + ov), b, s1);
      }
      dot = hsum(s0 + s1);
    }
    if constexpr (DX) {
      for (int64_t j = nv; j < n; ++j) {
        dot += static_cast<A>(gr[j]) * (w[j] + offset) * static_cast<A>(xr[j]);
      }
    }
    const A c1 = dot * rs / static_cast<A>(n);
    if constexpr (std::is_same_v<A, float>) {
      const fVec ov = simd::splat(offset), rv = simd::splat(rs), zero = simd::splat(0.f), cv = simd::splat(c1);
      fVec a, b, ga, gb;
      for (int64_t j = 0; j < nv; j += kStep) {
        load2(xr + j, a, b);
        load2(gr + j, ga, gb);
        a = a * rv;
        b = b * rv;
        if constexpr (DX) {
          const fVec da = norm_dx(ga * (loadu(w + j) + ov), a, rv, zero, cv);
          const fVec db = norm_dx(gb * (loadu(w + j + kF) + ov), b, rv, zero, cv);
          store2(dxr + j, da, db);
        }
        if constexpr (DW) {
          if constexpr (LLAMA) {
            round2<T>(a, b);
          }
          simd::store(pw + j, fmadd(ga, a, loadu(pw + j)));
          simd::store(pw + j + kF, fmadd(gb, b, loadu(pw + j + kF)));
        }
      }
    }
    for (int64_t j = nv; j < n; ++j) {
      const A gj = static_cast<A>(gr[j]);
      A xhat = static_cast<A>(xr[j]) * rs;
      if constexpr (DX) {
        dxr[j] = static_cast<T>(norm_dx(gj * (w[j] + offset), xhat, rs, A(0), c1));
      }
      if constexpr (DW) {
        if constexpr (LLAMA) {
          xhat = norm::round_to<T>(xhat);
        }
        pw[j] += gj * xhat;
      }
    }
  });
}

template <bool DX, bool DW, bool DB, typename T, typename G, typename A>
void layer_backward_rows(const G* g, const T* x, const A* w, const A* mean, const A* rstd, T* dx, A* dw, A* db,
                         int64_t rows, int64_t n) {
  reduce_rows_by_part<2>(rows, n, std::array<A*, 2>{dw, db}, [&](int64_t r, const std::array<A*, 2>& acc) {
    A* pw = acc[0];
    A* pb = acc[1];
    const T* xr = x + r * n;
    const G* gr = g + r * n;
    T* dxr = norm::offset_or_null(dx, r * n);
    const A mu = mean[r];
    const A rs = rstd[r];
    const int64_t nv = vec_end<T, A>(n);
    A sum_gw = 0, sum_gwx = 0;
    if constexpr (DX && std::is_same_v<A, float>) {
      const fVec mv = simd::splat(mu), rv = simd::splat(rs);
      fVec s0 = simd::splat(0.f), s1 = s0, t0 = s0, t1 = s0, a, b, ga, gb;
      for (int64_t j = 0; j < nv; j += kStep) {
        load2(xr + j, a, b);
        load2(gr + j, ga, gb);
        const fVec gwa = ga * loadu(w + j);
        const fVec gwb = gb * loadu(w + j + kF);
        s0 = s0 + gwa;
        s1 = s1 + gwb;
        t0 = fmadd(gwa, (a - mv) * rv, t0);
        t1 = fmadd(gwb, (b - mv) * rv, t1);
      }
      sum_gw = hsum(s0 + s1);
      sum_gwx = hsum(t0 + t1);
    }
    if constexpr (DX) {
      for (int64_t j = nv; j < n; ++j) {
        const A gw = static_cast<A>(gr[j]) * w[j];
        sum_gw += gw;
        sum_gwx += gw * ((static_cast<A>(xr[j]) - mu) * rs);
      }
    }
    const A c0 = sum_gw / static_cast<A>(n);
    const A c1 = sum_gwx / static_cast<A>(n);
    if constexpr (std::is_same_v<A, float>) {
      const fVec mv = simd::splat(mu), rv = simd::splat(rs), c0v = simd::splat(c0), c1v = simd::splat(c1);
      fVec a, b, ga, gb;
      for (int64_t j = 0; j < nv; j += kStep) {
        load2(xr + j, a, b);
        load2(gr + j, ga, gb);
        a = (a - mv) * rv;
        b = (b - mv) * rv;
        if constexpr (DX) {
          store2(dxr + j, norm_dx(ga * loadu(w + j), a, rv, c0v, c1v),
                 norm_dx(gb * loadu(w + j + kF), b, rv, c0v, c1v));
        }
        if constexpr (DW) {
          simd::store(pw + j, fmadd(ga, a, loadu(pw + j)));
          simd::store(pw + j + kF, fmadd(gb, b, loadu(pw + j + kF)));
        }
        if constexpr (DB) {
          simd::store(pb + j, loadu(pb + j) + ga);
          simd::store(pb + j + kF, loadu(pb + j + kF) + gb);
        }
      }
    }
    for (int64_t j = nv; j < n; ++j) {
      const A gj = static_cast<A>(gr[j]);
      const A xhat = (static_cast<A>(xr[j]) - mu) * rs;
      if constexpr (DX) {
        dxr[j] = static_cast<T>(norm_dx(gj * w[j], xhat, rs, c0, c1));
      }
      if constexpr (DW) {
        pw[j] += gj * xhat;
      }
      if constexpr (DB) {
        pb[j] += gj;
      }
    }
  });
}

// Calls fn(std::bool_constant<flags>{}...): run-time flags as template arguments.
template <typename Fn>
void with_flags(Fn&& fn) {
  fn();
}

template <typename Fn, typename... Rest>
void with_flags(Fn&& fn, bool flag, Rest... rest) {
  auto bind = [&](auto tag) { with_flags([&](auto... tags) { fn(tag, tags...); }, rest...); };
  flag ? bind(std::true_type{}) : bind(std::false_type{});
}

// Calls fn(T{}, U{}, A{}, rows, n, flag_tags...): x's type, `other`'s type (the output, or the
// incoming gradient), the math type, x seen as rows of n, and `flags` as with_flags gives them.
template <typename Fn, typename... Flags>
void dispatch_rows(const Tensor& x, const Tensor& other, Fn&& fn, Flags... flags) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  dispatch_norm_types(x.scalar_type(), other.scalar_type(), [&](auto t, auto u, auto acc) {
    with_flags([&](auto... tags) { fn(t, u, acc, rows, n, tags...); }, flags...);
  });
}

// t's data as the C++ type of `tag`, to read, or to write (null for an output the mask left out).
template <typename P>
const P* read_ptr(const Tensor& t, P /*tag*/) {
  return data_of<P>(t);
}

template <typename P>
P* write_ptr(const Tensor& t, P /*tag*/) {
  return data_or_null<P>(t);
}

void rms_norm_forward(const Tensor& x, const Tensor& w, Tensor& y, Tensor& rstd, double eps,
                      double offset, bool llama) {
  dispatch_rows(
      x, y,
      [&](auto t, auto o, auto a, int64_t rows, int64_t n, auto... flags) {
        rms_forward_rows<flags...>(read_ptr(x, t), read_ptr(w, a), write_ptr(y, o), write_ptr(rstd, a), rows, n,
                                   static_cast<decltype(a)>(eps), static_cast<decltype(a)>(offset));
      },
      llama);
}

void rms_norm_backward(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& rstd,
                       Tensor& dx, Tensor& dw, double offset, bool llama) {
  dispatch_rows(
      x, g,
      [&](auto t, auto gt, auto a, int64_t rows, int64_t n, auto... flags) {
        rms_backward_rows<flags...>(read_ptr(g, gt), read_ptr(x, t), read_ptr(w, a), read_ptr(rstd, a),
                                    write_ptr(dx, t), write_ptr(dw, a), rows, n, static_cast<decltype(a)>(offset));
      },
      llama, dx.defined(), dw.defined());
}

void layer_norm_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y,
                        Tensor& mean, Tensor& rstd, double eps) {
  dispatch_rows(x, y, [&](auto t, auto o, auto a, int64_t rows, int64_t n) {
    layer_forward_rows(read_ptr(x, t), read_ptr(w, a), read_ptr(b, a), write_ptr(y, o), write_ptr(mean, a),
                       write_ptr(rstd, a), rows, n, static_cast<decltype(a)>(eps));
  });
}

void layer_norm_backward(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& mean,
                         const Tensor& rstd, Tensor& dx, Tensor& dw, Tensor& db) {
  dispatch_rows(
      x, g,
      [&](auto t, auto gt, auto a, int64_t rows, int64_t n, auto... flags) {
        layer_backward_rows<flags...>(read_ptr(g, gt), read_ptr(x, t), read_ptr(w, a), read_ptr(mean, a),
                                      read_ptr(rstd, a), write_ptr(dx, t), write_ptr(dw, a), write_ptr(db, a), rows,
                                      n);
      },
      dx.defined(), dw.defined(), db.defined());
}

}  // namespace

const NormKernels& kernels() {
  static const NormKernels table{&rms_norm_forward, &rms_norm_backward, &layer_norm_forward, &layer_norm_backward};
  return table;
}

}  // namespace torchgc::norm_cpu::TORCHGC_NORM_ISA
