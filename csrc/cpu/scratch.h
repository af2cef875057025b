// Per-thread scratch buffers that outlive a call.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fused_bn::cpu {

// Per-thread scratch memory that outlives the call. Temporaries of a few
// hundred KB (the per-block partials) allocated on every call went through
// mmap/munmap or heap trimming, so every call page-faulted them in again and
// the munmaps cost TLB shootdowns on the other core, whenever glibc's
// thresholds fell that way (bench/NOTES.md, "Figures behind the kernels' choices"). The contents are stale: callers
// initialize what they read. Each use site has its own slot, so buffers live
// at the same time never alias.
enum class ScratchSlot {
  kCoefMean, kCoefScale, kCoefProjection, kCoefShift,
  kBlockMean, kBlockM2, kMean, kM2,
  kBlockShift, kBlockSum1, kBlockSum2, kBlockSum3, kBlockFlags, kBlockFlagLanes,
  kBlockSumDy, kBlockSumDyXmu, kBlockSumXmu, kSumDy, kSumDyXmu, kSumXmu,
  kRunMean, kRunScale, kRunProjection, kRunShift,
  kCoefForwardShift, kRunForwardShift, kStagedRun, kStagedPiece,
};

template <typename T, ScratchSlot kSlot>
inline T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

template <typename T, ScratchSlot kSlot>
inline T* thread_scratch_filled(int64_t n, T value) {
  T* p = thread_scratch<T, kSlot>(n);
  std::fill(p, p + n, value);
  return p;
}

}  // namespace fused_bn::cpu
