// NCHW with short planes: channel blocks (ChannelBlocking) walked image by
// image, so one image's planes of a block are one contiguous run.
#pragma once

#include <cstdint>
#include <cstring>

#include "accumulators.h"
#include "coefficients.h"
#include "epilogue.h"
#include "nchw_planes.h"
#include "plan.h"
#include "scratch.h"

namespace fused_bn::cpu {

// A channel block's coefficients per column of its image run: each channel's
// repeated over the H·W positions of its plane (see ChannelCoefs).
template <typename scalar_t>
struct RunCoefs {
  using Acc = acc_type<scalar_t>;
  Acc *mean, *scale, *projection, *shift, *forward_shift;
  RunCoefs(const ChannelCoefs<scalar_t>& k, int64_t c0, int64_t c1, int64_t HW) {
    const int64_t padded = padded_channels<scalar_t>((c1 - c0) * HW);
    mean = thread_scratch_filled<Acc, ScratchSlot::kRunMean>(padded, Acc(0));
    scale = thread_scratch_filled<Acc, ScratchSlot::kRunScale>(padded, Acc(0));
    projection = thread_scratch_filled<Acc, ScratchSlot::kRunProjection>(padded, Acc(0));
    shift = thread_scratch_filled<Acc, ScratchSlot::kRunShift>(padded, Acc(0));
    forward_shift = thread_scratch_filled<Acc, ScratchSlot::kRunForwardShift>(padded, Acc(0));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t first = (c - c0) * HW;
      std::fill(mean + first, mean + first + HW, k.mean[c]);
      std::fill(scale + first, scale + first + HW, k.scale[c]);
      std::fill(projection + first, projection + first + HW, k.projection[c]);
      std::fill(shift + first, shift + first + HW, k.shift[c]);
      std::fill(forward_shift + first, forward_shift + first + HW, k.forward_shift[c]);
    }
  }
};

// Calls step(c, n) for every plane of channels [c0, c1), image by image: the
// order both passes of a channel block take.
template <typename F>
__attribute__((always_inline)) inline void for_block_planes(const Geometry& g, int64_t c0, int64_t c1, F&& step) {
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t c = c0; c < c1; ++c) step(c, n);
  }
}

// A run of output computed into a per-thread buffer that has the run's
// alignment within a cache line, then copied out: whole lines with streaming
// stores, the partial lines at either end (which the neighbouring runs share)
// with ordinary ones. Whole pairs may be stored up to a pair past the run.
template <typename scalar_t>
class StagedRun {
 public:
  static constexpr int64_t kLine = kStreamAlignment / static_cast<int64_t>(sizeof(scalar_t));
  StagedRun(scalar_t* out, int64_t len) : out_(out), len_(len) {
    const int64_t lead = (reinterpret_cast<std::uintptr_t>(out) % kStreamAlignment) / sizeof(scalar_t);
    scalar_t* base = thread_scratch<scalar_t, ScratchSlot::kStagedRun>(len + 2 * kLine + VecPair<scalar_t>::kWidth);
    const int64_t to_line = (kStreamAlignment - reinterpret_cast<std::uintptr_t>(base) % kStreamAlignment) %
                            kStreamAlignment / sizeof(scalar_t);
    data_ = base + to_line + lead;
    head_ = std::min(len, (kLine - lead) % kLine);
  }
  scalar_t* data() const { return data_; }
  // Elements that may be stored from data() + i.
  int64_t writable(int64_t i) const { return len_ - i + VecPair<scalar_t>::kWidth; }
  void flush() const {
    std::memcpy(out_, data_, head_ * sizeof(scalar_t));
    int64_t i = head_;
    for (; i + kLine <= len_; i += kLine) {
      stream_vector(out_ + i, Vectorized<float>::loadu(reinterpret_cast<const float*>(data_ + i)));
    }
    std::memcpy(out_ + i, data_ + i, (len_ - i) * sizeof(scalar_t));
  }

 private:
  scalar_t* out_;
  int64_t len_;
  scalar_t* data_;
  int64_t head_;
};

// for_block_planes for an element pass writing `out`: step(c, n, dst, writable)
// with dst where plane (c, n)'s output goes and `writable` the elements that
// may be stored from it. With `staged`, each image's run goes through a
// StagedRun (then the caller fences).
template <typename scalar_t, typename F>
__attribute__((always_inline)) inline void for_block_planes_into(const Geometry& g, int64_t c0, int64_t c1,
                                                                 scalar_t* out, bool staged, F&& step) {
  const int64_t C = g.C, HW = g.HW;
  if (!staged) {
    for_block_planes(g, c0, c1, [&](int64_t c, int64_t n) { step(c, n, out + (n * C + c) * HW, HW); });
    return;
  }
  for (int64_t n = 0; n < g.N; ++n) {
    const StagedRun<scalar_t> run(out + (n * C + c0) * HW, (c1 - c0) * HW);
    for (int64_t c = c0; c < c1; ++c) step(c, n, run.data() + (c - c0) * HW, run.writable((c - c0) * HW));
    run.flush();
  }
}

// One short plane, walked as pairs of vectors: f(pair, tail) gets each whole
// pair, then the tail (whose lanes past the plane f must mask). Sums go into
// float lanes and are widened to double at the end of each plane: a short plane
// adds at most kShortPlaneBytes / VecPair::kBytes values per lane, fewer than a
// long-plane sum does between folds (kRowsPerFold).
template <typename scalar_t>
struct ShortPlane {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  int64_t HW, readable;
  TailMask<scalar_t> tail;
  ShortPlane(int64_t HW, int64_t readable) : HW(HW), readable(readable), tail(HW % IO::kWidth) {}

  void prefetch(const scalar_t* p) const { prefetch_span(p, HW * static_cast<int64_t>(sizeof(scalar_t))); }
  // A sum is kept per channel as kPartials doubles: each plane's float lanes
  // are widened and added in (a vectorized loop), and summed across once per
  // channel. Summing across lanes in float at every plane rounded at the scale
  // of the whole plane (grad_weight twice nn's error on cancelling sums), and
  // summing across in double at every plane put a chain of dependent adds on
  // each plane (bench/NOTES.md, "Figures behind the kernels' choices").
  using DoubleVec = Vectorized<double>;
  static constexpr int64_t kPartials = DoubleVec::size();
  static void add_lanes(const AccVec& lo, const AccVec& hi, double* partials) {
    DoubleVec p = DoubleVec::loadu(partials);
    if constexpr (std::is_same_v<acc_type<scalar_t>, double>) {
      p = p + (lo + hi);
    } else {
      const auto [first, second] = widen(lo + hi);
      p = p + first + second;
    }
    p.store(partials);
  }
  static double total(double* partials) {
    for (int64_t width = kPartials / 2; width > 0; width /= 2) {
      for (int64_t j = 0; j < width; ++j) partials[j] += partials[j + width];
    }
    return partials[0];
  }
  // load(at, n, whole) -> Pair for the pair at plane offset `at`.
  template <typename Load, typename F>
  __attribute__((always_inline)) void walk(int64_t offset, Load&& load, F&& f) const {
    int64_t i = 0;
    for (; i + IO::kWidth <= HW; i += IO::kWidth) f(load(offset + i, kFullPair<scalar_t>, true), false);
    if (i < HW) f(load(offset + i, HW - i, offset + i + IO::kWidth <= readable), true);
  }
};

// Adds Σ(x − shift) and Σ(x − shift)² over the plane at `offset` into the
// channel's partials (ShortPlane::add_lanes).
template <typename scalar_t>
__attribute__((always_inline)) inline void short_plane_moment_sums(
    const scalar_t* x, int64_t offset, const ShortPlane<scalar_t>& plane, acc_type<scalar_t> shift,
    double* sum, double* sum_sq) {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  const AccVec shift_vec(shift);
  AccVec s_lo(0), s_hi(0), q_lo(0), q_hi(0);
  WideSum wide_sum;
  plane.walk(offset, [&](int64_t at, auto n, bool whole) __attribute__((always_inline)) {
    return whole ? IO::load(x + at) : IO::load(x + at, n);
  }, [&](typename IO::Pair v, bool tail) __attribute__((always_inline)) {
    if constexpr (kSumInDouble<scalar_t>) {
      const auto [x_lo, x_hi] = plane.tail.apply_if(tail, v.first, v.second);
      wide_sum.add(x_lo, x_hi);
    }
    v.first = v.first - shift_vec;
    v.second = v.second - shift_vec;
    if (tail) v = plane.tail.apply(v.first, v.second);
    if constexpr (!kSumInDouble<scalar_t>) {
      s_lo = s_lo + v.first;
      s_hi = s_hi + v.second;
    }
    q_lo = at::vec::fmadd(v.first, v.first, q_lo);
    q_hi = at::vec::fmadd(v.second, v.second, q_hi);
  });
  if constexpr (kSumInDouble<scalar_t>) {
    wide_sum.add_to(sum);
  } else {
    ShortPlane<scalar_t>::add_lanes(s_lo, s_hi, sum);
  }
  ShortPlane<scalar_t>::add_lanes(q_lo, q_hi, sum_sq);
}

// Adds Σg, Σg·(x − mean) and Σ(x − mean) over the plane at `offset` into the
// channel's partials (ShortPlane::add_lanes), and flags g != first_dy in
// g_differs (see block_grad_sums); cg's pointers are the tensors' bases.
template <typename scalar_t, typename G>
__attribute__((always_inline)) inline void short_plane_grad_sums(
    const scalar_t* x, const scalar_t* dy, int64_t offset, const ShortPlane<scalar_t>& plane,
    acc_type<scalar_t> mean, acc_type<scalar_t> first_dy, const ChannelGrad<scalar_t, G>& cg, double* sum_dy,
    double* sum_dy_xmu, double* sum_xmu, unsigned char* g_differs) {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  using Pair = typename IO::Pair;
  const AccVec mean_vec(mean), first_dy_vec(first_dy);
  AccVec g_lo(0), g_hi(0), p_lo(0), p_hi(0), m_lo(0), m_hi(0), differs(0);
  plane.walk(offset, [&](int64_t at, auto n, bool whole) __attribute__((always_inline)) {
    const Pair x_pair = whole ? IO::load(x + at) : IO::load(x + at, n);
    return std::pair<Pair, Pair>{
        x_pair, pair_grad<scalar_t, G>(cg, x_pair, whole ? IO::load(dy + at) : IO::load(dy + at, n),
                                             mean_vec, at, n, whole)};
  }, [&](const std::pair<Pair, Pair>& xg, bool tail) __attribute__((always_inline)) {
    Pair xm{xg.first.first - mean_vec, xg.first.second - mean_vec};
    Pair g = xg.second;
    // As in nchw_block_grad_sums: both factors masked, so nothing leaks in.
    const auto [d_lo, d_hi] = plane.tail.apply_if(tail, g.first != first_dy_vec, g.second != first_dy_vec);
    differs = differs | d_lo | d_hi;
    if (tail) {
      xm = plane.tail.apply(xm.first, xm.second);
      g = plane.tail.apply(g.first, g.second);
    }
    g_lo = g_lo + g.first;
    g_hi = g_hi + g.second;
    p_lo = at::vec::fmadd(g.first, xm.first, p_lo);
    p_hi = at::vec::fmadd(g.second, xm.second, p_hi);
    m_lo = m_lo + xm.first;
    m_hi = m_hi + xm.second;
  });
  ShortPlane<scalar_t>::add_lanes(g_lo, g_hi, sum_dy);
  ShortPlane<scalar_t>::add_lanes(p_lo, p_hi, sum_dy_xmu);
  ShortPlane<scalar_t>::add_lanes(m_lo, m_hi, sum_xmu);
  if (!no_lane_set(differs)) *g_differs = 1;
}

}  // namespace fused_bn::cpu
