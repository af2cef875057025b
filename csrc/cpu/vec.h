// Vector primitives of the CPU kernels: ATen's Vectorized (the only ATen-vec
// include of the kernel layer), streaming stores, widening, prefetch, and
// VecPair, the load/store unit every pass walks in.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "../common/activation.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "tuning.h"

namespace fused_bn::cpu {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

constexpr int64_t kStreamAlignment = sizeof(Vectorized<float>);

inline bool stream_aligned(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % kStreamAlignment == 0;
}

template <typename V>
inline void stream_vector(void* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    _mm512_stream_ps(static_cast<float*>(p), v);
  } else if constexpr (std::is_same_v<V, Vectorized<double>>) {
    _mm512_stream_pd(static_cast<double*>(p), v);
  } else {
    _mm512_stream_si512(static_cast<__m512i*>(p), v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    _mm256_stream_ps(static_cast<float*>(p), v);
  } else if constexpr (std::is_same_v<V, Vectorized<double>>) {
    _mm256_stream_pd(static_cast<double*>(p), v);
  } else {
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
  }
#else
  v.store(p);
#endif
}

// The lanes of a float vector as two double vectors (first half, second half).
inline std::pair<Vectorized<double>, Vectorized<double>> widen(const Vectorized<float>& v) {
  static_assert(Vectorized<float>::size() == 2 * Vectorized<double>::size(), "float lanes are twice double lanes");
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = v;
  return {_mm512_cvtps_pd(_mm512_castps512_ps256(f)),
          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)))};
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 f = v;
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(f)), _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1))};
#else
  constexpr int64_t kHalf = Vectorized<double>::size();
  float lanes[2 * kHalf];
  v.store(lanes);
  double first[kHalf], second[kHalf];
  for (int64_t i = 0; i < kHalf; ++i) {
    first[i] = lanes[i];
    second[i] = lanes[kHalf + i];
  }
  return {Vectorized<double>::loadu(first), Vectorized<double>::loadu(second)};
#endif
}

// How accurate the float lanes' transcendentals must be. kFloat: the result
// is a float32 output or feeds float32 sums as itself (exp within ~1 ulp).
// kNarrowOutput: the activation's result is rounded once more, to bfloat16 or
// float16 (half an ulp: 2^-9, 2^-11 relative), and feeds float sums whose
// inputs carry that rounding already: exp within 5.4e-6 relative (1% of
// float16's half ulp), division by a once-refined reciprocal (2^-22). The
// cheaper forms are worth it where the activation is compute-bound: SiLU's
// pass in bfloat16 (bench/NOTES.md, "Issue 37: narrow-output transcendentals").
enum class Precision { kFloat, kNarrowOutput };

// min(max(x, low), high) where a NaN x stays NaN: the x86 min/max return their
// second operand when either is NaN, so x goes second (at::vec's maximum and
// minimum test for NaN with two more instructions each).
inline Vectorized<float> clamp_keeping_nan(const Vectorized<float>& x, float low, float high) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_min_ps(_mm512_set1_ps(high), _mm512_max_ps(_mm512_set1_ps(low), x));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_min_ps(_mm256_set1_ps(high), _mm256_max_ps(_mm256_set1_ps(low), x));
#else
  return at::vec::minimum(at::vec::maximum(x, Vectorized<float>(low)), Vectorized<float>(high));
#endif
}

// Whether every lane of v is at least `bound` (a NaN lane is not).
inline bool all_lanes_at_least(const Vectorized<float>& v, float bound) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(v, _mm512_set1_ps(bound), _CMP_GE_OQ) == 0xFFFF;
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(bound), _CMP_GE_OQ)) == 0xFF;
#else
  return (v >= Vectorized<float>(bound)).zero_mask() == 0;
#endif
}

// 2^k for integral float lanes k in [-126, 127]: a normal float built from its
// exponent bits, (k + 127) << 23.
inline Vectorized<float> power_of_two(const Vectorized<float>& k) {
  using V = Vectorized<float>;
  return at::vec::cast<float>(at::vec::convert_to_int_of_same_size(at::vec::fmadd(k, V(8388608.0f), V(1065353216.0f))));
}

// exp(x) = 2^n · exp(r): n = round(x / ln 2) and r = x − n ln 2 in
// [-ln2/2, ln2/2], with ln 2 split so that n times its high part is exact
// (Cody-Waite). x finite and clamped by the caller.
struct ExpReduction {
  Vectorized<float> n, r;
  explicit ExpReduction(const Vectorized<float>& x) : n((x * Vectorized<float>(1.44269504088896341f)).round()) {
    r = at::vec::fnmadd(n, Vectorized<float>(0.693359375f), x);
    r = at::vec::fnmadd(n, Vectorized<float>(-2.12194440e-4f), r);
  }
};

// exp(r) − 1 on [-ln2/2, ln2/2] as r + r²·p(r) (see exp_inlined for each
// precision's polynomial): the r term is exact, so the relative error stays
// that of p's term as r goes to 0 (where exp(r) − 1 would cancel).
template <Precision kPrecision>
inline Vectorized<float> expm1_polynomial(const Vectorized<float>& r) {
  using V = Vectorized<float>;
  V p;
  if constexpr (kPrecision == Precision::kFloat) {
    p = at::vec::fmadd(V(1.9875691500e-4f), r, V(1.3981999507e-3f));
    p = at::vec::fmadd(p, r, V(8.3334519073e-3f));
    p = at::vec::fmadd(p, r, V(4.1665795894e-2f));
    p = at::vec::fmadd(p, r, V(1.6666665459e-1f));
    p = at::vec::fmadd(p, r, V(5.0000001201e-1f));
  } else {
    p = at::vec::fmadd(V(4.127774e-2f), r, V(1.6753514e-1f));
    p = at::vec::fmadd(p, r, V(5.0005114e-1f));
  }
  return at::vec::fmadd(p, r * r, r);
}

// exp(r) on [-ln2/2, ln2/2].
template <Precision kPrecision>
inline Vectorized<float> exp_polynomial(const Vectorized<float>& r) {
  return expm1_polynomial<kPrecision>(r) + Vectorized<float>(1.0f);
}

// exp of float lanes, inlined. at::vec's exp is a call into Sleef (u10), across
// which no vector register survives (the x86-64 ABI saves none), and it
// dominated the costly activations' passes (bench/NOTES.md, "Issue 37: exp and
// erf inlined, pieces staged"). Cody-Waite reduction by ln 2 and a polynomial
// on [-ln2/2, ln2/2]: kFloat, Moshier's Cephes polynomial of degree 6, at most
// 1.01 ulp from float64's exp over [-104, 88.7], subnormal results included
// (every 13th float checked; Sleef's u10: 0.57), which keeps the epilogues
// within the accuracy rule (the rounding of u dominates their error);
// kNarrowOutput, degree 4 (our minimax fit of the relative error), 5.4e-6.
// Subnormal results round once, like Sleef's: 2^n is applied as two normal
// factors. Above log(FLT_MAX) inf; a NaN flows through as NaN.
template <Precision kPrecision = Precision::kFloat>
inline Vectorized<float> exp_inlined(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  // exp(-104) < 2^-150, half the least subnormal: from there down (-inf too)
  // the clamped x gives 0 with no test of its own.
  constexpr float kLowest = -104.0f;
  constexpr float kHighest = 88.72283905f;  // log(FLT_MAX)
  const ExpReduction reduced(clamp_keeping_nan(x, kLowest, kHighest));
  const V p = exp_polynomial<kPrecision>(reduced.r);
  // 2^n = 2^half · 2^(n - half): n runs from -150 to 128, each factor from -75 to 64.
  const V half = (reduced.n * V(0.5f)).floor();
  const V y = p * power_of_two(half) * power_of_two(reduced.n - half);
  return V::blendv(y, V(std::numeric_limits<float>::infinity()), x > V(kHighest));
}

// exp(x) − 1 of float lanes, inlined (ELU's forward): at::vec's expm1 is
// Sleef's out-of-line call, which held ELU's passes under issue 37's target
// (bench/NOTES.md, "Issue 37: ELU's expm1 inlined"). With exp_inlined's
// reduction x = n ln 2 + r, exp(x) − 1 = 2^n (expm1(r) + 1) − 1
// = fma(2^n, expm1(r), 2^n − 1): one rounding, 2^n and 2^n − 1 exact for
// |n| <= 24 (beyond, the −1 or 2^n is below half an ulp of the result), and
// for |x| < ln2/2 (n = 0) it is expm1(r) itself, whose r term keeps the
// relative error small near 0 (subnormal x: x). Fast while every lane has
// |x| <= 86 (|n| <= 124, 2^n one normal factor); a vector with a lane beyond
// (|x| > 86, inf, NaN: seldom in a normalized tensor) takes Sleef's expm1.
template <Precision kPrecision = Precision::kFloat>
inline Vectorized<float> expm1_inlined(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  if (__builtin_expect(all_lanes_at_least(x | V(-0.0f), -86.0f), 1)) {
    const ExpReduction reduced(x);
    const V scale = power_of_two(reduced.n);
    return at::vec::fmadd(scale, expm1_polynomial<kPrecision>(reduced.r), scale - V(1.0f));
  }
  return x.expm1();
}

// 1 / b by the hardware's reciprocal estimate refined by one Newton step
// (2^-22 relative) for finite b whose reciprocal is normal; a few cycles
// where the divide takes ~10 and stalls a pass.
inline Vectorized<float> refined_reciprocal(const Vectorized<float>& b) {
  using V = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  const V estimate = _mm512_rcp14_ps(b);
#elif defined(CPU_CAPABILITY_AVX2)
  const V estimate = _mm256_rcp_ps(b);
#else
  const V estimate = V(1.0f) / b;
#endif
  return estimate * at::vec::fnmadd(b, estimate, V(2.0f));
}

// a / b for float lanes with b >= 1 or inf (the sigmoids' 1 + exp(·)): kFloat
// divides; kNarrowOutput multiplies by the refined reciprocal, with b first
// bounded by FLT_MAX, whose estimate is 0 (flushed, as an inf's is), so that
// the step gives 0, not inf · 0.
template <Precision kPrecision = Precision::kFloat>
inline Vectorized<float> divide(const Vectorized<float>& a, const Vectorized<float>& b) {
  if constexpr (kPrecision == Precision::kNarrowOutput) {
    return a * refined_reciprocal(clamp_keeping_nan(b, -std::numeric_limits<float>::max(),
                                                    std::numeric_limits<float>::max()));
  }
  return a / b;
}

// a · σ(v) = a / (1 + exp(−v)) for float lanes: SiLU's forward with a = v,
// its derivative's σ(v) with a = 1, GELU-tanh's forward. kFloat evaluates that
// formula (nn's SiLU: one rounding of the quotient). kNarrowOutput, where a
// pass of SiLU is bound by this arithmetic: with t = exp(−|v|) in (0, 1],
// σ(v) = 1 / (1 + t) for v >= 0 and t / (1 + t) for v < 0, so the exp's
// argument is never positive (no overflow test), 2^n is one normal factor
// while −|v| >= −86 (n >= −125), and 1 + t in [1, 2] needs no bound before
// its reciprocal: ~8 fewer instructions per vector than exp_inlined and
// divide. A vector with a lane beyond (|v| > 86, inf or NaN, which a
// normalized tensor seldom holds) takes those general forms, subnormal
// results and NaN as they give them. The same 5.4e-6 and 2^-22 relative
// errors as the general narrow forms.
template <Precision kPrecision = Precision::kFloat>
inline Vectorized<float> times_sigmoid(const Vectorized<float>& a, const Vectorized<float>& v) {
  using V = Vectorized<float>;
  if constexpr (kPrecision == Precision::kNarrowOutput) {
    const V negative_magnitude = v | V(-0.0f);
    if (__builtin_expect(all_lanes_at_least(negative_magnitude, -86.0f), 1)) {
      const ExpReduction reduced(negative_magnitude);
      const V t = exp_polynomial<kPrecision>(reduced.r) * power_of_two(reduced.n);
      return a * V::blendv(V(1.0f), t, v < V(0.0f)) * refined_reciprocal(t + V(1.0f));
    }
  }
  return divide<kPrecision>(a, V(1.0f) + exp_inlined<kPrecision>(V(0.0f) - v));
}

// erf of float lanes by the formula of at::vec's own (Abramowitz and Stegun
// 7.1.26, |error| < 1.5e-7: what nn's CPU GELU evaluates), with exp_inlined
// in place of its Sleef call; beside it that exp(−x²), which GELU's
// derivative needs as well (its density at u = x·√2).
template <Precision kPrecision = Precision::kFloat>
inline common::ErfAndGaussian<Vectorized<float>> erf_and_gaussian_inlined(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V sign = x & V(-0.0f);
  const V t = divide<kPrecision>(V(1.0f), at::vec::fmadd(V(0.3275911f), x ^ sign, V(1.0f)));
  V poly = at::vec::fmadd(V(1.061405429f), t, V(-1.453152027f));
  poly = at::vec::fmadd(poly, t, V(1.421413741f));
  poly = at::vec::fmadd(poly, t, V(-0.284496736f));
  poly = at::vec::fmadd(poly, t, V(0.254829592f));
  const V gaussian = exp_inlined<kPrecision>((x * x) ^ V(-0.0f));
  return {at::vec::fnmadd(gaussian * t, poly, V(1.0f)) ^ sign, gaussian};
}

template <Precision kPrecision = Precision::kFloat>
inline Vectorized<float> erf_inlined(const Vectorized<float>& x) {
  return erf_and_gaussian_inlined<kPrecision>(x).erf;
}

// Streaming stores are weakly ordered: each thread fences its own before the
// parallel region ends, so the output is complete when the op returns.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

inline void prefetch_line(const void* p) { __builtin_prefetch(p, 0, 3); }

// Every cache line of the `bytes` from p.
inline void prefetch_span(const void* p, int64_t bytes) {
  const char* first = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) prefetch_line(first + b);
}

// Two accumulation-type vectors' worth of elements, so float16/bfloat16 data
// converts in whole native vectors. A pair's elements need not sit in its lanes
// in memory order: a store puts them back where the load found them, and
// whatever tells lanes apart asks the pair which elements its lanes hold
// (lane_elements, a tail's mask) or loads its per-element coefficients in the
// pair's order (load_coefs). bfloat16 under AVX2 uses that freedom (kPermuted):
// a load widens each half with one unpack against zero (a bfloat16 is its
// float's upper half), so .first holds elements 0-3 and 8-11 and .second 4-7
// and 12-15, and a store rounds as ATen does and packs with one packus, which
// restores memory order. ATen's conversions zero-extend and shift each half
// after a lane extract, and pack then permute: they bound the bfloat16 passes
// by instruction count (bench/NOTES.md, "Issue 37: where bfloat16's backward
// goes").
template <typename scalar_t>
struct VecPair {
  using Acc = acc_type<scalar_t>;
  using AccVec = Vectorized<Acc>;
  using Pair = std::pair<AccVec, AccVec>;
  static constexpr int64_t kHalf = AccVec::size();
  static constexpr int64_t kWidth = 2 * kHalf;
  static constexpr int64_t kBytes = kWidth * sizeof(scalar_t);
  static constexpr bool kNative = std::is_same_v<scalar_t, Acc>;
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  static constexpr bool kPermuted = std::is_same_v<scalar_t, c10::BFloat16>;
#else
  static constexpr bool kPermuted = false;
#endif

  // The first n elements (0 <= n <= kWidth); the other lanes read as zero and
  // their memory is not touched.
  __attribute__((always_inline)) static inline Pair load(const scalar_t* p, int64_t n = kWidth) {
    if constexpr (kNative) {
      if (n == kWidth) return {AccVec::loadu(p), AccVec::loadu(p + kHalf)};
      return {AccVec::loadu(p, std::min(n, kHalf)),
              n > kHalf ? AccVec::loadu(p + kHalf, n - kHalf) : AccVec(Acc(0))};
    } else if constexpr (kPermuted) {
#if defined(CPU_CAPABILITY_AVX2)
      const __m256i words = n == kWidth ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
      const __m256i zero = _mm256_setzero_si256();
      return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, words)),
              _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, words))};
#endif
    } else {
      const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(
          n == kWidth ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n));
      return {lo, hi};
    }
  }
  // The pair as a vector of scalar_t in memory order (not kNative).
  __attribute__((always_inline)) static inline Vectorized<scalar_t> narrow(const Pair& v) {
    if constexpr (kPermuted) {
#if defined(CPU_CAPABILITY_AVX2)
      // ATen's cvtfp32_bf16 rounding: to nearest even, NaN to 0xffff.
      auto rounded = [](const __m256& f) {
        const __m256i bits = _mm256_castps_si256(f);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)), bits);
        return _mm256_srli_epi32(_mm256_blendv_epi8(_mm256_set1_epi32(-1), sum,
                                                    _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_ORD_Q))),
                                 16);
      };
      return _mm256_packus_epi32(rounded(v.first), rounded(v.second));
#endif
    } else {
      return at::vec::convert_from_float<scalar_t>(v.first, v.second);
    }
  }
  // The first n elements. A partial pair goes through a buffer: masked vector
  // stores are microcoded and slow on AMD's AVX-512 cores.
  __attribute__((always_inline)) static inline void store(scalar_t* p, const Pair& v, int64_t n = kWidth) {
    if constexpr (kNative) {
      if (n == kWidth) {
        v.first.store(p);
        v.second.store(p + kHalf);
      } else {
        v.first.store(p, std::min(n, kHalf));
        if (n > kHalf) v.second.store(p + kHalf, n - kHalf);
      }
    } else {
      narrow(v).store(p, n);
    }
  }
  // A whole pair with streaming stores; p must be stream_aligned.
  __attribute__((always_inline)) static inline void stream(scalar_t* p, const Pair& v) {
    if constexpr (kNative) {
      stream_vector(p, v.first);
      stream_vector(p + kHalf, v.second);
    } else {
      stream_vector(p, narrow(v));
    }
  }
  __attribute__((always_inline)) static inline void prefetch_pair(const scalar_t* p) { prefetch_span(p, kBytes); }

  // The index in the pair of the element each lane holds.
  __attribute__((always_inline)) static inline Pair lane_elements() {
    std::array<Acc, kWidth> index{};
    for (int64_t i = 0; i < kWidth; ++i) index[i] = static_cast<Acc>(i);
    return load_coefs(index.data());
  }
  // kWidth per-element values (the accumulation type, in memory order) in the
  // lanes that hold those elements after load(); store_coefs is its inverse.
  __attribute__((always_inline)) static inline Pair load_coefs(const Acc* p) {
    const AccVec a = AccVec::loadu(p), b = AccVec::loadu(p + kHalf);
    if constexpr (kPermuted) {
#if defined(CPU_CAPABILITY_AVX2)
      return {_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31)};
#endif
    } else {
      return {a, b};
    }
  }
  __attribute__((always_inline)) static inline void store_coefs(Acc* p, const Pair& v) {
    if constexpr (kPermuted) {
#if defined(CPU_CAPABILITY_AVX2)
      // The same exchange of 128-bit halves undoes itself.
      AccVec(_mm256_permute2f128_ps(v.first, v.second, 0x20)).store(p);
      AccVec(_mm256_permute2f128_ps(v.first, v.second, 0x31)).store(p + kHalf);
#endif
    } else {
      v.first.store(p);
      v.second.store(p + kHalf);
    }
  }
};

// The element count of a whole pair as a type: loop bodies written as generic
// lambdas get a separate instantiation for whole pairs, in which every
// `n == kWidth` test folds away (gcc does not always inline the body).
template <typename scalar_t>
constexpr std::integral_constant<int64_t, VecPair<scalar_t>::kWidth> kFullPair{};

}  // namespace fused_bn::cpu
