// NCHW with long planes: one channel's planes walked block by block
// (reductions) and plane by plane (element passes).
#pragma once

#include <cstdint>
#include <initializer_list>

#include "accumulators.h"
#include "epilogue.h"
#include "plan.h"
#include "vec.h"

namespace fused_bn::cpu {

// How nchw_walk goes over one channel's planes: their geometry, whether it
// prefetches (kPrefetchBytes ahead in plane order), and how far it may read.
template <typename scalar_t>
struct PlaneWalk {
  static constexpr int64_t kAhead = kPrefetchElements<scalar_t>;
  int64_t HW, plane_stride;
  bool prefetch;
  // Elements readable from the channel's base pointer (to the tensor's end):
  // a plane's tail reads a whole pair, masked afterwards, wherever that stays
  // inside the tensor. A masked load was the hottest instruction of the 7x7
  // backward.
  int64_t readable;

  // The same, with `readable` counted from channel c's base (the tensor's base
  // + c·HW) instead of the tensor's.
  PlaneWalk for_channel(int64_t c) const {
    PlaneWalk p = *this;
    p.readable -= c * HW;
    return p;
  }

  // Planes shorter than the distance: at each plane's start, all of a later plane.
  void prefetch_at_plane_start(const scalar_t* plane) const {
    if (HW >= kAhead || HW == 0) return;
    prefetch_span(plane + (kAhead + HW - 1) / HW * plane_stride, HW * static_cast<int64_t>(sizeof(scalar_t)));
  }
  // Longer planes: the pair kAhead elements on, in this plane or the next.
  void prefetch_at_position(const scalar_t* plane, int64_t i) const {
    if (HW < kAhead) return;
    VecPair<scalar_t>::prefetch_pair(i + kAhead < HW ? plane + i + kAhead
                                                     : plane + plane_stride + (i + kAhead - HW));
  }
};

// Calls step(at, n, whole) over the positions [hw_begin, hw_end) of planes
// [n_begin, n_end) of one channel: `at` is the offset from the channel's base,
// n the VecPair width except at a plane's tail, whole whether a whole pair may
// be read there. Prefetches every stream in `streams` (the channel's base
// pointer in each tensor) when walk.prefetch.
template <typename scalar_t, typename Step>
__attribute__((always_inline)) inline void nchw_walk(int64_t n_begin, int64_t n_end, int64_t hw_begin, int64_t hw_end,
                      const PlaneWalk<scalar_t>& walk,
                      std::initializer_list<const scalar_t*> streams, Step&& step) {
  constexpr int64_t kWidth = VecPair<scalar_t>::kWidth;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t plane = n * walk.plane_stride;
    int64_t i = hw_begin;
    if (walk.prefetch) {
      for (const scalar_t* s : streams) walk.prefetch_at_plane_start(s + plane);
      for (; i + kWidth <= hw_end; i += kWidth) {
        for (const scalar_t* s : streams) walk.prefetch_at_position(s + plane, i);
        step(plane + i, kFullPair<scalar_t>, true);
      }
    } else {
      for (; i + kWidth <= hw_end; i += kWidth) step(plane + i, kFullPair<scalar_t>, true);
    }
    if (i < hw_end) step(plane + i, hw_end - i, plane + i + kWidth <= walk.readable);
  }
}

// Bit masks keeping the first n lanes of a pair (0 < n <= kWidth): a plane's
// tail has the same length in every plane, so the masks are made once per block.
template <typename scalar_t>
struct TailMask {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  AccVec lo, hi;
  explicit TailMask(int64_t n) {
    const AccVec lane = AccVec::arange(0, 1);
    lo = lane < AccVec(static_cast<acc_type<scalar_t>>(n));
    hi = (lane + AccVec(static_cast<acc_type<scalar_t>>(IO::kHalf))) < AccVec(static_cast<acc_type<scalar_t>>(n));
  }
  typename IO::Pair apply(const AccVec& a, const AccVec& b) const { return {a & lo, b & hi}; }
  // apply() where `masked` (a pair's tail), the pair as it is otherwise.
  typename IO::Pair apply_if(bool masked, const AccVec& a, const AccVec& b) const {
    return masked ? apply(a, b) : typename IO::Pair{a, b};
  }
};

template <typename scalar_t>
Moments nchw_block_moments(const scalar_t* x_channel, const PlaneWalk<scalar_t>& walk,
                           int64_t n_begin, int64_t n_end, int64_t hw_begin, int64_t hw_end) {
  using Acc = acc_type<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  if (n_end <= n_begin || hw_end <= hw_begin) return {};
  const Acc shift = static_cast<Acc>(x_channel[n_begin * walk.plane_stride + hw_begin]);
  const AccVec shift_vec(shift);
  const TailMask<scalar_t> tail((hw_end - hw_begin) % IO::kWidth);
  LaneSum<Acc> sum, sum_sq;
  typename LaneSum<Acc>::Totals sum_total, sum_sq_total;
  WideSum wide_sum;
  int64_t steps = 0;
  nchw_walk<scalar_t>(n_begin, n_end, hw_begin, hw_end, walk, {x_channel},
                      [&](int64_t at, auto n, bool whole) __attribute__((always_inline)) {
    auto [lo, hi] = whole ? IO::load(x_channel + at) : IO::load(x_channel + at, n);
    if constexpr (kSumInDouble<scalar_t>) {
      // Lanes past a tail hold the next plane's values.
      const auto [x_lo, x_hi] = tail.apply_if(n != IO::kWidth, lo, hi);
      wide_sum.add(x_lo, x_hi);
    }
    lo = lo - shift_vec;
    hi = hi - shift_vec;
    if (n != IO::kWidth) std::tie(lo, hi) = tail.apply(lo, hi);
    if constexpr (!kSumInDouble<scalar_t>) sum.add(lo, hi);
    sum_sq.add_product(lo, lo, hi, hi);
    if (++steps == kRowsPerFold) {
      if constexpr (!kSumInDouble<scalar_t>) sum.fold(sum_total);
      sum_sq.fold(sum_sq_total);
      steps = 0;
    }
  });
  sum.fold(sum_total);
  sum_sq.fold(sum_sq_total);
  return Moments::from_sums<scalar_t>((n_end - n_begin) * (hw_end - hw_begin), shift,
                                      kSumInDouble<scalar_t> ? wide_sum.total() : sum_total.sum(),
                                      sum_sq_total.sum());
}

// One channel's inputs to a GradMask, as the NCHW passes see them (pointers
// at the channel's base, like x's and dy's).
template <typename scalar_t>
struct ChannelMask {
  acc_type<scalar_t> scale = 0, forward_shift = 0;  // kReluOfInput
  const scalar_t* output = nullptr;              // kReluOfOutput: read
  scalar_t* grad = nullptr;                      // kReluOfOutput: g written
};

// g for the pair at `at` under kMask (see GradMask); writes it out for
// kReluOfOutput (the first n lanes).
template <typename scalar_t, GradMask kMask, typename N>
__attribute__((always_inline)) inline typename VecPair<scalar_t>::Pair masked_grad(
    const ChannelMask<scalar_t>& mask, const typename VecPair<scalar_t>::Pair& x,
    const typename VecPair<scalar_t>::Pair& dy, const Vectorized<acc_type<scalar_t>>& mean, int64_t at, N n,
    bool whole) {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  if constexpr (kMask == GradMask::kReluOfInput) {
    return relu_of_input<scalar_t>(x, dy, mean, AccVec(mask.scale), AccVec(mask.forward_shift));
  } else if constexpr (kMask == GradMask::kReluOfOutput) {
    const auto y = whole ? IO::load(mask.output + at) : IO::load(mask.output + at, n);
    const typename IO::Pair g{keep_where_positive(dy.first, y.first), keep_where_positive(dy.second, y.second)};
    if (n == IO::kWidth) {
      IO::store(mask.grad + at, g);
    } else {
      IO::store(mask.grad + at, g, n);
    }
    return g;
  } else {
    return dy;
  }
}

template <typename scalar_t, GradMask kMask>
GradSums nchw_block_grad_sums(const scalar_t* x_channel, const scalar_t* dy_channel,
                              const PlaneWalk<scalar_t>& walk, acc_type<scalar_t> mean,
                              const ChannelMask<scalar_t>& mask,
                              int64_t n_begin, int64_t n_end, int64_t hw_begin, int64_t hw_end) {
  using Acc = acc_type<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  const AccVec mean_vec(mean);
  const TailMask<scalar_t> tail((hw_end - hw_begin) % IO::kWidth);
  if (n_end <= n_begin || hw_end <= hw_begin) return {};
  const scalar_t* first_dy = dy_channel + n_begin * walk.plane_stride + hw_begin;
  const AccVec first_dy_vec(static_cast<Acc>(*first_dy));
  AccVec differs(Acc(0));
  LaneSum<Acc> sum_dy, sum_dy_xmu, sum_xmu;
  typename LaneSum<Acc>::Totals sum_dy_total, sum_dy_xmu_total, sum_xmu_total;
  int64_t steps = 0;
  auto step = [&](int64_t at, auto n, bool whole) __attribute__((always_inline)) {
    const auto x_pair = whole ? IO::load(x_channel + at) : IO::load(x_channel + at, n);
    const auto [x_lo, x_hi] = x_pair;
    auto [g_lo, g_hi] = masked_grad<scalar_t, kMask>(
        mask, x_pair, whole ? IO::load(dy_channel + at) : IO::load(dy_channel + at, n), mean_vec, at, n, whole);
    // Lanes past a tail hold the next plane's values or zeros: the masks clear
    // both factors, so nothing (not even an infinite or NaN mean) leaks in.
    auto [xm_lo, xm_hi] = std::pair{x_lo - mean_vec, x_hi - mean_vec};
    if (n != IO::kWidth) {
      std::tie(xm_lo, xm_hi) = tail.apply(xm_lo, xm_hi);
      std::tie(g_lo, g_hi) = tail.apply(g_lo, g_hi);
    }
    sum_dy.add(g_lo, g_hi);
    sum_dy_xmu.add_product(g_lo, xm_lo, g_hi, xm_hi);
    sum_xmu.add(xm_lo, xm_hi);
    const auto [d_lo, d_hi] = tail.apply_if(n != IO::kWidth, g_lo != first_dy_vec, g_hi != first_dy_vec);
    differs = differs | d_lo | d_hi;
    if (++steps == kRowsPerFold) {
      sum_dy.fold(sum_dy_total);
      sum_dy_xmu.fold(sum_dy_xmu_total);
      sum_xmu.fold(sum_xmu_total);
      steps = 0;
    }
  };
  if constexpr (kMask == GradMask::kReluOfOutput) {
    nchw_walk<scalar_t>(n_begin, n_end, hw_begin, hw_end, walk, {x_channel, dy_channel, mask.output}, step);
  } else {
    nchw_walk<scalar_t>(n_begin, n_end, hw_begin, hw_end, walk, {x_channel, dy_channel}, step);
  }
  sum_dy.fold(sum_dy_total);
  sum_dy_xmu.fold(sum_dy_xmu_total);
  sum_xmu.fold(sum_xmu_total);
  return block_grad_sums(no_lane_set(differs), first_dy, (n_end - n_begin) * (hw_end - hw_begin),
                         sum_dy_total.sum(), sum_dy_xmu_total.sum(), sum_xmu_total.sum());
}

// The element passes over a contiguous run of one channel (NCHW) are plain
// loops: written as a lambda handed to a shared driver, gcc left the lambda
// out of line and reloaded the coefficients every iteration (bench/NOTES.md,
// "Figures behind the kernels' choices"). Whole pairs are streamed when asked and the output is aligned.
// The tail is stored whole where the `writable` elements from `out` allow:
// the caller writes what lies past the run, with ordinary stores, right after
// (the next plane of a run of planes); otherwise it is masked. A masked store
// of a converted bfloat16 pair cost 64x512x7x7 eval a sixth of its time.
#define FUSED_BN_RUN_LOOP(out, len, readable, writable, stream, COMPUTE) \
  do {                                                                   \
    const bool streamed = (stream) && stream_aligned(out);               \
    int64_t i = 0;                                                       \
    for (; i + IO::kWidth <= (len); i += IO::kWidth) {                   \
      constexpr int64_t n = IO::kWidth;                                  \
      constexpr bool whole = true;                                       \
      const typename IO::Pair result = COMPUTE;                          \
      if (streamed) {                                                    \
        IO::stream((out) + i, result);                                   \
      } else {                                                           \
        IO::store((out) + i, result);                                    \
      }                                                                  \
    }                                                                    \
    if (i < (len)) {                                                     \
      const int64_t n = (len) - i;                                       \
      const bool whole = i + IO::kWidth <= (readable);                   \
      if (!(stream) && i + IO::kWidth <= (writable)) {                   \
        IO::store((out) + i, COMPUTE);                                   \
      } else {                                                           \
        IO::store((out) + i, COMPUTE, n);                                \
      }                                                                  \
    }                                                                    \
  } while (0)

// Loads a pair for FUSED_BN_RUN_LOOP: whole where that stays inside the input
// (lanes past the run are computed and not stored), else the first n.
#define FUSED_BN_LOAD(ptr) (whole ? IO::load(ptr) : IO::load(ptr, n))

// Training forward and eval: y = epilogue((x − mean) · scale + shift), the
// residual (kAddRelu) at the same offsets as x.
template <typename scalar_t, Epilogue kEpilogue>
void normalize_run(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t len, int64_t readable,
                   int64_t writable, acc_type<scalar_t> mean, acc_type<scalar_t> scale, acc_type<scalar_t> shift,
                   bool stream) {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  using Pair = typename IO::Pair;
  const AccVec m(mean), sc(scale), sh(shift);
  auto compute = [&](const Pair& v) -> Pair {
    return {at::vec::fmadd(v.first - m, sc, sh), at::vec::fmadd(v.second - m, sc, sh)};
  };
  if constexpr (kEpilogue == Epilogue::kNone) {
    FUSED_BN_RUN_LOOP(y, len, readable, writable, stream, compute(FUSED_BN_LOAD(x + i)));
  } else if constexpr (kEpilogue == Epilogue::kRelu) {
    auto compute_relu = [&](const Pair& v) -> Pair {
      const Pair z = compute(v);
      return {relu(z.first), relu(z.second)};
    };
    FUSED_BN_RUN_LOOP(y, len, readable, writable, stream, compute_relu(FUSED_BN_LOAD(x + i)));
  } else {
    auto compute_add_relu = [&](const Pair& v, const Pair& r) -> Pair {
      const Pair z = compute(v);
      return {relu(z.first + r.first), relu(z.second + r.second)};
    };
    FUSED_BN_RUN_LOOP(y, len, readable, writable, stream,
                      compute_add_relu(FUSED_BN_LOAD(x + i), FUSED_BN_LOAD(residual + i)));
  }
}

// Eval's dx = g · scale: x enters only through kReluOfInput's mask (a NaN in x
// must not reach dx; under the mask it zeroes g, as relu's backward does).
template <typename scalar_t, GradMask kMask>
void scale_run(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t len, int64_t readable,
               int64_t writable, acc_type<scalar_t> mean, acc_type<scalar_t> scale, acc_type<scalar_t> forward_shift, bool stream) {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  using Pair = typename IO::Pair;
  const AccVec mv(mean), sc(scale), fs(forward_shift);
  auto compute = [&](const Pair& g) -> Pair { return {g.first * sc, g.second * sc}; };
  if constexpr (kMask == GradMask::kReluOfInput) {
    auto compute_masked = [&](const Pair& v, const Pair& g) -> Pair {
      return compute(relu_of_input<scalar_t>(v, g, mv, sc, fs));
    };
    FUSED_BN_RUN_LOOP(dx, len, readable, writable, stream,
                      compute_masked(FUSED_BN_LOAD(x + i), FUSED_BN_LOAD(dy + i)));
  } else {
    FUSED_BN_RUN_LOOP(dx, len, readable, writable, stream, compute(FUSED_BN_LOAD(dy + i)));
  }
}

// Training's dx = (g − shift − (x − mean) · projection) · scale (see ChannelCoefs)
template <typename scalar_t, GradMask kMask>
void grad_input_run(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t len,
                    int64_t readable, int64_t writable, acc_type<scalar_t> mean, acc_type<scalar_t> scale, acc_type<scalar_t> projection,
                    acc_type<scalar_t> shift, acc_type<scalar_t> forward_shift, bool stream) {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  using Pair = typename IO::Pair;
  const AccVec mv(mean), sc(scale), pr(projection), sh(shift), fs(forward_shift);
  auto compute = [&](const Pair& v, const Pair& dy_pair) -> Pair {
    Pair g = dy_pair;
    if constexpr (kMask == GradMask::kReluOfInput) g = relu_of_input<scalar_t>(v, dy_pair, mv, sc, fs);
    return {at::vec::fnmadd(v.first - mv, pr, g.first - sh) * sc,
            at::vec::fnmadd(v.second - mv, pr, g.second - sh) * sc};
  };
  FUSED_BN_RUN_LOOP(dx, len, readable, writable, stream, compute(FUSED_BN_LOAD(x + i), FUSED_BN_LOAD(dy + i)));
}

#undef FUSED_BN_RUN_LOOP
#undef FUSED_BN_LOAD

}  // namespace fused_bn::cpu
