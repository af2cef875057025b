// Per-channel arithmetic both devices share (no torch, no CUDA runtime): the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda, nvcc or the
// emulated GPU) include this one copy, so the formulas defined here cannot
// drift apart between them. Chan's merge of moments is not defined only
// here: chan_merge below (double, exact for an empty side) is the CPU's
// Moments::merge (csrc/cpu/accumulators.h) and both devices' merge of the
// ranks' exchanged moments, but two more copies of the same formula live
// apart and must change with it: the CUDA kernels' merge_moments
// (csrc/cuda/reductions.cuh), in the accumulation type inside the thread,
// warp and block reductions and across a channel's split partials
// (csrc/cuda/forward_kernels.cuh), with its own handling of an infinite delta
// and of an empty side; and the CPU's merge_row_blocks (csrc/cpu/rows.h), one
// block's weights for all its channels so that the loop vectorizes.
#pragma once

#include <cmath>
#include <cstdint>

#include "exchange.h"
#include "host_device.h"

namespace fused_bn {
namespace common {

FUSED_BN_HOST_DEVICE inline bool finite(double v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

FUSED_BN_HOST_DEVICE inline double square_root(double v) {
#if defined(__CUDA_ARCH__)
  return sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// Chan et al.'s pairwise merge of one channel's (count, mean, M2), exact for
// an empty side: the CPU's merges of its blocks' moments, and both devices'
// merge of the ranks' exchanged moments (merge_ranks_moments).
FUSED_BN_HOST_DEVICE inline void chan_merge(int64_t& count, double& mean, double& m2, int64_t other_count,
                                            double other_mean, double other_m2) {
  if (other_count == 0) return;
  if (count == 0) {
    count = other_count;
    mean = other_mean;
    m2 = other_m2;
    return;
  }
  const int64_t total = count + other_count;
  const double delta = other_mean - mean;
  const double other_fraction = static_cast<double>(other_count) / static_cast<double>(total);
  mean += delta * other_fraction;
  m2 += other_m2 + delta * delta * static_cast<double>(count) * other_fraction;
  count = total;
}

// Channel c's moments from all ranks' exchanged ones (all_stats[ranks][C][3],
// each rank's batch_norm_stats), merged in rank order: every rank merges the
// same gathered tensor the same way, so all get the same statistics, bit for bit.
FUSED_BN_HOST_DEVICE inline void merge_ranks_moments(const double* all_stats, int64_t ranks, int64_t channels,
                                                     int64_t c, int64_t& count, double& mean, double& m2) {
  count = 0;
  mean = m2 = 0.0;
  for (int64_t r = 0; r < ranks; ++r) {
    const double* rank_stats = all_stats + (r * channels + c) * kExchangedMoments;
    chan_merge(count, mean, m2, static_cast<int64_t>(rank_stats[kMomentsCount]), rank_stats[kMomentsMean],
               rank_stats[kMomentsM2]);
  }
}

// 1/√(var + ε): the saved invstd (from the biased batch variance) and eval's
// (from running_var).
FUSED_BN_HOST_DEVICE inline double inverse_std(double var, double eps) { return 1.0 / square_root(var + eps); }

// The variance running_var tracks, Σ(x − x̄)²/(n − 1): unbiased, as nn's; a
// single value per channel gives inf or NaN there too.
FUSED_BN_HOST_DEVICE inline double unbiased_variance(double m2, double n) { return m2 / (n - 1.0); }

// nn's running-statistics update, in double.
FUSED_BN_HOST_DEVICE inline double running_average(double old, double value, double factor) {
  return (1.0 - factor) * old + factor * value;
}

// momentum=None: the cumulative average, factor 1/num_batches_tracked (0
// before the first batch).
FUSED_BN_HOST_DEVICE inline double cumulative_average_factor(double batches_tracked) {
  return batches_tracked > 0 ? 1.0 / batches_tracked : 0.0;
}

// Σg·(x − x̄) over `count` values, x̄ the exact batch mean, from the sums about
// the saved mean (x̄ rounded to the accumulation type): Σg·(x − mean) carries
// that rounding times Σg, one ulp of the mean times Σg, which put bfloat16's
// grad_weight at 5x nn's error and left the dx of a dy constant over a channel
// (a loss of y.sum()) nonzero where nn's is 0. Σ(x − mean) = n·(x̄ − mean)
// removes it. Non-finite sums are kept as they are, so inf and NaN propagate
// as nn's do.
FUSED_BN_HOST_DEVICE inline double centered_sum_dy_xmu(double sum_dy, double sum_dy_xmu, double sum_xmu,
                                                       int64_t count) {
  const double grad_mean = sum_dy / static_cast<double>(count);
  if (!finite(grad_mean) || !finite(sum_xmu)) return sum_dy_xmu;
  return sum_dy_xmu - grad_mean * sum_xmu;
}

// The backward's per-channel coefficients, nn's factored form:
//   dx = (g − shift − (x − mean) · projection) · scale
// with scale = w · invstd, shift the mean of g and projection
// Σg·(x − x̄) / (n · var) = invstd² · Σg·(x − x̄) / n (training; zero in eval,
// where dx = g · scale). Expanded into dy · a + (x − mean) · b + c, a gradient
// that is pure cancellation (dy constant over a channel, or two values per
// channel) kept the roundings of a and c at the scale of dy and came out at up
// to 3x nn's error. scale is w · invstd rounded once, as the ReLU forward's.
struct GradInputCoefficients {
  double scale;
  double projection;
  double shift;
};

FUSED_BN_HOST_DEVICE inline GradInputCoefficients grad_input_coefficients(double weight, double invstd,
                                                                          double sum_dy, double centered_sum_dy_xmu,
                                                                          int64_t count, bool training) {
  GradInputCoefficients k{weight * invstd, 0.0, 0.0};
  if (training && count > 0) {
    const double n = static_cast<double>(count);
    k.projection = invstd * invstd * centered_sum_dy_xmu / n;
    k.shift = sum_dy / n;
  }
  return k;
}

// The training backward of a channel of two values, x̄ ± d. There
// x̂ = ±d/√(d² + ε), and dx = w·invstd·(g − ḡ − x̂·mean(g·x̂)) cancels to
// w·invstd·(g₀ − g₁)/2 · ε/(d² + ε): a value ε/(d² + ε) times the size of its
// terms, which the general path leaves to the float rounding of those terms
// and of the saved invstd (the rounding of invstd² alone moves it by
// 2·ulp·d²/ε). So such a channel is computed in double from ε and the exact
// variance, in closed form where every value is finite; elsewhere the general
// formula (in double) keeps nn's NaN/inf pattern. x and g are the two values
// and their gradients (already masked by an epilogue's ReLU).
struct TwoValuesGrads {
  double grad_weight, grad_bias;
  double grad_input[2];
};

FUSED_BN_HOST_DEVICE inline TwoValuesGrads two_values_grads(const double (&x)[2], const double (&g)[2], double weight,
                                                            double eps) {
  const double d = (x[0] - x[1]) / 2;  // x₀ − x̄; x₁ − x̄ is −d
  const double var = d * d, denom = var + eps;
  const double istd = 1.0 / square_root(denom);
  const double sum_g = g[0] + g[1], sum_g_xmu = (g[0] - g[1]) * d;
  TwoValuesGrads r;
  r.grad_weight = sum_g_xmu * istd;
  r.grad_bias = sum_g;
  const double scale = weight * istd;
  const bool all_finite = finite(g[0]) && finite(g[1]) && finite(d) && denom > 0;
  const double closed_dx0 = scale * (g[0] - g[1]) / 2 * (eps / denom);  // dx₁ = −dx₀
  for (int i = 0; i < 2; ++i) {
    const double xmu = i == 0 ? d : -d;
    r.grad_input[i] = all_finite ? (i == 0 ? closed_dx0 : -closed_dx0)
                                 : scale * (g[i] - sum_g / 2 - xmu * sum_g_xmu / (2 * denom));
  }
  return r;
}

}  // namespace common
}  // namespace fused_bn
