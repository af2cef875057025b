// The CUDA kernels' one copy of the per-element epilogue and gradient-mask
// formulas (the vocabulary is both devices', csrc/common/epilogue.h): the
// normalize kernels apply an Epilogue, the grad-sums, grad-input and
// two-values kernels take g through a GradMask. Written once here so the
// forward's ReLU input and the backward's recomputed one are the same
// expression, bit for bit.
#pragma once

#include "../common/epilogue.h"
#include "device_primitives.cuh"

#include <cstdint>

namespace fused_bn {
namespace cuda {

using common::Epilogue;
using common::GradMask;

// Internal to the kernel layer (forward.cu, backward.cu).
namespace detail {

// z = (x − mean) · scale + shift with one rounding (the CPU's fmadd), from the
// coefficients of the saved statistics: what a forward with an epilogue
// normalizes with and kReluOfInput's mask recomputes.
template <typename acc_t>
__device__ __forceinline__ acc_t epilogue_input(acc_t x, acc_t mean, acc_t scale, acc_t shift) {
  return fused_multiply_add(x - mean, scale, shift);
}

// max(v, 0) with NaN kept, as torch.relu.
template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// y of an epilogue from z (kRelu, kAddRelu; kNone normalizes in
// NormalizeChannel's own form) and the residual (kAddRelu only).
template <Epilogue kEpilogue, typename acc_t>
__device__ __forceinline__ acc_t apply_epilogue(acc_t z, acc_t residual) {
  static_assert(kEpilogue != Epilogue::kNone, "kNone has no epilogue");
  if constexpr (kEpilogue == Epilogue::kRelu) return relu(z);
  return relu(z + residual);
}

// One channel's gradient mask: g = dy, or dy where the forward's ReLU passed
// its input (a NaN there gives 0, as relu's backward on a NaN output).
//   kReluOfInput : z recomputed from x (epilogue_input with the channel's
//                  mean, scale = w · invstd rounded once, and shift = bias).
//   kReluOfOutput: y > 0, y the forward's output.
template <GradMask kMask, typename acc_t>
struct ChannelGradMask {
  acc_t mean = acc_t(0), scale = acc_t(0), shift = acc_t(0);  // kReluOfInput

  template <typename scalar_t>
  __device__ __forceinline__ scalar_t operator()(scalar_t dy, scalar_t x, scalar_t y) const {
    if constexpr (kMask == GradMask::kReluOfInput) {
      return epilogue_input(convert<acc_t>(x), mean, scale, shift) > acc_t(0) ? dy : convert<scalar_t>(0.0f);
    } else if constexpr (kMask == GradMask::kReluOfOutput) {
      return convert<acc_t>(y) > acc_t(0) ? dy : convert<scalar_t>(0.0f);
    } else {
      return dy;
    }
  }
};

// The per-channel inputs of kReluOfInput's mask: the forward's coefficients
// from its saved statistics and parameters (param_t is the weight's and
// bias's dtype; both nullable).
template <typename acc_t, typename param_t>
struct GradMaskSource {
  const acc_t* mean = nullptr;
  const acc_t* invstd = nullptr;
  const param_t* weight = nullptr;
  const param_t* bias = nullptr;

  template <GradMask kMask>
  __device__ __forceinline__ ChannelGradMask<kMask, acc_t> of_channel(int64_t c) const {
    ChannelGradMask<kMask, acc_t> m;
    if constexpr (kMask == GradMask::kReluOfInput) {
      const double w = weight != nullptr ? convert<double>(weight[c]) : 1.0;
      m.mean = mean[c];
      m.scale = static_cast<acc_t>(w * static_cast<double>(invstd[c]));
      m.shift = bias != nullptr ? convert<acc_t>(bias[c]) : acc_t(0);
    }
    return m;
  }
};

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
