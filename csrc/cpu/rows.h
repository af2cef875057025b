// Rows of channels walked tile by tile: NHWC tensors, and NCHW channel
// blocks' element passes (a block's image runs as rows).
#pragma once

#include <cstdint>

#include "accumulators.h"
#include "coefficients.h"
#include "epilogue.h"
#include "plan.h"
#include "scratch.h"
#include "vec.h"

namespace fused_bn::cpu {

// kTileWidth consecutive columns of one row as accumulation-type vectors.
// Named members, not an array: gcc keeps a struct of vectors in registers but
// spills an array of them to the stack on every access.
template <typename scalar_t>
struct Tile {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  static constexpr int64_t kWidth = kTileWidth<scalar_t>;
  AccVec v0, v1, v2, v3;

  // Tile of f applied lane-wise to the tiles' vectors.
  template <typename F, typename... Tiles>
  __attribute__((always_inline)) static inline Tile zip(F&& f, const Tiles&... t) {
    return {f(t.v0...), f(t.v1...), f(t.v2...), f(t.v3...)};
  }
  __attribute__((always_inline)) static inline Tile zero() {
    const AccVec z(acc_type<scalar_t>(0));
    return {z, z, z, z};
  }
  // The first n columns (n <= kWidth); the rest read as zero, and a second
  // pair with no columns is not loaded at all.
  __attribute__((always_inline)) static inline Tile load(const scalar_t* p, int64_t n) {
    Tile t;
    if (n == kWidth) {
      std::tie(t.v0, t.v1) = IO::load(p);
      std::tie(t.v2, t.v3) = IO::load(p + IO::kWidth);
    } else {
      std::tie(t.v0, t.v1) = IO::load(p, std::min(n, IO::kWidth));
      if (n > IO::kWidth) {
        std::tie(t.v2, t.v3) = IO::load(p + IO::kWidth, n - IO::kWidth);
      } else {
        t.v2 = t.v3 = AccVec(acc_type<scalar_t>(0));
      }
    }
    return t;
  }
  // Per-column coefficients from a padded array, each in the lane that holds
  // its column after load() (VecPair::load_coefs).
  __attribute__((always_inline)) static inline Tile coefs(const acc_type<scalar_t>* p) {
    Tile t;
    std::tie(t.v0, t.v1) = IO::load_coefs(p);
    std::tie(t.v2, t.v3) = IO::load_coefs(p + IO::kWidth);
    return t;
  }
  // The inverse of coefs.
  __attribute__((always_inline)) inline void store_coefs(acc_type<scalar_t>* p) const {
    IO::store_coefs(p, {v0, v1});
    IO::store_coefs(p + IO::kWidth, {v2, v3});
  }
  // The vectors as they are, for load_lanes to read back (a staged piece):
  // no lane reordering either way.
  __attribute__((always_inline)) inline void store_lanes(acc_type<scalar_t>* p) const {
    constexpr int64_t W = AccVec::size();
    v0.store(p);
    v1.store(p + W);
    v2.store(p + 2 * W);
    v3.store(p + 3 * W);
  }
  __attribute__((always_inline)) static inline Tile load_lanes(const acc_type<scalar_t>* p) {
    constexpr int64_t W = AccVec::size();
    return {AccVec::loadu(p), AccVec::loadu(p + W), AccVec::loadu(p + 2 * W), AccVec::loadu(p + 3 * W)};
  }
  __attribute__((always_inline)) inline void store(scalar_t* p, int64_t n, bool stream) const {
    if (n == kWidth) {
      if (stream) {
        IO::stream(p, {v0, v1});
        IO::stream(p + IO::kWidth, {v2, v3});
      } else {
        IO::store(p, {v0, v1});
        IO::store(p + IO::kWidth, {v2, v3});
      }
      return;
    }
    if (n >= IO::kWidth && stream) {
      IO::stream(p, {v0, v1});
    } else {
      IO::store(p, {v0, v1}, std::min(n, IO::kWidth));
    }
    if (n > IO::kWidth) IO::store(p + IO::kWidth, {v2, v3}, n - IO::kWidth);
  }
  // Adds the lanes into totals[0..kWidth) in double (see LaneSum::fold).
  __attribute__((always_inline)) inline void fold_into(double* totals) const {
    acc_type<scalar_t> lanes[kWidth];
    store_coefs(lanes);
    for (int64_t i = 0; i < kWidth; ++i) totals[i] += static_cast<double>(lanes[i]);
  }
};

// g of a tile under G (see Grad, pair_grad); z's per-column coefficients (mean,
// scale, forward shift) loaded once per piece, the aux (residual or y) read and
// g written at element offset `at`.
template <typename scalar_t, typename G>
__attribute__((always_inline)) inline Tile<scalar_t> tile_grad(const Tile<scalar_t>& x, const Tile<scalar_t>& dy,
                                                               const Tile<scalar_t>& mean, const Tile<scalar_t>& sc,
                                                               const Tile<scalar_t>& fs, const scalar_t* aux,
                                                               scalar_t* grad,
                                                               const ActParams<scalar_t, typename G::Activation>& params,
                                                               int64_t at, int64_t n) {
  using T = Tile<scalar_t>;
  if constexpr (G::kIdentity) {
    return dy;
  } else {
    const T a = G::kReadsAux ? T::load(aux + at, n) : x;
    const T g = T::zip([&](auto d, auto xx, auto r, auto mm, auto s_, auto h) {
      return transform_grad<scalar_t, G>(d, xx, r, mm, s_, h, params);
    }, dy, x, a, mean, sc, fs);
    if constexpr (G::kWritesGrad) g.store(grad + at, n, /*stream=*/false);
    return g;
  }
}

// Visits rows [row_begin, row_end) as pieces (at most kRowsPerFold rows × one
// tile of columns), tiles innermost: a piece's per-column vectors stay in
// registers while its rows stay in L1. f(r0, r1, c0, n): rows [r0, r1),
// columns [c0, c0 + n). With reversed, spans of about kReverseSpanBytes go
// from the end of the range (rows within a span still go forward, which the
// hardware prefetcher needs): a pass that follows a reduction over the same
// rows starts on what the reduction read last, still in the last-level cache.
template <typename scalar_t, typename F>
__attribute__((always_inline)) inline void rows_walk(const Rows& rows, int64_t row_begin, int64_t row_end, bool reversed,
                                                     F&& f) {
  const int64_t width = rows.width;
  const int64_t row_bytes = std::max<int64_t>(1, width * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t span = reversed ? std::max<int64_t>(1, kReverseSpanBytes / row_bytes / kRowsPerFold) * kRowsPerFold
                                : row_end - row_begin;
  const int64_t spans = span > 0 ? (row_end - row_begin + span - 1) / span : 0;
  for (int64_t k = 0; k < spans; ++k) {
    const int64_t s0 = row_begin + (reversed ? spans - 1 - k : k) * span;
    const int64_t s1 = std::min(row_end, s0 + span);
    for (int64_t r0 = s0; r0 < s1; r0 += kRowsPerFold) {
      const int64_t r1 = std::min(s1, r0 + kRowsPerFold);
      for (int64_t c0 = 0; c0 < width; c0 += kTileWidth<scalar_t>) {
        f(r0, r1, c0, std::min(kTileWidth<scalar_t>, width - c0));
      }
    }
  }
}

// Per-channel mean and M2 of channels [strip.begin, strip.end) over rows
// [row_begin, row_end) of C channels, written to mean_out[strip.begin..end)
// and m2_out[strip.begin..end) (structure of arrays: see merge_row_blocks).
template <typename scalar_t>
void nhwc_block_moments(const scalar_t* x, int64_t C, ColumnRange strip, int64_t row_begin, int64_t row_end,
                        double* mean_out, double* m2_out) {
  using Acc = acc_type<scalar_t>;
  using T = Tile<scalar_t>;
  const int64_t width = strip.width();
  const int64_t padded = padded_channels<scalar_t>(width);
  x += strip.begin;
  mean_out += strip.begin;
  m2_out += strip.begin;
  Acc* shift = thread_scratch_filled<Acc, ScratchSlot::kBlockShift>(padded, Acc(0));
  double* total = thread_scratch_filled<double, ScratchSlot::kBlockSum1>(padded, 0.0);
  double* total_sq = thread_scratch_filled<double, ScratchSlot::kBlockSum2>(padded, 0.0);
  for (int64_t c = 0; c < width; ++c) shift[c] = static_cast<Acc>(x[row_begin * C + c]);
  rows_walk<scalar_t>(Rows{width, C}, row_begin, row_end, false, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
    // Lanes past n load as zero from both x and the padded shift: they add nothing.
    const T k = T::coefs(shift + c0);
    T sum = T::zero(), sum_sq = T::zero();
    WideSum wide[2];
    for (int64_t r = r0; r < r1; ++r) {
      const T tx = T::load(x + r * C + c0, n);
      if constexpr (kSumInDouble<scalar_t>) {
        wide[0].add(tx.v0, tx.v1);
        wide[1].add(tx.v2, tx.v3);
      }
      const T d = T::zip([](auto x, auto kk) { return x - kk; }, tx, k);
      if constexpr (!kSumInDouble<scalar_t>) sum = T::zip([](auto s_, auto d_) { return s_ + d_; }, sum, d);
      sum_sq = T::zip([](auto q, auto d_) { return at::vec::fmadd(d_, d_, q); }, sum_sq, d);
    }
    if constexpr (kSumInDouble<scalar_t>) {
      wide[0].add_lanes_to(total + c0);
      wide[1].add_lanes_to(total + c0 + T::kWidth / 2);
    } else {
      sum.fold_into(total + c0);
    }
    sum_sq.fold_into(total_sq + c0);
  });
  for (int64_t c = 0; c < width; ++c) {
    const Moments m = Moments::from_sums<scalar_t>(row_end - row_begin, shift[c], total[c], total_sq[c]);
    mean_out[c] = m.mean;
    m2_out[c] = m.m2;
  }
}

// Merges the row blocks' per-channel moments in block order (Chan's formula,
// as Moments::merge) for channels [c_begin, c_end). Every channel of a block
// has the same count, so the weights are per block and the loop over channels
// vectorizes: with many channels and 64 blocks, merging Moments one channel at
// a time took a tenth of the training forward.
inline void merge_row_blocks(const RowBlocking& rb, int64_t rows, int64_t C, const double* block_mean,
                             const double* block_m2, int64_t c_begin, int64_t c_end, double* mean,
                             double* m2) {
  std::copy(block_mean + c_begin, block_mean + c_end, mean + c_begin);
  std::copy(block_m2 + c_begin, block_m2 + c_end, m2 + c_begin);
  double count = static_cast<double>(rb.end(0, rows) - rb.begin(0));
  for (int64_t b = 1; b < rb.blocks; ++b) {
    const double block_count = static_cast<double>(rb.end(b, rows) - rb.begin(b));
    const double fraction = block_count / (count + block_count);
    const double weight = count * fraction;
    const double* bm = block_mean + b * C;
    const double* bm2 = block_m2 + b * C;
    for (int64_t c = c_begin; c < c_end; ++c) {
      const double delta = bm[c] - mean[c];
      mean[c] += delta * fraction;
      m2[c] += bm2[c] + delta * delta * weight;
    }
    count += block_count;
  }
}

// nhwc_block_grad_sums' piece when g is dy (no activation, no eval dx): the
// same sums lane by lane in the same row order, a pair of vectors (half a
// tile) at a time. Its four per-column sums (Σg, Σg·(x − mean), Σ(x − mean),
// the g != G flags) over a whole tile are 16 vectors beside the tile's mean
// and G: gcc spilled half of them, and the pass took 1.8x nn's reduction in
// channels_last (bench/NOTES.md, "Issue 38: channels_last backward sums").
template <typename scalar_t>
__attribute__((always_inline)) inline void identity_piece_grad_sums(
    const scalar_t* x, const scalar_t* dy, int64_t C, int64_t width, int64_t col, int64_t c0, int64_t n, int64_t r0,
    int64_t r1, const acc_type<scalar_t>* mean, const acc_type<scalar_t>* first_dy, acc_type<scalar_t>* differs, double* sum_dy,
    double* sum_dy_xmu, double* sum_xmu) {
  using IO = VecPair<scalar_t>;
  using Acc = acc_type<scalar_t>;
  using AccVec = typename IO::AccVec;
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t hc = c0 + h * IO::kWidth;  // the strip's column of this pair
    const int64_t hn = std::min<int64_t>(n - h * IO::kWidth, IO::kWidth);
    if (hn <= 0) break;
    const auto [m0, m1] = IO::load_coefs(mean + col + hc);
    const auto [f0, f1] = IO::load_coefs(first_dy + hc);
    const AccVec zero(Acc(0));
    AccVec sd0 = zero, sd1 = zero, sgx0 = zero, sgx1 = zero, sx0 = zero, sx1 = zero, d0 = zero, d1 = zero;
    // The pair the walk reads next in this row (the next pair of columns, or
    // after the strip's last, the first pair kRowsPerFold rows down) is
    // prefetched: a piece is 16 rows, too few for the hardware's stride
    // prefetcher to get ahead. A prefetch past the tensor is a hint, never a fault.
    const int64_t ahead = hc + IO::kWidth < width ? IO::kWidth : kRowsPerFold * C - hc;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t at = r * C + col + hc;
      __builtin_prefetch(x + at + ahead);
      __builtin_prefetch(dy + at + ahead);
      // Columns past hn: x, mean, dy and G all load as 0.
      const auto [x0, x1] = IO::load(x + at, hn);
      const auto [g0, g1] = IO::load(dy + at, hn);
      sd0 = sd0 + g0;
      sd1 = sd1 + g1;
      const AccVec u0 = x0 - m0, u1 = x1 - m1;
      sgx0 = at::vec::fmadd(g0, u0, sgx0);
      sgx1 = at::vec::fmadd(g1, u1, sgx1);
      sx0 = sx0 + u0;
      sx1 = sx1 + u1;
      d0 = d0 | (g0 != f0);
      d1 = d1 | (g1 != f1);
    }
    Acc lanes[IO::kWidth];
    const auto fold = [&](const AccVec& a, const AccVec& b, double* totals) {
      IO::store_coefs(lanes, {a, b});
      for (int64_t i = 0; i < IO::kWidth; ++i) totals[hc + i] += static_cast<double>(lanes[i]);
    };
    fold(sd0, sd1, sum_dy);
    fold(sgx0, sgx1, sum_dy_xmu);
    fold(sx0, sx1, sum_xmu);
    const auto [e0, e1] = IO::load_coefs(differs + hc);
    IO::store_coefs(differs + hc, {d0 | e0, d1 | e1});
  }
}

// Per-channel GradSums of channels [strip.begin, strip.end) over rows
// [row_begin, row_end) of C channels, as structure of arrays (see
// merge_row_blocks) at [strip.begin, strip.end); mean is padded to whole tiles.
// (g of G: the aux, residual or y, is read and g written to `grad`, both laid
// out as x, where G says.) A non-null eval_dx also gets eval's dx = g · k.scale in the
// same pass (eval's dx needs no sums; k.scale set beforehand).
template <typename scalar_t, typename G>
void nhwc_block_grad_sums(const scalar_t* x, const scalar_t* dy, int64_t C, ColumnRange strip,
                          const ChannelCoefs<scalar_t>& k, const scalar_t* aux, scalar_t* grad,
                          const ActParams<scalar_t, typename G::Activation>& params,
                          int64_t row_begin, int64_t row_end,
                          double* sum_dy_out, double* sum_dy_xmu_out, double* sum_xmu_out,
                          scalar_t* eval_dx = nullptr, bool stream_dx = false) {
  using Acc = acc_type<scalar_t>;
  using T = Tile<scalar_t>;
  const int64_t width = strip.width(), col = strip.begin;
  const int64_t padded = padded_channels<scalar_t>(width);
  double* sum_dy = thread_scratch_filled<double, ScratchSlot::kBlockSum1>(padded, 0.0);
  double* sum_dy_xmu = thread_scratch_filled<double, ScratchSlot::kBlockSum2>(padded, 0.0);
  double* sum_xmu = thread_scratch_filled<double, ScratchSlot::kBlockSum3>(padded, 0.0);
  // g != the block's first dy, OR-ed per column (see block_sum_dy_xmu).
  Acc* first_dy = thread_scratch_filled<Acc, ScratchSlot::kBlockShift>(padded, Acc(0));
  Acc* differs = thread_scratch_filled<Acc, ScratchSlot::kBlockFlagLanes>(padded, Acc(0));
  for (int64_t c = 0; c < width; ++c) first_dy[c] = static_cast<Acc>(dy[row_begin * C + col + c]);
  // A piece's g, staged first for a costly activation (kStagesRowPieces).
  constexpr bool kStaged = kStagesRowPieces<typename G::Activation>;
  Acc* staged = kStaged ? thread_scratch<Acc, ScratchSlot::kStagedPiece>(kRowsPerFold * T::kWidth) : nullptr;
  rows_walk<scalar_t>(Rows{width, C}, row_begin, row_end, false, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
    // c0 is the strip's column, col + c0 the channel.
    if constexpr (G::kIdentity) {
      if (!eval_dx) {
        identity_piece_grad_sums(x, dy, C, width, col, c0, n, r0, r1, k.mean, first_dy, differs, sum_dy, sum_dy_xmu,
                                 sum_xmu);
        return;
      }
    }
    const T m = T::coefs(k.mean + col + c0);
    const T sc = G::kRecomputes || eval_dx ? T::coefs(k.scale + col + c0) : T::zero();
    const T fs = G::kRecomputes ? T::coefs(k.forward_shift + col + c0) : T::zero();
    if constexpr (kStaged) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t at = r * C + col + c0;
        tile_grad<scalar_t, G>(T::load(x + at, n), T::load(dy + at, n), m, sc, fs, aux, grad, params, at, n)
            .store_lanes(staged + (r - r0) * T::kWidth);
      }
    }
    const T g0 = T::coefs(first_dy + c0);
    T s_dy = T::zero(), s_dy_xmu = T::zero(), s_xmu = T::zero(), d = T::zero();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t at = r * C + col + c0;
      const T tx = T::load(x + at, n);
      const T tg = kStaged ? T::load_lanes(staged + (r - r0) * T::kWidth)
                           : tile_grad<scalar_t, G>(tx, T::load(dy + at, n), m, sc, fs, aux, grad, params, at, n);
      if (eval_dx) T::zip([](auto g, auto s_) { return g * s_; }, tg, sc).store(eval_dx + at, n, stream_dx);
      s_dy = T::zip([](auto s_, auto g) { return s_ + g; }, s_dy, tg);
      // Columns past n: x, mean, dy and first_dy all load as 0.
      const T xm = T::zip([](auto xx, auto mm) { return xx - mm; }, tx, m);
      s_dy_xmu = T::zip([](auto s_, auto g, auto u) { return at::vec::fmadd(g, u, s_); }, s_dy_xmu, tg, xm);
      s_xmu = T::zip([](auto s_, auto u) { return s_ + u; }, s_xmu, xm);
      d = T::zip([](auto f, auto g, auto h) { return f | (g != h); }, d, tg, g0);
    }
    T::zip([](auto f, auto g) { return f | g; }, d, T::coefs(differs + c0)).store_coefs(differs + c0);
    s_dy.fold_into(sum_dy + c0);
    s_dy_xmu.fold_into(sum_dy_xmu + c0);
    s_xmu.fold_into(sum_xmu + c0);
  });
  for (int64_t c = 0; c < width; ++c) {
    Acc flag = differs[c];
    unsigned char bits[sizeof(Acc)];
    std::memcpy(bits, &flag, sizeof(Acc));
    const bool g_constant = std::all_of(bits, bits + sizeof(Acc), [](unsigned char b) { return b == 0; });
    const GradSums s = block_grad_sums(g_constant, dy + row_begin * C + col + c, row_end - row_begin, sum_dy[c],
                                       sum_dy_xmu[c], sum_xmu[c]);
    sum_dy_out[col + c] = s.sum_dy;
    sum_dy_xmu_out[col + c] = s.sum_dy_xmu;
    sum_xmu_out[col + c] = s.sum_xmu;
  }
}

// y = epilogue((x − mean) · scale + shift) over rows [row_begin, row_end); k
// holds per-column coefficients (ChannelCoefs or RunCoefs); the residual
// (Epi::kHasResidual) is laid out as x.
template <typename scalar_t, typename Epi, typename Coefs>
void normalize_rows(const scalar_t* x, const scalar_t* residual, scalar_t* y, const Rows& rows,
                    int64_t row_begin, int64_t row_end, const Coefs& k, const EpilogueArgs<scalar_t, Epi>& epilogue,
                    bool stream, bool reversed) {
  using T = Tile<scalar_t>;
  // A piece's z, staged first for a costly activation (kStagesRowPieces).
  constexpr bool kStaged = kStagesRowPieces<typename Epi::Activation>;
  using Acc = acc_type<scalar_t>;
  Acc* staged = kStaged ? thread_scratch<Acc, ScratchSlot::kStagedPiece>(kRowsPerFold * T::kWidth) : nullptr;
  rows_walk<scalar_t>(rows, row_begin, row_end, reversed, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
    const T m = T::coefs(k.mean + c0), sc = T::coefs(k.scale + c0), sh = T::coefs(k.shift + c0);
    auto normalized = [&](int64_t at) __attribute__((always_inline)) {
      return T::zip([](auto xx, auto mm, auto s_, auto h) { return at::vec::fmadd(xx - mm, s_, h); },
                    T::load(x + at, n), m, sc, sh);
    };
    if constexpr (kStaged) {
      for (int64_t r = r0; r < r1; ++r) normalized(r * rows.stride + c0).store_lanes(staged + (r - r0) * T::kWidth);
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t at = r * rows.stride + c0;
      T z = kStaged ? T::load_lanes(staged + (r - r0) * T::kWidth) : normalized(at);
      if constexpr (Epi::kHasResidual) {
        z = T::zip([&](auto v, auto res) { return epilogue.apply(v, res); }, z, T::load(residual + at, n));
      } else if constexpr (!Epi::kPlain) {
        z = T::zip([&](auto v) { return epilogue.apply(v, v); }, z);
      }
      z.store(y + at, n, stream);
    }
  });
}

// Training's dx = (g − shift − (x − mean) · projection) · scale (see ChannelCoefs), or eval's g · scale,
// with g = dy under G (one that reads no aux: the reduction pass wrote that g).
template <typename scalar_t, typename G, typename Coefs>
void grad_input_rows(const scalar_t* x, const scalar_t* dy, scalar_t* dx, const Rows& rows,
                     int64_t row_begin, int64_t row_end, const Coefs& k,
                     const ActParams<scalar_t, typename G::Activation>& params,
                     bool training, bool stream, bool reversed) {
  static_assert(!G::kReadsAux, "the reduction pass writes that g; pass it as dy");
  using T = Tile<scalar_t>;
  rows_walk<scalar_t>(rows, row_begin, row_end, reversed, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
    const T sc = T::coefs(k.scale + c0), m = T::coefs(k.mean + c0);
    const T fs = G::kRecomputes ? T::coefs(k.forward_shift + c0) : T::zero();
    auto grad = [&](int64_t at, const T& tx) __attribute__((always_inline)) {
      return tile_grad<scalar_t, G>(tx, T::load(dy + at, n), m, sc, fs, nullptr, nullptr, params, at, n);
    };
    if (!training) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t at = r * rows.stride + c0;
        const T tx = G::kRecomputes ? T::load(x + at, n) : T::zero();
        T::zip([](auto g, auto s_) { return g * s_; }, grad(at, tx), sc).store(dx + at, n, stream);
      }
      return;
    }
    const T pr = T::coefs(k.projection + c0), sh = T::coefs(k.shift + c0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t at = r * rows.stride + c0;
      const T tx = T::load(x + at, n);
      T::zip([](auto g, auto s_, auto xx, auto mm, auto p_, auto h) {
               return at::vec::fnmadd(xx - mm, p_, g - h) * s_;
             },
             grad(at, tx), sc, tx, m, pr, sh)
          .store(dx + at, n, stream);
    }
  });
}

}  // namespace fused_bn::cpu
