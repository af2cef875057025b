// Hand-written CPU batch-norm kernels on raw pointers.
//
// Memory traffic (x, dy read; y, dx written), per op:
//   training forward : statistics pass reads x, normalize pass reads x, writes y.
//                      NCHW with enough channels runs both passes per channel
//                      back to back, so the second read hits L2, not DRAM.
//   eval forward     : reads x, writes y.
//   backward         : reduction pass reads x and dy, dx pass reads them again
//                      and writes dx (per channel back to back for NCHW).
//
// Determinism: every reduction is split into blocks fixed by the shape alone
// (never by the thread count), each block is reduced by one thread in a fixed
// order, and blocks are merged in block order. Results are bitwise identical
// run to run and for any number of threads.
//
// Numerical stability: a block accumulates shifted sums, Σ(x−K) and Σ(x−K)²
// with K the block's first element (per channel), in the accumulation type;
// blocks are merged with Chan's parallel-variance formula in double. With the
// shift near the data, the sums carry no catastrophic cancellation even for a
// mean of 1e4 and a std of 1 in float32.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fused_bn::cpu {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// Loads and stores two accumulation-type vectors' worth of elements, so
// float16/bfloat16 data converts in whole native vectors.
template <typename scalar_t>
struct VecPair {
  using Acc = acc_t<scalar_t>;
  using AccVec = Vectorized<Acc>;
  static constexpr int64_t kWidth = 2 * AccVec::size();

  static inline void load(const scalar_t* p, AccVec& lo, AccVec& hi) {
    if constexpr (std::is_same_v<scalar_t, Acc>) {
      lo = AccVec::loadu(p);
      hi = AccVec::loadu(p + AccVec::size());
    } else {
      at::vec::load_to_float<scalar_t>(p, lo, hi);
    }
  }
  static inline void store(scalar_t* p, const AccVec& lo, const AccVec& hi) {
    if constexpr (std::is_same_v<scalar_t, Acc>) {
      lo.store(p);
      hi.store(p + AccVec::size());
    } else {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
    }
  }
};

// Vector-lane sums in the accumulation type, folded into one double every
// kFoldSteps additions. Short float runs keep the rounding of each lane tiny even
// when the data sit far from the block's shift; the fold costs a few percent.
template <typename Acc>
struct LaneSum {
  static constexpr int kFoldSteps = 16;
  Vectorized<Acc> lo{Acc(0)}, hi{Acc(0)};
  double total = 0.0;

  // Lane by lane in double: a float tree-sum of the lanes would round at the
  // scale of the whole fold and cost the mean its last bit.
  void fold() {
    Acc lanes[2 * Vectorized<Acc>::size()];
    lo.store(lanes);
    hi.store(lanes + Vectorized<Acc>::size());
    for (Acc lane : lanes) total += static_cast<double>(lane);
    lo = hi = Vectorized<Acc>(Acc(0));
  }
};

// Count, mean and sum of squared deviations of one block or channel.
struct Moments {
  int64_t count = 0;
  double mean = 0.0;
  double m2 = 0.0;

  // Chan et al.'s pairwise update: exact for an empty side, stable otherwise.
  void merge(const Moments& other) {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    const int64_t total = count + other.count;
    const double delta = other.mean - mean;
    const double other_fraction = static_cast<double>(other.count) / static_cast<double>(total);
    mean += delta * other_fraction;
    m2 += other.m2 + delta * delta * static_cast<double>(count) * other_fraction;
    count = total;
  }

  static Moments from_shifted_sums(int64_t count, double shift, double sum, double sum_sq) {
    if (count == 0) return {};
    const double n = static_cast<double>(count);
    return {count, shift + sum / n, std::max(sum_sq - sum * sum / n, 0.0)};
  }
};

// Sums for the backward reduction: Σdy and Σdy·(x − mean).
struct GradSums {
  double sum_dy = 0.0;
  double sum_dy_xmu = 0.0;
  void add(const GradSums& other) {
    sum_dy += other.sum_dy;
    sum_dy_xmu += other.sum_dy_xmu;
  }
};

// Per-channel coefficients of the element passes, all in the accumulation type:
//   forward : y  = ((x − mean_hi) − mean_lo) · scale + shift
//   backward: dx = dy · scale + (x − mean_hi) · x_coef + shift
// mean_hi + mean_lo carries the double-precision mean through float arithmetic.
template <typename Acc>
struct ChannelCoefs {
  std::vector<Acc> mean_hi, mean_lo, scale, x_coef, shift;
  explicit ChannelCoefs(int64_t channels)
      : mean_hi(channels), mean_lo(channels), scale(channels), x_coef(channels), shift(channels) {}
};

// ---------------------------------------------------------------------------
// Shape of the work
// ---------------------------------------------------------------------------

// A batch-norm input viewed as N planes of C channels by HW positions (NCHW),
// or as N*HW rows of C channels (NHWC).
struct Geometry {
  int64_t N, C, HW;
  bool channels_last;
  int64_t per_channel() const { return N * HW; }
};

// Target elements per reduction block: large enough to amortize the per-block
// merge, small enough that float partial sums stay accurate.
constexpr int64_t kBlockElements = 4096;

// NCHW blocks of one channel: either a chunk of one plane (large planes) or a
// group of whole planes (small planes).
struct PlaneBlocking {
  int64_t planes_per_block, chunk, chunks_per_plane, blocks;
  PlaneBlocking(int64_t N, int64_t HW) {
    if (HW >= kBlockElements) {
      planes_per_block = 1;
      chunk = kBlockElements;
      chunks_per_plane = (HW + chunk - 1) / chunk;
    } else {
      planes_per_block = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(HW, 1));
      chunk = HW;
      chunks_per_plane = 1;
    }
    blocks = ((N + planes_per_block - 1) / planes_per_block) * chunks_per_plane;
  }
  // Planes [n_begin, n_end) and positions [hw_begin, hw_end) of block b.
  void range(int64_t b, int64_t N, int64_t HW, int64_t& n_begin, int64_t& n_end,
             int64_t& hw_begin, int64_t& hw_end) const {
    const int64_t group = b / chunks_per_plane, piece = b % chunks_per_plane;
    n_begin = group * planes_per_block;
    n_end = std::min(N, n_begin + planes_per_block);
    hw_begin = piece * chunk;
    hw_end = std::min(HW, hw_begin + chunk);
  }
};

// NHWC row blocks: a fixed count (by shape) so partials stay small for any C.
struct RowBlocking {
  static constexpr int64_t kMaxBlocks = 64;
  int64_t rows_per_block, blocks;
  RowBlocking(int64_t rows, int64_t C) {
    const int64_t min_rows = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(C, 1));
    blocks = std::min(kMaxBlocks, std::max<int64_t>(1, (rows + min_rows - 1) / min_rows));
    rows_per_block = (rows + blocks - 1) / blocks;
    blocks = rows == 0 ? 0 : (rows + rows_per_block - 1) / rows_per_block;
  }
};

// Rows summed in the accumulation type before folding into double (see LaneSum).
constexpr int64_t kRowsPerFold = 16;

// Channels handled whole by one thread (statistics, then the element pass while
// the channel is still in cache) when there are enough of them to keep every
// thread busy; otherwise blocks of every channel are spread across threads.
inline bool split_channels_across_threads(const Geometry& g) {
  return g.C < 4 * static_cast<int64_t>(at::get_num_threads());
}

template <typename F>
inline void parallel_over(int64_t n, F&& f) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// ---------------------------------------------------------------------------
// NCHW reductions over one block
// ---------------------------------------------------------------------------

template <typename scalar_t>
Moments nchw_block_moments(const scalar_t* x_channel, int64_t plane_stride, int64_t n_begin,
                           int64_t n_end, int64_t hw_begin, int64_t hw_end) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  if (n_end <= n_begin || hw_end <= hw_begin) return {};
  const Acc shift = static_cast<Acc>(x_channel[n_begin * plane_stride + hw_begin]);
  const AccVec shift_vec(shift);
  LaneSum<Acc> sum, sum_sq;
  double tail_sum = 0, tail_sum_sq = 0;
  int steps = 0;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const scalar_t* p = x_channel + n * plane_stride;
    int64_t i = hw_begin;
    for (; i + IO::kWidth <= hw_end; i += IO::kWidth) {
      AccVec lo, hi;
      IO::load(p + i, lo, hi);
      lo = lo - shift_vec;
      hi = hi - shift_vec;
      sum.lo = sum.lo + lo;
      sum.hi = sum.hi + hi;
      sum_sq.lo = at::vec::fmadd(lo, lo, sum_sq.lo);
      sum_sq.hi = at::vec::fmadd(hi, hi, sum_sq.hi);
      if (++steps == LaneSum<Acc>::kFoldSteps) {
        sum.fold();
        sum_sq.fold();
        steps = 0;
      }
    }
    for (; i < hw_end; ++i) {
      const double d = static_cast<double>(static_cast<Acc>(p[i]) - shift);
      tail_sum += d;
      tail_sum_sq += d * d;
    }
  }
  sum.fold();
  sum_sq.fold();
  return Moments::from_shifted_sums((n_end - n_begin) * (hw_end - hw_begin), shift,
                                    sum.total + tail_sum, sum_sq.total + tail_sum_sq);
}

template <typename scalar_t>
GradSums nchw_block_grad_sums(const scalar_t* x_channel, const scalar_t* dy_channel,
                              int64_t plane_stride, acc_t<scalar_t> mean, int64_t n_begin,
                              int64_t n_end, int64_t hw_begin, int64_t hw_end) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  const AccVec mean_vec(mean);
  LaneSum<Acc> sum_dy, sum_dy_xmu;
  GradSums tail;
  int steps = 0;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const scalar_t* xp = x_channel + n * plane_stride;
    const scalar_t* gp = dy_channel + n * plane_stride;
    int64_t i = hw_begin;
    for (; i + IO::kWidth <= hw_end; i += IO::kWidth) {
      AccVec x_lo, x_hi, g_lo, g_hi;
      IO::load(xp + i, x_lo, x_hi);
      IO::load(gp + i, g_lo, g_hi);
      sum_dy.lo = sum_dy.lo + g_lo;
      sum_dy.hi = sum_dy.hi + g_hi;
      sum_dy_xmu.lo = at::vec::fmadd(g_lo, x_lo - mean_vec, sum_dy_xmu.lo);
      sum_dy_xmu.hi = at::vec::fmadd(g_hi, x_hi - mean_vec, sum_dy_xmu.hi);
      if (++steps == LaneSum<Acc>::kFoldSteps) {
        sum_dy.fold();
        sum_dy_xmu.fold();
        steps = 0;
      }
    }
    for (; i < hw_end; ++i) {
      const double g = static_cast<double>(static_cast<Acc>(gp[i]));
      tail.sum_dy += g;
      tail.sum_dy_xmu += g * static_cast<double>(static_cast<Acc>(xp[i]) - mean);
    }
  }
  sum_dy.fold();
  sum_dy_xmu.fold();
  return {sum_dy.total + tail.sum_dy, sum_dy_xmu.total + tail.sum_dy_xmu};
}

// ---------------------------------------------------------------------------
// Element passes over a contiguous run of one channel (NCHW)
// ---------------------------------------------------------------------------

// y = ((x − mean_hi) − mean_lo) · scale + shift
template <typename scalar_t>
void normalize_run(const scalar_t* x, scalar_t* y, int64_t len, acc_t<scalar_t> mean_hi,
                   acc_t<scalar_t> mean_lo, acc_t<scalar_t> scale, acc_t<scalar_t> shift) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  const AccVec mh(mean_hi), ml(mean_lo), sc(scale), sh(shift);
  int64_t i = 0;
  for (; i + IO::kWidth <= len; i += IO::kWidth) {
    AccVec lo, hi;
    IO::load(x + i, lo, hi);
    IO::store(y + i, at::vec::fmadd((lo - mh) - ml, sc, sh), at::vec::fmadd((hi - mh) - ml, sc, sh));
  }
  for (; i < len; ++i) {
    y[i] = static_cast<scalar_t>(((static_cast<Acc>(x[i]) - mean_hi) - mean_lo) * scale + shift);
  }
}

// Eval's dx = dy · scale: x plays no part (a NaN in x must not reach dx).
template <typename scalar_t>
void scale_run(const scalar_t* dy, scalar_t* dx, int64_t len, acc_t<scalar_t> scale) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  const AccVec sc(scale);
  int64_t i = 0;
  for (; i + IO::kWidth <= len; i += IO::kWidth) {
    AccVec lo, hi;
    IO::load(dy + i, lo, hi);
    IO::store(dx + i, lo * sc, hi * sc);
  }
  for (; i < len; ++i) dx[i] = static_cast<scalar_t>(static_cast<Acc>(dy[i]) * scale);
}

template <typename scalar_t>
void scale_row(const scalar_t* dy, scalar_t* dx, int64_t C, const acc_t<scalar_t>* scale) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  constexpr int64_t W = AccVec::size();
  int64_t c = 0;
  for (; c + IO::kWidth <= C; c += IO::kWidth) {
    AccVec lo, hi;
    IO::load(dy + c, lo, hi);
    IO::store(dx + c, lo * AccVec::loadu(scale + c), hi * AccVec::loadu(scale + c + W));
  }
  for (; c < C; ++c) dx[c] = static_cast<scalar_t>(static_cast<Acc>(dy[c]) * scale[c]);
}

// Training's dx = dy · dy_coef + (x − mean) · x_coef + shift
template <typename scalar_t>
void grad_input_run(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t len,
                    acc_t<scalar_t> mean, acc_t<scalar_t> dy_coef, acc_t<scalar_t> x_coef,
                    acc_t<scalar_t> shift) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  const AccVec mv(mean), gc(dy_coef), xc(x_coef), sh(shift);
  int64_t i = 0;
  for (; i + IO::kWidth <= len; i += IO::kWidth) {
    AccVec x_lo, x_hi, g_lo, g_hi;
    IO::load(x + i, x_lo, x_hi);
    IO::load(dy + i, g_lo, g_hi);
    IO::store(dx + i, at::vec::fmadd(g_lo, gc, at::vec::fmadd(x_lo - mv, xc, sh)),
              at::vec::fmadd(g_hi, gc, at::vec::fmadd(x_hi - mv, xc, sh)));
  }
  for (; i < len; ++i) {
    dx[i] = static_cast<scalar_t>(static_cast<Acc>(dy[i]) * dy_coef +
                                  ((static_cast<Acc>(x[i]) - mean) * x_coef + shift));
  }
}

// ---------------------------------------------------------------------------
// Element passes over one row of channels (NHWC)
// ---------------------------------------------------------------------------

template <typename scalar_t>
void normalize_row(const scalar_t* x, scalar_t* y, int64_t C, const ChannelCoefs<acc_t<scalar_t>>& k) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  constexpr int64_t W = AccVec::size();
  const Acc *mh = k.mean_hi.data(), *ml = k.mean_lo.data(), *sc = k.scale.data(),
            *sh = k.shift.data();
  int64_t c = 0;
  for (; c + IO::kWidth <= C; c += IO::kWidth) {
    AccVec lo, hi;
    IO::load(x + c, lo, hi);
    lo = at::vec::fmadd((lo - AccVec::loadu(mh + c)) - AccVec::loadu(ml + c), AccVec::loadu(sc + c),
                        AccVec::loadu(sh + c));
    hi = at::vec::fmadd((hi - AccVec::loadu(mh + c + W)) - AccVec::loadu(ml + c + W),
                        AccVec::loadu(sc + c + W), AccVec::loadu(sh + c + W));
    IO::store(y + c, lo, hi);
  }
  for (; c < C; ++c) {
    y[c] = static_cast<scalar_t>(((static_cast<Acc>(x[c]) - mh[c]) - ml[c]) * sc[c] + sh[c]);
  }
}

template <typename scalar_t>
void grad_input_row(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t C,
                    const ChannelCoefs<acc_t<scalar_t>>& k) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  constexpr int64_t W = AccVec::size();
  const Acc *mv = k.mean_hi.data(), *gc = k.scale.data(), *xc = k.x_coef.data(),
            *sh = k.shift.data();
  int64_t c = 0;
  for (; c + IO::kWidth <= C; c += IO::kWidth) {
    AccVec x_lo, x_hi, g_lo, g_hi;
    IO::load(x + c, x_lo, x_hi);
    IO::load(dy + c, g_lo, g_hi);
    const AccVec lo = at::vec::fmadd(
        g_lo, AccVec::loadu(gc + c),
        at::vec::fmadd(x_lo - AccVec::loadu(mv + c), AccVec::loadu(xc + c), AccVec::loadu(sh + c)));
    const AccVec hi = at::vec::fmadd(
        g_hi, AccVec::loadu(gc + c + W),
        at::vec::fmadd(x_hi - AccVec::loadu(mv + c + W), AccVec::loadu(xc + c + W),
                       AccVec::loadu(sh + c + W)));
    IO::store(dx + c, lo, hi);
  }
  for (; c < C; ++c) {
    dx[c] = static_cast<scalar_t>(static_cast<Acc>(dy[c]) * gc[c] +
                                  ((static_cast<Acc>(x[c]) - mv[c]) * xc[c] + sh[c]));
  }
}

// ---------------------------------------------------------------------------
// NHWC reductions over one block of rows
// ---------------------------------------------------------------------------

// Per-channel moments of rows [row_begin, row_end), written to out[0..C).
template <typename scalar_t>
void nhwc_block_moments(const scalar_t* x, int64_t C, int64_t row_begin, int64_t row_end,
                        Moments* out) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  constexpr int64_t W = AccVec::size();
  std::vector<Acc> shift(C), sum(C), sum_sq(C);
  std::vector<double> total(C, 0.0), total_sq(C, 0.0);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<Acc>(x[row_begin * C + c]);
  for (int64_t fold_begin = row_begin; fold_begin < row_end; fold_begin += kRowsPerFold) {
    const int64_t fold_end = std::min(row_end, fold_begin + kRowsPerFold);
    std::fill(sum.begin(), sum.end(), Acc(0));
    std::fill(sum_sq.begin(), sum_sq.end(), Acc(0));
    for (int64_t r = fold_begin; r < fold_end; ++r) {
      const scalar_t* row = x + r * C;
      int64_t c = 0;
      for (; c + IO::kWidth <= C; c += IO::kWidth) {
        AccVec lo, hi;
        IO::load(row + c, lo, hi);
        lo = lo - AccVec::loadu(shift.data() + c);
        hi = hi - AccVec::loadu(shift.data() + c + W);
        (AccVec::loadu(sum.data() + c) + lo).store(sum.data() + c);
        (AccVec::loadu(sum.data() + c + W) + hi).store(sum.data() + c + W);
        at::vec::fmadd(lo, lo, AccVec::loadu(sum_sq.data() + c)).store(sum_sq.data() + c);
        at::vec::fmadd(hi, hi, AccVec::loadu(sum_sq.data() + c + W)).store(sum_sq.data() + c + W);
      }
      for (; c < C; ++c) {
        const Acc d = static_cast<Acc>(row[c]) - shift[c];
        sum[c] += d;
        sum_sq[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      total[c] += sum[c];
      total_sq[c] += sum_sq[c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    out[c] = Moments::from_shifted_sums(row_end - row_begin, shift[c], total[c], total_sq[c]);
  }
}

template <typename scalar_t>
void nhwc_block_grad_sums(const scalar_t* x, const scalar_t* dy, int64_t C,
                          const acc_t<scalar_t>* mean, int64_t row_begin, int64_t row_end,
                          GradSums* out) {
  using Acc = acc_t<scalar_t>;
  using IO = VecPair<scalar_t>;
  using AccVec = Vectorized<Acc>;
  constexpr int64_t W = AccVec::size();
  std::vector<Acc> sum_dy(C), sum_dy_xmu(C);
  for (int64_t c = 0; c < C; ++c) out[c] = GradSums{};
  for (int64_t fold_begin = row_begin; fold_begin < row_end; fold_begin += kRowsPerFold) {
    const int64_t fold_end = std::min(row_end, fold_begin + kRowsPerFold);
    std::fill(sum_dy.begin(), sum_dy.end(), Acc(0));
    std::fill(sum_dy_xmu.begin(), sum_dy_xmu.end(), Acc(0));
    for (int64_t r = fold_begin; r < fold_end; ++r) {
      const scalar_t* xr = x + r * C;
      const scalar_t* gr = dy + r * C;
      int64_t c = 0;
      for (; c + IO::kWidth <= C; c += IO::kWidth) {
        AccVec x_lo, x_hi, g_lo, g_hi;
        IO::load(xr + c, x_lo, x_hi);
        IO::load(gr + c, g_lo, g_hi);
        (AccVec::loadu(sum_dy.data() + c) + g_lo).store(sum_dy.data() + c);
        (AccVec::loadu(sum_dy.data() + c + W) + g_hi).store(sum_dy.data() + c + W);
        at::vec::fmadd(g_lo, x_lo - AccVec::loadu(mean + c), AccVec::loadu(sum_dy_xmu.data() + c))
            .store(sum_dy_xmu.data() + c);
        at::vec::fmadd(g_hi, x_hi - AccVec::loadu(mean + c + W),
                       AccVec::loadu(sum_dy_xmu.data() + c + W))
            .store(sum_dy_xmu.data() + c + W);
      }
      for (; c < C; ++c) {
        const Acc g = static_cast<Acc>(gr[c]);
        sum_dy[c] += g;
        sum_dy_xmu[c] += g * (static_cast<Acc>(xr[c]) - mean[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      out[c].sum_dy += sum_dy[c];
      out[c].sum_dy_xmu += sum_dy_xmu[c];
    }
  }
}

// ---------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------

// Per-channel inputs and outputs of the ops, each of length C (may be null).
template <typename param_t>
struct ChannelTensors {
  const param_t* weight = nullptr;
  const param_t* bias = nullptr;
  param_t* running_mean = nullptr;
  param_t* running_var = nullptr;
};

template <typename param_t>
inline double param_or(const param_t* p, int64_t c, double fallback) {
  return p ? static_cast<double>(p[c]) : fallback;
}

// Finalizes channel c from its moments: saved statistics, running-statistics
// update, and the normalize coefficients.
template <typename scalar_t, typename param_t>
void finalize_channel_stats(int64_t c, const Moments& m, const ChannelTensors<param_t>& t,
                            double factor, double eps, acc_t<scalar_t>* save_mean,
                            acc_t<scalar_t>* save_invstd, ChannelCoefs<acc_t<scalar_t>>& k) {
  using Acc = acc_t<scalar_t>;
  const double n = static_cast<double>(m.count);
  const double var = m.count > 0 ? m.m2 / n : 0.0;
  const double invstd = 1.0 / std::sqrt(var + eps);
  save_mean[c] = static_cast<Acc>(m.mean);
  save_invstd[c] = static_cast<Acc>(invstd);
  if (m.count > 0 && t.running_mean) {
    t.running_mean[c] =
        static_cast<param_t>((1.0 - factor) * static_cast<double>(t.running_mean[c]) + factor * m.mean);
  }
  if (m.count > 0 && t.running_var) {
    // Unbiased, like nn.BatchNorm2d; a single value per channel gives inf/nan there too.
    const double unbiased = m.m2 / (n - 1.0);
    t.running_var[c] =
        static_cast<param_t>((1.0 - factor) * static_cast<double>(t.running_var[c]) + factor * unbiased);
  }
  const Acc mean_hi = static_cast<Acc>(m.mean);
  k.mean_hi[c] = mean_hi;
  k.mean_lo[c] = static_cast<Acc>(m.mean - static_cast<double>(mean_hi));
  k.scale[c] = static_cast<Acc>(invstd * param_or(t.weight, c, 1.0));
  k.shift[c] = static_cast<Acc>(param_or(t.bias, c, 0.0));
}

template <typename scalar_t, typename param_t>
void train_forward(const scalar_t* x, scalar_t* y, const Geometry& g, const ChannelTensors<param_t>& t,
                   double factor, double eps, acc_t<scalar_t>* save_mean,
                   acc_t<scalar_t>* save_invstd) {
  using Acc = acc_t<scalar_t>;
  const int64_t N = g.N, C = g.C, HW = g.HW;
  ChannelCoefs<Acc> k(C);

  if (g.channels_last) {
    const int64_t rows = N * HW;
    const RowBlocking rb(rows, C);
    std::vector<Moments> partial(rb.blocks * C);
    parallel_over(rb.blocks, [&](int64_t b) {
      nhwc_block_moments(x, C, b * rb.rows_per_block, std::min(rows, (b + 1) * rb.rows_per_block),
                         partial.data() + b * C);
    });
    parallel_over(C, [&](int64_t c) {
      Moments m;
      for (int64_t b = 0; b < rb.blocks; ++b) m.merge(partial[b * C + c]);
      finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd, k);
    });
    at::parallel_for(0, rows, std::max<int64_t>(1, kBlockElements / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) normalize_row(x + r * C, y + r * C, C, k);
                     });
    return;
  }

  const PlaneBlocking pb(N, HW);
  const int64_t plane_stride = C * HW;
  auto block_moments = [&](int64_t c, int64_t b) {
    int64_t n0, n1, h0, h1;
    pb.range(b, N, HW, n0, n1, h0, h1);
    return nchw_block_moments(x + c * HW, plane_stride, n0, n1, h0, h1);
  };
  auto normalize_planes = [&](int64_t c, int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      const int64_t offset = n * plane_stride + c * HW;
      normalize_run(x + offset, y + offset, HW, k.mean_hi[c], k.mean_lo[c], k.scale[c], k.shift[c]);
    }
  };

  if (!split_channels_across_threads(g)) {
    parallel_over(C, [&](int64_t c) {
      Moments m;
      for (int64_t b = 0; b < pb.blocks; ++b) m.merge(block_moments(c, b));
      finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd, k);
      normalize_planes(c, 0, N);
    });
    return;
  }
  std::vector<Moments> partial(C * pb.blocks);
  parallel_over(C * pb.blocks, [&](int64_t i) { partial[i] = block_moments(i / pb.blocks, i % pb.blocks); });
  for (int64_t c = 0; c < C; ++c) {
    Moments m;
    for (int64_t b = 0; b < pb.blocks; ++b) m.merge(partial[c * pb.blocks + b]);
    finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd, k);
  }
  parallel_over(C * N, [&](int64_t i) { normalize_planes(i / N, i % N, i % N + 1); });
}

template <typename scalar_t, typename param_t>
void eval_forward(const scalar_t* x, scalar_t* y, const Geometry& g, const ChannelTensors<param_t>& t,
                  double eps) {
  using Acc = acc_t<scalar_t>;
  const int64_t N = g.N, C = g.C, HW = g.HW;
  ChannelCoefs<Acc> k(C);
  for (int64_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(t.running_var[c]) + eps);
    k.mean_hi[c] = static_cast<Acc>(t.running_mean[c]);
    k.mean_lo[c] = Acc(0);
    k.scale[c] = static_cast<Acc>(invstd * param_or(t.weight, c, 1.0));
    k.shift[c] = static_cast<Acc>(param_or(t.bias, c, 0.0));
  }
  if (g.channels_last) {
    at::parallel_for(0, N * HW, std::max<int64_t>(1, kBlockElements / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) normalize_row(x + r * C, y + r * C, C, k);
                     });
    return;
  }
  at::parallel_for(0, N * C, std::max<int64_t>(1, kBlockElements / std::max<int64_t>(HW, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end; ++i) {
                       const int64_t c = i % C;
                       normalize_run(x + i * HW, y + i * HW, HW, k.mean_hi[c], Acc(0), k.scale[c],
                                     k.shift[c]);
                     }
                   });
}

// Outputs of the backward op (null where the output mask is false).
template <typename scalar_t, typename param_t>
struct BackwardOutputs {
  scalar_t* grad_input = nullptr;
  param_t* grad_weight = nullptr;
  param_t* grad_bias = nullptr;
};

// Backward coefficients of channel c from its sums (see ChannelCoefs).
template <typename scalar_t, typename param_t>
void finalize_channel_grads(int64_t c, const GradSums& s, int64_t count, bool training,
                            const param_t* weight, const acc_t<scalar_t>* mean,
                            const acc_t<scalar_t>* invstd, const BackwardOutputs<scalar_t, param_t>& out,
                            ChannelCoefs<acc_t<scalar_t>>& k) {
  using Acc = acc_t<scalar_t>;
  const double istd = static_cast<double>(invstd[c]);
  const double w = param_or(weight, c, 1.0);
  if (out.grad_weight) out.grad_weight[c] = static_cast<param_t>(s.sum_dy_xmu * istd);
  if (out.grad_bias) out.grad_bias[c] = static_cast<param_t>(s.sum_dy);
  k.mean_hi[c] = mean[c];
  k.scale[c] = static_cast<Acc>(w * istd);
  if (training && count > 0) {
    const double n = static_cast<double>(count);
    k.x_coef[c] = static_cast<Acc>(-w * istd * istd * istd * s.sum_dy_xmu / n);
    k.shift[c] = static_cast<Acc>(-w * istd * s.sum_dy / n);
  } else {
    k.x_coef[c] = Acc(0);
    k.shift[c] = Acc(0);
  }
}

template <typename scalar_t, typename param_t>
void backward(const scalar_t* dy, const scalar_t* x, const Geometry& g, const param_t* weight,
              const acc_t<scalar_t>* mean, const acc_t<scalar_t>* invstd, bool training,
              const BackwardOutputs<scalar_t, param_t>& out) {
  using Acc = acc_t<scalar_t>;
  const int64_t N = g.N, C = g.C, HW = g.HW;
  const int64_t count = g.per_channel();
  ChannelCoefs<Acc> k(C);
  // Eval's dx needs no sums; training's dx and both parameter grads do.
  const bool need_sums = training ? out.grad_input || out.grad_weight || out.grad_bias
                                  : out.grad_weight || out.grad_bias;

  if (g.channels_last) {
    const int64_t rows = N * HW;
    const RowBlocking rb(rows, C);
    std::vector<GradSums> partial(need_sums ? rb.blocks * C : 0);
    if (need_sums) {
      parallel_over(rb.blocks, [&](int64_t b) {
        nhwc_block_grad_sums(x, dy, C, mean, b * rb.rows_per_block,
                             std::min(rows, (b + 1) * rb.rows_per_block), partial.data() + b * C);
      });
    }
    parallel_over(C, [&](int64_t c) {
      GradSums s;
      for (int64_t b = 0; need_sums && b < rb.blocks; ++b) s.add(partial[b * C + c]);
      finalize_channel_grads<scalar_t>(c, s, count, training, weight, mean, invstd, out, k);
    });
    if (out.grad_input) {
      at::parallel_for(0, rows, std::max<int64_t>(1, kBlockElements / std::max<int64_t>(C, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t r = begin; r < end; ++r) {
                           if (training) {
                             grad_input_row(x + r * C, dy + r * C, out.grad_input + r * C, C, k);
                           } else {
                             scale_row(dy + r * C, out.grad_input + r * C, C, k.scale.data());
                           }
                         }
                       });
    }
    return;
  }

  const PlaneBlocking pb(N, HW);
  const int64_t plane_stride = C * HW;
  auto block_sums = [&](int64_t c, int64_t b) {
    int64_t n0, n1, h0, h1;
    pb.range(b, N, HW, n0, n1, h0, h1);
    return nchw_block_grad_sums(x + c * HW, dy + c * HW, plane_stride, mean[c], n0, n1, h0, h1);
  };
  auto grad_input_planes = [&](int64_t c, int64_t n_begin, int64_t n_end) {
    for (int64_t n = n_begin; n < n_end; ++n) {
      const int64_t offset = n * plane_stride + c * HW;
      if (training) {
        grad_input_run(x + offset, dy + offset, out.grad_input + offset, HW, k.mean_hi[c],
                       k.scale[c], k.x_coef[c], k.shift[c]);
      } else {
        scale_run(dy + offset, out.grad_input + offset, HW, k.scale[c]);
      }
    }
  };

  if (!split_channels_across_threads(g)) {
    parallel_over(C, [&](int64_t c) {
      GradSums s;
      for (int64_t b = 0; need_sums && b < pb.blocks; ++b) s.add(block_sums(c, b));
      finalize_channel_grads<scalar_t>(c, s, count, training, weight, mean, invstd, out, k);
      if (out.grad_input) grad_input_planes(c, 0, N);
    });
    return;
  }
  std::vector<GradSums> partial(need_sums ? C * pb.blocks : 0);
  if (need_sums) {
    parallel_over(C * pb.blocks, [&](int64_t i) { partial[i] = block_sums(i / pb.blocks, i % pb.blocks); });
  }
  for (int64_t c = 0; c < C; ++c) {
    GradSums s;
    for (int64_t b = 0; need_sums && b < pb.blocks; ++b) s.add(partial[c * pb.blocks + b]);
    finalize_channel_grads<scalar_t>(c, s, count, training, weight, mean, invstd, out, k);
  }
  if (out.grad_input) parallel_over(C * N, [&](int64_t i) { grad_input_planes(i / N, i % N, i % N + 1); });
}

}  // namespace fused_bn::cpu
