// Every activation an epilogue can apply after batch norm, each defined once
// for both devices (no torch, no CUDA runtime): its forward act(u), its
// derivative applied to a gradient, g · act'(u), its parameters as a small
// struct, and whether that derivative can be taken from the output instead
// (kGradFromOutput: act'(act(u)) = act'(u) for every u, which holds for the
// piecewise-linear activations whose kinks are fixed points, and
// grad_from_output_allowed(args, output_rounded): whether that survives the
// parameters and the rounding of y to a narrower output type; ELU's
// derivative is a function of y too, y + alpha, but not act'(y), so a
// recorded double backward could not use it: it recomputes u). The CPU kernels
// instantiate these with vectors (csrc/cpu/epilogue.h, at::vec), the CUDA
// kernels and the CPU's scalar paths with scalars (ScalarMath below).
//
// kCostlyDerivative: the derivative evaluates a transcendental (exp, erf,
// tanh), so that on the CPU, where that arithmetic and not memory bounds the
// backward, the training backward evaluates it once, writing g in the
// reduction pass for the dx pass to read, rather than once in each pass.
//
// Adding an activation: one struct here and one line in FUSED_BN_ACTIVATIONS;
// both devices' dispatch and instantiation expand that list, and Python's
// table (fused_bn/_activations.py) gives it a public name.
//
// The definitions are written against a math policy M, which provides
//   M::T, M::V          the accumulation type and the value type (T or a vector of T)
//   M::splat(T) -> V    a constant
//   M::select(m, a, b)  a where the mask m (a comparison of Vs) holds, else b
//   M::fma(a, b, c)     a · b + c, one rounding
//   M::div(a, b)        a / b for b >= 1 (the sigmoids' 1 + exp(·)), inf
//                       included; a policy whose results are rounded to a
//                       narrower type may divide by a refined reciprocal
//   M::times_sigmoid(a, v)  a · σ(v) = a / (1 + exp(−v)), inf and NaN as that
//                       formula gives them (a policy may evaluate σ its own way)
//   M::exp, expm1, erf, tanh, log1p
//   M::erf_and_gaussian(x) -> ErfAndGaussian<V>  erf(x) and exp(−x²) together
//                       (a policy whose erf is built on that exp shares it)
// Comparisons are false for NaN, so each formula's NaN behaviour is the one
// PyTorch's kernels give (written next to each).
#pragma once

#include <cmath>
#include <cstdlib>

#include "host_device.h"

namespace fused_bn {
namespace common {

// X(Type, enumerator, name, parameter count) for every activation, in the
// order of the enumeration; the name is what the ops take (csrc/ops.cpp).
#define FUSED_BN_ACTIVATIONS(X)               \
  X(Identity, kIdentity, "identity", 0)       \
  X(Relu, kRelu, "relu", 0)                   \
  X(Hardtanh, kHardtanh, "hardtanh", 2)       \
  X(LeakyRelu, kLeakyRelu, "leaky_relu", 1)   \
  X(Elu, kElu, "elu", 1)                      \
  X(Silu, kSilu, "silu", 0)                   \
  X(Hardswish, kHardswish, "hardswish", 0)    \
  X(Gelu, kGelu, "gelu", 0)                   \
  X(GeluTanh, kGeluTanh, "gelu_tanh", 0)     \
  X(Hardsigmoid, kHardsigmoid, "hardsigmoid", 0)

enum class Activation : int {
#define FUSED_BN_ACTIVATION_ENUMERATOR(Type, kind, name, params) kind,
  FUSED_BN_ACTIVATIONS(FUSED_BN_ACTIVATION_ENUMERATOR)
#undef FUSED_BN_ACTIVATION_ENUMERATOR
};

constexpr int kMaxActivationParams = 2;

// An epilogue's activation as the glue hands it to the kernels: its kind and
// its parameters in double, in the order of the activation's Params.
struct ActivationArgs {
  Activation kind = Activation::kIdentity;
  double params[kMaxActivationParams] = {0.0, 0.0};
};

// The value type of a math policy.
template <class M>
using Value = typename M::V;

// What an activation without parameters derives from: its Params hold
// nothing, and its derivative is taken from u (kGradFromOutput: see the top).
struct Unparameterized {
  template <typename T>
  struct Params {
    FUSED_BN_HOST_DEVICE static Params from(const ActivationArgs&) { return {}; }
  };
  template <class M>
  using P = Params<typename M::T>;
  static constexpr bool kGradFromOutput = false;
  static constexpr bool kCostlyDerivative = false;
};

// One parameter, params[0] of ActivationArgs (negative_slope, alpha).
struct OneParameter {
  template <typename T>
  struct Params {
    T value;
    FUSED_BN_HOST_DEVICE static Params from(const ActivationArgs& a) { return {static_cast<T>(a.params[0])}; }
  };
  template <class M>
  using P = Params<typename M::T>;
  static constexpr bool kCostlyDerivative = false;
};

struct Identity : Unparameterized {
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>&) { return u; }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>&, const P<M>&) { return g; }
};

// max(u, 0), NaN kept (torch.relu). Derivative: g where u > 0 (a NaN u gives 0).
struct Relu : Unparameterized {
  static constexpr bool kGradFromOutput = true;
  // Rounding keeps y's sign (below half's smallest subnormal y becomes 0, as
  // nn's own u does in that dtype).
  static bool grad_from_output_allowed(const ActivationArgs&, bool /*output_rounded*/) { return true; }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>&) {
    return M::select(u < M::splat(0), M::splat(0), u);
  }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>& u, const P<M>&) {
    return M::select(u > M::splat(0), g, M::splat(0));
  }
};

// clamp(u, min_val, max_val) (nn.Hardtanh; ReLU6 is hardtanh(0, 6)), NaN
// kept. Derivative: 0 where u <= min_val or u >= max_val, g elsewhere (NaN
// included), as hardtanh_backward.
struct Hardtanh {
  template <typename T>
  struct Params {
    T min_val, max_val;
    FUSED_BN_HOST_DEVICE static Params from(const ActivationArgs& a) {
      return {static_cast<T>(a.params[0]), static_cast<T>(a.params[1])};
    }
  };
  template <class M>
  using P = Params<typename M::T>;
  static constexpr bool kGradFromOutput = true;
  static constexpr bool kCostlyDerivative = false;
  // Only where y is u itself: rounded to half or bfloat16, a u just inside
  // a bound can round onto it (5.99 becomes 6 in bfloat16), and a bound
  // the type cannot hold is never reached exactly.
  static bool grad_from_output_allowed(const ActivationArgs&, bool output_rounded) { return !output_rounded; }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>& p) {
    const auto lo = M::splat(p.min_val), hi = M::splat(p.max_val);
    return M::select(u < lo, lo, M::select(u > hi, hi, u));
  }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>& u, const P<M>& p) {
    const auto zero = M::splat(0);
    return M::select(u <= M::splat(p.min_val), zero, M::select(u >= M::splat(p.max_val), zero, g));
  }
};

// u where u > 0, else u · negative_slope (NaN kept). Derivative g or
// g · negative_slope by the same test; y > 0 exactly where u > 0 when the
// slope is not negative (the condition for taking it from y).
struct LeakyRelu : OneParameter {  // negative_slope
  static constexpr bool kGradFromOutput = true;
  static bool grad_from_output_allowed(const ActivationArgs& a, bool /*output_rounded*/) {
    return a.params[0] >= 0.0;  // rounding keeps the sign, as for Relu
  }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>& p) {
    return M::select(u > M::splat(0), u, u * M::splat(p.value));
  }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>& u, const P<M>& p) {
    return M::select(u > M::splat(0), g, g * M::splat(p.value));
  }
};

// u where u > 0, else alpha · (exp(u) − 1) (nn.ELU; a NaN u gives NaN).
// Derivative: g · alpha · exp(u) where u <= 0, else g (NaN: g), as
// elu_backward.
struct Elu : OneParameter {  // alpha
  static constexpr bool kCostlyDerivative = true;
  static constexpr bool kGradFromOutput = false;
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>& p) {
    return M::select(u > M::splat(0), u, M::expm1(u) * M::splat(p.value));
  }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>& u, const P<M>& p) {
    return M::select(u <= M::splat(0), g * (M::splat(p.value) * M::exp(u)), g);
  }
};

// u · σ(u) = u / (1 + exp(−u)) (nn.SiLU). Derivative: g · σ(u) · (1 + u · (1 − σ(u))).
struct Silu : Unparameterized {
  static constexpr bool kCostlyDerivative = true;
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>&) {
    return M::times_sigmoid(u, u);
  }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>& u, const P<M>&) {
    const auto one = M::splat(1);
    const auto sigmoid = M::times_sigmoid(one, u);
    return g * sigmoid * (one + u * (one - sigmoid));
  }
};

// u · clamp(u + 3, 0, 6) / 6 (nn.Hardswish; NaN kept). Derivative: 0 where
// u < −3, g · (u / 3 + 0.5) where u <= 3, else g (NaN: g), as hardswish_backward.
struct Hardswish : Unparameterized {
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>&) {
    const auto zero = M::splat(0), six = M::splat(6);
    const auto shifted = u + M::splat(3);
    return u * M::select(shifted < zero, zero, M::select(shifted > six, six, shifted)) / six;
  }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>& u, const P<M>&) {
    const auto three = M::splat(3);
    return M::select(u < M::splat(-3), M::splat(0), M::select(u <= three, g * (u / three + M::splat(0.5)), g));
  }
};

// u · Φ(u) = u · (1 + erf(u / √2)) / 2 (nn.GELU(approximate="none")).
// Derivative: g · (Φ(u) + u · φ(u)), φ(u) = exp(−u²/2) / √(2π).
struct Gelu : Unparameterized {
  static constexpr bool kCostlyDerivative = true;
  static constexpr double kSqrtHalf = 0.70710678118654752440;      // 1/√2
  static constexpr double kInvSqrtTwoPi = 0.39894228040143267794;  // 1/√(2π)
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>&) {
    return u * M::splat(0.5) * (M::splat(1) + M::erf(u * M::splat(kSqrtHalf)));
  }
  // φ(u) is exp(−x²) / √(2π) at x = u / √2, erf's own argument: one exp
  // for both where the policy's erf evaluates it anyway.
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>& u, const P<M>&) {
    const auto both = M::erf_and_gaussian(u * M::splat(kSqrtHalf));
    const auto cdf = M::splat(0.5) * (M::splat(1) + both.erf);
    const auto pdf = both.gaussian * M::splat(kInvSqrtTwoPi);
    return g * (cdf + u * pdf);
  }
};

// u · (1 + tanh(z)) / 2 with z = √(2/π) · (u + 0.044715 · u³)
// (nn.GELU(approximate="tanh")), evaluated as u · σ(2z), since
// (1 + tanh(z)) / 2 = σ(2z) = 1 / (1 + exp(−2z)): one exp instead of a tanh
// (which the CPU's vector math has only as an out-of-line call), and no
// cancellation in 1 + tanh(z) where z is very negative. Derivative, with
// s = σ(2z): g · (s + 2u · s · (1 − s) · z'(u)), z'(u) = √(2/π) · (1 + 3 · 0.044715 · u²)
// (gelu_backward's 0.5 · (1 + tanh) + 0.5 · u · (1 − tanh²) · z'(u), the same
// function), with 1 − s taken as exp(−2z) · s: 1 − tanh² in nn's formula, and
// 1 − s, cancel where z is large, which cost up to 1e-6 of the derivative at
// u ≈ 5. NaN and ±inf give what nn's gives (NaN at −inf, where 0 · inf).
struct GeluTanh : Unparameterized {
  static constexpr bool kCostlyDerivative = true;
  static constexpr double kBeta = 0.79788456080286535588;  // √(2/π)
  static constexpr double kKappa = 0.044715;
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>&) {
    const auto twice_inner = M::splat(2 * kBeta) * (u + M::splat(kKappa) * u * u * u);
    return M::times_sigmoid(u, twice_inner);
  }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>& u, const P<M>&) {
    const auto twice_inner = M::splat(2 * kBeta) * (u + M::splat(kKappa) * u * u * u);
    const auto e = M::exp(M::splat(0) - twice_inner);
    const auto s = M::div(M::splat(1), M::splat(1) + e);
    // e · s is 1 − s, but inf · 0 where exp(−2z) overflows: there 1 − s is 1.
    const auto one_minus_s = M::select(s > M::splat(0), e * s, M::splat(1));
    const auto inner_derivative = M::splat(kBeta) * (M::splat(1) + M::splat(3 * kKappa) * u * u);
    return g * (s + M::splat(2) * u * s * one_minus_s * inner_derivative);
  }
};

// clamp(u + 3, 0, 6) / 6 (nn.Hardsigmoid; NaN kept). Derivative: g / 6
// where −3 < u < 3, else 0 (a NaN u gives 0), as hardsigmoid_backward. Not
// from the output: y rounds to 1 for u just below 3, where act'(u) = 1/6.
struct Hardsigmoid : Unparameterized {
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> forward(const Value<M>& u, const P<M>&) {
    const auto zero = M::splat(0), six = M::splat(6);
    const auto shifted = u + M::splat(3);
    return M::select(shifted < zero, zero, M::select(shifted > six, six, shifted)) / six;
  }
  template <class M>
  FUSED_BN_HOST_DEVICE static Value<M> grad(const Value<M>& g, const Value<M>& u, const P<M>&) {
    const auto zero = M::splat(0);
    return M::select(u > M::splat(-3), M::select(u < M::splat(3), g / M::splat(6), zero), zero);
  }
};

// Calls f(A{}) with A the activation's struct. The switch lists every
// enumerator (both expand FUSED_BN_ACTIVATIONS), so none can be missed; a
// value outside the enumeration (a bad cast) aborts rather than run another
// epilogue. Host code: the glue has validated the kind by then.
template <typename F>
decltype(auto) with_activation(Activation kind, F&& f) {
  switch (kind) {
#define FUSED_BN_ACTIVATION_CASE(Type, enumerator, name, params) \
  case Activation::enumerator:                                   \
    return f(Type{});
    FUSED_BN_ACTIVATIONS(FUSED_BN_ACTIVATION_CASE)
#undef FUSED_BN_ACTIVATION_CASE
  }
  std::abort();  // unreachable
}

// erf(x) and exp(−x²) (M::erf_and_gaussian).
template <typename V>
struct ErfAndGaussian {
  V erf;
  V gaussian;
};

// Scalar math for the activations (the CUDA kernels, the CPU's scalar paths):
// float or double, host or device.
template <typename Acc>
struct ScalarMath {
  using T = Acc;
  using V = Acc;
  FUSED_BN_HOST_DEVICE static V splat(double v) { return static_cast<V>(v); }
  FUSED_BN_HOST_DEVICE static V select(bool mask, V a, V b) { return mask ? a : b; }
  FUSED_BN_HOST_DEVICE static V fma(V a, V b, V c);
  FUSED_BN_HOST_DEVICE static V div(V a, V b) { return a / b; }
  FUSED_BN_HOST_DEVICE static V times_sigmoid(V a, V v) { return a / (V(1) + exp(V(0) - v)); }
  FUSED_BN_HOST_DEVICE static V exp(V v);
  FUSED_BN_HOST_DEVICE static V expm1(V v);
  FUSED_BN_HOST_DEVICE static V erf(V v);
  FUSED_BN_HOST_DEVICE static ErfAndGaussian<V> erf_and_gaussian(V x) { return {erf(x), exp(V(0) - x * x)}; }
  FUSED_BN_HOST_DEVICE static V tanh(V v);
  FUSED_BN_HOST_DEVICE static V log1p(V v);
};

#define FUSED_BN_SCALAR_MATH(type, fma_fn, exp_fn, expm1_fn, erf_fn, tanh_fn, log1p_fn)                         \
  template <>                                                                                                     \
  FUSED_BN_HOST_DEVICE inline type ScalarMath<type>::fma(type a, type b, type c) { return ::fma_fn(a, b, c); }    \
  template <>                                                                                                     \
  FUSED_BN_HOST_DEVICE inline type ScalarMath<type>::exp(type v) { return ::exp_fn(v); }                          \
  template <>                                                                                                     \
  FUSED_BN_HOST_DEVICE inline type ScalarMath<type>::expm1(type v) { return ::expm1_fn(v); }                      \
  template <>                                                                                                     \
  FUSED_BN_HOST_DEVICE inline type ScalarMath<type>::erf(type v) { return ::erf_fn(v); }                          \
  template <>                                                                                                     \
  FUSED_BN_HOST_DEVICE inline type ScalarMath<type>::tanh(type v) { return ::tanh_fn(v); }                        \
  template <>                                                                                                     \
  FUSED_BN_HOST_DEVICE inline type ScalarMath<type>::log1p(type v) { return ::log1p_fn(v); }
FUSED_BN_SCALAR_MATH(float, fmaf, expf, expm1f, erff, tanhf, log1pf)
FUSED_BN_SCALAR_MATH(double, fma, exp, expm1, erf, tanh, log1p)
#undef FUSED_BN_SCALAR_MATH

}  // namespace common
}  // namespace fused_bn
