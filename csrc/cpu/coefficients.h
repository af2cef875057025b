// The element passes' per-channel coefficients (ChannelCoefs), padded to
// whole NHWC tiles.
#pragma once

#include <cstdint>

#include "scratch.h"
#include "vec.h"

namespace fused_bn::cpu {

// Channels per NHWC tile: two pairs, so a tile's per-channel coefficients and
// accumulators fit the vector registers (4 vectors each).
template <typename scalar_t>
constexpr int64_t kTileWidth = 2 * VecPair<scalar_t>::kWidth;

template <typename scalar_t>
constexpr int64_t padded_channels(int64_t C) {
  return (C + kTileWidth<scalar_t> - 1) / kTileWidth<scalar_t> * kTileWidth<scalar_t>;
}

// Per-channel coefficients of the element passes, in the accumulation type,
// zero-padded to whole NHWC tiles so tile loads of them never need a mask:
//   forward : y  = (x − mean) · scale + shift
//   backward: dx = (g − shift − (x − mean) · projection) · scale, with shift the
//             mean of g and projection Σg·(x − mean) / (n · var): nn's factored
//             form. Expanded into dy · a + (x − mean) · b + c, a gradient that is
//             pure cancellation (dy constant over a channel, or two values per
//             channel) kept the roundings of a and c at the scale of dy and
//             came out at up to 3x nn's error (tests/test_properties.py).
// The forward's mean is the double mean rounded to Acc; the rounding error times
// scale is folded into shift, so the output keeps the double mean's accuracy.
// Forwards with a ReLU instead take their coefficients from the statistics as
// saved (rounded to Acc, shift = bias), which is all their backward sees: it
// recomputes the forward's z from forward_shift, bit for bit (GradMask).
template <typename scalar_t>
struct ChannelCoefs {
  using Acc = acc_type<scalar_t>;
  Acc *mean, *scale, *projection, *shift, *forward_shift;
  explicit ChannelCoefs(int64_t channels) {
    const int64_t padded = padded_channels<scalar_t>(channels);
    mean = thread_scratch_filled<Acc, ScratchSlot::kCoefMean>(padded, Acc(0));
    scale = thread_scratch_filled<Acc, ScratchSlot::kCoefScale>(padded, Acc(0));
    projection = thread_scratch_filled<Acc, ScratchSlot::kCoefProjection>(padded, Acc(0));
    shift = thread_scratch_filled<Acc, ScratchSlot::kCoefShift>(padded, Acc(0));
    forward_shift = thread_scratch_filled<Acc, ScratchSlot::kCoefForwardShift>(padded, Acc(0));
  }
};

}  // namespace fused_bn::cpu
