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
    const auto [first, second] = IO::lane_elements();
    const AccVec count(static_cast<acc_type<scalar_t>>(n));
    lo = first < count;
    hi = second < count;
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

// One channel's inputs to a gradient transform G (see Grad), as the NCHW
// passes see them (pointers at the channel's base, like x's and dy's).
template <typename scalar_t, typename G>
struct ChannelGrad {
  acc_type<scalar_t> scale = 0, forward_shift = 0;           // G::kRecomputes: z's coefficients
  const scalar_t* aux = nullptr;                             // G::kReadsAux: the residual or y
  scalar_t* grad = nullptr;                                  // G::kWritesGrad: g written
  ActParams<scalar_t, typename G::Activation> params{};
};

// g for the pair at `at` under G; writes it out (the first n lanes) where G
// writes g.
template <typename scalar_t, typename G, typename N>
__attribute__((always_inline)) inline typename VecPair<scalar_t>::Pair pair_grad(
    const ChannelGrad<scalar_t, G>& cg, const typename VecPair<scalar_t>::Pair& x,
    const typename VecPair<scalar_t>::Pair& dy, const Vectorized<acc_type<scalar_t>>& mean, int64_t at, N n,
    bool whole) {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  if constexpr (G::kIdentity) {
    return dy;
  } else {
    typename IO::Pair aux{AccVec(0), AccVec(0)};
    if constexpr (G::kReadsAux) aux = whole ? IO::load(cg.aux + at) : IO::load(cg.aux + at, n);
    const AccVec sc(cg.scale), fs(cg.forward_shift);
    const typename IO::Pair g{transform_grad<scalar_t, G>(dy.first, x.first, aux.first, mean, sc, fs, cg.params),
                              transform_grad<scalar_t, G>(dy.second, x.second, aux.second, mean, sc, fs, cg.params)};
    if constexpr (G::kWritesGrad) {
      if (n == IO::kWidth) {
        IO::store(cg.grad + at, g);
      } else {
        IO::store(cg.grad + at, g, n);
      }
    }
    return g;
  }
}

template <typename scalar_t, typename G>
GradSums nchw_block_grad_sums(const scalar_t* x_channel, const scalar_t* dy_channel,
                              const PlaneWalk<scalar_t>& walk, acc_type<scalar_t> mean,
                              const ChannelGrad<scalar_t, G>& cg,
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
    auto [g_lo, g_hi] = pair_grad<scalar_t, G>(
        cg, x_pair, whole ? IO::load(dy_channel + at) : IO::load(dy_channel + at, n), mean_vec, at, n, whole);
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
  if constexpr (G::kReadsAux) {
    nchw_walk<scalar_t>(n_begin, n_end, hw_begin, hw_end, walk, {x_channel, dy_channel, cg.aux}, step);
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
// residual (Epi::kHasResidual) at the same offsets as x.
template <typename scalar_t, typename Epi>
void normalize_run(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t len, int64_t readable,
                   int64_t writable, acc_type<scalar_t> mean, acc_type<scalar_t> scale, acc_type<scalar_t> shift,
                   const EpilogueArgs<scalar_t, Epi>& epilogue, bool stream) {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  using Pair = typename IO::Pair;
  const AccVec m(mean), sc(scale), sh(shift);
  auto compute = [&](const Pair& v) -> Pair {
    return {at::vec::fmadd(v.first - m, sc, sh), at::vec::fmadd(v.second - m, sc, sh)};
  };
  if constexpr (Epi::kPlain) {
    FUSED_BN_RUN_LOOP(y, len, readable, writable, stream, compute(FUSED_BN_LOAD(x + i)));
  } else if constexpr (!Epi::kHasResidual) {
    auto compute_epilogue = [&](const Pair& v) -> Pair {
      const Pair z = compute(v);
      return {epilogue.apply(z.first, z.first), epilogue.apply(z.second, z.second)};
    };
    FUSED_BN_RUN_LOOP(y, len, readable, writable, stream, compute_epilogue(FUSED_BN_LOAD(x + i)));
  } else {
    auto compute_epilogue = [&](const Pair& v, const Pair& r) -> Pair {
      const Pair z = compute(v);
      return {epilogue.apply(z.first, r.first), epilogue.apply(z.second, r.second)};
    };
    FUSED_BN_RUN_LOOP(y, len, readable, writable, stream,
                      compute_epilogue(FUSED_BN_LOAD(x + i), FUSED_BN_LOAD(residual + i)));
  }
}

// Eval's dx = g · scale: x enters only through G's recomputed z (a NaN in x
// reaches dx only as the activation's derivative lets it).
template <typename scalar_t, typename G>
void scale_run(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t len, int64_t readable,
               int64_t writable, acc_type<scalar_t> mean, const ChannelGrad<scalar_t, G>& cg, bool stream) {
  static_assert(!G::kReadsAux, "the reduction pass writes that g; pass it as dy");
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  using Pair = typename IO::Pair;
  const AccVec mv(mean), sc(cg.scale), fs(cg.forward_shift);
  auto compute = [&](const Pair& g) -> Pair { return {g.first * sc, g.second * sc}; };
  if constexpr (G::kRecomputes) {
    auto compute_transformed = [&](const Pair& v, const Pair& g) -> Pair {
      return compute({transform_grad<scalar_t, G>(g.first, v.first, v.first, mv, sc, fs, cg.params),
                      transform_grad<scalar_t, G>(g.second, v.second, v.second, mv, sc, fs, cg.params)});
    };
    FUSED_BN_RUN_LOOP(dx, len, readable, writable, stream,
                      compute_transformed(FUSED_BN_LOAD(x + i), FUSED_BN_LOAD(dy + i)));
  } else {
    FUSED_BN_RUN_LOOP(dx, len, readable, writable, stream, compute(FUSED_BN_LOAD(dy + i)));
  }
}

// Training's dx = (g − shift − (x − mean) · projection) · scale (see ChannelCoefs)
template <typename scalar_t, typename G>
void grad_input_run(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t len,
                    int64_t readable, int64_t writable, acc_type<scalar_t> mean, acc_type<scalar_t> projection,
                    acc_type<scalar_t> shift, const ChannelGrad<scalar_t, G>& cg, bool stream) {
  static_assert(!G::kReadsAux, "the reduction pass writes that g; pass it as dy");
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  using Pair = typename IO::Pair;
  const AccVec mv(mean), sc(cg.scale), pr(projection), sh(shift), fs(cg.forward_shift);
  auto compute = [&](const Pair& v, const Pair& dy_pair) -> Pair {
    Pair g = dy_pair;
    if constexpr (G::kRecomputes) {
      g = {transform_grad<scalar_t, G>(dy_pair.first, v.first, v.first, mv, sc, fs, cg.params),
           transform_grad<scalar_t, G>(dy_pair.second, v.second, v.second, mv, sc, fs, cg.params)};
    }
    return {at::vec::fnmadd(v.first - mv, pr, g.first - sh) * sc,
            at::vec::fnmadd(v.second - mv, pr, g.second - sh) * sc};
  };
  FUSED_BN_RUN_LOOP(dx, len, readable, writable, stream, compute(FUSED_BN_LOAD(x + i), FUSED_BN_LOAD(dy + i)));
}

#undef FUSED_BN_RUN_LOOP
#undef FUSED_BN_LOAD

}  // namespace fused_bn::cpu
