// The shared per-row norm math (norm_row.h, which the CUDA kernels also run) and the CPU norm
// kernels through the dispatcher, against float64 computations.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include "error_of.h"

#include <array>
#include <cmath>
#include <functional>
#include <numeric>
#include <vector>

#include "torchgc/norm_row.h"

namespace {

using torchgc::norm::ColumnOf;
using torchgc::norm::pairwise_sum;
using torchgc::norm::partition_rows;

std::tuple<at::Tensor, at::Tensor> call_rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, double offset,
                                                 bool llama, bool fp32_output) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchgc::rms_norm", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, double,
                                                                 bool, bool)>();
  return op.call(x, w, eps, offset, llama, fp32_output);
}

std::tuple<at::Tensor, at::Tensor> call_rms_norm_backward(const at::Tensor& g, const at::Tensor& x,
                                                          const at::Tensor& w, const at::Tensor& rstd, double offset,
                                                          bool llama, std::array<bool, 2> mask = {true, true}) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchgc::rms_norm_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, double, bool,
                                                                 std::array<bool, 2>)>();
  return op.call(g, x, w, rstd, offset, llama, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_layer_norm(const at::Tensor& x, const at::Tensor& w,
                                                               const std::optional<at::Tensor>& b, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchgc::layer_norm", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, bool)>();
  return op.call(x, w, b, eps, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_layer_norm_backward(const at::Tensor& g, const at::Tensor& x,
                                                                        const at::Tensor& w, const at::Tensor& mean,
                                                                        const at::Tensor& rstd,
                                                                        std::array<bool, 3> mask = {true, true,
                                                                                                    true}) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("torchgc::layer_norm_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, std::array<bool, 3>)>();
  return op.call(g, x, w, mean, rstd, mask);
}

void call_rms_norm_on_cpu(const at::Tensor& x, const at::Tensor& w) {
  c10::Dispatcher::singleton()
      .findSchemaOrThrow("torchgc::rms_norm", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double, double, bool, bool)>()
      .redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), x, w, 1e-6, 0.0, false, false);
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

TEST(NormRow, PairwiseSumIsExactOnIntegersAndBeatsASequentialSum) {
  for (int64_t n : {0, 1, 7, 8, 9, 64, 1000, 4097}) {
    std::vector<double> v(n);
    for (int64_t i = 0; i < n; ++i) {
      v[i] = static_cast<double>(i % 13);
    }
    const double expected = std::accumulate(v.begin(), v.end(), 0.0);
    EXPECT_EQ(pairwise_sum<double>(n, ColumnOf<double>{v.data(), 1}), expected) << n;
  }
  // 2^20 copies of 0.1f: a sequential fp32 sum drifts by percents, the pairwise one stays close.
  const int64_t n = int64_t{1} << 20;
  std::vector<float> v(n, 0.1f);
  float sequential = 0.f;
  for (float x : v) {
    sequential += x;
  }
  const float pairwise = pairwise_sum<float>(n, ColumnOf<float>{v.data(), 1});
  const double exact = n * static_cast<double>(0.1f);
  EXPECT_LT(std::abs(pairwise - exact) / exact, 1e-6);
  EXPECT_GT(std::abs(sequential - exact) / exact, 1e-3);
}

TEST(NormRow, PartitionDependsOnRowsOnlyAndCoversEveryRow) {
  for (int64_t rows : {1, 5, 32, 33, 4096, 100000}) {
    const auto p = partition_rows(rows, 32, 256);
    EXPECT_GE(p.parts, 1);
    EXPECT_LE(p.parts, 256);
    EXPECT_GE(p.parts * p.rows_per_part, rows);
    EXPECT_LT((p.parts - 1) * p.rows_per_part, rows);
  }
}

TEST(NormRow, FormulasMatchTheirDefinitions) {
  EXPECT_DOUBLE_EQ(torchgc::norm::row_rstd(8.0, 2, 0.0), 0.5);
  EXPECT_EQ(torchgc::norm::round_to<c10::BFloat16>(1.0f + 1.0f / 512), 1.0f);  // ties to even
  EXPECT_DOUBLE_EQ(torchgc::norm::rms_y(2.0, 0.5, 1.0), 3.0);
  EXPECT_DOUBLE_EQ(torchgc::norm::layer_y(3.0, 1.0, 0.5, 2.0, 0.25), 2.25);
  EXPECT_DOUBLE_EQ(torchgc::norm::norm_dx(1.0, 2.0, 0.5, 0.25, 0.125), 0.5 * (1.0 - 0.25 - 0.25));
}

// Each test of the CPU kernels runs once per copy of them: the baseline one and the AVX2 one.
class NormCpu : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    c10::Dispatcher::singleton().findSchemaOrThrow("torchgc::use_cpu_capability", "").typed<void(std::string)>().call(GetParam());
  }
};

INSTANTIATE_TEST_SUITE_P(CpuCapabilities, NormCpu, ::testing::Values("DEFAULT", "AVX2"));

// float64 reference of RMSNorm and its gradients, by hand.
struct RmsRef {
  at::Tensor y, dx, dw;
};

RmsRef rms_reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& g, double eps, double offset) {
  auto xd = x.to(at::kDouble), wd = w.to(at::kDouble) + offset, gd = g.to(at::kDouble);
  const int64_t n = x.size(-1);
  auto rstd = at::rsqrt(xd.pow(2).mean(-1, true) + eps);
  auto xhat = xd * rstd;
  auto dot = (gd * wd * xhat).sum(-1, true) / n;
  return {xhat * wd, rstd * (gd * wd - xhat * dot), (gd * xhat).reshape({-1, n}).sum(0)};
}

TEST_P(NormCpu, RmsNormMatchesFloat64ForEveryDtypeAndOddSizes) {
  at::manual_seed(0);
  for (auto dtype : {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble}) {
    for (int64_t n : {1, 7, 15, 16, 17, 64, 1000}) {
      auto x = at::randn({3, 5, n}).to(dtype);
      auto w = (at::rand({n}) + 0.5).to(dtype);
      auto g = at::randn({3, 5, n}).to(dtype);
      auto [y, rstd] = call_rms_norm(x, w, 1e-6, 1.0, false, false);
      auto [dx, dw] = call_rms_norm_backward(g, x, w, rstd, 1.0, false);
      const auto ref = rms_reference(x, w, g, 1e-6, 1.0);
      const double tol = dtype == at::kDouble ? 1e-12 : (dtype == at::kFloat ? 1e-5 : 2e-2);
      EXPECT_EQ(y.scalar_type(), dtype);
      EXPECT_EQ(rstd.scalar_type(), dtype == at::kDouble ? at::kDouble : at::kFloat);
      EXPECT_LE(max_abs_diff(y, ref.y), tol * (1 + ref.y.abs().max().item<double>())) << dtype << " n=" << n;
      EXPECT_LE(max_abs_diff(dx, ref.dx), tol * (1 + ref.dx.abs().max().item<double>())) << dtype << " n=" << n;
      EXPECT_LE(max_abs_diff(dw, ref.dw), tol * (1 + ref.dw.abs().max().item<double>())) << dtype << " n=" << n;
    }
  }
}

TEST_P(NormCpu, LayerNormMatchesAtenInFloat64) {
  at::manual_seed(1);
  for (int64_t n : {1, 9, 33, 512}) {
    auto x = at::randn({17, n}, at::kDouble) * 3 + 10;  // a large mean: checks the two-pass variance
    auto w = at::randn({n}, at::kDouble);
    auto b = at::randn({n}, at::kDouble);
    auto g = at::randn({17, n}, at::kDouble);
    auto [y, mean, rstd] = call_layer_norm(x, w, b, 1e-5);
    auto [dx, dw, db] = call_layer_norm_backward(g, x, w, mean, rstd);
    auto [ry, rmean, rrstd] = at::native_layer_norm(x, {n}, w, b, 1e-5);
    auto [rdx, rdw, rdb] = at::native_layer_norm_backward(g, x, {n}, rmean, rrstd, w, b, {true, true, true});
    EXPECT_LE(max_abs_diff(y, ry), 1e-12);
    EXPECT_LE(max_abs_diff(dx, rdx), 1e-10);
    EXPECT_LE(max_abs_diff(dw, rdw), 1e-10);
    EXPECT_LE(max_abs_diff(db, rdb), 1e-10);
  }
}

// Each output the mask asks for has the bits of the all-outputs call (the weight-gradient
// reduction keeps its fixed order); the others are undefined.
template <size_t K>
void expect_masked_outputs_match(const std::array<at::Tensor, K>& full, const std::array<at::Tensor, K>& got,
                                 const std::array<bool, K>& mask, const std::string& what) {
  for (size_t k = 0; k < K; ++k) {
    EXPECT_EQ(got[k].defined(), mask[k]) << what << " output " << k;
    if (mask[k] && got[k].defined()) {
      EXPECT_TRUE(at::equal(got[k], full[k])) << what << " output " << k;
    }
  }
}

template <typename Tuple>
auto as_array(const Tuple& t) {
  return std::apply([](const auto&... ts) { return std::array<at::Tensor, sizeof...(ts)>{ts...}; }, t);
}

TEST_P(NormCpu, MaskedBackwardComputesOnlyTheOutputsAskedFor) {
  at::manual_seed(2);
  // 300 rows make several parts of the weight-gradient reduction; n = 37 and 20 leave scalar tails.
  for (auto dtype : {at::kBFloat16, at::kFloat, at::kDouble}) {
    for (int64_t n : {20, 37, 96}) {
      auto x = at::randn({300, n}).to(dtype);
      auto w = (at::rand({n}) + 0.5).to(dtype);
      auto b = at::randn({n}).to(dtype);
      auto g = at::randn({300, n}).to(dtype);
      const std::string what = std::string(c10::toString(dtype)) + " n=" + std::to_string(n);
      for (bool llama : {false, true}) {
        auto [y, rstd] = call_rms_norm(x, w, 1e-6, 1.0, llama, false);
        const auto full = as_array(call_rms_norm_backward(g, x, w, rstd, 1.0, llama));
        for (std::array<bool, 2> mask : {std::array{true, false}, std::array{false, true}, std::array{false, false}}) {
          expect_masked_outputs_match(full, as_array(call_rms_norm_backward(g, x, w, rstd, 1.0, llama, mask)), mask,
                                      "rms_norm " + what);
        }
      }
      auto [y, mean, rstd] = call_layer_norm(x, w, b, 1e-5);
      const auto full = as_array(call_layer_norm_backward(g, x, w, mean, rstd));
      for (int bits = 0; bits < 7; ++bits) {
        const std::array<bool, 3> mask{(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0};
        expect_masked_outputs_match(full, as_array(call_layer_norm_backward(g, x, w, mean, rstd, mask)), mask,
                                    "layer_norm " + what);
      }
    }
  }
}

TEST(NormCpu, ChecksNameTheOpTheArgumentAndTheProblem) {
  auto x = at::randn({2, 4}).to(at::kBFloat16);
  auto meta_w = at::ones({4}, at::TensorOptions().device(at::kMeta));
  // Straight to the CPU kernel: a meta argument would otherwise send the call to the Meta key.
  auto msg = error_of([&] { call_rms_norm_on_cpu(x, meta_w); });
  EXPECT_NE(msg.find("torchgc::rms_norm: expected argument 'weight' to be on x's device cpu, got one on meta"),
            std::string::npos)
      << msg;
  msg = error_of([&] { call_rms_norm(x, at::ones({4}, at::kHalf), 1e-6, 0, false, false); });
  EXPECT_NE(msg.find("expected argument 'weight' to have dtype Float or x's dtype (BFloat16), got Half"),
            std::string::npos)
      << msg;
  msg = error_of([&] { call_layer_norm(x, at::ones({4}), at::ones({3}), 1e-6); });
  EXPECT_NE(msg.find("torchgc::layer_norm: expected argument 'bias' to have shape [4]"), std::string::npos) << msg;
  msg = error_of([&] { call_rms_norm(x, at::ones({4}), std::nan(""), 0, false, false); });
  EXPECT_NE(msg.find("expected argument 'eps' to be finite and >= 0, got nan"), std::string::npos) << msg;
}

}  // namespace
