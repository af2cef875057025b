// Per-channel moments of an input, one function per traversal, shared by
// the training forward and batch_stats.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "accumulators.h"
#include "nchw_planes.h"
#include "nchw_short_planes.h"
#include "parallel.h"
#include "plan.h"
#include "rows.h"
#include "scratch.h"

namespace fused_bn::cpu {

// Moments of every channel of N·H·W rows of C channels: on_channels(c_begin,
// c_end, mean, m2) is called, from several threads, for disjoint channel ranges
// with mean[c] and m2[c] final for those channels.
template <typename scalar_t, typename F>
void nhwc_channel_moments(const scalar_t* x, int64_t rows, int64_t C, F&& on_channels) {
  const RowBlockStrips tasks(rows, C, kTileWidth<scalar_t>, sizeof(scalar_t));
  const RowBlocking& rb = tasks.blocks;
  double* block_mean = thread_scratch<double, ScratchSlot::kBlockMean>(rb.blocks * C);
  double* block_m2 = thread_scratch<double, ScratchSlot::kBlockM2>(rb.blocks * C);
  double* mean = thread_scratch<double, ScratchSlot::kMean>(C);
  double* m2 = thread_scratch<double, ScratchSlot::kM2>(C);
  if (rb.blocks == 0) {  // no rows (an empty batch): no block to merge
    std::fill(mean, mean + C, 0.0);
    std::fill(m2, m2 + C, 0.0);
    on_channels(0, C, mean, m2);
    return;
  }
  parallel_over(tasks.tasks(), [&](int64_t t) {
    const int64_t b = tasks.block(t);
    nhwc_block_moments(x, C, tasks.strip(t, C), rb.begin(b), rb.end(b, rows), block_mean + b * C, block_m2 + b * C);
  });
  parallel_for(0, C, kMergeGrain, [&](int64_t c_begin, int64_t c_end) {
    merge_row_blocks(rb, rows, C, block_mean, block_m2, c_begin, c_end, mean, m2);
    on_channels(c_begin, c_end, mean, m2);
  });
}

// Moments of channels [c0, c1) of an NCHW input with short planes, walked as
// one channel block (ChannelBlocking) on the calling thread; on_channel(c, m)
// for each.
template <typename scalar_t, typename F>
void channel_block_moments(const scalar_t* x, const Geometry& g, int64_t c0, int64_t c1, F&& on_channel) {
  using Acc = acc_type<scalar_t>;
  const int64_t N = g.N, C = g.C, HW = g.HW;
  const ShortPlane<scalar_t> plane(HW, g.numel());
  constexpr int64_t P = ShortPlane<scalar_t>::kPartials;
  double* sum = thread_scratch_filled<double, ScratchSlot::kBlockSum1>((c1 - c0) * P, 0.0);
  double* sum_sq = thread_scratch_filled<double, ScratchSlot::kBlockSum2>((c1 - c0) * P, 0.0);
  Acc* shift = thread_scratch<Acc, ScratchSlot::kBlockShift>(c1 - c0);
  for (int64_t c = c0; c < c1; ++c) shift[c - c0] = static_cast<Acc>(x[c * HW]);
  for_block_planes(g, c0, c1, [&](int64_t c, int64_t n) {
    if (n + 1 < N) plane.prefetch(x + ((n + 1) * C + c) * HW);
    short_plane_moment_sums(x, (n * C + c) * HW, plane, shift[c - c0], sum + (c - c0) * P, sum_sq + (c - c0) * P);
  });
  for (int64_t c = c0; c < c1; ++c) {
    on_channel(c, Moments::from_sums<scalar_t>(N * HW, shift[c - c0], ShortPlane<scalar_t>::total(sum + (c - c0) * P),
                                               ShortPlane<scalar_t>::total(sum_sq + (c - c0) * P)));
  }
}

// Moments of NCHW channel c on the calling thread, block by block (PlaneBlocking).
template <typename scalar_t>
Moments nchw_channel_moments(const scalar_t* x, const Geometry& g, int64_t c) {
  const PlaneBlocking pb(g.N, g.HW);
  const PlaneWalk<scalar_t> walk{g.HW, g.C * g.HW, prefetch_planes<scalar_t>(g), g.numel()};
  Moments m;
  for (int64_t b = 0; b < pb.blocks; ++b) {
    int64_t n0, n1, h0, h1;
    pb.range(b, g.N, g.HW, n0, n1, h0, h1);
    m.merge(nchw_block_moments(x + c * g.HW, walk.for_channel(c), n0, n1, h0, h1));
  }
  return m;
}

// Moments of every NCHW channel with each channel's blocks spread over the
// threads (few channels); on_channel(c, m) on the calling thread, in order.
template <typename scalar_t, typename F>
void split_channel_moments(const scalar_t* x, const Geometry& g, F&& on_channel) {
  const PlaneBlocking pb(g.N, g.HW);
  const PlaneWalk<scalar_t> walk{g.HW, g.C * g.HW, prefetch_planes<scalar_t>(g), g.numel()};
  std::vector<Moments> partial(g.C * pb.blocks);
  parallel_over(g.C * pb.blocks, [&](int64_t i) {
    const int64_t c = i / pb.blocks;
    int64_t n0, n1, h0, h1;
    pb.range(i % pb.blocks, g.N, g.HW, n0, n1, h0, h1);
    partial[i] = nchw_block_moments(x + c * g.HW, walk.for_channel(c), n0, n1, h0, h1);
  });
  for (int64_t c = 0; c < g.C; ++c) {
    Moments m;
    for (int64_t b = 0; b < pb.blocks; ++b) m.merge(partial[c * pb.blocks + b]);
    on_channel(c, m);
  }
}

}  // namespace fused_bn::cpu
