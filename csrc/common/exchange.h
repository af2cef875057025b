// The exchange formats of the data-parallel ops (FusedSyncBatchNorm2d), the
// same on every device so ranks can all_gather / all_reduce plain float64
// tensors: a rank's forward statistics are one [C, kExchangedMoments] tensor,
// its backward sums one [C, kExchangedGradSums] tensor.
#pragma once

#include <cstdint>

namespace fused_bn {
namespace common {

// One channel's moments: (count, mean, M2) as three doubles. All ranks' are
// one all_gather, merged in rank order by Chan's formula.
constexpr int64_t kExchangedMoments = 3;
constexpr int64_t kMomentsCount = 0, kMomentsMean = 1, kMomentsM2 = 2;

// One channel's backward sums: (Σdy, Σdy·(x − mean), Σ(x − mean)) about the
// saved mean, as three doubles; ranks add them with one all_reduce.
constexpr int64_t kExchangedGradSums = 3;

}  // namespace common
}  // namespace fused_bn
