// Host side of the launches: vector width, grid plans (the one layout x
// vector-width switch, with_vector_width), workspace layout.
#pragma once

#include "device_primitives.cuh"
#include "epilogues.cuh"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace fused_bn {
namespace cuda {
// Internal to the kernel layer (forward.cu, backward.cu).
namespace detail {

// ---------------------------------------------------------------------------
// Host side: grid plans, workspace layout, launches.

// 16-byte vectors when every pointer is 16-byte aligned and the contiguous run
// (HW for channels-first, C for channels-last) is a whole number of vectors,
// so no vector straddles two channels or two images; scalar accesses otherwise.
template <typename scalar_t>
int pick_vector_width(const Geometry& geometry, std::initializer_list<const void*> pointers) {
  constexpr int vec = kVectorWidth<scalar_t>;
  const int64_t run = !geometry.channels_last ? geometry.HW : geometry.C;
  if (run % vec != 0) return 1;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return vec;
}

// Channels-first: grid (C, splits), 1-D blocks over one channel's slice of
// N x HW/vec vector positions. Channels-last: grid (column tiles, splits),
// blocks of (block.x vector columns) x (block.y rows); splits cut the N*HW rows.
struct LaunchPlan {
  dim3 grid;
  dim3 block;
  int64_t work_per_split = 0;  // vector positions (channels-first) or rows (channels-last)
  int64_t splits = 1;
  int vec = 1;
};

// resident_threads: what one multiprocessor holds of the pass's kernel
// (resident_threads_per_multiprocessor; 0: unknown). The grid is one wave of
// kTargetThreadsPerMultiprocessor per multiprocessor, or of what the kernel's
// registers allow when that is fewer (the channels-last reductions of 16-bit
// types hold 8 channels' double sums per thread).
inline LaunchPlan make_plan(const Geometry& g, int vec, int resident_threads = kTargetThreadsPerMultiprocessor) {
  LaunchPlan plan;
  plan.vec = vec;
  if (g.C <= 0) return plan;  // nothing is launched for C == 0
  const int threads_per_multiprocessor =
      resident_threads > 0 ? std::min(resident_threads, kTargetThreadsPerMultiprocessor)
                           : kTargetThreadsPerMultiprocessor;
  const int64_t target_threads = static_cast<int64_t>(std::max(g.multiprocessor_count, 1)) *
                                 threads_per_multiprocessor;
  if (!g.channels_last) {
    const int64_t total = g.N * (g.HW / vec);
    // Small planes get small blocks rather than idle threads.
    int threads = kMaxThreads;
    while (threads > kWarpSize && threads >= 2 * total) threads /= 2;
    const int64_t blocks_wanted = std::max<int64_t>(1, target_threads / threads);
    int64_t splits = ceil_div(blocks_wanted, g.C);
    const int64_t splits_with_work =
        ceil_div(total, static_cast<int64_t>(threads) * kUnroll * kMinIterationsPerThread);
    splits = std::min(splits, std::max<int64_t>(1, splits_with_work));
    splits = std::max<int64_t>(1, std::min(splits, kMaxGridY));
    // Whole multiples of the block per split: every thread of a split does the
    // same number of iterations.
    plan.work_per_split = std::max<int64_t>(threads, round_up(ceil_div(total, splits), threads));
    plan.splits = std::max<int64_t>(1, ceil_div(total, plan.work_per_split));
    plan.grid = dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(plan.splits), 1);
    plan.block = dim3(static_cast<unsigned>(threads), 1, 1);
    return plan;
  }
  const int64_t columns = g.C / vec;
  const int64_t rows = g.N * g.HW;
  const int block_x = static_cast<int>(std::min<int64_t>(columns, kWarpSize));
  int block_y = kMaxThreads / block_x;
  while (block_y > 1 && block_y >= 2 * rows) block_y /= 2;
  const int64_t tiles = ceil_div(columns, block_x);
  const int64_t blocks_wanted = std::max<int64_t>(1, target_threads / (block_x * block_y));
  int64_t splits = ceil_div(blocks_wanted, tiles);
  const int64_t splits_with_work = ceil_div(rows, static_cast<int64_t>(block_y) * kUnroll * kMinIterationsPerThread);
  splits = std::min(splits, std::max<int64_t>(1, splits_with_work));
  splits = std::max<int64_t>(1, std::min(splits, kMaxGridY));
  plan.work_per_split = std::max<int64_t>(block_y, round_up(ceil_div(rows, splits), block_y));
  plan.splits = std::max<int64_t>(1, ceil_div(rows, plan.work_per_split));
  plan.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(plan.splits), 1);
  plan.block = dim3(static_cast<unsigned>(block_x), static_cast<unsigned>(block_y), 1);
  return plan;
}

// f(std::integral_constant<int, kVec>) for 16-byte vectors (vec ==
// kVectorWidth), else f(std::integral_constant<int, 1>): each kernel is
// instantiated for both.
template <typename scalar_t, typename F>
auto with_vector_width(int vec, F&& f) {
  constexpr int kVec = kVectorWidth<scalar_t>;
  if (vec == kVec) return f(std::integral_constant<int, kVec>{});
  return f(std::integral_constant<int, 1>{});
}

template <typename scalar_t, typename F>
cudaError_t with_vector_width(const LaunchPlan& plan, F&& f) {
  return with_vector_width<scalar_t>(plan.vec, f);
}

// Whether a pass applying activation A per element (its forward or its
// derivative) uses 16-byte vectors: not for float64 under an activation other
// than the identity. Its FP64 math calls slow-path subroutines (division,
// exp), across which few registers survive; two values per vector made ptxas
// spill there, one does not (and FP64 activations bound those kernels more
// than the width of their loads).
template <typename scalar_t, typename A>
constexpr bool kActivationVectors = !(std::is_same_v<scalar_t, double> && !std::is_same_v<A, common::Identity>);

// pick_vector_width, or 1 where kActivationVectors says no.
template <typename scalar_t, typename A>
int pick_activation_vector_width(const Geometry& geometry, std::initializer_list<const void*> pointers) {
  if constexpr (!kActivationVectors<scalar_t, A>) {
    return 1;
  } else {
    return pick_vector_width<scalar_t>(geometry, pointers);
  }
}

// with_vector_width for a pass applying activation A: only kVec = 1 is
// instantiated where kActivationVectors says no.
template <typename scalar_t, typename A, typename F>
auto with_activation_vector_width(int vec, F&& f) {
  if constexpr (!kActivationVectors<scalar_t, A>) {
    (void)vec;
    return f(std::integral_constant<int, 1>{});
  } else {
    return with_vector_width<scalar_t>(vec, f);
  }
}

// The plan of a pass whose kernels are kChannelsFirst and kChannelsLast (one
// vector width's), sized by the occupancy of the one that runs.
template <auto kChannelsFirst, auto kChannelsLast>
LaunchPlan make_pass_plan(const Geometry& g, int vec) {
  const int resident = g.channels_last ? resident_threads_per_multiprocessor<kChannelsLast, kMaxThreads>()
                                       : resident_threads_per_multiprocessor<kChannelsFirst, kMaxThreads>();
  return make_plan(g, vec, resident);
}

// Epilogues and gradient sources are dispatched by csrc/common/epilogue.h's
// common::with_epilogue and common::with_activation + common::with_grad_source,
// which expand FUSED_BN_ACTIVATIONS: every kernel templated on an activation
// is instantiated from that list (and FUSED_BN_CUDA_DTYPE_PAIRS), and a kind
// outside it aborts instead of running another epilogue.

// Carves typed arrays out of the caller's workspace. Run with a null base it
// only measures, so the byte count and the launch agree by construction.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}

  template <typename T>
  T* take(int64_t count) {
    const size_t offset = bytes_;
    bytes_ += (static_cast<size_t>(count) * sizeof(T) + kWorkspaceAlignment - 1) / kWorkspaceAlignment *
              kWorkspaceAlignment;
    return base_ != nullptr ? reinterpret_cast<T*>(base_ + offset) : nullptr;
  }

  size_t bytes() const { return bytes_; }

 private:
  char* base_;
  size_t bytes_ = 0;
};

inline int64_t count_per_channel(const Geometry& g) { return g.N * g.HW; }

// The one layout switch of the passes: kChannelsFirst or kChannelsLast (a
// pass's two kernels, which take the same arguments) on the plan's grid.
template <auto kChannelsFirst, auto kChannelsLast, typename... Args>
cudaError_t launch_for_layout(const Geometry& g, const LaunchPlan& plan, cudaStream_t stream, const Args&... args) {
  if (!g.channels_last) return launch_kernel<kChannelsFirst, kMaxThreads>(plan.grid, plan.block, stream, args...);
  return launch_kernel<kChannelsLast, kMaxThreads>(plan.grid, plan.block, stream, args...);
}

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
