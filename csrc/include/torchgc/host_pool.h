#pragma once
// Host memory that offloaded activations live in. Pageable blocks are cached by exact byte size
// and reused across steps, bounded by a limit; pinned blocks (CUDA) come from torch's caching
// host allocator and are only counted here.
#include <ATen/ATen.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace torchgc {

struct HostPoolStats {
  int64_t reserved_bytes = 0;  // pageable bytes held by the pool, cached or in use
  int64_t in_use_bytes = 0;    // bytes of live offloaded host tensors, pageable and pinned
  int64_t limit_bytes = 0;     // most pageable bytes kept cached; 0 means no limit
  int64_t pinned_fallbacks = 0;  // times pinning failed and pageable memory was used instead
};

class HostPool {
 public:
  static HostPool& instance();

  // A contiguous CPU tensor backed by a cached pageable block.
  at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype);
  // Wraps a block from another allocator (pinned memory) so its bytes count as in use.
  at::Tensor adopt(c10::DataPtr block, size_t nbytes, at::IntArrayRef sizes, at::ScalarType dtype);
  // The DataPtr of `host` as its own allocator made it, if `host` came from adopt(); else null.
  static const c10::DataPtr* adopted_block(const at::Tensor& host);

  HostPoolStats stats();
  void set_limit(int64_t bytes);
  void empty_cache();
  void note_pinned_fallback();

 private:
  struct Block;
  struct Adopted;
  static void free_block(void* ctx);
  static void free_adopted(void* ctx);
  void release(Block* block);
  void trim_locked(int64_t keep_bytes);

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> free_blocks_;  // keyed by exact byte size
  HostPoolStats stats_;
};

}  // namespace torchgc
