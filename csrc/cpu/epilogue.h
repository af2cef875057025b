// The CPU passes' epilogue and gradient-transform plumbing: the activations
// (csrc/common/activation.h) applied to at::vec vectors, pairs and tiles. No
// activation's formula is written here.
#pragma once

#include <type_traits>

#include "../common/epilogue.h"
#include "vec.h"

namespace fused_bn::cpu {

using common::GradSource;

// The math policy of csrc/common/activation.h over at::vec vectors of Acc;
// kPrecision (vec.h) says whether its float results are rounded once more to a
// narrower output type.
template <typename Acc, Precision kPrecision = Precision::kFloat>
struct VecMath {
  using T = Acc;
  using V = Vectorized<Acc>;
  static inline V splat(double v) { return V(static_cast<Acc>(v)); }
  static inline V select(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
  static inline V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  // float lanes inline exp, expm1, erf, the sigmoids' division and σ
  // (vec.h); double keeps Sleef's and divides.
  static inline V div(const V& a, const V& b) {
    if constexpr (std::is_same_v<Acc, float>) {
      return divide<kPrecision>(a, b);
    } else {
      return a / b;
    }
  }
  static inline V times_sigmoid(const V& a, const V& v) {
    if constexpr (std::is_same_v<Acc, float>) {
      return cpu::times_sigmoid<kPrecision>(a, v);
    } else {
      return a / (V(1) + (V(0) - v).exp());
    }
  }
  static inline V exp(const V& v) {
    if constexpr (std::is_same_v<Acc, float>) {
      return exp_inlined<kPrecision>(v);
    } else {
      return v.exp();
    }
  }
  static inline V expm1(const V& v) {
    if constexpr (std::is_same_v<Acc, float>) {
      return expm1_inlined<kPrecision>(v);
    } else {
      return v.expm1();
    }
  }
  static inline V erf(const V& v) {
    if constexpr (std::is_same_v<Acc, float>) {
      return erf_inlined<kPrecision>(v);
    } else {
      return v.erf();
    }
  }
  static inline common::ErfAndGaussian<V> erf_and_gaussian(const V& x) {
    if constexpr (std::is_same_v<Acc, float>) {
      return erf_and_gaussian_inlined<kPrecision>(x);
    } else {
      return {x.erf(), (V(0) - x * x).exp()};
    }
  }
  static inline V tanh(const V& v) { return v.tanh(); }
  static inline V log1p(const V& v) { return v.log1p(); }
};

// The policy scalar_t's epilogues evaluate with: bfloat16 and float16 outputs
// (accumulated in float) take the narrow-output forms.
template <typename scalar_t>
using EpilogueMath = VecMath<acc_type<scalar_t>, std::is_same_v<acc_type<scalar_t>, scalar_t> ? Precision::kFloat
                                                                                               : Precision::kNarrowOutput>;

template <typename scalar_t, typename A>
using ActParams = typename A::template Params<acc_type<scalar_t>>;

// A forward's epilogue with its activation's parameters in the accumulation type.
template <typename scalar_t, typename Epi>
struct EpilogueArgs {
  using A = typename Epi::Activation;
  ActParams<scalar_t, A> params;
  explicit EpilogueArgs(const common::ActivationArgs& args) : params(ActParams<scalar_t, A>::from(args)) {}

  // y of a vector of z (and of the residual, with one).
  inline Vectorized<acc_type<scalar_t>> apply(const Vectorized<acc_type<scalar_t>>& z,
                                              const Vectorized<acc_type<scalar_t>>& residual) const {
    if constexpr (Epi::kHasResidual) {
      return A::template forward<EpilogueMath<scalar_t>>(z + residual, params);
    } else {
      return A::template forward<EpilogueMath<scalar_t>>(z, params);
    }
  }
};

// The backward's gradient transform: activation A's derivative taken as
// kSource says (common::GradSource). kOnce: the reduction pass writes g (into
// grad_input's memory, which the dx pass then overwrites with dx) so that a
// costly derivative is evaluated once (BackwardArgs::grad_once).
template <typename A, GradSource kSource, bool kOnce = false>
struct Grad {
  using Activation = A;
  static constexpr GradSource kFrom = kSource;
  static constexpr bool kIdentity = kSource == GradSource::kNone;
  // Reads x's z again with the forward's coefficients (scale, forward_shift).
  static constexpr bool kRecomputes = kSource == GradSource::kInput || kSource == GradSource::kInputAndResidual;
  // Reads the residual or y beside x and dy.
  static constexpr bool kReadsAux = common::kReadsAux<kSource>;
  // The reduction pass writes g (the residual's gradient, or kOnce's g).
  static constexpr bool kWritesGrad = common::kWritesResidualGrad<kSource> || kOnce;
};

// Whether the row passes (normalize_rows, nhwc_block_grad_sums) stage a piece
// for A: z or g of all its rows first, into an L1-sized buffer, then the
// activation or the sums over that buffer. The costly activations
// (kCostlyDerivative) need it: their formulas hold more vectors than fit
// beside a piece's per-column coefficients and accumulators (up to 24 where
// AVX2 has 16 registers), or call out of line (Sleef's tanh, and double lanes'
// exp and expm1; the x86-64 ABI saves no vector register across a call), so those would
// be spilled and reloaded on every row (bench/NOTES.md, "Issue 37: exp and
// erf inlined, pieces staged").
template <typename A>
constexpr bool kStagesRowPieces = A::kCostlyDerivative;

// What the dx pass applies: the reduction pass has already written g when it
// writes it, so the dx pass reads that g as its dy.
template <typename G>
using DxGrad = std::conditional_t<G::kWritesGrad, Grad<common::Identity, GradSource::kNone>, G>;

// g of a vector under G: dy, x, the aux (residual or y), the channel's mean,
// scale and forward shift (its z's coefficients).
template <typename scalar_t, typename G>
__attribute__((always_inline)) inline Vectorized<acc_type<scalar_t>> transform_grad(
    const Vectorized<acc_type<scalar_t>>& dy, const Vectorized<acc_type<scalar_t>>& x,
    const Vectorized<acc_type<scalar_t>>& aux, const Vectorized<acc_type<scalar_t>>& mean,
    const Vectorized<acc_type<scalar_t>>& scale, const Vectorized<acc_type<scalar_t>>& shift,
    const ActParams<scalar_t, typename G::Activation>& params) {
  return common::transform_grad<typename G::Activation, G::kFrom, EpilogueMath<scalar_t>>(dy, x, aux, mean, scale,
                                                                                         shift, params);
}

}  // namespace fused_bn::cpu
