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
#include <type_traits>

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
    store_global(sum_dy + slot, s[0]);
    store_global(sum_dy_xmu + slot, s[1]);
    store_global(sum_xmu + slot, s[2]);
  }
  __device__ __forceinline__ void add_to(int64_t slot, double (&s)[kGradSums]) const {
    s[0] += load_global(sum_dy + slot);
    s[1] += load_global(sum_dy_xmu + slot);
    s[2] += load_global(sum_xmu + slot);
  }
};

// g: the transform's (acc_t), x: the input's element.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void add_grad_sums(double (&s)[kGradSums], acc_t dy, scalar_t x, double mean) {
  const double g = static_cast<double>(dy);
  const double xmu = convert<double>(x) - mean;
  s[0] += g;
  s[1] += g * xmu;
  s[2] += xmu;
}

// Per channel, in the accumulation type (common::GradInputCoefficients), and
// kInput's forward shift (the bias) for the dx pass's recomputed z, whose
// scale is this scale (w · invstd rounded once, as the forward's).
template <typename acc_t>
struct GradInputCoefficients {
  acc_t* scale;
  acc_t* projection;
  acc_t* shift;
  acc_t* forward_shift;
};

// What the reduction pass reads besides dy and x, and writes besides its
// partials: the transform's inputs (mean is also the sums' centre), the aux
// tensor (the residual for kInputAndResidual, y for kOutput) and the g it
// writes out (grad_residual) for those two sources.
template <typename scalar_t, typename A>
struct GradSumsArgs {
  GradSourceArgs<A, scalar_t> source;
  const scalar_t* aux;
  scalar_t* grad_residual;
  GradPartials partials;
};

// Groups of vectors a thread of the grad-sums or grad-input pass loads before
// using any of them: kDualUnroll, and 2 under an activation's transform
// (kNormalizeSteps' reasons; this changes only the scalar kernels, kVec 1).
template <int kVec, GradSource kSource>
constexpr int kGradSteps = kSource == GradSource::kNone ? kDualUnroll<kVec> : 2;

// ---------------------------------------------------------------------------
// Backward, pass 1: per-(split, channel) Σg, Σg·(x − mean) and Σ(x − mean),
// in double (see MomentsAccumulate), with mean the saved (rounded) mean and g
// dy under (A, kSource) (kInputAndResidual and kOutput also write g to
// grad_residual).

template <typename scalar_t, int kVec, typename A, GradSource kSource>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_grad_sums_kernel(const scalar_t* __restrict__ grad_output,
                                    const scalar_t* __restrict__ input, Geometry geometry,
                                    int64_t vectors_per_split, const GradSumsArgs<scalar_t, A> args) {
  constexpr int kSteps = kGradSteps<kVec, kSource>;
  constexpr bool kReadsAux = common::kReadsAux<kSource>;
  constexpr bool kWritesGrad = common::kWritesResidualGrad<kSource>;
  const auto [channel, split, plane_vectors, begin, end, image_stride, stride] =
      ChannelsFirstShare(geometry, kVec, vectors_per_split);
  const int64_t channel_offset = channel * geometry.HW;

  double sums[kGradSums] = {0.0, 0.0, 0.0};
  int64_t position = begin + threadIdx.x;
  if (position < end) {
    const double channel_mean = static_cast<double>(load_global(args.source.mean + channel));
    const auto transform = args.source.template of_channel<kSource>(channel);
    PlaneCursor cursor(position, stride, plane_vectors);
    for (; position < end; position += stride * kSteps) {
      Bundle<scalar_t, kVec> dy[kSteps], x[kSteps], aux[kSteps];
      int64_t offsets[kSteps];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        offsets[u] = channel_offset + cursor.offset(image_stride, kVec);
        if (position + u * stride < end) {
          dy[u] = load_bundle<scalar_t, kVec>(grad_output + offsets[u]);
          x[u] = load_bundle<scalar_t, kVec>(input + offsets[u]);
          if constexpr (kReadsAux) aux[u] = load_bundle<scalar_t, kVec>(args.aux + offsets[u]);
        }
        cursor.advance();
      }
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (position + u * stride < end) {
          Bundle<scalar_t, kVec> g;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const auto gj = transform(dy[u].v[j], x[u].v[j], kReadsAux ? aux[u].v[j] : dy[u].v[j]);
            add_grad_sums(sums, gj, x[u].v[j], channel_mean);
            if constexpr (kWritesGrad) g.v[j] = convert<scalar_t>(gj);
          }
          if constexpr (kWritesGrad) store_bundle<scalar_t, kVec>(args.grad_residual + offsets[u], g);
        }
      }
    }
  }

  block_sum(sums);
  if (threadIdx.x == 0) args.partials.store(split * geometry.C + channel, sums);
}

// Short planes that are not whole vectors (uses_staged_planes), for every
// source but float64 under an activation other than the identity (its FP64
// math calls slow-path subroutines, across which kUnroll rows of dy and x
// made ptxas spill: GELU 72 bytes, ELU 8): warp w of block (group, split)
// takes channel group * kStagedChannels + w over the split's images, through
// staged_planes_pass, staging dy, x and, where the source reads one, the aux
// tensor (the residual, or y for kOutput); where the source writes g
// (kInputAndResidual, kOutput) the pass stores it to grad_residual from the
// shared tile, through the loads' windows. Shared memory: 2 or 3 tiles of
// kStagedElements, 24 KB at most (the aux sources are never float64: the
// identity has kNone only).
template <typename scalar_t, typename A, GradSource kSource>
constexpr bool kStagedGradSums = !(std::is_same_v<scalar_t, double> && !std::is_same_v<A, common::Identity>);

template <typename scalar_t, typename A, GradSource kSource>
__global__ void __launch_bounds__(kMaxThreads)
    staged_grad_sums_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                            Geometry geometry, int64_t images_per_split, const GradSumsArgs<scalar_t, A> args) {
  static_assert(kStagedGradSums<scalar_t, A, kSource>, "channels_first_grad_sums_kernel runs this one");
  constexpr bool kReadsAux = common::kReadsAux<kSource>;
  constexpr bool kWritesGrad = common::kWritesResidualGrad<kSource>;
  // dy, x, then the aux tensor where read; g replaces dy in the tile.
  constexpr int kTensors = kReadsAux ? 3 : 2;
  constexpr int kAux = kReadsAux ? 2 : 0;  // the transform's aux (dy where none is read)
  const int64_t channel = static_cast<int64_t>(blockIdx.x) * kStagedChannels + threadIdx.x / kWarpSize;
  const bool owns = channel < geometry.C;
  // Warps past the last channel visit nothing; channel 0's values stand in.
  const int64_t source_channel = owns ? channel : 0;
  const double channel_mean = static_cast<double>(load_global(args.source.mean + source_channel));
  const auto transform = args.source.template of_channel<kSource>(source_channel);

  double sums[kGradSums] = {0.0, 0.0, 0.0};
  const scalar_t* inputs[kTensors];
  inputs[0] = grad_output;
  inputs[1] = input;
  if constexpr (kReadsAux) inputs[kAux] = args.aux;
  // written: g's elements (kWritesGrad; the pass passes none otherwise).
  auto fold = [&](const scalar_t (&v)[kUnroll][kTensors], int valid_rows, scalar_t* written = nullptr) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < valid_rows) {
        const auto g = transform(v[u][0], v[u][1], v[u][kAux]);
        add_grad_sums(sums, g, v[u][1], channel_mean);
        if constexpr (kWritesGrad) written[u] = convert<scalar_t>(g);
      }
    }
  };
  staged_planes_pass<scalar_t, kTensors, kWritesGrad>(inputs, geometry, images_per_split, fold,
                                                      kWritesGrad ? args.grad_residual : nullptr);

  warp_sum(sums);
  if (owns && threadIdx.x % kWarpSize == 0) {
    args.partials.store(static_cast<int64_t>(blockIdx.y) * geometry.C + channel, sums);
  }
}

template <typename scalar_t, int kVec, typename A, GradSource kSource>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_grad_sums_kernel(const scalar_t* __restrict__ grad_output,
                                   const scalar_t* __restrict__ input, Geometry geometry,
                                   int64_t rows_per_split, const GradSumsArgs<scalar_t, A> args) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kSteps = kGradSteps<kVec, kSource>;
  constexpr bool kReadsAux = common::kReadsAux<kSource>;
  constexpr bool kWritesGrad = common::kWritesResidualGrad<kSource>;
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
    ChannelGrad<A, kSource, acc_t> transforms[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      channel_mean[j] = static_cast<double>(load_global(args.source.mean + column * kVec + j));
      transforms[j] = args.source.template of_channel<kSource>(column * kVec + j);
    }
    const int64_t offset_step = row_step * geometry.C;
    int64_t offset = row * geometry.C + column * kVec;
    for (; row < end; row += row_step * kSteps) {
      Bundle<scalar_t, kVec> dy[kSteps], x[kSteps], aux[kSteps];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (row + u * row_step < end) {
          dy[u] = load_bundle<scalar_t, kVec>(grad_output + offset + u * offset_step);
          x[u] = load_bundle<scalar_t, kVec>(input + offset + u * offset_step);
          if constexpr (kReadsAux) aux[u] = load_bundle<scalar_t, kVec>(args.aux + offset + u * offset_step);
        }
      }
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (row + u * row_step < end) {
          Bundle<scalar_t, kVec> g;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const auto gj = transforms[j](dy[u].v[j], x[u].v[j], kReadsAux ? aux[u].v[j] : dy[u].v[j]);
            if constexpr (kWritesGrad) g.v[j] = convert<scalar_t>(gj);
            double one[kGradSums] = {sums[0][j], sums[1][j], sums[2][j]};
            add_grad_sums(one, gj, x[u].v[j], channel_mean[j]);
#pragma unroll
            for (int i = 0; i < kGradSums; ++i) sums[i][j] = one[i];
          }
          if constexpr (kWritesGrad) store_bundle<scalar_t, kVec>(args.grad_residual + offset + u * offset_step, g);
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
  const param_t* bias;  // kInput's forward shift for the dx pass (nullable: 0)
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
    for (int i = 0; i < kGradSums; ++i) sums[i] = load_global(args.global_sums + channel * kGradSums + i);
    n = static_cast<int64_t>(load_global(args.global_count));
  } else {
    for (int64_t split = lane; split < args.splits; split += kWarpSize) {
      args.partials.add_to(split * args.channels + channel, sums);
    }
    warp_sum(sums);
    if (lane != 0) return;
  }
  if (args.local_sums != nullptr) {
#pragma unroll
    for (int i = 0; i < kGradSums; ++i) store_global(args.local_sums + channel * kGradSums + i, sums[i]);
  }

  const double sum_dy = sums[0];
  // A rank's own share (local_sums) stays about the saved mean: centring
  // needs every rank's values.
  const bool centred = args.training && n > 0 && args.local_sums == nullptr;
  const double sum_dy_xmu = centred ? common::centered_sum_dy_xmu(sum_dy, sums[1], sums[2], n) : sums[1];
  const double invstd = static_cast<double>(load_global(args.invstd + channel));
  const double w = args.weight != nullptr ? convert<double>(load_global(args.weight + channel)) : 1.0;
  if (args.grad_weight != nullptr) store_global(args.grad_weight + channel, convert<param_t>(sum_dy_xmu * invstd));
  if (args.grad_bias != nullptr) store_global(args.grad_bias + channel, convert<param_t>(sum_dy));
  const common::GradInputCoefficients k =
      common::grad_input_coefficients(w, invstd, sum_dy, sum_dy_xmu, n, args.training);
  store_global(args.coefficients.scale + channel, static_cast<acc_t>(k.scale));
  store_global(args.coefficients.projection + channel, static_cast<acc_t>(k.projection));
  store_global(args.coefficients.shift + channel, static_cast<acc_t>(k.shift));
  store_global(args.coefficients.forward_shift + channel,
               args.bias != nullptr ? convert<acc_t>(load_global(args.bias + channel)) : acc_t(0));
}

// ---------------------------------------------------------------------------
// Training backward of channels of two values (common::two_values_grads), one
// thread per channel, g taken under (A, kSource) as the reduction pass takes it
// (and written to grad_residual where that pass writes it).
template <typename scalar_t, typename param_t, typename A, GradSource kSource>
__global__ void __launch_bounds__(kFinalizeThreads)
    two_values_backward_kernel(const BackwardParams<scalar_t, param_t> p) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kReadsAux = common::kReadsAux<kSource>;
  const Geometry& g = p.geometry;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  // Two rows of C channels (channels-last, or N = 2 with HW = 1), else
  // neighbours in the channel's plane (N = 1, HW = 2).
  const bool rows = g.channels_last || g.HW == 1;
  const int64_t at[2] = {rows ? c : 2 * c, rows ? g.C + c : 2 * c + 1};
  const scalar_t* aux = kSource == GradSource::kOutput ? p.output : p.residual;
  GradSourceArgs<A, scalar_t> source;
  source.mean = p.mean;
  source.invstd = p.invstd;
  source.weight = ParamArray<scalar_t>::of(p.weight);
  source.bias = ParamArray<scalar_t>::of(p.bias);
  source.params = ActivationParams<A, acc_t>::from(p.activation);
  const auto transform = source.template of_channel<kSource>(c);
  double x[2], dy[2];
  for (int i = 0; i < 2; ++i) {
    const scalar_t dy_i = load_global(p.grad_output + at[i]);
    const scalar_t x_i = load_global(p.input + at[i]);
    const acc_t gi = transform(dy_i, x_i, kReadsAux ? load_global(aux + at[i]) : dy_i);
    if constexpr (common::kWritesResidualGrad<kSource>) store_global(p.grad_residual + at[i], convert<scalar_t>(gi));
    x[i] = static_cast<double>(convert<acc_t>(x_i));
    dy[i] = static_cast<double>(gi);
  }
  const common::TwoValuesGrads r =
      common::two_values_grads(x, dy, p.weight != nullptr ? convert<double>(load_global(p.weight + c)) : 1.0, p.eps);
  if (p.grad_weight != nullptr) store_global(p.grad_weight + c, convert<param_t>(r.grad_weight));
  if (p.grad_bias != nullptr) store_global(p.grad_bias + c, convert<param_t>(r.grad_bias));
  if (p.grad_input == nullptr) return;
  for (int i = 0; i < 2; ++i) store_global(p.grad_input + at[i], convert<scalar_t>(r.grad_input[i]));
}

// ---------------------------------------------------------------------------
// Backward, pass 3: dx = (g − shift − (x − mean) · projection) · scale, g dy
// under (A, kSource) with kSource kNone (A the identity) or kInput;
// kInputAndResidual's and kOutput's g was written by the reduction pass and
// comes in as dy, under (Identity, kNone). In eval mode projection == shift
// == 0 and x is read only for kInput's recomputed z.

template <typename acc_t, typename A>
struct GradInputArgs {
  const acc_t* mean;
  GradInputCoefficients<acc_t> coefficients;
  ActivationParams<A, acc_t> params;
};

// As the CPU's (fnmadd): (g − shift) − (x − mean) · projection fused, times
// scale; eval's dx is g · scale (kTraining false: shift is 0, x not read).
template <bool kTraining, typename acc_t, typename scalar_t>
__device__ __forceinline__ scalar_t grad_input_value(acc_t g, scalar_t x, acc_t mean, acc_t scale, acc_t projection,
                                                     acc_t shift) {
  if constexpr (!kTraining) return convert<scalar_t>(g * scale);
  return convert<scalar_t>(fused_multiply_add(mean - convert<acc_t>(x), projection, g - shift) * scale);
}

// One channel's dx (grad_input_value of g) from (dy, x).
template <typename scalar_t, bool kTraining, typename A, GradSource kSource>
struct GradInputChannel {
  static_assert(kSource == GradSource::kNone || kSource == GradSource::kInput,
                "the reduction pass writes that g; pass it as dy under (Identity, kNone)");
  using acc_t = acc_type<scalar_t>;
  using Source = GradInputArgs<acc_t, A>;
  acc_t projection, shift;
  ChannelGrad<A, kSource, acc_t> transform;  // its mean and scale are the dx's too
  __device__ __forceinline__ static GradInputChannel of_channel(const Source& args, int64_t c) {
    GradInputChannel op;
    op.transform.mean = load_global(args.mean + c);
    op.transform.scale = load_global(args.coefficients.scale + c);
    op.transform.params = args.params;
    op.projection = load_global(args.coefficients.projection + c);
    op.shift = load_global(args.coefficients.shift + c);
    if constexpr (kSource == GradSource::kInput) op.transform.shift = load_global(args.coefficients.forward_shift + c);
    return op;
  }
  __device__ __forceinline__ scalar_t operator()(scalar_t dy, scalar_t x) const {
    return grad_input_value<kTraining>(transform(dy, x, dy), x, transform.mean, transform.scale, projection, shift);
  }
};

// x is read in training, and for kInput's recomputed z.
template <bool kTraining, GradSource kSource>
constexpr int kGradInputInputs = kTraining || kSource == GradSource::kInput ? 2 : 1;

template <typename scalar_t, int kVec, bool kTraining, typename A, GradSource kSource>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_grad_input_kernel(const scalar_t* __restrict__ grad_output,
                                     const scalar_t* __restrict__ input, scalar_t* __restrict__ grad_input,
                                     Geometry geometry, int64_t vectors_per_split,
                                     const GradInputArgs<acc_type<scalar_t>, A> args) {
  channels_first_element_pass<GradInputChannel<scalar_t, kTraining, A, kSource>, scalar_t, kVec, kGradSteps<kVec, kSource>,
                              kGradInputInputs<kTraining, kSource>>(grad_output, input, grad_input, geometry,
                                                                    vectors_per_split, args);
}

template <typename scalar_t, int kVec, bool kTraining, typename A, GradSource kSource>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_grad_input_kernel(const scalar_t* __restrict__ grad_output,
                                    const scalar_t* __restrict__ input, scalar_t* __restrict__ grad_input,
                                    Geometry geometry, int64_t rows_per_split,
                                    const GradInputArgs<acc_type<scalar_t>, A> args) {
  channels_last_element_pass<GradInputChannel<scalar_t, kTraining, A, kSource>, scalar_t, kVec, kGradSteps<kVec, kSource>,
                             kGradInputInputs<kTraining, kSource>>(grad_output, input, grad_input, geometry,
                                                                   rows_per_split, args);
}

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
