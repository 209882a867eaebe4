#pragma once
// Host memory that offloaded activations live in. Pageable blocks come in size classes (four per
// power of two, so a class wastes at most a quarter of a block) and are cached for reuse across
// steps; a dynamic sequence length gives each step new sizes, and exact-size caching would grow
// without bound. Cached blocks beyond a cap are released least recently freed first, back to the
// OS (each block is its own mmap). Pinned blocks (CUDA) come from torch's caching host allocator
// and are only counted here.
#include "torchgc/stable.h"

#include <cstdint>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace torchgc {

struct HostPoolStats {
  int64_t reserved_bytes = 0;    // pageable bytes held by the pool, cached or in use
  int64_t in_use_bytes = 0;      // bytes of live offloaded host tensors, pageable and pinned
  int64_t limit_bytes = 0;       // most pageable bytes kept cached while not in use (the cap in force)
  int64_t pinned_fallbacks = 0;  // times pinning failed and pageable memory was used instead
  int64_t cached_bytes = 0;      // pageable bytes cached, not in use
};

class HostPool {
 public:
  // set_limit(kAutomaticLimit), the default: cache at most as many bytes as were ever in use at
  // once, so a steady training step finds every block it needs and the pool holds at most twice
  // its peak.
  static constexpr int64_t kAutomaticLimit = -1;

  static HostPool& instance();

  // The byte size of the block that holds `nbytes`: at least a page, then rounded up to a quarter
  // of the power of two below it.
  static size_t size_class(size_t nbytes);

  // A contiguous CPU tensor like `like` (its sizes and dtype) backed by a cached pageable block.
  Tensor empty_like(const Tensor& like);
  // A tensor on `block`'s memory (pinned memory from torch's allocator) whose bytes count as in
  // use until it is freed; it holds `block` until then.
  Tensor adopt(const Tensor& block);

  HostPoolStats stats();
  // Caps the cached (not in use) pageable bytes: `bytes` >= 0, or kAutomaticLimit.
  void set_limit(int64_t bytes);
  // Returns every cached block to the OS, and restarts the automatic limit's peak from now.
  void empty_cache();
  void note_pinned_fallback();

 private:
  struct Block;
  Block* take_cached(size_t cls);
  void release(Block* block);
  void release_adopted(int64_t nbytes);
  int64_t cache_limit_locked() const;
  void trim_locked(int64_t keep_cached_bytes);

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> free_by_class_;
  std::list<Block*> free_lru_;  // cached blocks, most recently freed first
  int64_t limit_ = kAutomaticLimit;
  int64_t pageable_in_use_ = 0;       // class bytes of the pageable blocks in use
  int64_t peak_pageable_in_use_ = 0;  // the most of them ever in use at once
  HostPoolStats stats_;
};

}  // namespace torchgc
