// Host side of the launches: vector width, grid plans (the one layout x
// vector-width switch, with_vector_width), workspace layout.
#pragma once

#include "device_primitives.cuh"
#include "epilogues.cuh"
#include "traversals.cuh"

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
// N x HW/vec vector positions; an element pass on scalar accesses (planes not
// whole vectors) instead walks the flattened tensor, grid (blocks), each
// block a run of work_per_split consecutive elements (channels_first_element_pass).
// Channels-last: grid (column tiles, splits), blocks of (block.x vector
// columns) x (block.y rows); splits cut the N*HW rows.
struct LaunchPlan {
  dim3 grid;
  dim3 block;
  int64_t work_per_split = 0;  // vector positions (channels-first), elements (flattened) or rows (channels-last)
  int64_t splits = 1;
  int vec = 1;
  // Channels-first reduction on the staged traversal (uses_staged_planes):
  // grid (channel groups, splits), work_per_split images.
  bool staged = false;
};

// What a plan is for: a reduction (a block's partial per split and channel,
// merged by a finalize pass) or an element pass (nothing to merge).
enum class PassKind { kReduction, kElement };

// The waves a grid takes go by whole waves: blocks / (ceil(blocks / wave) *
// wave) of them do work (1: the last wave is full).
inline double wave_fill(int64_t blocks, int64_t wave) {
  return static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, wave) * wave);
}

struct WorkSplit {
  int64_t splits = 1;
  int64_t work_per_split = 0;
};

// `work` cut into at most `splits` pieces of whole granules (so every thread
// of a split does the same number of iterations), at least one granule each.
inline WorkSplit split_work(int64_t work, int64_t splits, int64_t granule) {
  WorkSplit s;
  s.work_per_split = std::max<int64_t>(granule, round_up(ceil_div(work, std::max<int64_t>(1, splits)), granule));
  s.splits = std::max<int64_t>(1, ceil_div(work, s.work_per_split));
  return s;
}

// Waves a grid may take to fill its last one better (more blocks, more partials).
constexpr int64_t kMaxWaves = 4;
// Fills within this of the best count as equal; the fewest blocks among them win.
constexpr double kWaveFillTolerance = 1.0 / 32;

// The split of `work` for a grid of `units` x splits blocks, `wave` blocks
// resident at once, at most max_splits: among the splits that fill one wave
// (rounded up: the plan before issue 39's fix) and those that fill 1..kMaxWaves
// whole waves without going over, the one whose last wave is fullest (within
// kWaveFillTolerance, the fewest blocks). A function of the shape and the
// grid alone, as the determinism and the workspace's size need.
inline WorkSplit wave_filling_split(int64_t units, int64_t work, int64_t granule, int64_t max_splits, int64_t wave) {
  max_splits = std::max<int64_t>(1, std::min(max_splits, kMaxGridY));
  const auto clamp = [&](int64_t s) { return std::max<int64_t>(1, std::min(s, max_splits)); };
  WorkSplit candidates[kMaxWaves + 1];
  double fills[kMaxWaves + 1];
  candidates[0] = split_work(work, clamp(ceil_div(wave, units)), granule);
  for (int64_t k = 1; k <= kMaxWaves; ++k) candidates[k] = split_work(work, clamp(k * wave / units), granule);
  double best = 0.0;
  for (int64_t i = 0; i <= kMaxWaves; ++i) {
    fills[i] = wave_fill(units * candidates[i].splits, wave);
    best = std::max(best, fills[i]);
  }
  WorkSplit chosen = candidates[0];
  bool found = false;
  for (int64_t i = 0; i <= kMaxWaves; ++i) {
    if (fills[i] + kWaveFillTolerance < best) continue;
    if (!found || candidates[i].splits < chosen.splits) chosen = candidates[i];
    found = true;
  }
  return chosen;
}

// A channels-last grid: blocks of block_x vector columns x block_y rows,
// tiles of block_x columns, splits of whole block_y rows each cutting the
// N*HW rows, each thread taking at least min_rows_per_thread of them (where
// there are that many) and each split at least min_rows_per_split, sized by
// wave_filling_split.
inline LaunchPlan channels_last_plan(const Geometry& g, int vec, int threads_per_multiprocessor, int block_x,
                                     int64_t min_rows_per_thread, int64_t min_rows_per_split = 0) {
  LaunchPlan plan;
  plan.vec = vec;
  const int64_t columns = g.C / vec;
  const int64_t rows = g.N * g.HW;
  int block_y = kMaxThreads / block_x;
  while (block_y > 1 && block_y >= 2 * rows) block_y /= 2;
  const int64_t tiles = ceil_div(columns, block_x);
  const int64_t wave = static_cast<int64_t>(std::max(g.multiprocessor_count, 1)) *
                       std::max(1, threads_per_multiprocessor / (block_x * block_y));
  const int64_t splits_with_work =
      ceil_div(rows, std::max(static_cast<int64_t>(block_y) * min_rows_per_thread, min_rows_per_split));
  const WorkSplit split = wave_filling_split(tiles, rows, block_y, splits_with_work, wave);
  plan.work_per_split = split.work_per_split;
  plan.splits = split.splits;
  plan.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(plan.splits), 1);
  plan.block = dim3(static_cast<unsigned>(block_x), static_cast<unsigned>(block_y), 1);
  return plan;
}

// Issue 39: a channels-last reduction whose threads each take
// kUnroll * kMinIterationsPerThread rows leaves most of a wave idle on short
// planes with few vector columns (ResNet-50 at batch 64 on 132
// multiprocessors: float32 512x7x7 and bfloat16 256x14x14 ran 100 and 98
// blocks, 0.19 of a wave). Filling a wave there means fewer rows per thread
// whatever the block shape (a wave of 256-thread blocks holds 135k threads;
// float32 512x7x7 has 401k vector positions: 3 each), and more splits: each
// split writes 3 doubles per channel that the finalize pass reads back.
// So, where the plan above fills less than a wave (to within
// kWaveFillTolerance):
//  - a thread may go down to kMinRowsPerThreadToFill rows (two: one row would
//    leave a thread's block merge and partial store costing more than its
//    loads, and would fill no ResNet shape that two rows leave short, since
//    a wave of those takes 1.5 rows a thread at bfloat16 512x7x7);
//  - blocks may narrow to kMinFillColumns vector columns (128 bytes of a row,
//    a whole line per row and warp, and tiles that start on whole sectors):
//    at a given block count a channel's splits, so its partials, go with the
//    block width (float32 512x7x7 filled with 32-column blocks writes 131
//    splits' partials, 1.6 MB beside its 6.3 MB input; with 8-column ones
//    33 splits, 0.4 MB). Only 16-byte vector columns narrow: a scalar
//    column of 16-bit type is 2 bytes, and 8 of them would split sectors
//    between tiles;
//  - a split keeps at least kMinRowsPerSplitToFill rows, so that its
//    partials (24 bytes a channel) stay under a fifth of the bytes it reads
//    of a 16-bit tensor (2 bytes a row and channel), a tenth of a float32
//    one's. It binds only blocks that cannot narrow (8-row blocks of 32
//    scalar columns would otherwise split 16 rows at a time).
// Among those grids (and the plan above): the fullest last wave (within
// kWaveFillTolerance), then the fewest splits (partials), then the fuller
// last wave, then the fewest blocks. Shapes the plan above fills keep it. A function of the shape and
// the multiprocessor count alone, as the determinism and the workspace's size
// (sized from this plan) need.
constexpr int64_t kMinRowsPerThreadToFill = 2;
constexpr int kMinFillColumns = 8;
constexpr int64_t kMinRowsPerSplitToFill = 64;

inline int64_t plan_blocks(const LaunchPlan& plan) {
  return static_cast<int64_t>(plan.grid.x) * plan.grid.y * plan.grid.z;
}

// The blocks of the plan's shape resident at once.
inline int64_t plan_wave(const LaunchPlan& plan, int64_t multiprocessors, int threads_per_multiprocessor) {
  const int64_t threads = static_cast<int64_t>(plan.block.x) * plan.block.y * plan.block.z;
  return multiprocessors * std::max<int64_t>(1, threads_per_multiprocessor / std::max<int64_t>(1, threads));
}

inline double plan_wave_fill(const LaunchPlan& plan, int64_t multiprocessors, int threads_per_multiprocessor) {
  return wave_fill(plan_blocks(plan), plan_wave(plan, multiprocessors, threads_per_multiprocessor));
}

inline LaunchPlan channels_last_reduction_plan(const Geometry& g, int vec, int threads_per_multiprocessor,
                                               int block_x, const LaunchPlan& plan_at_min_iterations) {
  const int64_t multiprocessors = std::max(g.multiprocessor_count, 1);
  // A grid of a wave or more is wave_filling_split's (it fills the last wave).
  const int64_t blocks = plan_blocks(plan_at_min_iterations);
  if (blocks >= plan_wave(plan_at_min_iterations, multiprocessors, threads_per_multiprocessor) ||
      plan_wave_fill(plan_at_min_iterations, multiprocessors, threads_per_multiprocessor) + kWaveFillTolerance >= 1.0) {
    return plan_at_min_iterations;
  }
  LaunchPlan candidates[8];
  int count = 0;
  candidates[count++] = plan_at_min_iterations;
  for (int x = block_x;; x /= 2) {
    candidates[count++] = channels_last_plan(g, vec, threads_per_multiprocessor, x, kMinRowsPerThreadToFill,
                                             kMinRowsPerSplitToFill);
    // Halve while the half is a whole number of 32-byte sectors (an even
    // count of 16-byte vectors) and at least kMinFillColumns.
    if (vec == 1 || x % 4 != 0 || x / 2 < kMinFillColumns || count == 8) break;
  }
  double fills[8];
  double best = 0.0;
  for (int i = 0; i < count; ++i) {
    fills[i] = plan_wave_fill(candidates[i], multiprocessors, threads_per_multiprocessor);
    best = std::max(best, fills[i]);
  }
  int chosen = -1;
  for (int i = 0; i < count; ++i) {
    if (fills[i] + kWaveFillTolerance < best) continue;
    const bool better =
        chosen < 0 || candidates[i].splits < candidates[chosen].splits ||
        (candidates[i].splits == candidates[chosen].splits &&
         (fills[i] > fills[chosen] ||
          (fills[i] == fills[chosen] && plan_blocks(candidates[i]) < plan_blocks(candidates[chosen]))));
    if (better) chosen = i;
  }
  return candidates[chosen];
}

// resident_threads: what one multiprocessor holds of the pass's kernel
// (resident_threads_per_multiprocessor; 0: unknown). The grid aims at whole
// waves (wave_filling_split) of kTargetThreadsPerMultiprocessor per
// multiprocessor, or of what the kernel's registers allow when that is fewer
// (the channels-last reductions of 16-bit types hold 8 channels' double sums
// per thread). A reduction's thread gets at least kMinIterationsPerThread
// unrolled iterations (each split adds partials to write and merge), except
// a channels-last one whose grid would fill less than a wave
// (channels_last_reduction_plan); an element pass's, one.
inline LaunchPlan make_plan(const Geometry& g, int vec, int resident_threads = kTargetThreadsPerMultiprocessor,
                            PassKind kind = PassKind::kReduction) {
  LaunchPlan plan;
  plan.vec = vec;
  if (g.C <= 0) return plan;  // nothing is launched for C == 0
  const int threads_per_multiprocessor =
      resident_threads > 0 ? std::min(resident_threads, kTargetThreadsPerMultiprocessor)
                           : kTargetThreadsPerMultiprocessor;
  const int64_t multiprocessors = std::max(g.multiprocessor_count, 1);
  const int64_t min_iterations = kind == PassKind::kReduction ? kMinIterationsPerThread : 1;
  if (!g.channels_last) {
    // Flattened: scalar element passes (their warps then read whole sectors
    // where a channel's planes would leave each warp straddling two of them).
    const bool flat = kind == PassKind::kElement && vec == 1;
    const int64_t total = flat ? g.numel() : g.N * (g.HW / vec);
    // Small planes get small blocks rather than idle threads.
    int threads = kMaxThreads;
    while (threads > kWarpSize && threads >= 2 * total) threads /= 2;
    const int64_t wave = multiprocessors * std::max(1, threads_per_multiprocessor / threads);
    const int64_t units = flat ? 1 : g.C;
    const int64_t splits_with_work = ceil_div(total, static_cast<int64_t>(threads) * kUnroll * min_iterations);
    const WorkSplit split = wave_filling_split(units, total, threads, splits_with_work, wave);
    plan.work_per_split = split.work_per_split;
    plan.splits = split.splits;
    plan.grid = flat ? dim3(static_cast<unsigned>(plan.splits), 1, 1)
                     : dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(plan.splits), 1);
    plan.block = dim3(static_cast<unsigned>(threads), 1, 1);
    return plan;
  }
  const int64_t columns = g.C / vec;
  const int64_t rows = g.N * g.HW;
  const int block_x = static_cast<int>(std::min<int64_t>(columns, kWarpSize));
  const LaunchPlan plan_at_min_iterations =
      channels_last_plan(g, vec, threads_per_multiprocessor, block_x, kUnroll * min_iterations);
  if (kind != PassKind::kReduction || rows <= 0) return plan_at_min_iterations;
  return channels_last_reduction_plan(g, vec, threads_per_multiprocessor, block_x, plan_at_min_iterations);
}

// The plan of a staged reduction (uses_staged_planes; traversals.cuh's
// staged_planes_pass): grid (ceil(C / kStagedChannels), splits), splits
// cutting the N images, at least a round's images each, filling whole waves.
inline LaunchPlan make_staged_plan(const Geometry& g, int resident_threads) {
  LaunchPlan plan;
  plan.vec = 1;
  plan.staged = true;
  if (g.C <= 0) return plan;
  const int threads_per_multiprocessor =
      resident_threads > 0 ? std::min(resident_threads, kTargetThreadsPerMultiprocessor)
                           : kTargetThreadsPerMultiprocessor;
  const int64_t wave = static_cast<int64_t>(std::max(g.multiprocessor_count, 1)) *
                       std::max(1, threads_per_multiprocessor / kMaxThreads);
  const int64_t groups = ceil_div(g.C, static_cast<int64_t>(kStagedChannels));
  const int64_t images_per_round = kStagedElements / (std::min<int64_t>(g.C, kStagedChannels) * g.HW);
  const WorkSplit split = wave_filling_split(groups, g.N, 1, ceil_div(g.N, images_per_round), wave);
  plan.work_per_split = split.work_per_split;
  plan.splits = split.splits;
  plan.grid = dim3(static_cast<unsigned>(groups), static_cast<unsigned>(plan.splits), 1);
  plan.block = dim3(static_cast<unsigned>(kMaxThreads), 1, 1);
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

// make_pass_plan for an element pass (PassKind::kElement): the grid
// channels_first_element_pass and channels_last_element_pass walk.
template <auto kChannelsFirst, auto kChannelsLast>
LaunchPlan make_element_pass_plan(const Geometry& g, int vec) {
  const int resident = g.channels_last ? resident_threads_per_multiprocessor<kChannelsLast, kMaxThreads>()
                                       : resident_threads_per_multiprocessor<kChannelsFirst, kMaxThreads>();
  return make_plan(g, vec, resident, PassKind::kElement);
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
