// Reductions, layered warp -> block -> column: Chan merges of moments and
// sums of several values, each with a fixed tree (determinism).
#pragma once

#include "device_primitives.cuh"

#include <cstdint>

namespace fused_bn {
namespace cuda {
// Internal to the kernel layer (forward.cu, backward.cu).
namespace detail {

// ---------------------------------------------------------------------------
// Moments (count, mean, sum of squared deviations) and their merges.

// The mean of two merged sides. Where either mean is infinite (an inf in the
// data) delta is inf or NaN, and mean + delta * fraction would give NaN where
// nn's Σx / n gives inf: the sides' means then add as their sums would
// (inf + finite = inf, inf - inf = NaN; an empty side's mean is 0).
template <typename T>
__device__ __forceinline__ T merged_mean(T mean, T delta, T other_fraction, T other_mean) {
  return isfinite(delta) ? mean + delta * other_fraction : mean + other_mean;
}

// Chan et al.'s pairwise merge; exact when either side is empty. The
// (delta * weight) * delta order keeps a huge delta against an empty side at 0
// rather than inf * 0.
template <typename T>
__device__ __forceinline__ void merge_moments(T& mean, T& m2, T& count, T other_mean, T other_m2,
                                              T other_count) {
  const T total = count + other_count;
  const T other_fraction = total > T(0) ? other_count * reciprocal_of_count(total) : T(0);
  const T delta = other_mean - mean;
  mean = merged_mean(mean, delta, other_fraction, other_mean);
  m2 += other_m2 + delta * (count * other_fraction) * delta;
  count = total;
}

// The reductions are written once, over an operator: Op::State is what a
// thread holds, Op::combine(a, b) folds b into a, Op::identity() is what an
// absent warp contributes, Op::shuffle_down(s, offset) is s from the lane
// `offset` above. Each layer has one fixed tree, so a result depends on the
// shape and the grid alone (determinism).

// Chan merges of (mean, m2, count).
template <typename T>
struct MomentsMerge {
  struct State {
    T mean, m2, count;
  };
  __device__ __forceinline__ static State identity() { return {T(0), T(0), T(0)}; }
  __device__ __forceinline__ static void combine(State& a, const State& b) {
    merge_moments(a.mean, a.m2, a.count, b.mean, b.m2, b.count);
  }
  __device__ __forceinline__ static State shuffle_down(const State& s, int offset) {
    return {__shfl_down_sync(kFullWarpMask, s.mean, offset), __shfl_down_sync(kFullWarpMask, s.m2, offset),
            __shfl_down_sync(kFullWarpMask, s.count, offset)};
  }
};

// Sums of kValues values.
template <typename T, int kValues>
struct Sums {
  struct State {
    T v[kValues];
  };
  __device__ __forceinline__ static State identity() {
    State s;
#pragma unroll
    for (int i = 0; i < kValues; ++i) s.v[i] = T(0);
    return s;
  }
  __device__ __forceinline__ static void combine(State& a, const State& b) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) a.v[i] += b.v[i];
  }
  __device__ __forceinline__ static State shuffle_down(const State& s, int offset) {
    State r;
#pragma unroll
    for (int i = 0; i < kValues; ++i) r.v[i] = __shfl_down_sync(kFullWarpMask, s.v[i], offset);
    return r;
  }
};

// Warp layer: a shuffle tree; the result lands in lane 0.
template <typename Op>
__device__ __forceinline__ void warp_reduce(typename Op::State& s) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) Op::combine(s, Op::shuffle_down(s, offset));
}

// Block layer (1-D block, blockDim.x a multiple of 32): each warp's result
// through shared memory into warp 0's tree; the result lands in thread 0.
template <typename Op>
__device__ __forceinline__ void block_reduce(typename Op::State& s) {
  __shared__ typename Op::State warp_state[kMaxThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  warp_reduce<Op>(s);
  if (lane == 0) warp_state[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < warps ? warp_state[lane] : Op::identity();
    warp_reduce<Op>(s);
  }
}

template <typename T>
__device__ __forceinline__ void warp_merge_moments(T& mean, T& m2, T& count) {
  typename MomentsMerge<T>::State s{mean, m2, count};
  warp_reduce<MomentsMerge<T>>(s);
  mean = s.mean, m2 = s.m2, count = s.count;
}

template <typename T>
__device__ __forceinline__ void block_merge_moments(T& mean, T& m2, T& count) {
  typename MomentsMerge<T>::State s{mean, m2, count};
  block_reduce<MomentsMerge<T>>(s);
  mean = s.mean, m2 = s.m2, count = s.count;
}

template <typename T, int kValues>
__device__ __forceinline__ void warp_sum(T (&v)[kValues]) {
  typename Sums<T, kValues>::State s;
#pragma unroll
  for (int i = 0; i < kValues; ++i) s.v[i] = v[i];
  warp_reduce<Sums<T, kValues>>(s);
#pragma unroll
  for (int i = 0; i < kValues; ++i) v[i] = s.v[i];
}

template <typename T, int kValues>
__device__ __forceinline__ void block_sum(T (&v)[kValues]) {
  typename Sums<T, kValues>::State s;
#pragma unroll
  for (int i = 0; i < kValues; ++i) s.v[i] = v[i];
  block_reduce<Sums<T, kValues>>(s);
#pragma unroll
  for (int i = 0; i < kValues; ++i) v[i] = s.v[i];
}

// Column layer. Channels-last blocks are (columns x rows): each column is
// reduced over threadIdx.y with a fixed halving tree in shared memory, rows
// [half, active) folding into rows [0, active - half); reads and writes of one
// step touch disjoint rows, so one barrier per step suffices. fold(other)
// folds the values of thread `other` (same column) into this thread's and
// stores the result at this thread's slot. The result lands in threadIdx.y == 0.
template <typename Fold>
__device__ __forceinline__ void column_tree(Fold&& fold) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int active = blockDim.y; active > 1;) {
    const int half = (active + 1) / 2;
    __syncthreads();
    if (static_cast<int>(threadIdx.y) < active - half) fold(tid + half * blockDim.x);
    active = half;
  }
}

// Each column's moments; column threads hold kVec channels that share one count.
template <typename T, int kVec>
__device__ __forceinline__ void block_merge_column_moments(T (&mean)[kVec], T (&m2)[kVec], T& count) {
  __shared__ T shared_mean[kVec * kMaxThreads];
  __shared__ T shared_m2[kVec * kMaxThreads];
  __shared__ T shared_count[kMaxThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    shared_mean[j * kMaxThreads + tid] = mean[j];
    shared_m2[j * kMaxThreads + tid] = m2[j];
  }
  shared_count[tid] = count;
  column_tree([&](int other) {
    const T other_count = shared_count[other];
    const T total = count + other_count;
    const T other_fraction = total > T(0) ? other_count * reciprocal_of_count(total) : T(0);
    const T own_weight = count * other_fraction;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const T other_mean = shared_mean[j * kMaxThreads + other];
      const T delta = other_mean - mean[j];
      mean[j] = merged_mean(mean[j], delta, other_fraction, other_mean);
      m2[j] += shared_m2[j * kMaxThreads + other] + delta * own_weight * delta;
      shared_mean[j * kMaxThreads + tid] = mean[j];
      shared_m2[j * kMaxThreads + tid] = m2[j];
    }
    count = total;
    shared_count[tid] = count;
  });
}

// Each column's kValues sums per channel, one sum after another through one
// shared array (a third of the shared memory of all at once: 16 KB for double
// sums of 8-wide columns).
template <typename T, int kValues, int kVec>
__device__ __forceinline__ void block_sum_columns(T (&v)[kValues][kVec]) {
  __shared__ T shared_v[kVec * kMaxThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    if (i > 0) __syncthreads();  // the previous sum's last reads are done
#pragma unroll
    for (int j = 0; j < kVec; ++j) shared_v[j * kMaxThreads + tid] = v[i][j];
    column_tree([&](int other) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v[i][j] += shared_v[j * kMaxThreads + other];
        shared_v[j * kMaxThreads + tid] = v[i][j];
      }
    });
  }
}

// Folds one load group (valid_rows x kCols values, all of one channel) into a
// thread's running moments: the group's own mean and m2 (two passes over
// registers), then one Chan merge, so one division pair per group instead of
// a division per element.
template <typename acc_t, int kRows, int kCols>
__device__ __forceinline__ void fold_channel_group(const acc_t (&values)[kRows][kCols], int valid_rows,
                                                   acc_t& mean, acc_t& m2, acc_t& count) {
  acc_t sum = acc_t(0);
#pragma unroll
  for (int u = 0; u < kRows; ++u) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) sum += values[u][j];  // invalid rows hold 0
  }
  const acc_t group_count = static_cast<acc_t>(valid_rows * kCols);
  const acc_t group_mean = sum * reciprocal_of_count(group_count);
  acc_t group_m2 = acc_t(0);
#pragma unroll
  for (int u = 0; u < kRows; ++u) {
    if (u < valid_rows) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const acc_t d = values[u][j] - group_mean;
        group_m2 += d * d;
      }
    }
  }
  merge_moments(mean, m2, count, group_mean, group_m2, group_count);
}

// Folds valid_rows rows of kCols channels (one channel per column) into
// per-channel moments that share one count.
template <typename acc_t, int kRows, int kCols>
__device__ __forceinline__ void fold_column_group(const acc_t (&values)[kRows][kCols], int valid_rows,
                                                  acc_t (&mean)[kCols], acc_t (&m2)[kCols],
                                                  acc_t& count) {
  const acc_t group_count = static_cast<acc_t>(valid_rows);
  const acc_t inverse_group_count = reciprocal_of_count(group_count);
  const acc_t total = count + group_count;
  const acc_t group_fraction = group_count * reciprocal_of_count(total);
  const acc_t own_weight = count * group_fraction;
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    acc_t sum = acc_t(0);
#pragma unroll
    for (int u = 0; u < kRows; ++u) sum += values[u][j];  // invalid rows hold 0
    const acc_t group_mean = sum * inverse_group_count;
    acc_t group_m2 = acc_t(0);
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      if (u < valid_rows) {
        const acc_t d = values[u][j] - group_mean;
        group_m2 += d * d;
      }
    }
    const acc_t delta = group_mean - mean[j];
    mean[j] = merged_mean(mean[j], delta, group_fraction, group_mean);
    m2[j] += group_m2 + delta * own_weight * delta;
  }
  count = total;
}

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
