// Scratch memory for implementations, with peak accounting.
//
// Implementations take every temporary buffer from the Workspace they are given
// (call `alloc` outside OpenMP regions, e.g. one slab per thread). The harness
// reports the peak as the implementation's working memory beyond inputs and
// outputs. Anything allocated behind the workspace's back is still seen by the
// process-wide counting allocator (AllocCounter), which the benchmark reports too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

// 1 in AddressSanitizer builds: GCC defines __SANITIZE_ADDRESS__, clang only
// answers __has_feature(address_sanitizer). The counting operator new is off there.
#if defined(__SANITIZE_ADDRESS__)
#define ATTNBENCH_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ATTNBENCH_ASAN 1
#endif
#endif
#ifndef ATTNBENCH_ASAN
#define ATTNBENCH_ASAN 0
#endif

namespace attnbench {

class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace();

  /// `bytes` of uninitialized memory aligned to 64 bytes, valid until release().
  void* allocate(size_t bytes);
  template <class T>
  T* alloc(size_t n) {
    return static_cast<T*>(allocate(n * sizeof(T)));
  }
  /// Frees everything allocated so far; the peak is kept.
  void release();

  size_t current_bytes() const { return current_; }
  size_t peak_bytes() const { return peak_; }
  void reset_peak() { peak_ = current_; }

 private:
  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> blocks_;
  size_t current_ = 0;
  size_t peak_ = 0;
};

/// Process-wide counts from the replaced global operator new/delete
/// (all zero in AddressSanitizer builds, which keep ASan's operator new).
struct AllocCounter {
  struct Snapshot {
    int64_t allocs;
    int64_t bytes_in_use;
    int64_t peak_bytes;  // since the last reset_peak()
  };
  static Snapshot snapshot();
  static void reset_peak();
};

}  // namespace attnbench
