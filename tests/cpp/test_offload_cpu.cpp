// The CPU offload kernels and the host pool, through the dispatcher as Python calls them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include "error_of.h"

#include "torchgc/host_pool.h"

namespace {

at::Tensor call_offload(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("torchgc::offload", "").typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

at::Tensor call_reload(const at::Tensor& host, c10::Device device) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("torchgc::reload", "").typed<at::Tensor(const at::Tensor&, c10::Device)>();
  return op.call(host, device);
}

TEST(OffloadCpu, RoundTripKeepsValuesShapeAndDtype) {
  for (auto dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kLong, at::kBool}) {
    auto x = at::randn({3, 5, 7}).to(dtype);
    auto host = call_offload(x);
    EXPECT_NE(host.data_ptr(), x.data_ptr());
    auto back = call_reload(host, c10::Device(c10::kCPU));
    EXPECT_EQ(back.scalar_type(), dtype);
    EXPECT_EQ(back.sizes(), x.sizes());
    EXPECT_TRUE(at::equal(back, x));
  }
}

TEST(OffloadCpu, NonContiguousInputComesBackEqual) {
  auto x = at::randn({8, 6}).t();
  ASSERT_FALSE(x.is_contiguous());
  auto back = call_reload(call_offload(x), c10::Device(c10::kCPU));
  EXPECT_TRUE(at::equal(back, x));
}

TEST(OffloadCpu, EmptyTensorRoundTrips) {
  auto x = at::randn({0, 4});
  auto back = call_reload(call_offload(x), c10::Device(c10::kCPU));
  EXPECT_EQ(back.sizes(), x.sizes());
}

TEST(HostPool, BlocksAreReusedAndAccounted) {
  auto& pool = torchgc::HostPool::instance();
  pool.empty_cache();
  const auto before = pool.stats();
  void* first = nullptr;
  {
    auto host = call_offload(at::randn({256}));
    first = host.data_ptr();
    EXPECT_EQ(pool.stats().in_use_bytes, before.in_use_bytes + 1024);
  }
  EXPECT_EQ(pool.stats().in_use_bytes, before.in_use_bytes);
  const auto reserved = pool.stats().reserved_bytes;
  for (int step = 0; step < 50; ++step) {
    auto host = call_offload(at::randn({256}));
    EXPECT_EQ(host.data_ptr(), first);
  }
  EXPECT_EQ(pool.stats().reserved_bytes, reserved);
}

TEST(HostPool, LimitTrimsCachedBlocks) {
  auto& pool = torchgc::HostPool::instance();
  pool.empty_cache();
  { auto a = call_offload(at::randn({1024})); auto b = call_offload(at::randn({2048})); }
  EXPECT_GE(pool.stats().reserved_bytes, 3 * 4096);
  pool.set_limit(4096);
  EXPECT_LE(pool.stats().reserved_bytes, 4096);
  pool.set_limit(0);
  pool.empty_cache();
  EXPECT_EQ(pool.stats().reserved_bytes, pool.stats().in_use_bytes);
}

TEST(HostPool, NegativeLimitIsRejectedWithAClearMessage) {
  auto msg = error_of([] { torchgc::HostPool::instance().set_limit(-1); });
  EXPECT_NE(msg.find("torchgc::set_host_pool_limit"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'bytes' >= 0"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got -1"), std::string::npos) << msg;
}

TEST(OffloadCpu, ReloadRejectsBadArguments) {
  auto msg = error_of([] { call_reload(at::randn({2}), c10::Device(c10::kMeta)); });
  EXPECT_NE(msg.find("torchgc::reload: expected argument 'device'"), std::string::npos) << msg;
  msg = error_of([] { call_reload(at::empty({2}, at::kMeta), c10::Device(c10::kCPU)); });
  EXPECT_NE(msg.find("torchgc::reload: expected argument 'host' to be a CPU tensor, got one on meta"), std::string::npos) << msg;
}

}  // namespace
