// The CUDA kernels' epilogue plumbing: per-channel coefficient loading and
// the calls into the one definition of every activation and of the
// backward's gradient transform (csrc/common/activation.h,
// csrc/common/epilogue.h). No activation's formula is written here: the
// normalize kernels apply an Epilogue<A, kResidual> through A::forward, the
// grad-sums, grad-input and two-values kernels take g through
// common::transform_grad<A, GradSource>, both with scalar math in acc_t.
#pragma once

#include "../common/epilogue.h"
#include "device_primitives.cuh"

#include <cstdint>

namespace fused_bn {
namespace cuda {

using common::GradSource;

// Internal to the kernel layer (forward.cu, backward.cu).
namespace detail {

// The activations' scalar math policy in the accumulation type.
template <typename acc_t>
using ScalarMath = common::ScalarMath<acc_t>;

// Activation A's runtime parameters in the accumulation type
// (A::Params::from(ActivationArgs), converted once on the host).
template <typename A, typename acc_t>
using ActivationParams = typename A::template Params<acc_t>;

// z = (x − mean) · scale + shift with one rounding (the CPU's fmadd), from the
// coefficients of the saved statistics: what a forward whose activation is
// not the identity normalizes with, and the same expression
// common::transform_grad recomputes z with (ScalarMath::fma), bit for bit.
template <typename acc_t>
__device__ __forceinline__ acc_t epilogue_input(acc_t x, acc_t mean, acc_t scale, acc_t shift) {
  return ScalarMath<acc_t>::fma(x - mean, scale, shift);
}

// y of an epilogue: A(z), or A(z + residual) with one; in acc_t, rounded
// once by the caller.
template <class Epi, typename acc_t>
__device__ __forceinline__ acc_t apply_epilogue(acc_t z, acc_t residual,
                                                const ActivationParams<typename Epi::Activation, acc_t>& params) {
  using A = typename Epi::Activation;
  if constexpr (Epi::kHasResidual) {
    return A::template forward<ScalarMath<acc_t>>(z + residual, params);
  } else {
    (void)residual;
    return A::template forward<ScalarMath<acc_t>>(z, params);
  }
}

// Sources that recompute z from x (and so need the channel's mean, scale and
// forward shift).
template <GradSource kSource>
constexpr bool kRecomputesInput = kSource == GradSource::kInput || kSource == GradSource::kInputAndResidual;

// One channel's gradient transform: g = dy under (A, kSource), in acc_t
// (common::transform_grad), as the CPU kernels keep it: the sums and the dx
// pass take it unrounded, and it is rounded once where it is stored
// (grad_residual, which the dx pass of kInputAndResidual and kOutput reads).
//   kInput, kInputAndResidual: z recomputed from x with the channel's mean,
//                  scale = w · invstd rounded once and shift = bias.
//   kInputAndResidual, kOutput: aux is the residual or y.
template <typename A, GradSource kSource, typename acc_t>
struct ChannelGrad {
  acc_t mean = acc_t(0), scale = acc_t(0), shift = acc_t(0);  // kRecomputesInput
  ActivationParams<A, acc_t> params;

  template <typename scalar_t>
  __device__ __forceinline__ acc_t operator()(scalar_t dy, scalar_t x, scalar_t aux) const {
    if constexpr (kSource == GradSource::kNone) {
      (void)x;
      (void)aux;
      return convert<acc_t>(dy);
    } else {
      return common::transform_grad<A, kSource, ScalarMath<acc_t>>(convert<acc_t>(dy), convert<acc_t>(x),
                                                                   convert<acc_t>(aux), mean, scale, shift, params);
    }
  }
};

// The per-channel inputs of the transform: the forward's coefficients from
// its saved statistics and parameters (weight and bias nullable, in the
// dtype of scalar_t's pair: ParamArray), and the activation's parameters.
template <typename A, typename scalar_t>
struct GradSourceArgs {
  using acc_t = acc_type<scalar_t>;
  const acc_t* mean = nullptr;
  const acc_t* invstd = nullptr;
  ParamArray<scalar_t> weight;
  ParamArray<scalar_t> bias;
  ActivationParams<A, acc_t> params{};

  template <GradSource kSource>
  __device__ __forceinline__ ChannelGrad<A, kSource, acc_t> of_channel(int64_t c) const {
    ChannelGrad<A, kSource, acc_t> g;
    g.params = params;
    if constexpr (kRecomputesInput<kSource>) {
      const double w = weight.defined() ? weight.load(c) : 1.0;
      g.mean = load_global(mean + c);
      g.scale = static_cast<acc_t>(w * static_cast<double>(load_global(invstd + c)));
      g.shift = bias.defined() ? static_cast<acc_t>(bias.load(c)) : acc_t(0);
    }
    return g;
  }
};

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
