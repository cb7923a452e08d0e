// What the oneDNN FFI handlers of jaxclf (onednn_conv.cc, onednn_norm_pool.cc) share: one CPU
// engine, one execution mutex, the threading knobs, and per-thread workspaces. Inline functions
// with static locals, so the two translation units see one instance of each.
#pragma once

#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

#include "dnnl.hpp"

namespace jaxclf_onednn {

inline dnnl::engine& Engine() {
  static dnnl::engine* eng = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *eng;
}

// Serialises calls: one oneDNN call already uses every core through OpenMP, and two OpenMP
// teams on a 2-core machine only oversubscribe it.
inline std::mutex& ExecMutex() {
  static std::mutex* mu = new std::mutex();
  return *mu;
}
inline int& Serialize() {
  static int on = 1;
  return on;
}
inline int& NumThreads() {  // 0: leave OpenMP's default
  static int n = 0;
  return n;
}

inline size_t AlignUp(size_t n) { return (n + 63) & ~size_t{63}; }

// Per-thread workspace (reorder buffers + scratchpad), grown on demand, 64-byte aligned.
struct Workspace {
  void* p = nullptr;
  size_t n = 0;
  ~Workspace() { std::free(p); }
  char* Get(size_t bytes) {
    if (bytes == 0) bytes = 64;
    if (bytes > n) {
      std::free(p);
      n = AlignUp(bytes);
      p = std::aligned_alloc(64, n);
      if (!p) n = 0;
    }
    if (!p) throw std::bad_alloc();
    return static_cast<char*>(p);
  }
};
inline Workspace& ThreadWorkspace() {
  thread_local Workspace ws;
  return ws;
}

// Takes the execution mutex when calls are serialised (or `force`), and applies the thread count.
struct ExecGuard {
  std::unique_lock<std::mutex> lock;
  explicit ExecGuard(bool force) : lock(ExecMutex(), std::defer_lock) {
    if (Serialize() || force) lock.lock();
    if (NumThreads() > 0) omp_set_num_threads(NumThreads());
  }
};

// FNV-1a over a fixed-size key of int64s: the plan caches' hash.
template <int N>
struct Int64Key {
  int64_t v[N];
  bool operator==(const Int64Key& o) const { return std::memcmp(v, o.v, sizeof(v)) == 0; }
};
struct Int64KeyHash {
  template <int N>
  size_t operator()(const Int64Key<N>& k) const {
    uint64_t h = 1469598103934665603ull;
    for (int64_t x : k.v) {
      h ^= static_cast<uint64_t>(x);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

}  // namespace jaxclf_onednn
