// The CPU offload kernels and the host pool, through the dispatcher as Python calls them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <vector>

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

TEST(HostPool, LimitTrimsTheLeastRecentlyFreedBlocksFirst) {
  auto& pool = torchgc::HostPool::instance();
  pool.empty_cache();
  void* kept = nullptr;
  {
    auto a = call_offload(at::randn({1024}));  // a 4 KiB block, destroyed last: the most recently freed
    auto b = call_offload(at::randn({2048}));  // an 8 KiB block
    kept = a.data_ptr();
  }
  EXPECT_EQ(pool.stats().cached_bytes, 3 * 4096);
  pool.set_limit(4096);
  EXPECT_EQ(pool.stats().cached_bytes, 4096);
  EXPECT_EQ(pool.stats().reserved_bytes, pool.stats().in_use_bytes + 4096);
  EXPECT_EQ(call_offload(at::randn({1024})).data_ptr(), kept);
  pool.set_limit(0);  // caches nothing
  EXPECT_EQ(pool.stats().cached_bytes, 0);
  pool.set_limit(torchgc::HostPool::kAutomaticLimit);
}

TEST(HostPool, SizeClassesWasteAtMostAQuarter) {
  using torchgc::HostPool;
  EXPECT_EQ(HostPool::size_class(0), 4096u);
  EXPECT_EQ(HostPool::size_class(4096), 4096u);
  EXPECT_EQ(HostPool::size_class(4097), 8192u);
  EXPECT_EQ(HostPool::size_class(1u << 20), 1u << 20);
  EXPECT_EQ(HostPool::size_class((1u << 20) + 1), (1u << 20) + (1u << 18));
  for (size_t n = 1; n < (size_t{1} << 32); n = n * 3 + 7) {
    const size_t c = HostPool::size_class(n);
    EXPECT_GE(c, n);
    EXPECT_EQ(c % 4096, 0u);
    EXPECT_LE(c, std::max<size_t>(4096, n + n / 4 + 4096)) << n;
  }
}

TEST(HostPool, ChangingSizesStayWithinTwiceThePeakInUse) {
  // Dynamic padding: every step offloads tensors of a new length. The automatic limit keeps the
  // cached bytes at most the peak in use.
  auto& pool = torchgc::HostPool::instance();
  pool.empty_cache();
  int64_t peak_in_use = 0, most_reserved = 0;
  for (int step = 0; step < 300; ++step) {
    std::vector<at::Tensor> held;
    const int64_t length = 16 + (step * 37) % 500;
    for (int layer = 0; layer < 4; ++layer) {
      held.push_back(call_offload(at::randn({length, 64})));
    }
    const auto s = pool.stats();
    peak_in_use = std::max(peak_in_use, s.reserved_bytes - s.cached_bytes);
    most_reserved = std::max(most_reserved, s.reserved_bytes);
    EXPECT_LE(s.cached_bytes, s.limit_bytes);
  }
  EXPECT_LE(most_reserved, 2 * peak_in_use);
  EXPECT_LE(pool.stats().reserved_bytes, peak_in_use);  // nothing in use: only the cache
}

TEST(HostPool, EmptyingTheCacheReturnsTheMemoryToTheOS) {
  auto rss_bytes = [] {
    long pages = 0, resident = 0;
    FILE* f = std::fopen("/proc/self/statm", "r");
    EXPECT_EQ(std::fscanf(f, "%ld %ld", &pages, &resident), 2);
    std::fclose(f);
    return static_cast<int64_t>(resident) * 4096;
  };
  auto& pool = torchgc::HostPool::instance();
  pool.empty_cache();
  const int64_t block = 64 << 20;
  { auto host = call_offload(at::ones({block / 4})); }  // written, so resident
  ASSERT_EQ(pool.stats().cached_bytes, block);
  const int64_t before = rss_bytes();
  pool.empty_cache();
  EXPECT_LE(rss_bytes(), before - block * 9 / 10);
}

TEST(HostPool, NegativeLimitIsRejectedWithAClearMessage) {
  auto msg = error_of([] { torchgc::HostPool::instance().set_limit(-5); });
  EXPECT_NE(msg.find("torchgc::set_host_pool_limit"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'bytes' >= 0, or -1 for the automatic limit"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got -5"), std::string::npos) << msg;
}

TEST(OffloadCpu, ReloadRejectsBadArguments) {
  auto msg = error_of([] { call_reload(at::randn({2}), c10::Device(c10::kMeta)); });
  EXPECT_NE(msg.find("torchgc::reload: expected argument 'device'"), std::string::npos) << msg;
  msg = error_of([] { call_reload(at::empty({2}, at::kMeta), c10::Device(c10::kCPU)); });
  EXPECT_NE(msg.find("torchgc::reload: expected argument 'host' to be a CPU tensor, got one on meta"), std::string::npos) << msg;
}

}  // namespace
