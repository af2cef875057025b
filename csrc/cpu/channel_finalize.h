// Per-channel finalization of the forward: saved statistics, the
// running-statistics update and the normalize coefficients.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/channel_math.h"
#include "accumulators.h"
#include "coefficients.h"

namespace fused_bn::cpu {

// Per-channel inputs and outputs of the ops, each of length C (may be null).
template <typename param_t>
struct ChannelTensors {
  const param_t* weight = nullptr;
  const param_t* bias = nullptr;
  param_t* running_mean = nullptr;
  param_t* running_var = nullptr;
};

template <typename param_t>
inline double param_or(const param_t* p, int64_t c, double fallback) {
  return p ? static_cast<double>(p[c]) : fallback;
}

// Normalize coefficients of channel c from a double mean and invstd.
template <typename scalar_t, typename param_t>
void set_normalize_coefs(int64_t c, double mean, double invstd, const ChannelTensors<param_t>& t,
                         ChannelCoefs<scalar_t>& k) {
  using Acc = acc_type<scalar_t>;
  const double scale = invstd * param_or(t.weight, c, 1.0);
  const Acc mean_rounded = static_cast<Acc>(mean);
  k.mean[c] = mean_rounded;
  k.scale[c] = static_cast<Acc>(scale);
  k.shift[c] = static_cast<Acc>(param_or(t.bias, c, 0.0) -
                                (mean - static_cast<double>(mean_rounded)) * scale);
}

// Finalizes channel c from its moments: saved statistics, running-statistics
// update, and the normalize coefficients (from the saved statistics with a
// ReLU epilogue: see ChannelCoefs).
template <typename scalar_t, typename param_t>
void finalize_channel_stats(int64_t c, const Moments& m, const ChannelTensors<param_t>& t,
                            double factor, double eps, acc_type<scalar_t>* save_mean,
                            acc_type<scalar_t>* save_invstd, bool coefs_from_saved, ChannelCoefs<scalar_t>& k) {
  using Acc = acc_type<scalar_t>;
  const double n = static_cast<double>(m.count);
  const double var = m.count > 0 ? m.m2 / n : 0.0;
  const double invstd = common::inverse_std(var, eps);
  save_mean[c] = static_cast<Acc>(m.mean);
  save_invstd[c] = static_cast<Acc>(invstd);
  if (m.count > 0 && t.running_mean) {
    t.running_mean[c] = static_cast<param_t>(common::running_average(static_cast<double>(t.running_mean[c]), m.mean, factor));
  }
  if (m.count > 0 && t.running_var) {
    t.running_var[c] = static_cast<param_t>(
        common::running_average(static_cast<double>(t.running_var[c]), common::unbiased_variance(m.m2, n), factor));
  }
  if (coefs_from_saved) {
    set_normalize_coefs<scalar_t>(c, static_cast<double>(save_mean[c]), static_cast<double>(save_invstd[c]), t, k);
  } else {
    set_normalize_coefs<scalar_t>(c, m.mean, invstd, t, k);
  }
}

}  // namespace fused_bn::cpu
