#include "torchgc/host_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace torchgc {

namespace {

constexpr size_t kPage = 4096;

// Each block is its own anonymous mapping, so freeing one gives its pages back to the OS at once.
// Small or large, glibc's malloc would keep freed memory in its arenas (its mmap threshold grows
// after the first large free), and RSS would not follow the pool.
void* map_block(size_t nbytes) {
  void* ptr = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCHGC_CHECK(ptr != MAP_FAILED, "torchgc host pool: out of host memory mapping ", nbytes, " bytes (",
                std::strerror(errno), ")");
  return ptr;
}

}  // namespace

struct HostPool::Block {
  void* ptr;
  size_t nbytes;  // the class size
  size_t requested;  // the bytes of the tensor using it, while in use
  std::list<Block*>::iterator lru;  // its place in free_lru_, while cached
};

HostPool& HostPool::instance() {
  // Leaked on purpose: blocks may be freed by tensors that outlive static destruction.
  static HostPool* pool = new HostPool();
  return *pool;
}

size_t HostPool::size_class(size_t nbytes) {
  if (nbytes <= kPage) {
    return kPage;
  }
  size_t power = size_t{1} << (63 - __builtin_clzll(nbytes));  // the power of two at or below nbytes
  const size_t step = std::max(kPage, power / 4);
  return (nbytes + step - 1) / step * step;
}

Tensor HostPool::empty_like(const Tensor& like) {
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  const size_t cls = size_class(nbytes);
  Block* block = take_cached(cls);
  const bool fresh = block == nullptr;
  if (fresh) {
    block = new Block{map_block(cls), cls, 0, {}};  // outside the lock: mapping may take a while
  }
  block->requested = nbytes;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (fresh) {
      stats_.reserved_bytes += static_cast<int64_t>(cls);
    }
    stats_.in_use_bytes += static_cast<int64_t>(nbytes);
    pageable_in_use_ += static_cast<int64_t>(cls);
    peak_pageable_in_use_ = std::max(peak_pageable_in_use_, pageable_in_use_);
  }
  const auto strides = contiguous_strides(like.sizes());
  return torch::stable::from_blob(block->ptr, like.sizes(), strides, Device(DeviceType::CPU), like.scalar_type(),
                                  [block](void*) { instance().release(block); });
}

Tensor HostPool::adopt(const Tensor& block) {
  const auto nbytes = static_cast<int64_t>(block.numel() * block.element_size());
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.in_use_bytes += nbytes;
  }
  const auto strides = contiguous_strides(block.sizes());
  // The deleter holds `block` until the wrapper is freed, then gives it back to its allocator.
  return torch::stable::from_blob(block.data_ptr(), block.sizes(), strides, Device(DeviceType::CPU),
                                  block.scalar_type(), [block, nbytes](void*) { instance().release_adopted(nbytes); });
}

HostPool::Block* HostPool::take_cached(size_t cls) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = free_by_class_.find(cls);
  if (it == free_by_class_.end() || it->second.empty()) {
    return nullptr;
  }
  Block* block = it->second.back();  // the most recently freed of its class: likely still in cache
  it->second.pop_back();
  free_lru_.erase(block->lru);
  stats_.cached_bytes -= static_cast<int64_t>(cls);
  return block;
}

void HostPool::release_adopted(int64_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.in_use_bytes -= nbytes;
}

void HostPool::release(Block* block) {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.in_use_bytes -= static_cast<int64_t>(block->requested);
  pageable_in_use_ -= static_cast<int64_t>(block->nbytes);
  free_by_class_[block->nbytes].push_back(block);
  free_lru_.push_front(block);
  block->lru = free_lru_.begin();
  stats_.cached_bytes += static_cast<int64_t>(block->nbytes);
  trim_locked(cache_limit_locked());
}

int64_t HostPool::cache_limit_locked() const { return limit_ == kAutomaticLimit ? peak_pageable_in_use_ : limit_; }

void HostPool::trim_locked(int64_t keep_cached_bytes) {
  while (stats_.cached_bytes > keep_cached_bytes && !free_lru_.empty()) {
    Block* block = free_lru_.back();
    free_lru_.pop_back();
    auto& same_class = free_by_class_[block->nbytes];
    same_class.erase(std::find(same_class.begin(), same_class.end(), block));
    stats_.cached_bytes -= static_cast<int64_t>(block->nbytes);
    stats_.reserved_bytes -= static_cast<int64_t>(block->nbytes);
    munmap(block->ptr, block->nbytes);
    delete block;
  }
}

HostPoolStats HostPool::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  auto s = stats_;
  s.limit_bytes = cache_limit_locked();
  return s;
}

void HostPool::set_limit(int64_t bytes) {
  TORCHGC_CHECK(bytes >= 0 || bytes == kAutomaticLimit, "torchgc::set_host_pool_limit: expected argument 'bytes' >= 0, or ",
                kAutomaticLimit, " for the automatic limit, got ", bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  limit_ = bytes;
  trim_locked(cache_limit_locked());
}

void HostPool::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  trim_locked(0);
  peak_pageable_in_use_ = pageable_in_use_;  // the automatic limit learns the peak again
}

void HostPool::note_pinned_fallback() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.pinned_fallbacks += 1;
}

}  // namespace torchgc
