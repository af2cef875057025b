// FusedSyncBatchNorm2d's forward ops: this rank's statistics in the
// exchange format, and the training forward from all ranks' statistics.
// (The backward's exchange is SumsExchange, backward.h.)
#pragma once

#include <cstdint>

#include "../common/exchange.h"
#include "channel_finalize.h"
#include "channel_statistics.h"
#include "forward.h"

namespace fused_bn::cpu {

// The exchange format (csrc/common/exchange.h).
using common::kExchangedMoments;

// Per-channel count, mean and M2 of x into out[C][3].
template <typename scalar_t>
void batch_stats(const scalar_t* x, const Geometry& g, double* out) {
  auto store = [&](int64_t c, const Moments& m) {
    out[c * kExchangedMoments + common::kMomentsCount] = static_cast<double>(m.count);
    out[c * kExchangedMoments + common::kMomentsMean] = m.mean;
    out[c * kExchangedMoments + common::kMomentsM2] = m.m2;
  };
  if (g.per_channel() == 0) {
    for (int64_t c = 0; c < g.C; ++c) store(c, Moments{});
  } else if (g.channels_last) {
    const int64_t rows = g.per_channel();
    nhwc_channel_moments(x, rows, g.C, [&](int64_t c_begin, int64_t c_end, const double* mean, const double* m2) {
      for (int64_t c = c_begin; c < c_end; ++c) store(c, Moments{rows, mean[c], m2[c]});
    });
  } else if (walks_channel_blocks<scalar_t>(g)) {
    const ChannelBlocking cb(g, sizeof(scalar_t));
    parallel_over(cb.blocks, [&](int64_t b) { channel_block_moments(x, g, cb.begin(b), cb.end(b, g.C), store); });
  } else {
    split_channel_moments(x, g, store);
  }
}

// The training forward with statistics gathered from `ranks` ranks
// (all_stats[ranks][C][3], as batch_stats writes them): the ranks' moments
// merge in rank order (Chan's formula, as within a rank), so every rank
// computes the same statistics and running-statistics update, bit for bit.
template <typename scalar_t, typename param_t, typename Epi>
void train_forward_with_stats(const scalar_t* x, const scalar_t* residual, scalar_t* y, const Geometry& g,
                              const ChannelTensors<param_t>& t, double factor, double eps,
                              const EpilogueArgs<scalar_t, Epi>& epilogue, const double* all_stats, int64_t ranks,
                              acc_type<scalar_t>* save_mean, acc_type<scalar_t>* save_invstd) {
  ChannelCoefs<scalar_t> k(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    Moments m;
    common::merge_ranks_moments(all_stats, ranks, g.C, c, m.count, m.mean, m.m2);
    finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd,
                                     /*coefs_from_saved=*/Epi::kCoefficientsFromSaved, k);
  }
  normalize<scalar_t, Epi>(x, residual, y, g, k, epilogue, streams_training_output<scalar_t>(g));
}

}  // namespace fused_bn::cpu
