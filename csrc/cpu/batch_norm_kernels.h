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
#include <cstring>
#include <tuple>
#include <type_traits>

#include "../common/channel_math.h"
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fused_bn::cpu {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// ---------------------------------------------------------------------------
// Tuning constants (measured on a 2-core AMD EPYC with 1 MB L2 per core and a
// 32 MB shared L3; see bench/NOTES.md)
// ---------------------------------------------------------------------------

// Target elements per reduction block: large enough to amortize the per-block
// merge, small enough that float partial sums stay accurate.
constexpr int64_t kBlockElements = 4096;

// Rows (NHWC) or vector steps (NCHW) summed in the accumulation type before
// folding into double: short float runs keep each lane's rounding tiny even when
// the data sit far from the block's shift.
constexpr int64_t kRowsPerFold = 16;

// Tensors (one of x, y, dy, dx) up to this size stay in the shared 32 MB L3
// next to their partner; larger ones go to and from DRAM, where two things pay:
//  - streaming (non-temporal) stores of the output: they skip the read for
//    ownership an ordinary store of a missing line costs, and they no longer
//    evict the input a second pass re-reads. Eval's output is read by the next
//    layer right away, so below this size it is stored normally and stays in
//    cache for it (training outputs: kTrainingStreamBytes).
//  - software prefetch in the NCHW passes: the hardware prefetcher stops at
//    every 4 KB page and restarts on every plane (one channel's planes lie
//    C·H·W elements apart), which left the statistics pass stalled on loads.
//    On cache-resident data the prefetches only cost instructions.
constexpr int64_t kCacheResidentBytes = int64_t{16} << 20;

// A training step's outputs (forward's y, backward's dx) are streamed once the
// step's four input-sized tensors (x, y, dy, dx) outgrow half the L3. Their
// buffers are fresh allocations, cold in cache, so an ordinary store pays a
// read for ownership of every line and a write-back later, and it evicts the
// x and dy the next pass re-reads. Below that, the lines an ordinary store
// brings in stay in cache for the step (and y for the next layer): training
// steps of 2-4 MB tensors ran 5-25% faster with ordinary stores, 6.4 MB and
// larger ones 15-45% slower (bench/NOTES.md).
constexpr int64_t kTrainingStreamBytes = int64_t{4} << 20;

// How far ahead of the loads the NCHW passes prefetch.
constexpr int64_t kPrefetchBytes = 4096;

// Channels per task when merging NHWC block partials: below this the merge
// runs on the calling thread, cheaper than waking the pool.
constexpr int64_t kMergeGrain = 256;

// NCHW planes up to this size are walked by channel blocks (ChannelBlocking),
// which keep a block's planes, over all images, within this much of a core's L2.
constexpr int64_t kShortPlaneBytes = 1024;
constexpr int64_t kChannelBlockBytes = int64_t{256} << 10;
constexpr int64_t kMaxRunColumns = 8192;

// Granularity of the NHWC passes that walk their rows backwards (nhwc_walk).
constexpr int64_t kReverseSpanBytes = int64_t{256} << 10;

// ---------------------------------------------------------------------------
// Vector loads and stores
// ---------------------------------------------------------------------------

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
// converts in whole native vectors.
template <typename scalar_t>
struct VecPair {
  using Acc = acc_t<scalar_t>;
  using AccVec = Vectorized<Acc>;
  using Pair = std::pair<AccVec, AccVec>;
  static constexpr int64_t kHalf = AccVec::size();
  static constexpr int64_t kWidth = 2 * kHalf;
  static constexpr int64_t kBytes = kWidth * sizeof(scalar_t);
  static constexpr bool kNative = std::is_same_v<scalar_t, Acc>;

  // The first n elements (0 <= n <= kWidth); the other lanes read as zero and
  // their memory is not touched.
  static inline Pair load(const scalar_t* p, int64_t n = kWidth) {
    if constexpr (kNative) {
      if (n == kWidth) return {AccVec::loadu(p), AccVec::loadu(p + kHalf)};
      return {AccVec::loadu(p, std::min(n, kHalf)),
              n > kHalf ? AccVec::loadu(p + kHalf, n - kHalf) : AccVec(Acc(0))};
    } else {
      const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(
          n == kWidth ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n));
      return {lo, hi};
    }
  }
  // The first n elements. A partial pair goes through a buffer: masked vector
  // stores are microcoded and slow on AMD's AVX-512 cores.
  static inline void store(scalar_t* p, const Pair& v, int64_t n = kWidth) {
    if constexpr (kNative) {
      if (n == kWidth) {
        v.first.store(p);
        v.second.store(p + kHalf);
      } else {
        v.first.store(p, std::min(n, kHalf));
        if (n > kHalf) v.second.store(p + kHalf, n - kHalf);
      }
    } else {
      at::vec::convert_from_float<scalar_t>(v.first, v.second).store(p, n);
    }
  }
  // A whole pair with streaming stores; p must be stream_aligned.
  static inline void stream(scalar_t* p, const Pair& v) {
    if constexpr (kNative) {
      stream_vector(p, v.first);
      stream_vector(p + kHalf, v.second);
    } else {
      stream_vector(p, at::vec::convert_from_float<scalar_t>(v.first, v.second));
    }
  }
  static inline void prefetch_pair(const scalar_t* p) { prefetch_span(p, kBytes); }
};

// The element count of a whole pair as a type: loop bodies written as generic
// lambdas get a separate instantiation for whole pairs, in which every
// `n == kWidth` test folds away (gcc does not always inline the body).
template <typename scalar_t>
constexpr std::integral_constant<int64_t, VecPair<scalar_t>::kWidth> kFullPair{};

// Vector-lane sums in the accumulation type, folded into one double every
// kRowsPerFold additions (see kRowsPerFold).
template <typename Acc>
struct LaneSum {
  static constexpr int64_t kLanes = 2 * Vectorized<Acc>::size();
  // The double totals live apart from the vectors: gcc keeps a struct of
  // vectors in registers, but not one that also holds an array.
  struct Totals {
    double lanes[kLanes] = {};
    double sum() const {
      double t = 0.0;
      for (double v : lanes) t += v;
      return t;
    }
  };
  Vectorized<Acc> lo{Acc(0)}, hi{Acc(0)};

  void add(const Vectorized<Acc>& a, const Vectorized<Acc>& b) {
    lo = lo + a;
    hi = hi + b;
  }
  void add_product(const Vectorized<Acc>& a, const Vectorized<Acc>& b, const Vectorized<Acc>& c,
                   const Vectorized<Acc>& d) {
    lo = at::vec::fmadd(a, b, lo);
    hi = at::vec::fmadd(c, d, hi);
  }
  // Each lane into its own double total: a float tree-sum of the lanes would
  // round at the scale of the whole fold and cost the mean its last bit, and a
  // single running double total is a chain of dependent adds. This loop
  // vectorizes (float to double conversions and double adds).
  void fold(Totals& totals) {
    Acc lanes[kLanes];
    lo.store(lanes);
    hi.store(lanes + Vectorized<Acc>::size());
    for (int64_t i = 0; i < kLanes; ++i) totals.lanes[i] += static_cast<double>(lanes[i]);
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
  // From Σx summed in double (kSumInDouble) and Σ(x − shift)².
  static Moments from_sum_and_shifted_squares(int64_t count, double shift, double sum, double sum_sq) {
    if (count == 0) return {};
    const double n = static_cast<double>(count);
    const double mean = sum / n;
    const double offset = mean - shift;
    return {count, mean, std::max(sum_sq - n * offset * offset, 0.0)};
  }
  // From the statistics loops' sums: Σx (kSumInDouble) or Σ(x − shift), and Σ(x − shift)².
  template <typename scalar_t>
  static Moments from_sums(int64_t count, double shift, double sum, double sum_sq);
};

// float32 statistics sum x itself in double lanes; the squares keep float
// lanes of x − shift. In float, every x − shift rounds at 2^-24·|x − shift|,
// and over a channel those roundings moved a mean that is small next to the
// spread (N(0, 1) data, mean 0.03) by up to 6 ulps, where nn's CPU kernel
// sums float32 in double and rounds its mean correctly; the backward of a
// cancelling channel (dy constant, two values) and a running_mean near 0
// inherited that error at 3x nn's (tests/test_properties.py). The squares
// need only relative accuracy. bfloat16 and float16: x − shift is exact in
// float and nn sums them in float too. float64 sums in double anyway.
template <typename scalar_t>
constexpr bool kSumInDouble = std::is_same_v<scalar_t, float>;

template <typename scalar_t>
Moments Moments::from_sums(int64_t count, double shift, double sum, double sum_sq) {
  return kSumInDouble<scalar_t> ? from_sum_and_shifted_squares(count, shift, sum, sum_sq)
                                : from_shifted_sums(count, shift, sum, sum_sq);
}

// Σ of float vectors in double lanes (kSumInDouble), four accumulators so a
// pair's four widened halves add in parallel.
struct WideSum {
  using DoubleVec = Vectorized<double>;
  DoubleVec a{0.0}, b{0.0}, c{0.0}, d{0.0};
  void add(const Vectorized<float>& lo, const Vectorized<float>& hi) {
    const auto [lo0, lo1] = widen(lo);
    const auto [hi0, hi1] = widen(hi);
    a = a + lo0;
    b = b + lo1;
    c = c + hi0;
    d = d + hi1;
  }
  // Lane by lane into totals[0..4·DoubleVec::size()), in the pair's lane order.
  void add_lanes_to(double* totals) const {
    constexpr int64_t W = DoubleVec::size();
    (DoubleVec::loadu(totals) + a).store(totals);
    (DoubleVec::loadu(totals + W) + b).store(totals + W);
    (DoubleVec::loadu(totals + 2 * W) + c).store(totals + 2 * W);
    (DoubleVec::loadu(totals + 3 * W) + d).store(totals + 3 * W);
  }
  // Into partials[0..DoubleVec::size()) (ShortPlane's per-channel partials).
  void add_to(double* partials) const {
    (DoubleVec::loadu(partials) + ((a + b) + (c + d))).store(partials);
  }
  double total() const {
    double lanes[DoubleVec::size()];
    ((a + b) + (c + d)).store(lanes);
    double t = 0.0;
    for (double v : lanes) t += v;
    return t;
  }
};

// Sums for the backward reduction: Σg, Σg·(x − mean) and Σ(x − mean), with
// mean the saved (rounded) mean. Σ(x − mean) = n·(x̄ − mean) recovers the
// exact batch mean x̄ (see centered_sum_dy_xmu).
struct GradSums {
  double sum_dy = 0.0;
  double sum_dy_xmu = 0.0;
  double sum_xmu = 0.0;
  void add(const GradSums& other) {
    sum_dy += other.sum_dy;
    sum_dy_xmu += other.sum_dy_xmu;
    sum_xmu += other.sum_xmu;
  }
  // Σg·(x − x̄) over `count` values, x̄ the exact batch mean (training).
  double centered_sum_dy_xmu(int64_t count) const {
    return common::centered_sum_dy_xmu(sum_dy, sum_dy_xmu, sum_xmu, count);
  }
};

// A block's sums from its lanes' sums, except where its g is one value G
// throughout: then Σg = G·count and Σg·(x − mean) = G·Σ(x − mean), in double.
// The lanes round G·count and G·(x − mean) a few ulps away from those, and
// g − Σg/count and centered_sum_dy_xmu would turn the difference into a
// nonzero dx where nn's and the true one are 0: a loss of y.sum() or y.mean()
// gives such a dy. A per-lane flag of g != G (bitwise OR of compare masks)
// tells the blocks apart.
template <typename scalar_t>
inline GradSums block_grad_sums(bool g_constant, const scalar_t* first_dy, int64_t count, double lanes_sum_dy,
                                double lanes_sum_dy_xmu, double sum_xmu) {
  if (!g_constant) return {lanes_sum_dy, lanes_sum_dy_xmu, sum_xmu};
  const double g = static_cast<double>(static_cast<acc_t<scalar_t>>(*first_dy));
  // + 0.0: an all-zero g sums to +0 in the lanes, and so it does here.
  return {g * static_cast<double>(count) + 0.0, g * sum_xmu + 0.0, sum_xmu};
}

// True where no lane of the OR-ed g != G compare masks is set.
template <typename V>
inline bool no_lane_set(const V& flags) {
  return flags.zero_mask() == (1 << V::size()) - 1;
}

// Channels per NHWC tile: two pairs, so a tile's per-channel coefficients and
// accumulators fit the vector registers (4 vectors each).
template <typename scalar_t>
constexpr int64_t kTileWidth = 2 * VecPair<scalar_t>::kWidth;

template <typename scalar_t>
constexpr int64_t padded_channels(int64_t C) {
  return (C + kTileWidth<scalar_t> - 1) / kTileWidth<scalar_t> * kTileWidth<scalar_t>;
}

// Per-thread scratch memory that outlives the call. Temporaries of a few
// hundred KB (the per-block partials) allocated on every call went through
// mmap/munmap or heap trimming, so every call page-faulted them in again and
// the munmaps cost TLB shootdowns on the other core: the 64x512x7x7
// channels_last training forward ran 1.0-1.8 ms instead of 0.15 ms whenever
// glibc's thresholds fell that way. The contents are stale: callers
// initialize what they read. Each use site has its own slot, so buffers live
// at the same time never alias.
enum class ScratchSlot {
  kCoefMean, kCoefScale, kCoefProjection, kCoefShift,
  kBlockMean, kBlockM2, kMean, kM2,
  kBlockShift, kBlockSum1, kBlockSum2, kBlockSum3, kBlockFlags, kBlockFlagLanes,
  kBlockSumDy, kBlockSumDyXmu, kBlockSumXmu, kSumDy, kSumDyXmu, kSumXmu,
  kRunMean, kRunScale, kRunProjection, kRunShift,
  kCoefForwardShift, kRunForwardShift, kStagedRun,
};

template <typename T, ScratchSlot kSlot>
inline T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

template <typename T, ScratchSlot kSlot>
inline T* thread_scratch_filled(int64_t n, T value) {
  T* p = thread_scratch<T, kSlot>(n);
  std::fill(p, p + n, value);
  return p;
}

// Per-channel coefficients of the element passes, in the accumulation type,
// zero-padded to whole NHWC tiles so tile loads of them never need a mask:
//   forward : y  = (x − mean) · scale + shift
//   backward: dx = (g − shift − (x − mean) · projection) · scale, with shift the
//             mean of g and projection Σg·(x − mean) / (n · var): nn's factored
//             form. Expanded into dy · a + (x − mean) · b + c, a gradient that is
//             pure cancellation (dy constant over a channel, or two values per
//             channel) kept the roundings of a and c at the scale of dy and
//             came out at up to 3x nn's error (tests/test_properties.py).
// The forward's mean is the double mean rounded to Acc; the rounding error times
// scale is folded into shift, so the output keeps the double mean's accuracy.
// Forwards with a ReLU instead take their coefficients from the statistics as
// saved (rounded to Acc, shift = bias), which is all their backward sees: it
// recomputes the forward's z from forward_shift, bit for bit (GradMask).
template <typename scalar_t>
struct ChannelCoefs {
  using Acc = acc_t<scalar_t>;
  Acc *mean, *scale, *projection, *shift, *forward_shift;
  explicit ChannelCoefs(int64_t channels) {
    const int64_t padded = padded_channels<scalar_t>(channels);
    mean = thread_scratch_filled<Acc, ScratchSlot::kCoefMean>(padded, Acc(0));
    scale = thread_scratch_filled<Acc, ScratchSlot::kCoefScale>(padded, Acc(0));
    projection = thread_scratch_filled<Acc, ScratchSlot::kCoefProjection>(padded, Acc(0));
    shift = thread_scratch_filled<Acc, ScratchSlot::kCoefShift>(padded, Acc(0));
    forward_shift = thread_scratch_filled<Acc, ScratchSlot::kCoefForwardShift>(padded, Acc(0));
  }
};

// What follows the normalization z = (x − mean) · scale + shift in a forward
// element pass: y = z, y = max(z, 0), or y = max(z + residual, 0).
enum class Epilogue { kNone, kRelu, kAddRelu };

// The gradient the backward passes reduce and scale, g:
//   kNone        : g = dy.
//   kReluOfInput : g = dy where z > 0, z recomputed from x with the forward's
//                  coefficients (ChannelCoefs::forward_shift): the same mask
//                  as the forward's, with no tensor saved for it.
//   kReluOfOutput: g = dy where y > 0, y the forward's output (add+relu: z
//                  there includes the residual). The reduction pass writes g
//                  (it is the residual's gradient) and the dx pass reads it
//                  in place of dy, so dy and y are each read once.
enum class GradMask { kNone, kReluOfInput, kReluOfOutput };

// max(v, 0), NaN kept (as torch.relu).
template <typename V>
inline V relu(const V& v) {
  return at::vec::maximum(v, V(0));
}

// g where z > 0, else 0 (a NaN z gives 0, as relu's backward on a NaN output).
template <typename V>
inline V keep_where_positive(const V& g, const V& z) {
  return V::blendv(V(0), g, z > V(0));
}

// g of one pair under kReluOfInput: dy where (x − mean) · scale + shift > 0.
template <typename scalar_t>
inline typename VecPair<scalar_t>::Pair relu_of_input(const typename VecPair<scalar_t>::Pair& x,
                                                       const typename VecPair<scalar_t>::Pair& dy,
                                                       const Vectorized<acc_t<scalar_t>>& mean,
                                                       const Vectorized<acc_t<scalar_t>>& scale,
                                                       const Vectorized<acc_t<scalar_t>>& shift) {
  return {keep_where_positive(dy.first, at::vec::fmadd(x.first - mean, scale, shift)),
          keep_where_positive(dy.second, at::vec::fmadd(x.second - mean, scale, shift))};
}

// ---------------------------------------------------------------------------
// Shape of the work
// ---------------------------------------------------------------------------

// A batch-norm input viewed as N planes of C channels by HW positions (NCHW),
// or as N*HW rows of C channels (NHWC).
struct Geometry {
  int64_t N, C, HW;
  bool channels_last;
  int64_t per_channel() const { return N * HW; }
  int64_t numel() const { return N * C * HW; }
};

// Rows of `width` elements, `stride` elements apart, with per-column
// coefficients: an NHWC tensor's N·H·W rows of C channels (stride C), or an
// NCHW channel block's N image runs, each the block's planes back to back
// (stride C·H·W; a column is then one position of one channel's plane).
struct Rows {
  int64_t width, stride;
};

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
// Every block costs O(C) beyond its rows (zeroed totals, per-channel moments
// or sums, one more step of the merge), so a block spans at least
// kMinRowsPerBlock rows: with 64 blocks of 49 rows (64x512x7x7), the merge
// alone took 9% of the training forward's CPU time (bench/NOTES.md).
struct RowBlocking {
  static constexpr int64_t kMaxBlocks = 64;
  static constexpr int64_t kMinRowsPerBlock = 256;
  int64_t rows_per_block, blocks;
  RowBlocking(int64_t rows, int64_t C) {
    const int64_t min_rows = std::max<int64_t>(kMinRowsPerBlock, kBlockElements / std::max<int64_t>(C, 1));
    blocks = std::min(kMaxBlocks, std::max<int64_t>(1, (rows + min_rows - 1) / min_rows));
    rows_per_block = (rows + blocks - 1) / blocks;
    blocks = rows == 0 ? 0 : (rows + rows_per_block - 1) / rows_per_block;
  }
  int64_t begin(int64_t b) const { return b * rows_per_block; }
  int64_t end(int64_t b, int64_t rows) const { return std::min(rows, (b + 1) * rows_per_block); }
};

// Channels handled whole by one thread (statistics, then the element pass while
// the channel is still in cache) when there are enough of them to keep every
// thread busy; otherwise blocks of every channel are spread across threads.
inline bool split_channels_across_threads(const Geometry& g) {
  return g.C < 4 * static_cast<int64_t>(at::get_num_threads());
}

// f(i) for i in [0, n), spread over threads; each thread fences its streaming
// stores before the region ends.
template <typename F>
inline void parallel_over(int64_t n, F&& f, int64_t grain = 1) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
    stream_fence();
  });
}

// Whether a tensor of this many elements is larger than `bytes`.
template <typename scalar_t>
inline bool larger_than(int64_t numel, int64_t bytes) {
  return numel * static_cast<int64_t>(sizeof(scalar_t)) > bytes;
}

// ---------------------------------------------------------------------------
// NCHW: reductions over one block and element passes over one plane
// ---------------------------------------------------------------------------

// How nchw_walk goes over one channel's planes: their geometry, whether it
// prefetches (kPrefetchBytes ahead in plane order), and how far it may read.
template <typename scalar_t>
struct PlaneWalk {
  static constexpr int64_t kAhead = kPrefetchBytes / sizeof(scalar_t);
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

// Whether the NCHW passes prefetch (see kCacheResidentBytes). Planes shorter
// than the prefetch distance always do: one channel's planes are only a few
// cache lines each, a page or more apart, so even from L3 every plane is a
// fresh miss the hardware prefetcher never sees coming (7x7 planes inside a
// training step: forward+backward 1.36 -> 1.1 ms for 64x512x7x7). Longer
// planes stream well from L3 and only pay for it once they come from DRAM.
template <typename scalar_t>
inline bool prefetch_planes(const Geometry& g) {
  return g.HW < PlaneWalk<scalar_t>::kAhead || larger_than<scalar_t>(g.numel(), kCacheResidentBytes);
}

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
    lo = lane < AccVec(static_cast<acc_t<scalar_t>>(n));
    hi = (lane + AccVec(static_cast<acc_t<scalar_t>>(IO::kHalf))) < AccVec(static_cast<acc_t<scalar_t>>(n));
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
  using Acc = acc_t<scalar_t>;
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
  acc_t<scalar_t> scale = 0, forward_shift = 0;  // kReluOfInput
  const scalar_t* output = nullptr;              // kReluOfOutput: read
  scalar_t* grad = nullptr;                      // kReluOfOutput: g written
};

// g for the pair at `at` under kMask (see GradMask); writes it out for
// kReluOfOutput (the first n lanes).
template <typename scalar_t, GradMask kMask, typename N>
__attribute__((always_inline)) inline typename VecPair<scalar_t>::Pair masked_grad(
    const ChannelMask<scalar_t>& mask, const typename VecPair<scalar_t>::Pair& x,
    const typename VecPair<scalar_t>::Pair& dy, const Vectorized<acc_t<scalar_t>>& mean, int64_t at, N n,
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
                              const PlaneWalk<scalar_t>& walk, acc_t<scalar_t> mean,
                              const ChannelMask<scalar_t>& mask,
                              int64_t n_begin, int64_t n_end, int64_t hw_begin, int64_t hw_end) {
  using Acc = acc_t<scalar_t>;
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
// out of line and reloaded the coefficients every iteration (35% slower for
// bfloat16). Whole pairs are streamed when asked and the output is aligned.
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
                   int64_t writable, acc_t<scalar_t> mean, acc_t<scalar_t> scale, acc_t<scalar_t> shift,
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
               int64_t writable, acc_t<scalar_t> mean, acc_t<scalar_t> scale, acc_t<scalar_t> forward_shift, bool stream) {
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
                    int64_t readable, int64_t writable, acc_t<scalar_t> mean, acc_t<scalar_t> scale, acc_t<scalar_t> projection,
                    acc_t<scalar_t> shift, acc_t<scalar_t> forward_shift, bool stream) {
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

// ---------------------------------------------------------------------------
// NCHW with short planes: channel blocks walked image by image
// ---------------------------------------------------------------------------

// One channel's planes of a few cache lines each lie C·H·W elements apart:
// walked a channel at a time they are a gather the hardware prefetcher cannot
// follow (64x512x7x7 training forward, one thread: 0.73 ns per element from
// L3 against 0.42 from L2). A block of consecutive channels is walked image by
// image instead: one image's planes of the block are a single contiguous run,
// and the block, over all images, stays in L2 for the pass that re-reads it.
struct ChannelBlocking {
  int64_t per_block, blocks;
  // reread_bytes: bytes per element of the tensors the second pass re-reads.
  ChannelBlocking(const Geometry& g, int64_t reread_bytes) {
    const int64_t channel_bytes = std::max<int64_t>(1, g.N * g.HW * reread_bytes);
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t wanted = (g.C * channel_bytes + kChannelBlockBytes - 1) / kChannelBlockBytes;
    // A whole number of blocks per thread: the last thread is not left a
    // block behind.
    wanted = std::max<int64_t>(1, (wanted + threads - 1) / threads) * threads;
    per_block = std::max<int64_t>(1, (g.C + wanted - 1) / wanted);
    // Few images make wide runs, and RunCoefs' per-column scratch would then
    // outweigh the block's data: the run is capped.
    per_block = std::min(per_block, std::max<int64_t>(1, kMaxRunColumns / std::max<int64_t>(g.HW, 1)));
    blocks = (g.C + per_block - 1) / per_block;
  }
  int64_t begin(int64_t b) const { return b * per_block; }
  int64_t end(int64_t b, int64_t C) const { return std::min(C, (b + 1) * per_block); }
  // Block b as rows (see Rows), from the block's first plane in image 0.
  Rows run(const Geometry& g, int64_t b) const { return {(end(b, g.C) - begin(b)) * g.HW, g.C * g.HW}; }
};

// A channel block's coefficients per column of its image run: each channel's
// repeated over the H·W positions of its plane (see ChannelCoefs).
template <typename scalar_t>
struct RunCoefs {
  using Acc = acc_t<scalar_t>;
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

template <typename scalar_t>
inline bool walks_channel_blocks(const Geometry& g) {
  return !g.channels_last && g.numel() > 0 &&
         g.HW * static_cast<int64_t>(sizeof(scalar_t)) <= kShortPlaneBytes &&
         !split_channels_across_threads(g);
}

// Calls step(c, n) for every plane of channels [c0, c1), image by image: the
// order both passes of a channel block take.
template <typename F>
__attribute__((always_inline)) inline void for_block_planes(const Geometry& g, int64_t c0, int64_t c1, F&& step) {
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t c = c0; c < c1; ++c) step(c, n);
  }
}

// How the element pass of a channel block goes: plane by plane (normalize_run,
// grad_input_run), or as the block's image runs in pieces of kRowsPerFold
// runs by one tile (normalize_rows, grad_input_rows over RunCoefs), with no
// tail at each plane's end. Runs were 20% faster for bfloat16 (64x512x7x7
// forward+backward 0.61 -> 0.48 ms: a plane of 49 fills 49 of 64 lanes, and
// each tail converts through a buffer) and 5-10% slower for float32, whose
// 16 strided runs at once cost more in L1 than the tails do (bench/NOTES.md).
template <typename scalar_t>
constexpr bool kPlanesOneByOne = VecPair<scalar_t>::kNative;

// Whether a training pass streams its output in place (kTrainingStreamBytes).
// Not on the channel-block path: a short plane starts on a streamable (64-byte)
// boundary only every few planes (fp32 14x14: one in four; 7x7: one in
// sixteen), so its output would go out as a mix of streamed and ordinary
// lines, which measured slower than ordinary stores alone (bench/NOTES.md).
// That path stages its runs instead (stages_training_output).
template <typename scalar_t>
inline bool streams_training_output(const Geometry& g) {
  return larger_than<scalar_t>(g.numel(), kTrainingStreamBytes) && !walks_channel_blocks<scalar_t>(g);
}

// The channel-block path's planes-one-by-one element passes (kPlanesOneByOne)
// stream a large training output through StagedRun instead: each image's run
// of the block's planes is computed into an L1 buffer and copied out in whole
// lines. Stored in place, every line of the cold output buffer was read for
// ownership and written back later: fp32 forward+backward steps of
// 32x256x14x14 and 64x512x7x7 ran 0.63-0.73 and 0.90 ms against 0.49-0.50 and
// 0.67 ms staged (bench/NOTES.md).
template <typename scalar_t>
inline bool stages_training_output(const Geometry& g) {
  return kPlanesOneByOne<scalar_t> && larger_than<scalar_t>(g.numel(), kTrainingStreamBytes) &&
         walks_channel_blocks<scalar_t>(g);
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
  // each plane (7x7 backward 0.30 -> 0.40 ms).
  using DoubleVec = Vectorized<double>;
  static constexpr int64_t kPartials = DoubleVec::size();
  static void add_lanes(const AccVec& lo, const AccVec& hi, double* partials) {
    DoubleVec p = DoubleVec::loadu(partials);
    if constexpr (std::is_same_v<acc_t<scalar_t>, double>) {
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
    const scalar_t* x, int64_t offset, const ShortPlane<scalar_t>& plane, acc_t<scalar_t> shift,
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
// g_differs (see block_grad_sums); the mask's pointers are the tensors' bases.
template <typename scalar_t, GradMask kMask>
__attribute__((always_inline)) inline void short_plane_grad_sums(
    const scalar_t* x, const scalar_t* dy, int64_t offset, const ShortPlane<scalar_t>& plane,
    acc_t<scalar_t> mean, acc_t<scalar_t> first_dy, const ChannelMask<scalar_t>& mask, double* sum_dy,
    double* sum_dy_xmu, double* sum_xmu, unsigned char* g_differs) {
  using IO = VecPair<scalar_t>;
  using AccVec = typename IO::AccVec;
  using Pair = typename IO::Pair;
  const AccVec mean_vec(mean), first_dy_vec(first_dy);
  AccVec g_lo(0), g_hi(0), p_lo(0), p_hi(0), m_lo(0), m_hi(0), differs(0);
  plane.walk(offset, [&](int64_t at, auto n, bool whole) __attribute__((always_inline)) {
    const Pair x_pair = whole ? IO::load(x + at) : IO::load(x + at, n);
    return std::pair<Pair, Pair>{
        x_pair, masked_grad<scalar_t, kMask>(mask, x_pair, whole ? IO::load(dy + at) : IO::load(dy + at, n),
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

// ---------------------------------------------------------------------------
// Rows (NHWC, and NCHW channel blocks' element passes), walked tile by tile
// ---------------------------------------------------------------------------

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
  static inline Tile zip(F&& f, const Tiles&... t) {
    return {f(t.v0...), f(t.v1...), f(t.v2...), f(t.v3...)};
  }
  static inline Tile zero() {
    const AccVec z(acc_t<scalar_t>(0));
    return {z, z, z, z};
  }
  // The first n columns (n <= kWidth); the rest read as zero, and a second
  // pair with no columns is not loaded at all.
  static inline Tile load(const scalar_t* p, int64_t n) {
    Tile t;
    if (n == kWidth) {
      std::tie(t.v0, t.v1) = IO::load(p);
      std::tie(t.v2, t.v3) = IO::load(p + IO::kWidth);
    } else {
      std::tie(t.v0, t.v1) = IO::load(p, std::min(n, IO::kWidth));
      if (n > IO::kWidth) {
        std::tie(t.v2, t.v3) = IO::load(p + IO::kWidth, n - IO::kWidth);
      } else {
        t.v2 = t.v3 = AccVec(acc_t<scalar_t>(0));
      }
    }
    return t;
  }
  // Per-column coefficients from a padded array.
  static inline Tile coefs(const acc_t<scalar_t>* p) {
    constexpr int64_t W = AccVec::size();
    return {AccVec::loadu(p), AccVec::loadu(p + W), AccVec::loadu(p + 2 * W), AccVec::loadu(p + 3 * W)};
  }
  // The inverse of coefs.
  inline void store_coefs(acc_t<scalar_t>* p) const {
    constexpr int64_t W = AccVec::size();
    v0.store(p);
    v1.store(p + W);
    v2.store(p + 2 * W);
    v3.store(p + 3 * W);
  }
  inline void store(scalar_t* p, int64_t n, bool stream) const {
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
  inline void fold_into(double* totals) const {
    constexpr int64_t W = AccVec::size();
    acc_t<scalar_t> lanes[kWidth];
    v0.store(lanes);
    v1.store(lanes + W);
    v2.store(lanes + 2 * W);
    v3.store(lanes + 3 * W);
    for (int64_t i = 0; i < kWidth; ++i) totals[i] += static_cast<double>(lanes[i]);
  }
};

// g of a tile under kMask (see GradMask, masked_grad); per-column coefficients
// from k at column c0, output and grad at element offset `at`.
template <typename scalar_t, GradMask kMask, typename Coefs>
__attribute__((always_inline)) inline Tile<scalar_t> masked_grad_tile(const Coefs& k, int64_t c0,
                                                                      const Tile<scalar_t>& x,
                                                                      const Tile<scalar_t>& dy,
                                                                      const Tile<scalar_t>& mean,
                                                                      const scalar_t* output, scalar_t* grad,
                                                                      int64_t at, int64_t n) {
  using T = Tile<scalar_t>;
  if constexpr (kMask == GradMask::kReluOfInput) {
    const T sc = T::coefs(k.scale + c0), fs = T::coefs(k.forward_shift + c0);
    return T::zip([](auto g, auto xx, auto mm, auto s_, auto h) {
      return keep_where_positive(g, at::vec::fmadd(xx - mm, s_, h));
    }, dy, x, mean, sc, fs);
  } else if constexpr (kMask == GradMask::kReluOfOutput) {
    const T g = T::zip([](auto d, auto y) { return keep_where_positive(d, y); }, dy, T::load(output + at, n));
    g.store(grad + at, n, /*stream=*/false);
    return g;
  } else {
    return dy;
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

// Per-channel mean and M2 of rows [row_begin, row_end), written to
// mean_out[0..C) and m2_out[0..C) (structure of arrays: see merge_row_blocks).
template <typename scalar_t>
void nhwc_block_moments(const scalar_t* x, int64_t C, int64_t row_begin, int64_t row_end,
                        double* mean_out, double* m2_out) {
  using Acc = acc_t<scalar_t>;
  using T = Tile<scalar_t>;
  const int64_t padded = padded_channels<scalar_t>(C);
  Acc* shift = thread_scratch_filled<Acc, ScratchSlot::kBlockShift>(padded, Acc(0));
  double* total = thread_scratch_filled<double, ScratchSlot::kBlockSum1>(padded, 0.0);
  double* total_sq = thread_scratch_filled<double, ScratchSlot::kBlockSum2>(padded, 0.0);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<Acc>(x[row_begin * C + c]);
  rows_walk<scalar_t>(Rows{C, C}, row_begin, row_end, false, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
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
  for (int64_t c = 0; c < C; ++c) {
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

// Per-channel GradSums of rows [row_begin, row_end), as structure of arrays
// (see merge_row_blocks); mean is padded to whole tiles.
// (g of GradMask: kReluOfOutput reads `output` and writes g to `grad`, both
// laid out as x.) A non-null eval_dx also gets eval's dx = g · k.scale in the
// same pass (eval's dx needs no sums; k.scale set beforehand).
template <typename scalar_t, GradMask kMask>
void nhwc_block_grad_sums(const scalar_t* x, const scalar_t* dy, int64_t C,
                          const ChannelCoefs<scalar_t>& k, const scalar_t* output, scalar_t* grad,
                          int64_t row_begin, int64_t row_end,
                          double* sum_dy_out, double* sum_dy_xmu_out, double* sum_xmu_out,
                          scalar_t* eval_dx = nullptr, bool stream_dx = false) {
  using Acc = acc_t<scalar_t>;
  using T = Tile<scalar_t>;
  const int64_t padded = padded_channels<scalar_t>(C);
  double* sum_dy = thread_scratch_filled<double, ScratchSlot::kBlockSum1>(padded, 0.0);
  double* sum_dy_xmu = thread_scratch_filled<double, ScratchSlot::kBlockSum2>(padded, 0.0);
  double* sum_xmu = thread_scratch_filled<double, ScratchSlot::kBlockSum3>(padded, 0.0);
  // g != the block's first dy, OR-ed per column (see block_sum_dy_xmu).
  Acc* first_dy = thread_scratch_filled<Acc, ScratchSlot::kBlockShift>(padded, Acc(0));
  Acc* differs = thread_scratch_filled<Acc, ScratchSlot::kBlockFlagLanes>(padded, Acc(0));
  for (int64_t c = 0; c < C; ++c) first_dy[c] = static_cast<Acc>(dy[row_begin * C + c]);
  rows_walk<scalar_t>(Rows{C, C}, row_begin, row_end, false, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
    const T m = T::coefs(k.mean + c0), g0 = T::coefs(first_dy + c0);
    T s_dy = T::zero(), s_dy_xmu = T::zero(), s_xmu = T::zero(), d = T::zero();
    for (int64_t r = r0; r < r1; ++r) {
      const T tx = T::load(x + r * C + c0, n);
      const T tg = masked_grad_tile<scalar_t, kMask>(k, c0, tx, T::load(dy + r * C + c0, n), m, output, grad,
                                                     r * C + c0, n);
      if (eval_dx) {
        T::zip([](auto g, auto s_) { return g * s_; }, tg, T::coefs(k.scale + c0))
            .store(eval_dx + r * C + c0, n, stream_dx);
      }
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
  for (int64_t c = 0; c < C; ++c) {
    Acc flag = differs[c];
    unsigned char bits[sizeof(Acc)];
    std::memcpy(bits, &flag, sizeof(Acc));
    const bool g_constant = std::all_of(bits, bits + sizeof(Acc), [](unsigned char b) { return b == 0; });
    const GradSums s = block_grad_sums(g_constant, dy + row_begin * C + c, row_end - row_begin, sum_dy[c],
                                       sum_dy_xmu[c], sum_xmu[c]);
    sum_dy_out[c] = s.sum_dy;
    sum_dy_xmu_out[c] = s.sum_dy_xmu;
    sum_xmu_out[c] = s.sum_xmu;
  }
}

// y = epilogue((x − mean) · scale + shift) over rows [row_begin, row_end); k
// holds per-column coefficients (ChannelCoefs or RunCoefs); the residual
// (kAddRelu) is laid out as x.
template <typename scalar_t, Epilogue kEpilogue, typename Coefs>
void normalize_rows(const scalar_t* x, const scalar_t* residual, scalar_t* y, const Rows& rows,
                    int64_t row_begin, int64_t row_end, const Coefs& k, bool stream, bool reversed) {
  using T = Tile<scalar_t>;
  rows_walk<scalar_t>(rows, row_begin, row_end, reversed, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
    const T m = T::coefs(k.mean + c0), sc = T::coefs(k.scale + c0),
            sh = T::coefs(k.shift + c0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t at = r * rows.stride + c0;
      T z = T::zip([](auto xx, auto mm, auto s_, auto h) { return at::vec::fmadd(xx - mm, s_, h); },
                   T::load(x + at, n), m, sc, sh);
      if constexpr (kEpilogue == Epilogue::kRelu) {
        z = T::zip([](auto v) { return relu(v); }, z);
      } else if constexpr (kEpilogue == Epilogue::kAddRelu) {
        z = T::zip([](auto v, auto res) { return relu(v + res); }, z, T::load(residual + at, n));
      }
      z.store(y + at, n, stream);
    }
  });
}

// Training's dx = (g − shift − (x − mean) · projection) · scale (see ChannelCoefs), or eval's g · scale,
// with g = dy under kMask (kNone or kReluOfInput).
template <typename scalar_t, GradMask kMask, typename Coefs>
void grad_input_rows(const scalar_t* x, const scalar_t* dy, scalar_t* dx, const Rows& rows,
                     int64_t row_begin, int64_t row_end, const Coefs& k,
                     bool training, bool stream, bool reversed) {
  static_assert(kMask != GradMask::kReluOfOutput, "the reduction pass writes that g; pass it as dy");
  using T = Tile<scalar_t>;
  rows_walk<scalar_t>(rows, row_begin, row_end, reversed, [&](int64_t r0, int64_t r1, int64_t c0, int64_t n) {
    const T sc = T::coefs(k.scale + c0), m = T::coefs(k.mean + c0);
    auto grad = [&](int64_t at, const T& tx) __attribute__((always_inline)) {
      return masked_grad_tile<scalar_t, kMask>(k, c0, tx, T::load(dy + at, n), m, nullptr, nullptr, at, n);
    };
    if (!training) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t at = r * rows.stride + c0;
        const T tx = kMask == GradMask::kReluOfInput ? T::load(x + at, n) : T::zero();
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

// Streaming stores of NHWC tiles need every row to start aligned.
template <typename scalar_t>
inline bool rows_stream_aligned(const scalar_t* out, int64_t C) {
  return stream_aligned(out) && (C * static_cast<int64_t>(sizeof(scalar_t))) % kStreamAlignment == 0;
}

// Rows per parallel task of an NHWC element pass.
inline int64_t row_grain(int64_t C) {
  return std::max<int64_t>(kRowsPerFold, kBlockElements / std::max<int64_t>(C, 1));
}

// ---------------------------------------------------------------------------
// Per-channel statistics, shared by the training forward and batch_stats
// ---------------------------------------------------------------------------

// Moments of every channel of N·H·W rows of C channels: on_channels(c_begin,
// c_end, mean, m2) is called, from several threads, for disjoint channel ranges
// with mean[c] and m2[c] final for those channels.
template <typename scalar_t, typename F>
void nhwc_channel_moments(const scalar_t* x, int64_t rows, int64_t C, F&& on_channels) {
  const RowBlocking rb(rows, C);
  double* block_mean = thread_scratch<double, ScratchSlot::kBlockMean>(rb.blocks * C);
  double* block_m2 = thread_scratch<double, ScratchSlot::kBlockM2>(rb.blocks * C);
  double* mean = thread_scratch<double, ScratchSlot::kMean>(C);
  double* m2 = thread_scratch<double, ScratchSlot::kM2>(C);
  parallel_over(rb.blocks, [&](int64_t b) {
    nhwc_block_moments(x, C, rb.begin(b), rb.end(b, rows), block_mean + b * C, block_m2 + b * C);
  });
  at::parallel_for(0, C, kMergeGrain, [&](int64_t c_begin, int64_t c_end) {
    merge_row_blocks(rb, rows, C, block_mean, block_m2, c_begin, c_end, mean, m2);
    on_channels(c_begin, c_end, mean, m2);
  });
}

// Moments of channels [c0, c1) of an NCHW input with short planes, walked as
// one channel block (ChannelBlocking) on the calling thread; on_channel(c, m)
// for each.
template <typename scalar_t, typename F>
void channel_block_moments(const scalar_t* x, const Geometry& g, int64_t c0, int64_t c1, F&& on_channel) {
  using Acc = acc_t<scalar_t>;
  const int64_t N = g.N, C = g.C, HW = g.HW;
  const ShortPlane<scalar_t> plane(HW, g.numel());
  constexpr int64_t P = ShortPlane<scalar_t>::kPartials;
  double* sum = thread_scratch_filled<double, ScratchSlot::kBlockSum1>((c1 - c0) * P, 0.0);
  double* sum_sq = thread_scratch_filled<double, ScratchSlot::kBlockSum2>((c1 - c0) * P, 0.0);
  Acc* shift = thread_scratch<Acc, ScratchSlot::kBlockShift>(c1 - c0);
  for (int64_t c = c0; c < c1; ++c) shift[c - c0] = static_cast<Acc>(x[c * HW]);
  for_block_planes(g, c0, c1, [&](int64_t c, int64_t n) {
    if (n + 1 < N) plane.prefetch(x + ((n + 1) * C + c) * HW);
    short_plane_moment_sums(x, (n * C + c) * HW, plane, shift[c - c0], sum + (c - c0) * P, sum_sq + (c - c0) * P);
  });
  for (int64_t c = c0; c < c1; ++c) {
    on_channel(c, Moments::from_sums<scalar_t>(N * HW, shift[c - c0], ShortPlane<scalar_t>::total(sum + (c - c0) * P),
                                               ShortPlane<scalar_t>::total(sum_sq + (c - c0) * P)));
  }
}

// Moments of NCHW channel c on the calling thread, block by block (PlaneBlocking).
template <typename scalar_t>
Moments nchw_channel_moments(const scalar_t* x, const Geometry& g, int64_t c) {
  const PlaneBlocking pb(g.N, g.HW);
  const PlaneWalk<scalar_t> walk{g.HW, g.C * g.HW, prefetch_planes<scalar_t>(g), g.numel()};
  Moments m;
  for (int64_t b = 0; b < pb.blocks; ++b) {
    int64_t n0, n1, h0, h1;
    pb.range(b, g.N, g.HW, n0, n1, h0, h1);
    m.merge(nchw_block_moments(x + c * g.HW, walk.for_channel(c), n0, n1, h0, h1));
  }
  return m;
}

// Moments of every NCHW channel with each channel's blocks spread over the
// threads (few channels); on_channel(c, m) on the calling thread, in order.
template <typename scalar_t, typename F>
void split_channel_moments(const scalar_t* x, const Geometry& g, F&& on_channel) {
  const PlaneBlocking pb(g.N, g.HW);
  const PlaneWalk<scalar_t> walk{g.HW, g.C * g.HW, prefetch_planes<scalar_t>(g), g.numel()};
  std::vector<Moments> partial(g.C * pb.blocks);
  parallel_over(g.C * pb.blocks, [&](int64_t i) {
    const int64_t c = i / pb.blocks;
    int64_t n0, n1, h0, h1;
    pb.range(i % pb.blocks, g.N, g.HW, n0, n1, h0, h1);
    partial[i] = nchw_block_moments(x + c * g.HW, walk.for_channel(c), n0, n1, h0, h1);
  });
  for (int64_t c = 0; c < g.C; ++c) {
    Moments m;
    for (int64_t b = 0; b < pb.blocks; ++b) m.merge(partial[c * pb.blocks + b]);
    on_channel(c, m);
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

// Normalize coefficients of channel c from a double mean and invstd.
template <typename scalar_t, typename param_t>
void set_normalize_coefs(int64_t c, double mean, double invstd, const ChannelTensors<param_t>& t,
                         ChannelCoefs<scalar_t>& k) {
  using Acc = acc_t<scalar_t>;
  const double scale = invstd * param_or(t.weight, c, 1.0);
  const Acc mean_rounded = static_cast<Acc>(mean);
  k.mean[c] = mean_rounded;
  k.scale[c] = static_cast<Acc>(scale);
  k.shift[c] = static_cast<Acc>(param_or(t.bias, c, 0.0) -
                                (mean - static_cast<double>(mean_rounded)) * scale);
}

// Finalizes channel c from its moments: saved statistics, running-statistics
// update, and the normalize coefficients (from the saved statistics with a
// ReLU epilogue: see ChannelCoefs).
template <typename scalar_t, typename param_t>
void finalize_channel_stats(int64_t c, const Moments& m, const ChannelTensors<param_t>& t,
                            double factor, double eps, acc_t<scalar_t>* save_mean,
                            acc_t<scalar_t>* save_invstd, bool coefs_from_saved, ChannelCoefs<scalar_t>& k) {
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
  if (coefs_from_saved) {
    set_normalize_coefs<scalar_t>(c, static_cast<double>(save_mean[c]), static_cast<double>(save_invstd[c]), t, k);
  } else {
    set_normalize_coefs<scalar_t>(c, m.mean, invstd, t, k);
  }
}

// y = epilogue(batch_norm(x)); `residual` (kAddRelu only) is laid out as x.
template <typename scalar_t, typename param_t, Epilogue kEpilogue>
void train_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, const Geometry& g,
                   const ChannelTensors<param_t>& t, double factor, double eps, acc_t<scalar_t>* save_mean,
                   acc_t<scalar_t>* save_invstd) {
  constexpr bool kFromSaved = kEpilogue != Epilogue::kNone;
  const int64_t N = g.N, C = g.C, HW = g.HW;
  ChannelCoefs<scalar_t> k(C);
  const bool stream = streams_training_output<scalar_t>(g);
  const bool staged = stages_training_output<scalar_t>(g);

  if (g.channels_last) {
    const int64_t rows = N * HW;
    nhwc_channel_moments(x, rows, C, [&](int64_t c_begin, int64_t c_end, const double* mean, const double* m2) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        finalize_channel_stats<scalar_t>(c, Moments{rows, mean[c], m2[c]}, t, factor, eps, save_mean,
                                         save_invstd, kFromSaved, k);
      }
    });
    const bool stream_rows = stream && rows_stream_aligned(y, C);
    at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
      normalize_rows<scalar_t, kEpilogue>(x, residual, y, Rows{C, C}, begin, end, k, stream_rows,
                                          /*reversed=*/true);
      stream_fence();
    });
    return;
  }

  // Plane (c, n)'s y into dst, `writable` elements from it (streamed when
  // `stream_dst`).
  auto normalize_plane_into = [&](int64_t c, int64_t n, scalar_t* dst, int64_t writable, bool stream_dst) {
    const int64_t offset = n * C * HW + c * HW;
    normalize_run<scalar_t, kEpilogue>(x + offset, residual + offset, dst, HW, g.numel() - offset, writable,
                                       k.mean[c], k.scale[c], k.shift[c], stream_dst);
  };
  auto normalize_plane = [&](int64_t c, int64_t n) {
    normalize_plane_into(c, n, y + n * C * HW + c * HW, HW, stream);
  };

  if (walks_channel_blocks<scalar_t>(g)) {
    const ChannelBlocking cb(g, sizeof(scalar_t));
    parallel_over(cb.blocks, [&](int64_t b) {
      const int64_t c0 = cb.begin(b), c1 = cb.end(b, C);
      channel_block_moments(x, g, c0, c1, [&](int64_t c, const Moments& m) {
        finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd, kFromSaved, k);
      });
      if constexpr (kPlanesOneByOne<scalar_t>) {
        for_block_planes_into(g, c0, c1, y, staged, [&](int64_t c, int64_t n, scalar_t* dst, int64_t writable) {
          normalize_plane_into(c, n, dst, writable, /*stream_dst=*/false);
        });
        if (staged) stream_fence();
      } else {
        normalize_rows<scalar_t, kEpilogue>(x + c0 * HW, residual + c0 * HW, y + c0 * HW, cb.run(g, b), 0, N,
                                            RunCoefs<scalar_t>(k, c0, c1, HW), stream, /*reversed=*/false);
      }
    });
    return;
  }
  if (!split_channels_across_threads(g)) {
    parallel_over(C, [&](int64_t c) {
      const Moments m = nchw_channel_moments(x, g, c);
      finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd, kFromSaved, k);
      for (int64_t n = 0; n < N; ++n) normalize_plane(c, n);
    });
    return;
  }
  split_channel_moments(x, g, [&](int64_t c, const Moments& m) {
    finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd, kFromSaved, k);
  });
  parallel_over(C * N, [&](int64_t i) { normalize_plane(i / N, i % N); });
}

// The inverse standard deviation eval normalizes with. Its backward gets the
// same value rounded to Acc (fused_bn/_autograd.py computes it the same way), and a
// ReLU epilogue normalizes with that rounded value too, so the backward's
// recomputed mask is the forward's (ChannelCoefs).
inline double eval_invstd(double running_var, double eps) { return 1.0 / std::sqrt(running_var + eps); }

// The element pass y = epilogue((x − mean) · scale + shift) over the whole
// input with fixed coefficients (eval, and training with statistics from
// elsewhere: batch_norm_train_with_stats).
template <typename scalar_t, Epilogue kEpilogue>
void normalize(const scalar_t* x, const scalar_t* residual, scalar_t* y, const Geometry& g,
               const ChannelCoefs<scalar_t>& k, bool stream) {
  const int64_t N = g.N, C = g.C, HW = g.HW;
  if (g.channels_last) {
    const bool stream_rows = stream && rows_stream_aligned(y, C);
    at::parallel_for(0, N * HW, row_grain(C), [&](int64_t begin, int64_t end) {
      normalize_rows<scalar_t, kEpilogue>(x, residual, y, Rows{C, C}, begin, end, k, stream_rows,
                                          /*reversed=*/false);
      stream_fence();
    });
    return;
  }
  if (!kPlanesOneByOne<scalar_t> && walks_channel_blocks<scalar_t>(g) && HW < 4 * VecPair<scalar_t>::kWidth) {
    // As the training element pass (kPlanesOneByOne), for planes under four
    // pairs: bf16 64x512x7x7 eval 0.125 -> 0.091 ms, but 32x256x14x14 (six
    // whole pairs a plane) 0.081 -> 0.095, where the memory-order walk below
    // wins. Runs start anywhere, so nothing is streamed.
    const ChannelBlocking cb(g, sizeof(scalar_t));
    parallel_over(cb.blocks, [&](int64_t b) {
      const int64_t c0 = cb.begin(b), c1 = cb.end(b, C);
      normalize_rows<scalar_t, kEpilogue>(x + c0 * HW, residual + c0 * HW, y + c0 * HW, cb.run(g, b), 0, N,
                                          RunCoefs<scalar_t>(k, c0, c1, HW), /*stream=*/false, /*reversed=*/false);
    });
    return;
  }
  // Planes in memory order, each thread a contiguous range of them: a plane's
  // tail may be stored whole over the start of the next one (FUSED_BN_RUN_LOOP).
  at::parallel_for(0, N * C, std::max<int64_t>(1, kBlockElements / std::max<int64_t>(HW, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i % C;
      normalize_run<scalar_t, kEpilogue>(x + i * HW, residual + i * HW, y + i * HW, HW, g.numel() - i * HW,
                                         (end - i) * HW, k.mean[c], k.scale[c], k.shift[c], stream);
    }
    stream_fence();
  });
}

template <typename scalar_t, typename param_t, Epilogue kEpilogue>
void eval_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, const Geometry& g,
                  const ChannelTensors<param_t>& t, double eps) {
  using Acc = acc_t<scalar_t>;
  const int64_t C = g.C;
  ChannelCoefs<scalar_t> k(C);
  for (int64_t c = 0; c < C; ++c) {
    double mean = static_cast<double>(t.running_mean[c]);
    double invstd = eval_invstd(static_cast<double>(t.running_var[c]), eps);
    if constexpr (kEpilogue != Epilogue::kNone) {
      mean = static_cast<double>(static_cast<Acc>(mean));
      invstd = static_cast<double>(static_cast<Acc>(invstd));
    }
    set_normalize_coefs<scalar_t>(c, mean, invstd, t, k);
  }
  normalize<scalar_t, kEpilogue>(x, residual, y, g, k, larger_than<scalar_t>(g.numel(), kCacheResidentBytes));
}

// ---------------------------------------------------------------------------
// Data parallel (FusedSyncBatchNorm2d): statistics exchanged between ranks
// ---------------------------------------------------------------------------

// One channel's moments as the ops exchange them: three doubles (count, mean,
// M2), so a rank's statistics are one [C, 3] float64 tensor and all ranks'
// one all_gather.
constexpr int64_t kExchangedMoments = 3;

// Per-channel count, mean and M2 of x into out[C][3].
template <typename scalar_t>
void batch_stats(const scalar_t* x, const Geometry& g, double* out) {
  auto store = [&](int64_t c, const Moments& m) {
    out[c * kExchangedMoments] = static_cast<double>(m.count);
    out[c * kExchangedMoments + 1] = m.mean;
    out[c * kExchangedMoments + 2] = m.m2;
  };
  if (g.per_channel() == 0) {
    for (int64_t c = 0; c < g.C; ++c) store(c, Moments{});
  } else if (g.channels_last) {
    const int64_t rows = g.per_channel();
    nhwc_channel_moments(x, rows, g.C, [&](int64_t c_begin, int64_t c_end, const double* mean, const double* m2) {
      for (int64_t c = c_begin; c < c_end; ++c) store(c, Moments{rows, mean[c], m2[c]});
    });
  } else if (walks_channel_blocks<scalar_t>(g)) {
    const ChannelBlocking cb(g, sizeof(scalar_t));
    parallel_over(cb.blocks, [&](int64_t b) { channel_block_moments(x, g, cb.begin(b), cb.end(b, g.C), store); });
  } else {
    split_channel_moments(x, g, store);
  }
}

// The training forward with statistics gathered from `ranks` ranks
// (all_stats[ranks][C][3], as batch_stats writes them): the ranks' moments
// merge in rank order (Chan's formula, as within a rank), so every rank
// computes the same statistics and running-statistics update, bit for bit.
template <typename scalar_t, typename param_t, Epilogue kEpilogue>
void train_forward_with_stats(const scalar_t* x, scalar_t* y, const Geometry& g, const ChannelTensors<param_t>& t,
                              double factor, double eps, const double* all_stats, int64_t ranks,
                              acc_t<scalar_t>* save_mean, acc_t<scalar_t>* save_invstd) {
  ChannelCoefs<scalar_t> k(g.C);
  for (int64_t c = 0; c < g.C; ++c) {
    Moments m;
    for (int64_t r = 0; r < ranks; ++r) {
      const double* rank_stats = all_stats + (r * g.C + c) * kExchangedMoments;
      m.merge(Moments{static_cast<int64_t>(rank_stats[0]), rank_stats[1], rank_stats[2]});
    }
    finalize_channel_stats<scalar_t>(c, m, t, factor, eps, save_mean, save_invstd,
                                     /*coefs_from_saved=*/kEpilogue != Epilogue::kNone, k);
  }
  normalize<scalar_t, kEpilogue>(x, nullptr, y, g, k, streams_training_output<scalar_t>(g));
}

// Outputs of the backward op (null where the output mask is false).
// grad_residual is kReluOfOutput's g, written always under that mask.
template <typename scalar_t, typename param_t>
struct BackwardOutputs {
  scalar_t* grad_input = nullptr;
  param_t* grad_weight = nullptr;
  param_t* grad_bias = nullptr;
  scalar_t* grad_residual = nullptr;
};

// The backward's scale, w · invstd: also the ReLU forward's scale (set_normalize_coefs
// from the saved invstd), which kReluOfInput's recomputed mask relies on.
template <typename scalar_t, typename param_t>
inline acc_t<scalar_t> backward_scale(const param_t* weight, const acc_t<scalar_t>* invstd, int64_t c) {
  return static_cast<acc_t<scalar_t>>(param_or(weight, c, 1.0) * static_cast<double>(invstd[c]));
}

// Backward coefficients of channel c from its sums (see ChannelCoefs); k.mean
// is already set.
template <typename scalar_t, typename param_t>
void finalize_channel_grads(int64_t c, const GradSums& s, int64_t count, bool training, bool centered,
                            const param_t* weight, const acc_t<scalar_t>* invstd,
                            const BackwardOutputs<scalar_t, param_t>& out, ChannelCoefs<scalar_t>& k) {
  using Acc = acc_t<scalar_t>;
  const double istd = static_cast<double>(invstd[c]);
  // Σg·(x − x̄) needs every value's sums: a rank's own share (SumsExchange's
  // local) takes its sums about the saved mean, as ranks add up those shares.
  const double sum_dy_xmu = training && centered && count > 0 ? s.centered_sum_dy_xmu(count) : s.sum_dy_xmu;
  if (out.grad_weight) out.grad_weight[c] = static_cast<param_t>(sum_dy_xmu * istd);
  if (out.grad_bias) out.grad_bias[c] = static_cast<param_t>(s.sum_dy);
  const common::GradInputCoefficients coefs =
      common::grad_input_coefficients(param_or(weight, c, 1.0), istd, s.sum_dy, sum_dy_xmu, count, training);
  k.scale[c] = backward_scale<scalar_t>(weight, invstd, c);  // coefs.scale, as the ReLU mask needs it
  k.projection[c] = static_cast<Acc>(coefs.projection);
  k.shift[c] = static_cast<Acc>(coefs.shift);
}

// FusedSyncBatchNorm2d's training backward is two calls of `backward` around
// an all_reduce of the sums:
//   local : the reduction pass only; this rank's sums are written to local[C]
//           (with grad_input null, nothing else is read or written).
//   global: no reduction pass; dx from every rank's summed sums, global[C],
//           over global_count values per channel.
struct SumsExchange {
  GradSums* local = nullptr;
  const GradSums* global = nullptr;
  int64_t global_count = 0;
};
static_assert(sizeof(GradSums) == 3 * sizeof(double), "GradSums is exchanged as three doubles per channel");

// The training backward of a channel of two values, x̄ ± d. There x̂ = ±d/√(d² + ε),
// and dx = w·invstd·(g − ḡ − x̂·mean(g·x̂)) cancels to w·invstd·(g₀ − g₁)/2 ·
// ε/(d² + ε): a value ε/(d² + ε) times the size of its terms, which the general
// path leaves to the float rounding of those terms and of the saved invstd
// (the rounding of invstd² alone moves it by 2·ulp·d²/ε). So this channel is
// computed in double from ε and the exact variance, in closed form where every
// value is finite; elsewhere the general formula (in double) keeps nn's
// NaN/inf pattern. g is dy under kMask, as in the general path.
template <typename scalar_t, typename param_t, GradMask kMask>
void two_values_backward(const scalar_t* dy, const scalar_t* x, const Geometry& g, const param_t* weight,
                         const param_t* bias, const scalar_t* output, const acc_t<scalar_t>* mean,
                         const acc_t<scalar_t>* invstd, double eps, const BackwardOutputs<scalar_t, param_t>& out) {
  using Acc = acc_t<scalar_t>;
  // The two values are two rows of C channels (NHWC, or N = 2 with H·W = 1),
  // else neighbours in the channel's plane.
  const bool rows = g.channels_last || g.HW == 1;
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t at[2] = {rows ? c : 2 * c, rows ? g.C + c : 2 * c + 1};
    double xv[2], gv[2];
    for (int64_t i = 0; i < 2; ++i) {
      const Acc xi = static_cast<Acc>(x[at[i]]);
      scalar_t gi = dy[at[i]];
      if constexpr (kMask == GradMask::kReluOfInput) {
        const Acc z = std::fma(xi - mean[c], backward_scale<scalar_t>(weight, invstd, c),
                               static_cast<Acc>(param_or(bias, c, 0.0)));
        if (!(z > Acc(0))) gi = scalar_t(0);
      } else if constexpr (kMask == GradMask::kReluOfOutput) {
        if (!(static_cast<Acc>(output[at[i]]) > Acc(0))) gi = scalar_t(0);
        out.grad_residual[at[i]] = gi;
      }
      xv[i] = static_cast<double>(xi);
      gv[i] = static_cast<double>(static_cast<Acc>(gi));
    }
    const double d = (xv[0] - xv[1]) / 2;  // x₀ − x̄; x₁ − x̄ is −d
    const double var = d * d, denom = var + eps;
    const double istd = 1.0 / std::sqrt(denom);
    const double sum_g = gv[0] + gv[1], sum_g_xmu = (gv[0] - gv[1]) * d;
    if (out.grad_weight) out.grad_weight[c] = static_cast<param_t>(sum_g_xmu * istd);
    if (out.grad_bias) out.grad_bias[c] = static_cast<param_t>(sum_g);
    if (!out.grad_input) continue;
    const double scale = param_or(weight, c, 1.0) * istd;
    const bool finite = std::isfinite(gv[0]) && std::isfinite(gv[1]) && std::isfinite(d) && denom > 0;
    const double closed_dx0 = scale * (gv[0] - gv[1]) / 2 * (eps / denom);  // dx₁ = −dx₀
    for (int64_t i = 0; i < 2; ++i) {
      const double xmu = i == 0 ? d : -d;
      const double dx = finite ? (i == 0 ? closed_dx0 : -closed_dx0)
                               : scale * (gv[i] - sum_g / 2 - xmu * sum_g_xmu / (2 * denom));
      out.grad_input[at[i]] = static_cast<scalar_t>(dx);
    }
  }
}

// Gradients of batch_norm (kNone), of relu(batch_norm) (kReluOfInput: bias is
// the forward's, for its shift) and of relu(batch_norm + residual)
// (kReluOfOutput: output is the forward's y). See GradMask.
template <typename scalar_t, typename param_t, GradMask kMask>
void backward(const scalar_t* dy, const scalar_t* x, const Geometry& g, const param_t* weight,
              const param_t* bias, const scalar_t* output, const acc_t<scalar_t>* mean,
              const acc_t<scalar_t>* invstd, bool training, double eps,
              const BackwardOutputs<scalar_t, param_t>& out, const SumsExchange& exchange = {}) {
  using Acc = acc_t<scalar_t>;
  if (training && !exchange.local && !exchange.global && g.per_channel() == 2) {
    two_values_backward<scalar_t, param_t, kMask>(dy, x, g, weight, bias, output, mean, invstd, eps, out);
    return;
  }
  const int64_t N = g.N, C = g.C, HW = g.HW;
  const int64_t count = exchange.global ? exchange.global_count : g.per_channel();
  ChannelCoefs<scalar_t> k(C);
  std::copy(mean, mean + C, k.mean);
  if constexpr (kMask == GradMask::kReluOfInput) {
    // The forward's coefficients, as finalize_channel_stats (coefs_from_saved)
    // and finalize_channel_grads compute them.
    for (int64_t c = 0; c < C; ++c) {
      k.scale[c] = backward_scale<scalar_t>(weight, invstd, c);
      k.forward_shift[c] = static_cast<Acc>(param_or(bias, c, 0.0));
    }
  }
  // Eval's dx needs no sums; training's dx and both parameter grads do, and
  // kReluOfOutput's reduction pass is what writes g.
  const bool need_sums = !exchange.global &&
                         (exchange.local || kMask == GradMask::kReluOfOutput ||
                          (training ? out.grad_input || out.grad_weight || out.grad_bias
                                    : out.grad_weight || out.grad_bias));
  // The sums channel c's coefficients come from (see SumsExchange).
  auto exchanged = [&](int64_t c, const GradSums& reduced) {
    if (exchange.local) exchange.local[c] = reduced;
    return exchange.global ? exchange.global[c] : reduced;
  };
  const bool stream = streams_training_output<scalar_t>(g);
  const bool staged = stages_training_output<scalar_t>(g);
  // The dx pass: kReluOfOutput's g is already masked and written out.
  constexpr GradMask kDxMask = kMask == GradMask::kReluOfOutput ? GradMask::kNone : kMask;
  const scalar_t* dx_grad = kMask == GradMask::kReluOfOutput ? out.grad_residual : dy;

  // Eval's dx needs no sums: with them wanted too, one pass does both.
  const bool eval_dx_with_sums = !training && need_sums && out.grad_input && !exchange.local;
  if (eval_dx_with_sums) {
    for (int64_t c = 0; c < C; ++c) k.scale[c] = backward_scale<scalar_t>(weight, invstd, c);
  }

  if (g.channels_last) {
    const int64_t rows = N * HW;
    const RowBlocking rb(rows, C);
    const bool stream_rows = stream && rows_stream_aligned(out.grad_input, C);
    // Block partials as structure of arrays, summed in block order with a loop
    // over channels that vectorizes.
    const int64_t block_sums_size = need_sums ? rb.blocks * C : 0;
    double* block_sum_dy = thread_scratch<double, ScratchSlot::kBlockSumDy>(block_sums_size);
    double* block_sum_dy_xmu = thread_scratch<double, ScratchSlot::kBlockSumDyXmu>(block_sums_size);
    double* block_sum_xmu = thread_scratch<double, ScratchSlot::kBlockSumXmu>(block_sums_size);
    if (need_sums) {
      parallel_over(rb.blocks, [&](int64_t b) {
        nhwc_block_grad_sums<scalar_t, kMask>(x, dy, C, k, output, out.grad_residual, rb.begin(b),
                                              rb.end(b, rows), block_sum_dy + b * C, block_sum_dy_xmu + b * C,
                                              block_sum_xmu + b * C,
                                              eval_dx_with_sums ? out.grad_input : nullptr, stream_rows);
      });
    }
    at::parallel_for(0, C, kMergeGrain, [&](int64_t c_begin, int64_t c_end) {
      double* sum_dy = thread_scratch_filled<double, ScratchSlot::kSumDy>(c_end - c_begin, 0.0);
      double* sum_dy_xmu = thread_scratch_filled<double, ScratchSlot::kSumDyXmu>(c_end - c_begin, 0.0);
      double* sum_xmu = thread_scratch_filled<double, ScratchSlot::kSumXmu>(c_end - c_begin, 0.0);
      for (int64_t b = 0; need_sums && b < rb.blocks; ++b) {
        const double* bs = block_sum_dy + b * C + c_begin;
        const double* bsx = block_sum_dy_xmu + b * C + c_begin;
        const double* bx = block_sum_xmu + b * C + c_begin;
        for (int64_t i = 0; i < c_end - c_begin; ++i) {
          sum_dy[i] += bs[i];
          sum_dy_xmu[i] += bsx[i];
          sum_xmu[i] += bx[i];
        }
      }
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t i = c - c_begin;
        finalize_channel_grads<scalar_t>(c, exchanged(c, GradSums{sum_dy[i], sum_dy_xmu[i], sum_xmu[i]}),
                                         count, training, !exchange.local, weight, invstd, out, k);
      }
    });
    if (out.grad_input && !eval_dx_with_sums) {
      at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
        grad_input_rows<scalar_t, kDxMask>(x, dx_grad, out.grad_input, Rows{C, C}, begin, end, k, training,
                                           stream_rows, /*reversed=*/need_sums);
        stream_fence();
      });
    }
    return;
  }

  // The mask's inputs for channel c, pointers at the channel's base (offset
  // is that base for the NCHW long-plane walk, 0 for the short-plane one).
  auto channel_mask = [&](int64_t c, int64_t offset) {
    ChannelMask<scalar_t> m;
    if constexpr (kMask == GradMask::kReluOfInput) {
      m.scale = k.scale[c];
      m.forward_shift = k.forward_shift[c];
    } else if constexpr (kMask == GradMask::kReluOfOutput) {
      m.output = output + offset;
      m.grad = out.grad_residual + offset;
    }
    return m;
  };
  const PlaneBlocking pb(N, HW);
  const PlaneWalk<scalar_t> walk{HW, C * HW, prefetch_planes<scalar_t>(g), g.numel()};
  auto block_sums = [&](int64_t c, int64_t b) {
    int64_t n0, n1, h0, h1;
    pb.range(b, N, HW, n0, n1, h0, h1);
    return nchw_block_grad_sums<scalar_t, kMask>(x + c * HW, dy + c * HW, walk.for_channel(c), mean[c],
                                                 channel_mask(c, c * HW), n0, n1, h0, h1);
  };
  // Plane (c, n)'s dx into dst, `writable` elements from it (streamed when
  // `stream_dst`).
  auto grad_input_plane_into = [&](int64_t c, int64_t n, scalar_t* dst, int64_t writable, bool stream_dst) {
    const int64_t offset = n * C * HW + c * HW;
    if (training) {
      grad_input_run<scalar_t, kDxMask>(x + offset, dx_grad + offset, dst, HW, g.numel() - offset, writable,
                                        k.mean[c], k.scale[c], k.projection[c], k.shift[c], k.forward_shift[c],
                                        stream_dst);
    } else {
      scale_run<scalar_t, kDxMask>(x + offset, dx_grad + offset, dst, HW, g.numel() - offset, writable, k.mean[c],
                                   k.scale[c], k.forward_shift[c], stream_dst);
    }
  };
  auto grad_input_plane = [&](int64_t c, int64_t n) {
    grad_input_plane_into(c, n, out.grad_input + n * C * HW + c * HW, HW, stream);
  };

  if (walks_channel_blocks<scalar_t>(g)) {
    const ChannelBlocking cb(g, 2 * sizeof(scalar_t));
    const ShortPlane<scalar_t> plane(HW, g.numel());
    parallel_over(cb.blocks, [&](int64_t b) {
      const int64_t c0 = cb.begin(b), c1 = cb.end(b, C);
      constexpr int64_t P = ShortPlane<scalar_t>::kPartials;
      double* sum_dy = thread_scratch_filled<double, ScratchSlot::kBlockSum1>((c1 - c0) * P, 0.0);
      double* sum_dy_xmu = thread_scratch_filled<double, ScratchSlot::kBlockSum2>((c1 - c0) * P, 0.0);
      double* sum_xmu = thread_scratch_filled<double, ScratchSlot::kBlockSum3>((c1 - c0) * P, 0.0);
      unsigned char* g_differs = thread_scratch_filled<unsigned char, ScratchSlot::kBlockFlags>(c1 - c0, 0);
      auto plane_sums = [&](int64_t c, int64_t n) __attribute__((always_inline)) {
        if (n + 1 < N) {
          plane.prefetch(x + ((n + 1) * C + c) * HW);
          plane.prefetch(dy + ((n + 1) * C + c) * HW);
          if constexpr (kMask == GradMask::kReluOfOutput) plane.prefetch(output + ((n + 1) * C + c) * HW);
        }
        short_plane_grad_sums<scalar_t, kMask>(x, dy, (n * C + c) * HW, plane, mean[c],
                                               static_cast<Acc>(dy[c * HW]), channel_mask(c, 0),
                                               sum_dy + (c - c0) * P, sum_dy_xmu + (c - c0) * P,
                                               sum_xmu + (c - c0) * P, g_differs + (c - c0));
      };
      // The planes-one-by-one dx pass; with_sums: each plane's sums first
      // (eval's dx then comes while the plane is in L1).
      auto planes_dx = [&](auto with_sums) {
        for_block_planes_into(g, c0, c1, out.grad_input, staged,
                              [&](int64_t c, int64_t n, scalar_t* dst, int64_t writable) {
          if constexpr (decltype(with_sums)::value) plane_sums(c, n);
          grad_input_plane_into(c, n, dst, writable, /*stream_dst=*/false);
        });
        if (staged) stream_fence();
      };
      // Not on the runs path: its dx goes a tile of runs at a time.
      const bool dx_with_sums = kPlanesOneByOne<scalar_t> && eval_dx_with_sums;
      if (dx_with_sums) {
        planes_dx(/*with_sums=*/std::true_type{});
      } else if (need_sums) {
        for_block_planes(g, c0, c1, plane_sums);
      }
      for (int64_t c = c0; c < c1; ++c) {
        const double xmu = ShortPlane<scalar_t>::total(sum_xmu + (c - c0) * P);
        const GradSums sums = block_grad_sums(!g_differs[c - c0], dy + c * HW, N * HW,
                                              ShortPlane<scalar_t>::total(sum_dy + (c - c0) * P),
                                              ShortPlane<scalar_t>::total(sum_dy_xmu + (c - c0) * P), xmu);
        finalize_channel_grads<scalar_t>(c, exchanged(c, sums), count, training, !exchange.local, weight, invstd, out, k);
      }
      if (!out.grad_input || dx_with_sums) return;
      if constexpr (kPlanesOneByOne<scalar_t>) {
        planes_dx(/*with_sums=*/std::false_type{});
      } else {
        grad_input_rows<scalar_t, kDxMask>(x + c0 * HW, dx_grad + c0 * HW, out.grad_input + c0 * HW,
                                           cb.run(g, b), 0, N, RunCoefs<scalar_t>(k, c0, c1, HW), training,
                                           stream, /*reversed=*/false);
      }
    });
    return;
  }
  if (!split_channels_across_threads(g)) {
    parallel_over(C, [&](int64_t c) {
      GradSums s;
      for (int64_t b = 0; need_sums && b < pb.blocks; ++b) s.add(block_sums(c, b));
      finalize_channel_grads<scalar_t>(c, exchanged(c, s), count, training, !exchange.local, weight, invstd, out, k);
      for (int64_t n = 0; out.grad_input && n < N; ++n) grad_input_plane(c, n);
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
    finalize_channel_grads<scalar_t>(c, exchanged(c, s), count, training, !exchange.local, weight, invstd, out, k);
  }
  if (out.grad_input) {
    parallel_over(C * N, [&](int64_t i) { grad_input_plane(i / N, i % N); });
  }
}

}  // namespace fused_bn::cpu
