#include "torchgc/host_pool.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <new>

namespace torchgc {

struct HostPool::Block {
  void* ptr;
  size_t nbytes;
};

struct HostPool::Adopted {
  c10::DataPtr block;
  size_t nbytes;
};

HostPool& HostPool::instance() {
  // Leaked on purpose: blocks may be freed by tensors that outlive static destruction.
  static HostPool* pool = new HostPool();
  return *pool;
}

at::Tensor HostPool::empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  Block* block = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_blocks_.find(nbytes);
    if (it != free_blocks_.end() && !it->second.empty()) {
      block = it->second.back();
      it->second.pop_back();
    }
  }
  if (block == nullptr) {
    void* ptr = std::aligned_alloc(64, ((nbytes + 63) / 64) * 64 + 64);
    TORCH_CHECK(ptr != nullptr, "torchgc host pool: out of host memory allocating ", nbytes, " bytes");
    block = new Block{ptr, nbytes};
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.reserved_bytes += static_cast<int64_t>(nbytes);
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.in_use_bytes += static_cast<int64_t>(nbytes);
  }
  c10::DataPtr data(block->ptr, block, &HostPool::free_block, c10::Device(c10::kCPU));
  auto storage = c10::Storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data),
                              /*allocator=*/nullptr, /*resizable=*/false);
  return at::empty({0}, at::TensorOptions().dtype(dtype)).set_(storage, 0, sizes);
}

at::Tensor HostPool::adopt(c10::DataPtr block, size_t nbytes, at::IntArrayRef sizes, at::ScalarType dtype) {
  void* ptr = block.get();
  auto* adopted = new Adopted{std::move(block), nbytes};
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.in_use_bytes += static_cast<int64_t>(nbytes);
  }
  c10::DataPtr data(ptr, adopted, &HostPool::free_adopted, c10::Device(c10::kCPU));
  auto storage = c10::Storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data),
                              /*allocator=*/nullptr, /*resizable=*/false);
  return at::empty({0}, at::TensorOptions().dtype(dtype)).set_(storage, 0, sizes);
}

const c10::DataPtr* HostPool::adopted_block(const at::Tensor& host) {
  const auto& data = host.storage().data_ptr();
  if (data.get_deleter() != &HostPool::free_adopted) {
    return nullptr;
  }
  return &static_cast<Adopted*>(data.get_context())->block;
}

void HostPool::free_block(void* ctx) { instance().release(static_cast<Block*>(ctx)); }

void HostPool::free_adopted(void* ctx) {
  auto* adopted = static_cast<Adopted*>(ctx);
  {
    std::lock_guard<std::mutex> lock(instance().mutex_);
    instance().stats_.in_use_bytes -= static_cast<int64_t>(adopted->nbytes);
  }
  delete adopted;  // returns the block to its own allocator
}

void HostPool::release(Block* block) {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.in_use_bytes -= static_cast<int64_t>(block->nbytes);
  free_blocks_[block->nbytes].push_back(block);
  if (stats_.limit_bytes > 0 && stats_.reserved_bytes > stats_.limit_bytes) {
    trim_locked(stats_.limit_bytes);
  }
}

void HostPool::trim_locked(int64_t keep_bytes) {
  for (auto& [nbytes, blocks] : free_blocks_) {
    while (!blocks.empty() && stats_.reserved_bytes > keep_bytes) {
      Block* block = blocks.back();
      blocks.pop_back();
      stats_.reserved_bytes -= static_cast<int64_t>(block->nbytes);
      std::free(block->ptr);
      delete block;
    }
  }
}

HostPoolStats HostPool::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void HostPool::set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "torchgc::set_host_pool_limit: expected argument 'bytes' >= 0 (0 means no limit), got ", bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.limit_bytes = bytes;
  if (bytes > 0) {
    trim_locked(bytes);
  }
}

void HostPool::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  trim_locked(0);
}

void HostPool::note_pinned_fallback() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.pinned_fallbacks += 1;
}

}  // namespace torchgc
