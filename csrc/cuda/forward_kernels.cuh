// The training forward's kernels (moments, finalize) and the normalize
// kernels both forwards use.
#pragma once

#include "../common/channel_math.h"
#include "device_primitives.cuh"
#include "epilogues.cuh"
#include "reductions.cuh"
#include "traversals.cuh"

#include <cstdint>
#include <type_traits>

namespace fused_bn {
namespace cuda {
// Internal to the kernel layer (forward.cu, backward.cu).
namespace detail {

// ---------------------------------------------------------------------------
// Training forward, pass 1: per-(split, channel) moments of x - K, K the
// channel's first element.

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_moments_kernel(const scalar_t* __restrict__ input, Geometry geometry,
                                  int64_t vectors_per_split, double* __restrict__ partial_mean,
                                  double* __restrict__ partial_m2, double* __restrict__ partial_count,
                                  const int64_t* __restrict__ counter, int64_t* __restrict__ counter_snapshot) {
  using acc_t = moments_t<scalar_t>;
  const auto [channel, split, plane_vectors, begin, end, image_stride, stride] =
      ChannelsFirstShare(geometry, kVec, vectors_per_split);
  const scalar_t* __restrict__ channel_input = input + channel * geometry.HW;

  acc_t mean = acc_t(0), m2 = acc_t(0), count = acc_t(0);
  int64_t position = begin + threadIdx.x;
  if (position < end) {
    const acc_t shift = moments_shift<acc_t>(load_global(channel_input));
    PlaneCursor cursor(position, stride, plane_vectors);
    for (; position < end; position += stride * kUnroll) {
      acc_t values[kUnroll][kVec];
      int valid_rows = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (position + u * stride < end) {
          const Bundle<scalar_t, kVec> x =
              load_bundle<scalar_t, kVec>(channel_input + cursor.offset(image_stride, kVec));
#pragma unroll
          for (int j = 0; j < kVec; ++j) values[u][j] = convert<acc_t>(x.v[j]) - shift;
          valid_rows = u + 1;
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) values[u][j] = acc_t(0);
        }
        cursor.advance();
      }
      fold_channel_group(values, valid_rows, mean, m2, count);
    }
  }

  block_merge_moments(mean, m2, count);
  if (threadIdx.x == 0) {
    const int64_t slot = split * geometry.C + channel;
    store_global(partial_mean + slot, mean);
    store_global(partial_m2 + slot, m2);
    store_global(partial_count + slot, count);
    if (channel == 0 && split == 0 && counter != nullptr) store_global(counter_snapshot, load_global(counter) + 1);
  }
}

// Short planes that are not whole vectors (uses_staged_planes): warp w of
// block (group, split) takes channel group * kStagedChannels + w over the
// split's images, through staged_planes_pass.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    staged_moments_kernel(const scalar_t* __restrict__ input, Geometry geometry, int64_t images_per_split,
                          double* __restrict__ partial_mean, double* __restrict__ partial_m2,
                          double* __restrict__ partial_count, const int64_t* __restrict__ counter,
                          int64_t* __restrict__ counter_snapshot) {
  using acc_t = moments_t<scalar_t>;
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * kStagedChannels + threadIdx.x / kWarpSize;
  const bool owns = channel < geometry.C;
  // K is image 0's first element of the channel, loaded only by a warp that
  // will fold some: an empty batch (N == 0) still launches this pass (for the
  // counter snapshot) with a grid of one split, and its input has no element
  // (a null data pointer: reading it segfaulted; channels_first_moments_kernel
  // loads K only where a thread has a position).
  const bool has_images = static_cast<int64_t>(blockIdx.y) * images_per_split < geometry.N;
  const acc_t shift =
      owns && has_images ? moments_shift<acc_t>(load_global(input + channel * geometry.HW)) : acc_t(0);

  acc_t mean = acc_t(0), m2 = acc_t(0), count = acc_t(0);
  const scalar_t* const inputs[1] = {input};
  staged_planes_pass<scalar_t, 1>(inputs, geometry, images_per_split,
                                  [&](const scalar_t (&x)[kUnroll][1], int valid_rows) {
                                    acc_t values[kUnroll][1];
#pragma unroll
                                    for (int u = 0; u < kUnroll; ++u) {
                                      values[u][0] = u < valid_rows ? convert<acc_t>(x[u][0]) - shift : acc_t(0);
                                    }
                                    fold_channel_group(values, valid_rows, mean, m2, count);
                                  });

  warp_merge_moments(mean, m2, count);
  if (owns && threadIdx.x % kWarpSize == 0) {
    const int64_t slot = static_cast<int64_t>(blockIdx.y) * geometry.C + channel;
    store_global(partial_mean + slot, mean);
    store_global(partial_m2 + slot, m2);
    store_global(partial_count + slot, count);
  }
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && counter != nullptr) {
    store_global(counter_snapshot, load_global(counter) + 1);
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_moments_kernel(const scalar_t* __restrict__ input, Geometry geometry,
                                 int64_t rows_per_split, double* __restrict__ partial_mean,
                                 double* __restrict__ partial_m2, double* __restrict__ partial_count,
                                 const int64_t* __restrict__ counter, int64_t* __restrict__ counter_snapshot) {
  using acc_t = moments_t<scalar_t>;
  const auto [columns, column, begin, end, row_step] = ChannelsLastShare(geometry, kVec, rows_per_split);

  acc_t mean[kVec], m2[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) mean[j] = m2[j] = acc_t(0);
  acc_t count = acc_t(0);

  int64_t row = begin + threadIdx.y;
  if (column < columns && row < end) {
    const Bundle<scalar_t, kVec> first = load_bundle<scalar_t, kVec>(input + column * kVec);
    acc_t shift[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) shift[j] = moments_shift<acc_t>(first.v[j]);
    const int64_t offset_step = row_step * geometry.C;
    int64_t offset = row * geometry.C + column * kVec;
    for (; row < end; row += row_step * kUnroll) {
      acc_t values[kUnroll][kVec];
      int valid_rows = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (row + u * row_step < end) {
          const Bundle<scalar_t, kVec> x = load_bundle<scalar_t, kVec>(input + offset);
#pragma unroll
          for (int j = 0; j < kVec; ++j) values[u][j] = convert<acc_t>(x.v[j]) - shift[j];
          valid_rows = u + 1;
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) values[u][j] = acc_t(0);
        }
        offset += offset_step;
      }
      fold_column_group(values, valid_rows, mean, m2, count);
    }
  }

  block_merge_column_moments(mean, m2, count);
  if (threadIdx.y == 0 && column < columns) {
    const int64_t slot = static_cast<int64_t>(blockIdx.y) * geometry.C + column * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      store_global(partial_mean + slot + j, mean[j]);
      store_global(partial_m2 + slot + j, m2[j]);
      store_global(partial_count + slot + j, count);
    }
  }
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0 && counter != nullptr) {
    store_global(counter_snapshot, load_global(counter) + 1);
  }
}

// ---------------------------------------------------------------------------
// Training forward, pass 2: per channel, merge the partials (fixed order, in
// double), write the saved statistics, update the running statistics and the
// counter, and leave the normalize coefficients in the workspace.

template <typename scalar_t, typename param_t>
struct FinalizeMomentsArgs {
  using acc_t = acc_type<scalar_t>;
  const double* partial_mean;
  const double* partial_m2;
  const double* partial_count;
  int64_t splits;
  int64_t channels;
  int64_t count_per_channel;  // N * HW
  const scalar_t* input;      // for the shift K: input[channel * first_element_stride]
  int64_t first_element_stride;
  const param_t* weight;
  const param_t* bias;
  param_t* running_mean;
  param_t* running_var;
  int64_t* counter;
  const int64_t* counter_snapshot;
  acc_t* save_mean;
  acc_t* save_invstd;
  acc_t* mean_hi;  // normalize: ((x - mean_hi) - mean_lo) * scale + shift
  acc_t* mean_lo;
  acc_t* scale;
  acc_t* shift;
  double eps;
  double momentum;
  bool cumulative_momentum;
  // An activation other than the identity normalizes with the coefficients
  // of the saved statistics (mean_lo 0), which its backward recomputes
  // (Epilogue::kCoefficientsFromSaved, epilogue_input).
  bool coefficients_from_saved = false;
  // batch_norm_train_with_stats: the moments are all ranks' exchanged ones,
  // gathered_moments[ranks][C][3], merged in rank order; no partials, no input.
  const double* gathered_moments = nullptr;
  int64_t ranks = 0;
  // batch_norm_stats: the channel's (count, mean, M2) go to exchanged_moments[C][3],
  // and nothing else is written.
  double* exchanged_moments = nullptr;
};

template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_moments_kernel(const FinalizeMomentsArgs<scalar_t, param_t> args) {
  using acc_t = acc_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t channel =
      static_cast<int64_t>(blockIdx.x) * kFinalizeChannelsPerBlock + threadIdx.x / kWarpSize;
  // Only this kernel writes the counter, and no block of it reads the counter.
  if (blockIdx.x == 0 && threadIdx.x == 0 && args.counter != nullptr) {
    store_global(args.counter, load_global(args.counter_snapshot));
  }
  if (channel >= args.channels) return;  // whole warps leave together

  // The channel's moments about `shift` (its mean is shift + mean), over n values.
  double mean = 0.0, m2 = 0.0, shift = 0.0, n = 0.0;
  if (args.gathered_moments != nullptr) {
    if (lane != 0) return;
    int64_t count = 0;
    double batch_mean = 0.0;
    common::merge_ranks_moments(args.gathered_moments, args.ranks, args.channels, channel, count, batch_mean, m2);
    n = static_cast<double>(count);
    mean = batch_mean;
  } else {
    double count = 0.0;
    for (int64_t split = lane; split < args.splits; split += kWarpSize) {
      const int64_t slot = split * args.channels + channel;
      merge_moments(mean, m2, count, load_global(args.partial_mean + slot), load_global(args.partial_m2 + slot),
                    load_global(args.partial_count + slot));
    }
    warp_merge_moments(mean, m2, count);
    if (lane != 0) return;
    n = static_cast<double>(args.count_per_channel);
    if (args.count_per_channel > 0) shift = moments_shift<double>(load_global(args.input + channel * args.first_element_stride));
  }

  const bool has_data = n > 0;
  const double batch_mean = shift + mean;
  if (args.exchanged_moments != nullptr) {
    double* out = args.exchanged_moments + channel * common::kExchangedMoments;
    store_global(out + common::kMomentsCount, n);
    store_global(out + common::kMomentsMean, batch_mean);
    store_global(out + common::kMomentsM2, m2);
    return;
  }
  const double var = has_data ? m2 / n : 0.0;
  const double invstd = common::inverse_std(var, args.eps);
  store_global(args.save_mean + channel, static_cast<acc_t>(batch_mean));
  store_global(args.save_invstd + channel, static_cast<acc_t>(invstd));

  double factor = args.momentum;
  if (args.cumulative_momentum) {
    const int64_t batches = args.counter != nullptr ? load_global(args.counter_snapshot) : 0;
    factor = common::cumulative_average_factor(static_cast<double>(batches));
  }
  if (has_data && args.running_mean != nullptr) {
    const double old = convert<double>(load_global(args.running_mean + channel));
    store_global(args.running_mean + channel, convert<param_t>(common::running_average(old, batch_mean, factor)));
  }
  if (has_data && args.running_var != nullptr) {
    const double old = convert<double>(load_global(args.running_var + channel));
    store_global(args.running_var + channel,
                 convert<param_t>(common::running_average(old, common::unbiased_variance(m2, n), factor)));
  }
  const double w = args.weight != nullptr ? convert<double>(load_global(args.weight + channel)) : 1.0;
  const double b = args.bias != nullptr ? convert<double>(load_global(args.bias + channel)) : 0.0;
  if (args.coefficients_from_saved) {
    store_global(args.mean_hi + channel, load_global(args.save_mean + channel));
    store_global(args.mean_lo + channel, acc_t(0));
    store_global(args.scale + channel, static_cast<acc_t>(static_cast<double>(load_global(args.save_invstd + channel)) * w));
  } else {
    // The mean in two parts, its rounding and what that rounding left, so
    // the output keeps the double mean's accuracy; from the statistics alone,
    // so a rank's gathered moments normalize as its own do, bit for bit.
    const acc_t mean_hi = static_cast<acc_t>(batch_mean);
    store_global(args.mean_hi + channel, mean_hi);
    store_global(args.mean_lo + channel, static_cast<acc_t>(batch_mean - static_cast<double>(mean_hi)));
    store_global(args.scale + channel, static_cast<acc_t>(invstd * w));
  }
  store_global(args.shift + channel, static_cast<acc_t>(b));
}

// batch_norm_train_with_stats has no moments pass to take the counter's
// snapshot (see FinalizeMomentsArgs): this one-thread launch does.
__global__ void snapshot_counter_kernel(const int64_t* counter, int64_t* counter_snapshot) {
  store_global(counter_snapshot, load_global(counter) + 1);
}

// Only launched for C == 0, where no finalize kernel runs.
__global__ void increment_counter_kernel(int64_t* counter) { store_global(counter, load_global(counter) + 1); }

// ---------------------------------------------------------------------------
// Normalize: y = ((x - mean_hi) - mean_lo) * scale + shift, in acc_t.

// Eval: the coefficients of the running statistics, one thread per channel,
// into the workspace (what the training forward's finalize pass leaves
// there). A launch of its own keeps the double sqrt and division of
// inverse_std, which call out to slow-path subroutines, out of the hot
// normalize kernels: across such a call few registers survive, and deriving
// them per thread there made ptxas spill (and instantiate every normalize
// kernel per parameter dtype).
template <typename acc_t, typename param_t>
struct EvalCoefficientsArgs {
  int64_t channels;
  const param_t* running_mean;
  const param_t* running_var;
  const param_t* weight;  // nullable: 1
  const param_t* bias;    // nullable: 0
  double eps;
  // An activation's eval (Epilogue::kCoefficientsFromSaved) normalizes with
  // the statistics its backward gets, the mean and invstd rounded to acc_t
  // (fused_bn/_autograd.py), so the recomputed z is the forward's.
  bool from_saved;
  acc_t* mean_hi;
  acc_t* mean_lo;
  acc_t* scale;
  acc_t* shift;
};

template <typename acc_t, typename param_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_eval_coefficients_kernel(const EvalCoefficientsArgs<acc_t, param_t> args) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= args.channels) return;
  const double w = args.weight != nullptr ? convert<double>(load_global(args.weight + c)) : 1.0;
  double invstd = common::inverse_std(convert<double>(load_global(args.running_var + c)), args.eps);
  if (args.from_saved) invstd = static_cast<double>(static_cast<acc_t>(invstd));
  store_global(args.mean_hi + c, convert<acc_t>(load_global(args.running_mean + c)));
  store_global(args.mean_lo + c, acc_t(0));
  store_global(args.scale + c, static_cast<acc_t>(invstd * w));
  store_global(args.shift + c, args.bias != nullptr ? convert<acc_t>(load_global(args.bias + c)) : acc_t(0));
}

// The normalize pass's per-channel coefficients (the finalize kernel's, or
// the eval coefficients kernel's), in acc_t.
template <typename acc_t>
struct NormalizeCoefficients {
  const acc_t* mean_hi = nullptr;
  const acc_t* mean_lo = nullptr;
  const acc_t* scale = nullptr;
  const acc_t* shift = nullptr;

  __device__ __forceinline__ void load(int64_t c, acc_t& hi, acc_t& lo, acc_t& sc, acc_t& sh) const {
    hi = load_global(mean_hi + c);
    lo = load_global(mean_lo + c);
    sc = load_global(scale + c);
    sh = load_global(shift + c);
  }
};

// The normalize kernels' per-channel source: the coefficients, and the
// epilogue's activation parameters (in acc_t, converted on the host).
template <typename acc_t, typename A>
struct NormalizeArgs {
  NormalizeCoefficients<acc_t> coefficients;
  ActivationParams<A, acc_t> params;
};

// One channel's normalize under Epi (common::Epilogue): plain batch norm is
// y = ((x - mean_hi) - mean_lo) * scale + shift; an activation other than the
// identity gets z = epilogue_input(x, mean_hi, scale, shift) (mean_lo is 0
// there: the saved statistics' coefficients), the identity with a residual
// keeps the accurate form; then y = apply_epilogue(z, residual), rounded once.
template <typename scalar_t, class Epi>
struct NormalizeChannel {
  using acc_t = acc_type<scalar_t>;
  using A = typename Epi::Activation;
  using Source = NormalizeArgs<acc_t, A>;
  acc_t mean_hi, mean_lo, scale, shift;
  ActivationParams<A, acc_t> params;
  __device__ __forceinline__ static NormalizeChannel of_channel(const Source& source, int64_t c) {
    NormalizeChannel op;
    source.coefficients.load(c, op.mean_hi, op.mean_lo, op.scale, op.shift);
    op.params = source.params;
    return op;
  }
  __device__ __forceinline__ scalar_t operator()(scalar_t x, scalar_t residual) const {
    if constexpr (Epi::kCoefficientsFromSaved) {
      return convert<scalar_t>(apply_epilogue<Epi>(epilogue_input(convert<acc_t>(x), mean_hi, scale, shift),
                                                   convert<acc_t>(residual), params));
    } else {
      const acc_t z = ((convert<acc_t>(x) - mean_hi) - mean_lo) * scale + shift;
      if constexpr (Epi::kPlain) {
        (void)residual;
        return convert<scalar_t>(z);
      } else {
        return convert<scalar_t>(apply_epilogue<Epi>(z, convert<acc_t>(residual), params));
      }
    }
  }
};

// Groups of vectors a normalize thread loads before using any of them:
// kUnroll for plain batch norm and the identity with a residual (pure
// streaming, as before activations), 2 under an activation, as the backward's
// two-input kernels (kDualUnroll). An activation's arithmetic bounds those
// kernels more than the loads in flight do; 2 groups leave fewer values live
// across the slow-path subroutines of its math, and half the code per kernel
// (there are 16 such epilogues per dtype, layout and width to build).
template <class Epi>
constexpr int kNormalizeSteps = std::is_same_v<typename Epi::Activation, common::Identity> ? kUnroll : 2;

// The residual (Epi::kHasResidual only) is laid out as the input.
template <typename scalar_t, int kVec, class Epi>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_normalize_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ residual,
                                    scalar_t* __restrict__ output, Geometry geometry, int64_t vectors_per_split,
                                    const NormalizeArgs<acc_type<scalar_t>, typename Epi::Activation> args) {
  channels_first_element_pass<NormalizeChannel<scalar_t, Epi>, scalar_t, kVec, kNormalizeSteps<Epi>,
                              Epi::kHasResidual ? 2 : 1>(input, residual, output, geometry, vectors_per_split, args);
}

template <typename scalar_t, int kVec, class Epi>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_normalize_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ residual,
                                   scalar_t* __restrict__ output, Geometry geometry, int64_t rows_per_split,
                                   const NormalizeArgs<acc_type<scalar_t>, typename Epi::Activation> args) {
  channels_last_element_pass<NormalizeChannel<scalar_t, Epi>, scalar_t, kVec, kNormalizeSteps<Epi>,
                             Epi::kHasResidual ? 2 : 1>(input, residual, output, geometry, rows_per_split, args);
}

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
