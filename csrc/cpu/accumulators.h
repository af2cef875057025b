// Accumulators of the reductions: vector-lane sums folded into double,
// Moments (Chan's merge), double-lane sums of float32, and the backward's
// GradSums.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/channel_math.h"
#include "vec.h"

namespace fused_bn::cpu {

// Vector-lane sums in the accumulation type, folded into one double every
// kRowsPerFold additions (see kRowsPerFold).
template <typename Acc>
struct LaneSum {
  static constexpr int64_t kLanes = 2 * Vectorized<Acc>::size();
  // The double totals live apart from the vectors: gcc keeps a struct of
  // vectors in registers, but not one that also holds an array.
  struct Totals {
    double lanes[kLanes] = {};
    double sum() const {
      double t = 0.0;
      for (double v : lanes) t += v;
      return t;
    }
  };
  Vectorized<Acc> lo{Acc(0)}, hi{Acc(0)};

  void add(const Vectorized<Acc>& a, const Vectorized<Acc>& b) {
    lo = lo + a;
    hi = hi + b;
  }
  void add_product(const Vectorized<Acc>& a, const Vectorized<Acc>& b, const Vectorized<Acc>& c,
                   const Vectorized<Acc>& d) {
    lo = at::vec::fmadd(a, b, lo);
    hi = at::vec::fmadd(c, d, hi);
  }
  // Each lane into its own double total: a float tree-sum of the lanes would
  // round at the scale of the whole fold and cost the mean its last bit, and a
  // single running double total is a chain of dependent adds. This loop
  // vectorizes (float to double conversions and double adds).
  void fold(Totals& totals) {
    Acc lanes[kLanes];
    lo.store(lanes);
    hi.store(lanes + Vectorized<Acc>::size());
    for (int64_t i = 0; i < kLanes; ++i) totals.lanes[i] += static_cast<double>(lanes[i]);
    lo = hi = Vectorized<Acc>(Acc(0));
  }
};

// Count, mean and sum of squared deviations of one block or channel.
struct Moments {
  int64_t count = 0;
  double mean = 0.0;
  double m2 = 0.0;

  // Chan et al.'s pairwise update: exact for an empty side, stable otherwise.
  void merge(const Moments& other) { common::chan_merge(count, mean, m2, other.count, other.mean, other.m2); }

  static Moments from_shifted_sums(int64_t count, double shift, double sum, double sum_sq) {
    if (count == 0) return {};
    const double n = static_cast<double>(count);
    return {count, shift + sum / n, std::max(sum_sq - sum * sum / n, 0.0)};
  }
  // From Σx summed in double (kSumInDouble) and Σ(x − shift)².
  static Moments from_sum_and_shifted_squares(int64_t count, double shift, double sum, double sum_sq) {
    if (count == 0) return {};
    const double n = static_cast<double>(count);
    const double mean = sum / n;
    const double offset = mean - shift;
    return {count, mean, std::max(sum_sq - n * offset * offset, 0.0)};
  }
  // From the statistics loops' sums: Σx (kSumInDouble) or Σ(x − shift), and Σ(x − shift)².
  template <typename scalar_t>
  static Moments from_sums(int64_t count, double shift, double sum, double sum_sq);
};

// float32 statistics sum x itself in double lanes; the squares keep float
// lanes of x − shift. In float, every x − shift rounds at 2^-24·|x − shift|,
// and over a channel those roundings moved a mean that is small next to the
// spread (N(0, 1) data, mean 0.03) by up to 6 ulps, where nn's CPU kernel
// sums float32 in double and rounds its mean correctly; the backward of a
// cancelling channel (dy constant, two values) and a running_mean near 0
// inherited that error at 3x nn's (tests/test_properties.py). The squares
// need only relative accuracy. bfloat16 and float16: x − shift is exact in
// float and nn sums them in float too. float64 sums in double anyway.
template <typename scalar_t>
constexpr bool kSumInDouble = std::is_same_v<scalar_t, float>;

template <typename scalar_t>
Moments Moments::from_sums(int64_t count, double shift, double sum, double sum_sq) {
  return kSumInDouble<scalar_t> ? from_sum_and_shifted_squares(count, shift, sum, sum_sq)
                                : from_shifted_sums(count, shift, sum, sum_sq);
}

// Σ of float vectors in double lanes (kSumInDouble), four accumulators so a
// pair's four widened halves add in parallel.
struct WideSum {
  using DoubleVec = Vectorized<double>;
  DoubleVec a{0.0}, b{0.0}, c{0.0}, d{0.0};
  void add(const Vectorized<float>& lo, const Vectorized<float>& hi) {
    const auto [lo0, lo1] = widen(lo);
    const auto [hi0, hi1] = widen(hi);
    a = a + lo0;
    b = b + lo1;
    c = c + hi0;
    d = d + hi1;
  }
  // Lane by lane into totals[0..4·DoubleVec::size()), in the pair's lane order.
  void add_lanes_to(double* totals) const {
    constexpr int64_t W = DoubleVec::size();
    (DoubleVec::loadu(totals) + a).store(totals);
    (DoubleVec::loadu(totals + W) + b).store(totals + W);
    (DoubleVec::loadu(totals + 2 * W) + c).store(totals + 2 * W);
    (DoubleVec::loadu(totals + 3 * W) + d).store(totals + 3 * W);
  }
  // Into partials[0..DoubleVec::size()) (ShortPlane's per-channel partials).
  void add_to(double* partials) const {
    (DoubleVec::loadu(partials) + ((a + b) + (c + d))).store(partials);
  }
  double total() const {
    double lanes[DoubleVec::size()];
    ((a + b) + (c + d)).store(lanes);
    double t = 0.0;
    for (double v : lanes) t += v;
    return t;
  }
};

// Sums for the backward reduction: Σg, Σg·(x − mean) and Σ(x − mean), with
// mean the saved (rounded) mean. Σ(x − mean) = n·(x̄ − mean) recovers the
// exact batch mean x̄ (see centered_sum_dy_xmu).
struct GradSums {
  double sum_dy = 0.0;
  double sum_dy_xmu = 0.0;
  double sum_xmu = 0.0;
  void add(const GradSums& other) {
    sum_dy += other.sum_dy;
    sum_dy_xmu += other.sum_dy_xmu;
    sum_xmu += other.sum_xmu;
  }
  // Σg·(x − x̄) over `count` values, x̄ the exact batch mean (training).
  double centered_sum_dy_xmu(int64_t count) const {
    return common::centered_sum_dy_xmu(sum_dy, sum_dy_xmu, sum_xmu, count);
  }
};

// A block's sums from its lanes' sums, except where its g is one value G
// throughout: then Σg = G·count and Σg·(x − mean) = G·Σ(x − mean), in double.
// The lanes round G·count and G·(x − mean) a few ulps away from those, and
// g − Σg/count and centered_sum_dy_xmu would turn the difference into a
// nonzero dx where nn's and the true one are 0: a loss of y.sum() or y.mean()
// gives such a dy. A per-lane flag of g != G (bitwise OR of compare masks)
// tells the blocks apart.
template <typename scalar_t>
inline GradSums block_grad_sums(bool g_constant, const scalar_t* first_dy, int64_t count, double lanes_sum_dy,
                                double lanes_sum_dy_xmu, double sum_xmu) {
  if (!g_constant) return {lanes_sum_dy, lanes_sum_dy_xmu, sum_xmu};
  const double g = static_cast<double>(static_cast<acc_type<scalar_t>>(*first_dy));
  // + 0.0: an all-zero g sums to +0 in the lanes, and so it does here.
  return {g * static_cast<double>(count) + 0.0, g * sum_xmu + 0.0, sum_xmu};
}

// True where no lane of the OR-ed g != G compare masks is set.
template <typename V>
inline bool no_lane_set(const V& flags) {
  return flags.zero_mask() == (1 << V::size()) - 1;
}

}  // namespace fused_bn::cpu
