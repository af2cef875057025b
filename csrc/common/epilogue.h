// What a forward element pass does after the normalization, and where the
// backward passes take the activation's derivative from: one vocabulary for
// both devices' kernels and glue (no torch, no CUDA runtime). The
// activations themselves are csrc/common/activation.h.
#pragma once

#include <cstdlib>
#include <type_traits>

#include "activation.h"

namespace fused_bn {
namespace common {

// The forward's epilogue: y = A(z) or y = A(z + residual), with
// z = (x − mean) · scale + shift the normalized input.
template <typename A, bool kResidual>
struct Epilogue {
  using Activation = A;
  static constexpr bool kHasResidual = kResidual;
  // Plain batch norm: nothing after the normalization.
  static constexpr bool kPlain = std::is_same_v<A, Identity> && !kResidual;
  // A derivative is recomputed from z in the backward, so z must be what the
  // backward can recompute bit for bit: the coefficients of the saved
  // statistics (see the CPU's ChannelCoefs), not the double mean's.
  static constexpr bool kCoefficientsFromSaved = !std::is_same_v<A, Identity>;
};

// Where the backward's g = A'(u) · dy comes from:
//   kNone            : g = dy (the identity; its residual's gradient is dy itself).
//   kInput           : u = z recomputed from x with the forward's coefficients
//                      (no residual): nothing saved for it.
//   kInputAndResidual: u = z + r, z recomputed, r the saved residual (read
//                      where dy is).
//   kOutput          : evaluated at y, the forward's output (A::kGradFromOutput).
// With a residual (kInputAndResidual, kOutput) the reduction pass writes g (it
// is the residual's gradient) and the dx pass reads it in place of dy, so dy
// and the residual or y are each read once.
enum class GradSource { kNone, kInput, kInputAndResidual, kOutput };

template <GradSource kSource>
constexpr bool kWritesResidualGrad = kSource == GradSource::kInputAndResidual || kSource == GradSource::kOutput;

// The tensor a gradient transform reads beside x and dy: the residual or y.
template <GradSource kSource>
constexpr bool kReadsAux = kWritesResidualGrad<kSource>;

// The derivative of activation A applied to dy under kSource; x, mean, scale
// and shift give z (with the forward's rounding: one fma), aux is r or y.
template <typename A, GradSource kSource, class M>
FUSED_BN_HOST_DEVICE inline typename M::V transform_grad(const typename M::V& dy, const typename M::V& x,
                                                         const typename M::V& aux, const typename M::V& mean,
                                                         const typename M::V& scale, const typename M::V& shift,
                                                         const typename A::template Params<typename M::T>& p) {
  if constexpr (kSource == GradSource::kNone) {
    return dy;
  } else if constexpr (kSource == GradSource::kOutput) {
    return A::template grad<M>(dy, aux, p);
  } else {
    const auto z = M::fma(x - mean, scale, shift);
    if constexpr (kSource == GradSource::kInput) {
      return A::template grad<M>(dy, z, p);
    } else {
      return A::template grad<M>(dy, z + aux, p);
    }
  }
}

// Calls f(std::integral_constant<GradSource, s>{}) for s and activation A:
// kNone only for the identity, kOutput only where A::kGradFromOutput, the
// rest for the others. The glue chooses a valid source
// (grad_source_for); anything else aborts.
template <typename A, typename F>
decltype(auto) with_grad_source(GradSource source, F&& f) {
  if constexpr (std::is_same_v<A, Identity>) {
    if (source == GradSource::kNone) return f(std::integral_constant<GradSource, GradSource::kNone>{});
  } else {
    switch (source) {
      case GradSource::kNone:
        break;
      case GradSource::kInput:
        return f(std::integral_constant<GradSource, GradSource::kInput>{});
      case GradSource::kInputAndResidual:
        return f(std::integral_constant<GradSource, GradSource::kInputAndResidual>{});
      case GradSource::kOutput:
        if constexpr (A::kGradFromOutput) return f(std::integral_constant<GradSource, GradSource::kOutput>{});
        break;
    }
  }
  std::abort();  // unreachable
}

// Calls f(Epilogue<A, residual>{}) for the activation `kind`.
template <typename F>
decltype(auto) with_epilogue(Activation kind, bool residual, F&& f) {
  return with_activation(kind, [&](auto a) {
    using A = decltype(a);
    if (residual) return f(Epilogue<A, true>{});
    return f(Epilogue<A, false>{});
  });
}

// Whether activation `args` may take its derivative from the output (with a
// residual, the backward then reads y instead of recomputing u = z + r);
// output_rounded: y is stored in a narrower type than the one act(u) is
// computed in (half and bfloat16).
inline bool grad_from_output_allowed(const ActivationArgs& args, bool output_rounded) {
  return with_activation(args.kind, [&](auto a) {
    using A = decltype(a);
    if constexpr (A::kGradFromOutput) {
      return A::grad_from_output_allowed(args, output_rounded);
    } else {
      return false;
    }
  });
}

// Whether activation `kind`'s derivative is costly to evaluate
// (kCostlyDerivative: a transcendental).
inline bool costly_derivative(Activation kind) {
  return with_activation(kind, [](auto a) { return decltype(a)::kCostlyDerivative; });
}

// The backward's source for an activation, given what the forward saved: the
// output (has_output) or the residual (has_residual) or neither.
inline GradSource grad_source_for(Activation kind, bool has_residual, bool has_output) {
  if (kind == Activation::kIdentity) return GradSource::kNone;
  if (has_output) return GradSource::kOutput;
  return has_residual ? GradSource::kInputAndResidual : GradSource::kInput;
}

}  // namespace common
}  // namespace fused_bn
