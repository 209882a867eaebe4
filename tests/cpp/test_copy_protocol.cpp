// The offload synchronization protocol (csrc/include/torchgc/copy_engine.h) on a simulated device.
//
// The simulated device queues every operation on its stream and runs nothing until the test says
// so; then it runs one queued operation at a time, picked at random among the streams whose next
// operation may run. So copies finish late and in any order the stream semantics allow. Memory
// comes from a caching allocator that hands a freed block out again at once, as torch's does on the
// compute stream. The device records a violation whenever a copy reads or writes a block that was
// freed (and so possibly reused) after the copy was queued, and the kernels the tests queue check
// the values they read. The engine never gets a blocking call: the device has none.
#include <gtest/gtest.h>

#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "torchgc/copy_engine.h"

namespace {

class Sim {
 public:
  struct Block {
    std::vector<float> data;
    int generation = 0;  // bumped when the block is freed: a queued copy that saw another one is late
  };

  // A tensor's hold on a block: freeing the last handle gives the block back to the allocator.
  struct Allocation {
    Allocation(Sim* sim, Block* block) : sim(sim), block(block) {}
    Allocation(const Allocation&) = delete;
    ~Allocation() { sim->free_block(block); }
    Sim* sim;
    Block* block;
  };
  using Buffer = std::shared_ptr<Allocation>;

  explicit Sim(unsigned seed, size_t floats) : rng_(seed), floats_(floats) {}

  Buffer alloc() {
    Block* block;
    if (!free_.empty()) {
      block = free_.back();  // the most recently freed block, as a caching allocator on one stream
      free_.pop_back();
    } else {
      blocks_.push_back(std::make_unique<Block>());
      block = blocks_.back().get();
      block->data.assign(floats_, 0.f);
    }
    return std::make_shared<Allocation>(this, block);
  }

  int new_stream() {
    streams_.emplace_back();
    return static_cast<int>(streams_.size()) - 1;
  }

  int new_event() {
    latest_record_.push_back(0);
    return static_cast<int>(latest_record_.size()) - 1;
  }

  void record(int event, int stream) {
    const int record = static_cast<int>(record_done_.size());
    record_done_.push_back(false);
    latest_record_[event] = record + 1;  // 0: never recorded
    streams_[stream].push_back(Op{Op::kRecord, record});
  }

  // As cudaStreamWaitEvent: waits for the event's record at the time of the call.
  void wait(int stream, int event) { streams_[stream].push_back(Op{Op::kWait, latest_record_[event] - 1}); }

  bool done(int event) const { return latest_record_[event] == 0 || record_done_[latest_record_[event] - 1]; }

  void copy(Block* dst, Block* src, size_t nbytes, int stream) {
    Op op{Op::kCopy, -1};
    op.dst = dst;
    op.src = src;
    op.dst_generation = dst->generation;
    op.src_generation = src->generation;
    op.floats = nbytes / sizeof(float);
    streams_[stream].push_back(op);
  }

  // Queues a kernel on `stream`: fn runs when the stream reaches it.
  void kernel(int stream, std::function<void()> fn) {
    Op op{Op::kKernel, -1};
    op.fn = std::move(fn);
    streams_[stream].push_back(std::move(op));
  }

  // Runs one queued operation whose stream may proceed; false when none may.
  bool step() {
    std::vector<size_t> ready;
    for (size_t s = 0; s < streams_.size(); ++s) {
      if (!streams_[s].empty() && may_run(streams_[s].front())) {
        ready.push_back(s);
      }
    }
    if (ready.empty()) {
      return false;
    }
    auto& stream = streams_[ready[std::uniform_int_distribution<size_t>(0, ready.size() - 1)(rng_)]];
    Op op = std::move(stream.front());
    stream.pop_front();
    run(op);
    return true;
  }

  // Runs everything queued; a stream left waiting would be a deadlock.
  void drain() {
    while (step()) {
    }
    for (const auto& stream : streams_) {
      EXPECT_TRUE(stream.empty()) << "a stream waits forever";
    }
  }

  // Runs a random number of queued operations: the device is part way through.
  void advance() {
    for (int n = std::uniform_int_distribution<int>(0, 6)(rng_); n > 0 && step(); --n) {
    }
  }

  void violation(const std::string& what) { violations.push_back(what); }
  size_t queued() const {
    size_t n = 0;
    for (const auto& stream : streams_) {
      n += stream.size();
    }
    return n;
  }
  bool in_use(const Block* block) const {
    for (const Block* free : free_) {
      if (free == block) {
        return false;
      }
    }
    return true;
  }

  std::vector<std::string> violations;

 private:
  struct Op {
    enum Kind { kRecord, kWait, kCopy, kKernel } kind;
    int record;
    Block* dst = nullptr;
    Block* src = nullptr;
    int dst_generation = 0;
    int src_generation = 0;
    size_t floats = 0;
    std::function<void()> fn{};
  };

  bool may_run(const Op& op) const { return op.kind != Op::kWait || op.record < 0 || record_done_[op.record]; }

  void run(Op& op) {
    switch (op.kind) {
      case Op::kRecord: record_done_[op.record] = true; break;
      case Op::kWait: break;
      case Op::kKernel: op.fn(); break;
      case Op::kCopy:
        if (op.src->generation != op.src_generation) {
          violation("a copy read a block that was freed after the copy was queued");
        }
        if (op.dst->generation != op.dst_generation) {
          violation("a copy wrote a block that was freed after the copy was queued");
        }
        std::copy(op.src->data.begin(), op.src->data.begin() + op.floats, op.dst->data.begin());
        break;
    }
  }

  void free_block(Block* block) {
    block->generation += 1;
    free_.push_back(block);
  }

  std::mt19937 rng_;
  size_t floats_;
  std::vector<std::unique_ptr<Block>> blocks_;
  std::vector<Block*> free_;
  std::vector<std::deque<Op>> streams_;
  std::vector<int> latest_record_;
  std::vector<bool> record_done_;
};

// Which waits a SimDevice drops: the protocol broken on purpose, to show that the simulation
// catches what the protocol prevents.
enum class Broken { kNothing, kCopyStreamWaits, kComputeStreamWaits };

// The simulation as copy_engine.h's Device.
struct SimDevice {
  using Stream = int;
  using Event = int;
  using Buffer = Sim::Buffer;

  Sim* sim;
  int copy_stream;
  Broken broken = Broken::kNothing;

  Event new_event() { return sim->new_event(); }
  void recycle(Event) {}
  void record(Event event, Stream stream) { sim->record(event, stream); }
  void wait(Stream stream, Event event) {
    const bool dropped = stream == copy_stream ? broken == Broken::kCopyStreamWaits : broken == Broken::kComputeStreamWaits;
    if (!dropped) {
      sim->wait(stream, event);
    }
  }
  bool done(Event event) { return sim->done(event); }
  void copy(const Buffer& dst, const Buffer& src, size_t nbytes, Stream stream) {
    sim->copy(dst->block, src->block, nbytes, stream);
  }
  static const void* key(const Buffer& buffer) { return buffer->block; }
};

constexpr size_t kFloats = 16;
constexpr size_t kBytes = kFloats * sizeof(float);

// Queues a kernel that fills `buffer` with `value` (a layer producing its output).
void fill(Sim& sim, int stream, const Sim::Buffer& buffer, float value) {
  sim.kernel(stream, [buffer, value] { std::fill(buffer->block->data.begin(), buffer->block->data.end(), value); });
}

// Queues a kernel that checks `buffer` holds `value` when it runs (a layer reading its input).
void expect(Sim& sim, int stream, const Sim::Buffer& buffer, float value, const std::string& what) {
  sim.kernel(stream, [&sim, buffer, value, what] {
    for (float v : buffer->block->data) {
      if (v != value) {
        sim.violation(what + ": read " + std::to_string(v) + ", expected " + std::to_string(value));
        return;
      }
    }
  });
}

struct Rig {
  Sim sim;
  int compute;
  int copy;
  torchgc::CopyEngine<SimDevice> engine;

  explicit Rig(unsigned seed, Broken broken = Broken::kNothing)
      : sim(seed, kFloats), compute(sim.new_stream()), copy(sim.new_stream()), engine(SimDevice{&sim, copy, broken}, copy) {}
};

// A training step's pattern: each layer's input is produced on the compute stream, offloaded, and
// its device block freed and reused by the next layer; backward reloads the inputs in reverse
// order one layer ahead (prefetch), waits just before use, and reads them. The device runs a
// little between the calls.
void offload_then_reload(Rig& s, int layers) {
  std::vector<Sim::Buffer> hosts;
  for (int layer = 0; layer < layers; ++layer) {
    auto input = s.sim.alloc();
    fill(s.sim, s.compute, input, 1.f + layer);
    auto host = s.sim.alloc();
    s.engine.copy(host, input, kBytes, s.compute, /*awaited=*/false);
    hosts.push_back(host);
    s.sim.advance();
  }  // each input's block is freed here and taken by the next layer's input
  std::vector<Sim::Buffer> reloaded(layers);
  auto start_reload = [&](int layer) {
    reloaded[layer] = s.sim.alloc();
    s.engine.copy(reloaded[layer], hosts[layer], kBytes, s.compute, /*awaited=*/true);
  };
  start_reload(layers - 1);
  for (int layer = layers - 1; layer >= 0; --layer) {
    if (layer > 0) {
      start_reload(layer - 1);
    }
    s.sim.advance();
    s.engine.wait(reloaded[layer], s.compute);
    expect(s.sim, s.compute, reloaded[layer], 1.f + layer, "layer " + std::to_string(layer) + "'s reloaded input");
    auto scratch = s.sim.alloc();  // the recompute's activations, reusing freed blocks
    fill(s.sim, s.compute, scratch, -1.f);
    reloaded[layer].reset();
  }
  hosts.clear();
  s.sim.drain();
}

TEST(CopyProtocol, NoBlockIsReadReusedOrFreedEarlyUnderAnyCompletionOrder) {
  for (unsigned seed = 0; seed < 300; ++seed) {
    Rig s(seed);
    offload_then_reload(s, 6);
    EXPECT_TRUE(s.sim.violations.empty()) << "seed " << seed << ": " << s.sim.violations.front();
    s.engine.collect();
    EXPECT_EQ(s.engine.unfinished(), 0u) << "seed " << seed;
  }
}

// Without the copy stream's waits, some completion order lets a copy read an input before the
// kernel producing it ran, or write a block a queued kernel still reads; without the compute
// stream's, a layer reads its input before the reload finished.
TEST(CopyProtocol, TheSimulationCatchesEachDroppedWait) {
  for (Broken broken : {Broken::kCopyStreamWaits, Broken::kComputeStreamWaits}) {
    size_t caught = 0;
    for (unsigned seed = 0; seed < 100; ++seed) {
      Rig s(seed, broken);
      offload_then_reload(s, 6);
      caught += !s.sim.violations.empty();
    }
    EXPECT_GT(caught, 10u) << "dropped waits: " << static_cast<int>(broken);
  }
}

TEST(CopyProtocol, OffloadCopiesWhatTheProducingKernelWroteEvenIfTheBlockIsReusedAtOnce) {
  for (unsigned seed = 0; seed < 100; ++seed) {
    Rig s(seed);
    auto input = s.sim.alloc();
    Sim::Block* block = input->block;
    fill(s.sim, s.compute, input, 7.f);
    auto host = s.sim.alloc();
    s.engine.copy(host, input, kBytes, s.compute, false);
    input.reset();  // the caller drops the source at once
    EXPECT_TRUE(s.sim.in_use(block)) << "the source block went back to the allocator before its copy ran";
    auto next = s.sim.alloc();  // not the source's block, which the engine still holds
    EXPECT_NE(next->block, block);
    fill(s.sim, s.compute, next, 8.f);
    s.sim.drain();
    s.engine.collect();
    EXPECT_FALSE(s.sim.in_use(block)) << "the source block is held after its copy finished";
    EXPECT_EQ(host->block->data, std::vector<float>(kFloats, 7.f));
    EXPECT_TRUE(s.sim.violations.empty()) << s.sim.violations.front();
  }
}

TEST(CopyProtocol, CallsReturnWhileCopiesAreStillQueuedAndWaitAfterACollectedCopyAddsNothing) {
  Rig s(0);
  auto input = s.sim.alloc();
  auto host = s.sim.alloc();
  s.engine.copy(host, input, kBytes, s.compute, false);
  auto back = s.sim.alloc();
  s.engine.copy(back, host, kBytes, s.compute, true);
  EXPECT_EQ(s.engine.unfinished(), 2u);
  EXPECT_GT(s.sim.queued(), 0u);  // nothing ran: the engine did not wait for the device
  s.sim.drain();
  s.engine.collect();
  EXPECT_EQ(s.engine.unfinished(), 0u);
  const size_t before = s.sim.queued();
  s.engine.wait(back, s.compute);  // the copy is known finished: no wait is queued
  EXPECT_EQ(s.sim.queued(), before);
}

}  // namespace
