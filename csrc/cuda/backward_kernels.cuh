// The backward's kernels: grad sums, finalize, the two-values closed form and
// grad input.
#pragma once

#include "../common/channel_math.h"
#include "../common/exchange.h"
#include "device_primitives.cuh"
#include "epilogues.cuh"
#include "reductions.cuh"
#include "traversals.cuh"

#include <cstdint>

namespace fused_bn {
namespace cuda {
// Internal to the kernel layer (forward.cu, backward.cu).
namespace detail {

// ---------------------------------------------------------------------------
// The backward's sums and coefficients.

// Σdy, Σdy·(x − mean), Σ(x − mean): the exchange format (csrc/common/exchange.h).
constexpr int kGradSums = static_cast<int>(common::kExchangedGradSums);

// Per-(split, channel) partial sums in the workspace, at [split][channel].
struct GradPartials {
  double* sum_dy;
  double* sum_dy_xmu;
  double* sum_xmu;

  __device__ __forceinline__ void store(int64_t slot, const double (&s)[kGradSums]) const {
    sum_dy[slot] = s[0];
    sum_dy_xmu[slot] = s[1];
    sum_xmu[slot] = s[2];
  }
  __device__ __forceinline__ void add_to(int64_t slot, double (&s)[kGradSums]) const {
    s[0] += sum_dy[slot];
    s[1] += sum_dy_xmu[slot];
    s[2] += sum_xmu[slot];
  }
};

template <typename scalar_t>
__device__ __forceinline__ void add_grad_sums(double (&s)[kGradSums], scalar_t dy, scalar_t x, double mean) {
  const double g = convert<double>(dy);
  const double xmu = convert<double>(x) - mean;
  s[0] += g;
  s[1] += g * xmu;
  s[2] += xmu;
}

// Per channel, in the accumulation type (common::GradInputCoefficients), and
// kReluOfInput's forward shift (the bias) for the dx pass's mask, whose scale
// is this scale (w · invstd rounded once, as the forward's).
template <typename acc_t>
struct GradInputCoefficients {
  acc_t* scale;
  acc_t* projection;
  acc_t* shift;
  acc_t* forward_shift;
};

// What the reduction pass reads besides dy and x, and writes besides its
// partials: the mask's inputs (mean is also the sums' centre), and
// kReluOfOutput's y and the g it writes out (grad_residual).
template <typename scalar_t, typename param_t>
struct GradSumsArgs {
  using acc_t = acc_type<scalar_t>;
  GradMaskSource<acc_t, param_t> mask;
  const scalar_t* output;
  scalar_t* grad_residual;
  GradPartials partials;
};

// ---------------------------------------------------------------------------
// Backward, pass 1: per-(split, channel) Σg, Σg·(x − mean) and Σ(x − mean),
// in double (see MomentsAccumulate), with mean the saved (rounded) mean and g
// dy under kMask (kReluOfOutput also writes g to grad_residual).

template <typename scalar_t, typename param_t, int kVec, GradMask kMask>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_grad_sums_kernel(const scalar_t* __restrict__ grad_output,
                                    const scalar_t* __restrict__ input, Geometry geometry,
                                    int64_t vectors_per_split, const GradSumsArgs<scalar_t, param_t> args) {
  constexpr int kSteps = kDualUnroll<kVec>;
  constexpr bool kReadsOutput = kMask == GradMask::kReluOfOutput;
  const auto [channel, split, plane_vectors, begin, end, image_stride, stride] =
      ChannelsFirstShare(geometry, kVec, vectors_per_split);
  const int64_t channel_offset = channel * geometry.HW;

  double sums[kGradSums] = {0.0, 0.0, 0.0};
  int64_t position = begin + threadIdx.x;
  if (position < end) {
    const double channel_mean = static_cast<double>(args.mask.mean[channel]);
    const auto mask = args.mask.template of_channel<kMask>(channel);
    PlaneCursor cursor(position, stride, plane_vectors);
    for (; position < end; position += stride * kSteps) {
      Bundle<scalar_t, kVec> dy[kSteps], x[kSteps], y[kSteps];
      int64_t offsets[kSteps];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        offsets[u] = channel_offset + cursor.offset(image_stride, kVec);
        if (position + u * stride < end) {
          dy[u] = load_bundle<scalar_t, kVec>(grad_output + offsets[u]);
          x[u] = load_bundle<scalar_t, kVec>(input + offsets[u]);
          if constexpr (kReadsOutput) y[u] = load_bundle<scalar_t, kVec>(args.output + offsets[u]);
        }
        cursor.advance();
      }
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (position + u * stride < end) {
          Bundle<scalar_t, kVec> g;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            g.v[j] = mask(dy[u].v[j], x[u].v[j], kReadsOutput ? y[u].v[j] : dy[u].v[j]);
            add_grad_sums(sums, g.v[j], x[u].v[j], channel_mean);
          }
          if constexpr (kReadsOutput) store_bundle<scalar_t, kVec>(args.grad_residual + offsets[u], g);
        }
      }
    }
  }

  block_sum(sums);
  if (threadIdx.x == 0) args.partials.store(split * geometry.C + channel, sums);
}

template <typename scalar_t, typename param_t, int kVec, GradMask kMask>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_grad_sums_kernel(const scalar_t* __restrict__ grad_output,
                                   const scalar_t* __restrict__ input, Geometry geometry,
                                   int64_t rows_per_split, const GradSumsArgs<scalar_t, param_t> args) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kSteps = kDualUnroll<kVec>;
  constexpr bool kReadsOutput = kMask == GradMask::kReluOfOutput;
  const auto [columns, column, begin, end, row_step] = ChannelsLastShare(geometry, kVec, rows_per_split);

  double sums[kGradSums][kVec];
#pragma unroll
  for (int i = 0; i < kGradSums; ++i) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) sums[i][j] = 0.0;
  }

  int64_t row = begin + threadIdx.y;
  if (column < columns && row < end) {
    double channel_mean[kVec];
    ChannelGradMask<kMask, acc_t> masks[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      channel_mean[j] = static_cast<double>(args.mask.mean[column * kVec + j]);
      masks[j] = args.mask.template of_channel<kMask>(column * kVec + j);
    }
    const int64_t offset_step = row_step * geometry.C;
    int64_t offset = row * geometry.C + column * kVec;
    for (; row < end; row += row_step * kSteps) {
      Bundle<scalar_t, kVec> dy[kSteps], x[kSteps], y[kSteps];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (row + u * row_step < end) {
          dy[u] = load_bundle<scalar_t, kVec>(grad_output + offset + u * offset_step);
          x[u] = load_bundle<scalar_t, kVec>(input + offset + u * offset_step);
          if constexpr (kReadsOutput) y[u] = load_bundle<scalar_t, kVec>(args.output + offset + u * offset_step);
        }
      }
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (row + u * row_step < end) {
          Bundle<scalar_t, kVec> g;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            g.v[j] = masks[j](dy[u].v[j], x[u].v[j], kReadsOutput ? y[u].v[j] : dy[u].v[j]);
            double one[kGradSums] = {sums[0][j], sums[1][j], sums[2][j]};
            add_grad_sums(one, g.v[j], x[u].v[j], channel_mean[j]);
#pragma unroll
            for (int i = 0; i < kGradSums; ++i) sums[i][j] = one[i];
          }
          if constexpr (kReadsOutput) store_bundle<scalar_t, kVec>(args.grad_residual + offset + u * offset_step, g);
        }
      }
      offset += kSteps * offset_step;
    }
  }

  block_sum_columns(sums);
  if (threadIdx.y == 0 && column < columns) {
    const int64_t slot = static_cast<int64_t>(blockIdx.y) * geometry.C + column * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const double one[kGradSums] = {sums[0][j], sums[1][j], sums[2][j]};
      args.partials.store(slot + j, one);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward, pass 2: per channel, merge the partials (fixed order, in double),
// write grad_weight / grad_bias and the grad-input coefficients
// (common::grad_input_coefficients, the CPU's formula).

template <typename scalar_t, typename param_t>
struct FinalizeGradArgs {
  using acc_t = acc_type<scalar_t>;
  GradPartials partials;
  int64_t splits;  // 0: no sums were taken (eval, grad_input only)
  int64_t channels;
  int64_t count_per_channel;
  const param_t* weight;
  const acc_t* invstd;
  bool training;
  param_t* grad_weight;
  param_t* grad_bias;
  GradInputCoefficients<acc_t> coefficients;
  const param_t* bias;  // kReluOfInput's forward shift (nullable: 0)
  // The data-parallel calls (BackwardParams): this rank's sums written out
  // (grad_weight uncentred), or all ranks' read in place of the partials,
  // over *global_count values per channel.
  double* local_sums;
  const double* global_sums;
  const double* global_count;
};

template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_grad_kernel(const FinalizeGradArgs<scalar_t, param_t> args) {
  using acc_t = acc_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t channel =
      static_cast<int64_t>(blockIdx.x) * kFinalizeChannelsPerBlock + threadIdx.x / kWarpSize;
  if (channel >= args.channels) return;  // whole warps leave together

  double sums[kGradSums] = {0.0, 0.0, 0.0};
  int64_t n = args.count_per_channel;
  if (args.global_sums != nullptr) {
    if (lane != 0) return;
#pragma unroll
    for (int i = 0; i < kGradSums; ++i) sums[i] = args.global_sums[channel * kGradSums + i];
    n = static_cast<int64_t>(*args.global_count);
  } else {
    for (int64_t split = lane; split < args.splits; split += kWarpSize) {
      args.partials.add_to(split * args.channels + channel, sums);
    }
    warp_sum(sums);
    if (lane != 0) return;
  }
  if (args.local_sums != nullptr) {
#pragma unroll
    for (int i = 0; i < kGradSums; ++i) args.local_sums[channel * kGradSums + i] = sums[i];
  }

  const double sum_dy = sums[0];
  // A rank's own share (local_sums) stays about the saved mean: centring
  // needs every rank's values.
  const bool centred = args.training && n > 0 && args.local_sums == nullptr;
  const double sum_dy_xmu = centred ? common::centered_sum_dy_xmu(sum_dy, sums[1], sums[2], n) : sums[1];
  const double invstd = static_cast<double>(args.invstd[channel]);
  const double w = args.weight != nullptr ? convert<double>(args.weight[channel]) : 1.0;
  if (args.grad_weight != nullptr) args.grad_weight[channel] = convert<param_t>(sum_dy_xmu * invstd);
  if (args.grad_bias != nullptr) args.grad_bias[channel] = convert<param_t>(sum_dy);
  const common::GradInputCoefficients k =
      common::grad_input_coefficients(w, invstd, sum_dy, sum_dy_xmu, n, args.training);
  args.coefficients.scale[channel] = static_cast<acc_t>(k.scale);
  args.coefficients.projection[channel] = static_cast<acc_t>(k.projection);
  args.coefficients.shift[channel] = static_cast<acc_t>(k.shift);
  args.coefficients.forward_shift[channel] = args.bias != nullptr ? convert<acc_t>(args.bias[channel]) : acc_t(0);
}

// ---------------------------------------------------------------------------
// Training backward of channels of two values (common::two_values_grads), one
// thread per channel.
template <typename scalar_t, typename param_t, GradMask kMask>
__global__ void __launch_bounds__(kFinalizeThreads)
    two_values_backward_kernel(const BackwardParams<scalar_t, param_t> p) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = p.geometry;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  // Two rows of C channels (channels-last, or N = 2 with HW = 1), else
  // neighbours in the channel's plane (N = 1, HW = 2).
  const bool rows = g.channels_last || g.HW == 1;
  const int64_t at[2] = {rows ? c : 2 * c, rows ? g.C + c : 2 * c + 1};
  const GradMaskSource<acc_t, param_t> source{p.mean, p.invstd, p.weight, p.bias};
  const auto mask = source.template of_channel<kMask>(c);
  double x[2], dy[2];
  for (int i = 0; i < 2; ++i) {
    const scalar_t gi = mask(p.grad_output[at[i]], p.input[at[i]],
                             kMask == GradMask::kReluOfOutput ? p.output[at[i]] : p.grad_output[at[i]]);
    if constexpr (kMask == GradMask::kReluOfOutput) p.grad_residual[at[i]] = gi;
    x[i] = static_cast<double>(convert<acc_t>(p.input[at[i]]));
    dy[i] = static_cast<double>(convert<acc_t>(gi));
  }
  const common::TwoValuesGrads r =
      common::two_values_grads(x, dy, p.weight != nullptr ? convert<double>(p.weight[c]) : 1.0, p.eps);
  if (p.grad_weight != nullptr) p.grad_weight[c] = convert<param_t>(r.grad_weight);
  if (p.grad_bias != nullptr) p.grad_bias[c] = convert<param_t>(r.grad_bias);
  if (p.grad_input == nullptr) return;
  for (int i = 0; i < 2; ++i) p.grad_input[at[i]] = convert<scalar_t>(r.grad_input[i]);
}

// ---------------------------------------------------------------------------
// Backward, pass 3: dx = (g − shift − (x − mean) · projection) · scale, g dy
// under kMask (kNone, or kReluOfInput; kReluOfOutput's g was written by the
// reduction pass and comes in as dy). In eval mode projection == shift == 0
// and x is read only for kReluOfInput's mask.

template <typename acc_t>
struct GradInputArgs {
  const acc_t* mean;
  GradInputCoefficients<acc_t> coefficients;
};

// As the CPU's (fnmadd): (g − shift) − (x − mean) · projection fused, times
// scale; eval's dx is g · scale (kTraining false: shift is 0, x not read).
template <bool kTraining, typename acc_t, typename scalar_t>
__device__ __forceinline__ scalar_t grad_input_value(scalar_t dy, scalar_t x, acc_t mean, acc_t scale,
                                                     acc_t projection, acc_t shift) {
  if constexpr (!kTraining) return convert<scalar_t>(convert<acc_t>(dy) * scale);
  return convert<scalar_t>(fused_multiply_add(mean - convert<acc_t>(x), projection, convert<acc_t>(dy) - shift) *
                           scale);
}

// One channel's dx (grad_input_value of g) from (dy, x).
template <typename scalar_t, bool kTraining, GradMask kMask>
struct GradInputChannel {
  static_assert(kMask != GradMask::kReluOfOutput, "the reduction pass writes that g; pass it as dy");
  using acc_t = acc_type<scalar_t>;
  using Source = GradInputArgs<acc_t>;
  acc_t projection, shift;
  ChannelGradMask<kMask, acc_t> mask;  // its mean and scale are the dx's too
  __device__ __forceinline__ static GradInputChannel of_channel(const Source& args, int64_t c) {
    GradInputChannel op;
    op.mask.mean = args.mean[c];
    op.mask.scale = args.coefficients.scale[c];
    op.projection = args.coefficients.projection[c];
    op.shift = args.coefficients.shift[c];
    if constexpr (kMask == GradMask::kReluOfInput) op.mask.shift = args.coefficients.forward_shift[c];
    return op;
  }
  __device__ __forceinline__ scalar_t operator()(scalar_t dy, scalar_t x) const {
    return grad_input_value<kTraining>(mask(dy, x, dy), x, mask.mean, mask.scale, projection, shift);
  }
};

// x is read in training, and for kReluOfInput's mask.
template <bool kTraining, GradMask kMask>
constexpr int kGradInputInputs = kTraining || kMask == GradMask::kReluOfInput ? 2 : 1;

template <typename scalar_t, int kVec, bool kTraining, GradMask kMask>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_grad_input_kernel(const scalar_t* __restrict__ grad_output,
                                     const scalar_t* __restrict__ input, scalar_t* __restrict__ grad_input,
                                     Geometry geometry, int64_t vectors_per_split,
                                     const GradInputArgs<acc_type<scalar_t>> args) {
  channels_first_element_pass<GradInputChannel<scalar_t, kTraining, kMask>, scalar_t, kVec, kDualUnroll<kVec>,
                              kGradInputInputs<kTraining, kMask>>(grad_output, input, grad_input, geometry,
                                                                  vectors_per_split, args);
}

template <typename scalar_t, int kVec, bool kTraining, GradMask kMask>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_grad_input_kernel(const scalar_t* __restrict__ grad_output,
                                    const scalar_t* __restrict__ input, scalar_t* __restrict__ grad_input,
                                    Geometry geometry, int64_t rows_per_split,
                                    const GradInputArgs<acc_type<scalar_t>> args) {
  channels_last_element_pass<GradInputChannel<scalar_t, kTraining, kMask>, scalar_t, kVec, kDualUnroll<kVec>,
                             kGradInputInputs<kTraining, kMask>>(grad_output, input, grad_input, geometry,
                                                                 rows_per_split, args);
}

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
