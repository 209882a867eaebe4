#pragma once
// CPU kernels of the fused norms. This header is compiled once per instruction set (norm_cpu.cpp
// for the baseline, norm_cpu_avx2.cpp with AVX2/FMA/F16C); each copy lives in its own namespace
// TORCHGC_NORM_ISA, and norm_cpu.cpp picks one at run time. Inputs arrive validated, contiguous
// and with the weight (and bias) already in the math type A.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <type_traits>

#include "torchgc/norm.h"
#include "torchgc/norm_row.h"

#ifndef TORCHGC_NORM_ISA
#error "define TORCHGC_NORM_ISA before including norm_cpu_kernel.h"
#endif

namespace torchgc::norm_cpu::TORCHGC_NORM_ISA {
namespace {

using norm::norm_dx;
using norm::row_rstd;
using fVec = at::vec::Vectorized<float>;
constexpr int64_t kF = fVec::size();
// Elements per SIMD step: one vector of bf16/fp16 widens to two float vectors.
constexpr int64_t kStep = 2 * kF;

template <typename T>
inline void load2(const T* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kF);
  } else {
    static_assert(at::vec::Vectorized<T>::size() == kStep);
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kF);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

template <typename T>
inline void round2(fVec& a, fVec& b) {
  if constexpr (!std::is_same_v<T, float>) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
  }
}

inline float hsum(const fVec& v) {
  float lanes[kF];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kF; ++i) {
    s += lanes[i];
  }
  return s;
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
    fVec s0(0.f), s1(0.f), a, b;
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

template <typename T, typename O, typename A, bool LLAMA>
void rms_forward_rows(const T* x, const A* w, O* y, A* rstd, int64_t rows, int64_t n, A eps, A offset) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      O* yr = y + r * n;
      const int64_t nv = vec_end<T, A>(n);
      const A rs = row_rstd(row_sum<A>(xr, n, [](auto v) { return v * v; }), n, eps);
      rstd[r] = rs;
      if constexpr (std::is_same_v<A, float>) {
        const fVec rv(rs), ov(offset);
        fVec a, b;
        for (int64_t j = 0; j < nv; j += kStep) {
          load2(xr + j, a, b);
          a = a * rv;
          b = b * rv;
          if constexpr (LLAMA) {
            round2<T>(a, b);
          }
          store2(yr + j, norm::rms_y(a, fVec::loadu(w + j), ov), norm::rms_y(b, fVec::loadu(w + j + kF), ov));
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
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      O* yr = y + r * n;
      const int64_t nv = vec_end<T, A>(n);
      // Two passes (mean, then squared deviations): no cancellation for rows with a large mean.
      const A mu = row_sum<A>(xr, n, [](auto v) { return v; }) / static_cast<A>(n);
      const A rs = row_rstd(row_sum<A>(xr, n, [mu](auto v) {
                              const auto d = v - decltype(v)(mu);
                              return d * d;
                            }),
                            n, eps);
      mean[r] = mu;
      rstd[r] = rs;
      if constexpr (std::is_same_v<A, float>) {
        const fVec mv(mu), rv(rs);
        fVec a, b;
        for (int64_t j = 0; j < nv; j += kStep) {
          load2(xr + j, a, b);
          store2(yr + j, norm::layer_y(a, mv, rv, fVec::loadu(w + j), fVec::loadu(bias + j)),
                 norm::layer_y(b, mv, rv, fVec::loadu(w + j + kF), fVec::loadu(bias + j + kF)));
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
  at::parallel_for(0, (n + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t j0 = c * kCols;
      const int64_t j1 = std::min(n, j0 + kCols);
      int64_t j = j0;
      if constexpr (std::is_same_v<A, float>) {
        for (; j + kF <= j1; j += kF) {
          const float* col = part + j;
          norm::pairwise_sum<fVec>(parts, [&](int64_t p) { return fVec::loadu(col + p * n); }).store(out + j);
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
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, split.parts, 1, [&](int64_t pbegin, int64_t pend) {
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
template <typename T, typename G, typename A, bool LLAMA, bool DX, bool DW>
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
      const fVec ov(offset);
      fVec s0(0.f), s1(0.f), a, b, ga, gb;
      for (int64_t j = 0; j < nv; j += kStep) {
        load2(xr + j, a, b);
        load2(gr + j, ga, gb);
        s0 = at::vec::fmadd(ga * (fVec::loadu(w + j) + ov), a, s0);
        s1 = at::vec::fmadd(gb * (fVec::loadu(w + j + kF) + ov), b, s1);
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
      const fVec ov(offset), rv(rs), zero(0.f), cv(c1);
      fVec a, b, ga, gb;
      for (int64_t j = 0; j < nv; j += kStep) {
        load2(xr + j, a, b);
        load2(gr + j, ga, gb);
        a = a * rv;
        b = b * rv;
        if constexpr (DX) {
          const fVec da = norm_dx(ga * (fVec::loadu(w + j) + ov), a, rv, zero, cv);
          const fVec db = norm_dx(gb * (fVec::loadu(w + j + kF) + ov), b, rv, zero, cv);
          store2(dxr + j, da, db);
        }
        if constexpr (DW) {
          if constexpr (LLAMA) {
            round2<T>(a, b);
          }
          at::vec::fmadd(ga, a, fVec::loadu(pw + j)).store(pw + j);
          at::vec::fmadd(gb, b, fVec::loadu(pw + j + kF)).store(pw + j + kF);
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

template <typename T, typename G, typename A, bool DX, bool DW, bool DB>
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
      const fVec mv(mu), rv(rs);
      fVec s0(0.f), s1(0.f), t0(0.f), t1(0.f), a, b, ga, gb;
      for (int64_t j = 0; j < nv; j += kStep) {
        load2(xr + j, a, b);
        load2(gr + j, ga, gb);
        const fVec gwa = ga * fVec::loadu(w + j);
        const fVec gwb = gb * fVec::loadu(w + j + kF);
        s0 = s0 + gwa;
        s1 = s1 + gwb;
        t0 = at::vec::fmadd(gwa, (a - mv) * rv, t0);
        t1 = at::vec::fmadd(gwb, (b - mv) * rv, t1);
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
      const fVec mv(mu), rv(rs), c0v(c0), c1v(c1);
      fVec a, b, ga, gb;
      for (int64_t j = 0; j < nv; j += kStep) {
        load2(xr + j, a, b);
        load2(gr + j, ga, gb);
        a = (a - mv) * rv;
        b = (b - mv) * rv;
        if constexpr (DX) {
          store2(dxr + j, norm_dx(ga * fVec::loadu(w + j), a, rv, c0v, c1v),
                 norm_dx(gb * fVec::loadu(w + j + kF), b, rv, c0v, c1v));
        }
        if constexpr (DW) {
          at::vec::fmadd(ga, a, fVec::loadu(pw + j)).store(pw + j);
          at::vec::fmadd(gb, b, fVec::loadu(pw + j + kF)).store(pw + j + kF);
        }
        if constexpr (DB) {
          (fVec::loadu(pb + j) + ga).store(pb + j);
          (fVec::loadu(pb + j + kF) + gb).store(pb + j + kF);
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

// Calls fn(T{}, U{}, A{}, rows, n): x's type, `other`'s type (the output, or the incoming
// gradient), the math type, and x seen as rows of n.
template <typename Fn>
void dispatch_rows(const at::Tensor& x, const at::Tensor& other, Fn&& fn) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  dispatch_norm_types(x.scalar_type(), other.scalar_type(), [&](auto t, auto u, auto acc) { fn(t, u, acc, rows, n); });
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

}  // namespace

void rms_norm_forward(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, at::Tensor& rstd, double eps,
                      double offset, bool llama) {
  dispatch_rows(x, y, [&](auto t, auto o, auto acc, int64_t rows, int64_t n) {
    using T = decltype(t);
    using O = decltype(o);
    using A = decltype(acc);
    with_flags(
        [&](auto llama_tag) {
          rms_forward_rows<T, O, A, decltype(llama_tag)::value>(x.const_data_ptr<T>(), w.const_data_ptr<A>(),
                                                               y.mutable_data_ptr<O>(), rstd.mutable_data_ptr<A>(),
                                                               rows, n, static_cast<A>(eps), static_cast<A>(offset));
        },
        llama);
  });
}

void rms_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                       at::Tensor& dx, at::Tensor& dw, double offset, bool llama) {
  dispatch_rows(x, g, [&](auto t, auto gt, auto acc, int64_t rows, int64_t n) {
    using T = decltype(t);
    using G = decltype(gt);
    using A = decltype(acc);
    with_flags(
        [&](auto llama_tag, auto dx_tag, auto dw_tag) {
          rms_backward_rows<T, G, A, decltype(llama_tag)::value, decltype(dx_tag)::value, decltype(dw_tag)::value>(
              g.const_data_ptr<G>(), x.const_data_ptr<T>(), w.const_data_ptr<A>(), rstd.const_data_ptr<A>(),
              data_or_null<T>(dx), data_or_null<A>(dw), rows, n, static_cast<A>(offset));
        },
        llama, dx.defined(), dw.defined());
  });
}

void layer_norm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& y,
                        at::Tensor& mean, at::Tensor& rstd, double eps) {
  dispatch_rows(x, y, [&](auto t, auto o, auto acc, int64_t rows, int64_t n) {
    using T = decltype(t);
    using O = decltype(o);
    using A = decltype(acc);
    layer_forward_rows<T, O, A>(x.const_data_ptr<T>(), w.const_data_ptr<A>(), b.const_data_ptr<A>(),
                                y.mutable_data_ptr<O>(), mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), rows,
                                n, static_cast<A>(eps));
  });
}

void layer_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const at::Tensor& mean,
                         const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
  dispatch_rows(x, g, [&](auto t, auto gt, auto acc, int64_t rows, int64_t n) {
    using T = decltype(t);
    using G = decltype(gt);
    using A = decltype(acc);
    with_flags(
        [&](auto dx_tag, auto dw_tag, auto db_tag) {
          layer_backward_rows<T, G, A, decltype(dx_tag)::value, decltype(dw_tag)::value, decltype(db_tag)::value>(
              g.const_data_ptr<G>(), x.const_data_ptr<T>(), w.const_data_ptr<A>(), mean.const_data_ptr<A>(),
              rstd.const_data_ptr<A>(), data_or_null<T>(dx), data_or_null<A>(dw), data_or_null<A>(db), rows, n);
        },
        dx.defined(), dw.defined(), db.defined());
  });
}

}  // namespace torchgc::norm_cpu::TORCHGC_NORM_ISA
