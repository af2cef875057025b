// Threads of the CPU kernels (the only ATen-parallel include of the kernel
// layer): ATen's pool, so a kernel shares the threads and the thread count of
// the rest of the model's ops.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "vec.h"

namespace fused_bn::cpu {

inline int64_t thread_count() { return at::get_num_threads(); }

// f(begin, end) over chunks of [begin, end) of at least `grain`, on the pool.
template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}

// f(i) for i in [0, n), spread over threads; each thread fences its streaming
// stores before the region ends.
template <typename F>
inline void parallel_over(int64_t n, F&& f, int64_t grain = 1) {
  parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
    stream_fence();
  });
}

}  // namespace fused_bn::cpu
