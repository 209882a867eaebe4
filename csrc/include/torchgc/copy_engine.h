#pragma once
// The offload ops' synchronization protocol, written once against a small stream/event interface:
// offload_cuda.cpp runs it on the CUDA runtime, and tests/cpp/test_copy_protocol.cpp on a
// simulated device whose copies finish late and out of order. It needs nothing of torch.
//
// A Device provides:
//   types Stream, Event, and Buffer (a handle that keeps its memory allocated while held);
//   Event new_event();                  recycle(Event): events are reused once their copy is done
//   record(Event, Stream):              the event completes when the stream's work so far has
//   wait(Stream, Event):                the stream's later work waits for the event
//   bool done(Event):                   asks, without blocking
//   copy(dst, src, nbytes, Stream):     queues an asynchronous copy
//   const void* key(const Buffer&):     the memory a buffer holds, which wait() is given
//
// The protocol:
//   1. The copy stream waits for an event recorded on the compute stream when the copy is issued:
//      the kernel producing the source has run, and a destination block that the compute stream
//      just reused from a freed tensor is no longer read by kernels queued before the free.
//   2. The copy runs on the copy stream, which records a done-event after it.
//   3. The source and the destination stay held until the done-event has completed, so neither
//      block is freed, and so reused, while the copy still reads or writes it. This replaces the
//      caching allocators' recordStream/record_event, which are not part of PyTorch's stable ABI.
//   4. wait(dst) makes the compute stream wait for the done-event of the copy into dst, just
//      before dst's first use; waiting when the copy is issued would make the prefetch useless.
//   5. Nothing blocks the host: finished copies are found by asking their events, each time the
//      engine is called.
#include <cstddef>
#include <deque>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace torchgc {

template <class Device>
class CopyEngine {
 public:
  using Stream = typename Device::Stream;
  using Event = typename Device::Event;
  using Buffer = typename Device::Buffer;

  CopyEngine(Device device, Stream copy_stream) : device_(std::move(device)), copy_stream_(copy_stream) {}

  // Copies src into dst after the work queued so far on `compute`, and returns at once.
  // `awaited`: the compute stream will read dst, and wait(dst) orders it after the copy.
  void copy(const Buffer& dst, const Buffer& src, size_t nbytes, Stream compute, bool awaited) {
    std::lock_guard<std::mutex> lock(mutex_);
    collect_locked();
    Event ready = device_.new_event();
    device_.record(ready, compute);
    device_.wait(copy_stream_, ready);
    device_.copy(dst, src, nbytes, copy_stream_);
    Event done = device_.new_event();
    device_.record(done, copy_stream_);
    pending_.push_back(Copy{ready, done, src, dst});
    if (awaited) {
      awaited_[Device::key(dst)] = done;
    }
  }

  // Makes `compute` wait for the unfinished copy into the memory of dst, if there is one.
  void wait(const Buffer& dst, Stream compute) {
    std::lock_guard<std::mutex> lock(mutex_);
    collect_locked();
    auto it = awaited_.find(Device::key(dst));
    if (it != awaited_.end()) {
      device_.wait(compute, it->second);
      awaited_.erase(it);
    }
  }

  // Lets go of the buffers and events of the copies that have finished; never blocks.
  void collect() {
    std::lock_guard<std::mutex> lock(mutex_);
    collect_locked();
  }

  size_t unfinished() {
    std::lock_guard<std::mutex> lock(mutex_);
    return pending_.size();
  }

 private:
  struct Copy {
    Event ready;
    Event done;
    Buffer src;
    Buffer dst;
  };

  // Copies finish in the order they were queued on the one copy stream: stop at the first that
  // has not.
  void collect_locked() {
    while (!pending_.empty() && device_.done(pending_.front().done)) {
      Copy& finished = pending_.front();
      auto it = awaited_.find(Device::key(finished.dst));
      if (it != awaited_.end() && it->second == finished.done) {
        awaited_.erase(it);  // finished: the compute stream has nothing left to wait for
      }
      device_.recycle(finished.ready);
      device_.recycle(finished.done);
      pending_.pop_front();
    }
  }

  Device device_;
  Stream copy_stream_;
  std::mutex mutex_;
  std::deque<Copy> pending_;
  std::unordered_map<const void*, Event> awaited_;
};

}  // namespace torchgc
