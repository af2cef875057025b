// Per-channel arithmetic both devices share (no torch, no CUDA runtime): the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda, nvcc or the
// emulated GPU) include this one copy, so the two cannot drift apart.
#pragma once

#include <cmath>
#include <cstdint>

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

}  // namespace common
}  // namespace fused_bn
