// Batch-norm CUDA kernels; the design (memory traffic, determinism, numerics)
// is described at the top of batch_norm_kernels.cuh.
#include "batch_norm_kernels.cuh"

#include "../common/channel_math.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace fused_bn {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
// Vectors (channels-first) or rows (channels-last) each thread loads before
// using any of them: enough bytes in flight per thread to cover DRAM latency.
constexpr int kUnroll = 4;
// Kernels reading both x and dy with 16-byte vectors already have twice the
// bytes in flight per step; a smaller unroll keeps them near 64 registers.
template <int kVec>
constexpr int kDualUnroll = kVec == 1 ? 4 : 2;
// A block should run at least this many unrolled iterations per thread before
// the grid is split further: block-level merging is not free.
constexpr int kMinIterationsPerThread = 4;
// Grids are sized for this many resident threads per multiprocessor (half of
// sm_80/sm_90's 2048), which the kernels' register use allows.
constexpr int kTargetThreadsPerMultiprocessor = 1024;
constexpr int64_t kMaxGridY = 65535;
constexpr int kFinalizeThreads = 256;
constexpr int kFinalizeChannelsPerBlock = kFinalizeThreads / kWarpSize;  // one warp per channel
constexpr size_t kWorkspaceAlignment = 16;

// The forward statistics' accumulation type: double for float (and double)
// input, so x − K is exact and the mean keeps the accuracy of nn's double sums
// (float lanes of x − K left a batch mean of 1e-3 14 ulps off); float for
// half/bfloat16, whose values keep few bits. The backward's sums are always
// double: a dy constant over a channel then sums exactly to G·n (dx exactly 0,
// as nn's), and Σdy·(x − mean) keeps no float-lane rounding tail.
template <typename scalar_t>
struct MomentsAccumulate {
  using type = double;
};
template <>
struct MomentsAccumulate<__half> {
  using type = float;
};
template <>
struct MomentsAccumulate<__nv_bfloat16> {
  using type = float;
};
template <typename scalar_t>
using moments_t = typename MomentsAccumulate<scalar_t>::type;

// Elements per 16-byte load.
template <typename scalar_t>
constexpr int kVectorWidth = static_cast<int>(16 / sizeof(scalar_t));

__device__ __forceinline__ int64_t min_index(int64_t a, int64_t b) { return a < b ? a : b; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ---------------------------------------------------------------------------
// Conversions. PyTorch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so half/bfloat16 go through intrinsics.

template <typename To, typename From>
struct Converter {
  __device__ __forceinline__ static To run(From v) { return static_cast<To>(v); }
};
template <>
struct Converter<float, __half> {
  __device__ __forceinline__ static float run(__half v) { return __half2float(v); }
};
template <>
struct Converter<float, __nv_bfloat16> {
  __device__ __forceinline__ static float run(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <>
struct Converter<double, __half> {
  __device__ __forceinline__ static double run(__half v) { return __half2float(v); }
};
template <>
struct Converter<double, __nv_bfloat16> {
  __device__ __forceinline__ static double run(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <>
struct Converter<__half, float> {
  __device__ __forceinline__ static __half run(float v) { return __float2half_rn(v); }
};
template <>
struct Converter<__nv_bfloat16, float> {
  __device__ __forceinline__ static __nv_bfloat16 run(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Converter<__half, double> {
  __device__ __forceinline__ static __half run(double v) { return __double2half(v); }
};
template <>
struct Converter<__nv_bfloat16, double> {
  __device__ __forceinline__ static __nv_bfloat16 run(double v) { return __double2bfloat16(v); }
};

template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  return Converter<To, From>::run(v);
}

// K, the value a channel's moments are taken about: its first element, or 0
// where that is not finite (x − inf would turn every value into NaN or -inf).
template <typename T, typename scalar_t>
__device__ __forceinline__ T moments_shift(scalar_t first) {
  const T k = convert<T>(first);
  return isfinite(k) ? k : T(0);
}

// kVec consecutive elements moved as one aligned load/store (16 bytes when
// kVec == kVectorWidth, a plain scalar access when kVec == 1).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Bundle {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ Bundle<T, kVec> load_bundle(const T* p) {
  return *reinterpret_cast<const Bundle<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_bundle(T* p, const Bundle<T, kVec>& b) {
  *reinterpret_cast<Bundle<T, kVec>*>(p) = b;
}

// 1/n for an element count n (positive, normal, finite; n == 0 gives NaN,
// which every caller discards). '/' and the correctly rounded rcp.rn
// expand to a slow-path subroutine whose calling convention spills registers
// in the hot loops; the hardware approximation refined by Newton steps (each
// doubles the correct bits) needs no special cases for such inputs and is
// within an ulp or so of 1/n.
__device__ __forceinline__ float reciprocal_of_count(float n) {
  float r;
#if defined(FUSED_BN_CUDA_EMULATION)
  r = emulation::rcp_approx_ftz(n);
#else
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(n));
#endif
  return fmaf(r, fmaf(-n, r, 1.0f), r);
}
__device__ __forceinline__ double reciprocal_of_count(double n) {
  double r;
#if defined(FUSED_BN_CUDA_EMULATION)
  r = emulation::rcp_approx_ftz(n);
#else
  asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(n));
#endif
  r = fma(r, fma(-n, r, 1.0), r);
  r = fma(r, fma(-n, r, 1.0), r);
  return fma(r, fma(-n, r, 1.0), r);
}

__device__ __forceinline__ float fused_multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fused_multiply_add(double a, double b, double c) { return fma(a, b, c); }

// ---------------------------------------------------------------------------
// Moments (count, mean, sum of squared deviations) and their merges.

// The mean of two merged sides. Where either mean is infinite (an inf in the
// data) delta is inf or NaN, and mean + delta * fraction would give NaN where
// nn's Σx / n gives inf: the sides' means then add as their sums would
// (inf + finite = inf, inf - inf = NaN; an empty side's mean is 0).
template <typename T>
__device__ __forceinline__ T merged_mean(T mean, T delta, T other_fraction, T other_mean) {
  return isfinite(delta) ? mean + delta * other_fraction : mean + other_mean;
}

// Chan et al.'s pairwise merge; exact when either side is empty. The
// (delta * weight) * delta order keeps a huge delta against an empty side at 0
// rather than inf * 0.
template <typename T>
__device__ __forceinline__ void merge_moments(T& mean, T& m2, T& count, T other_mean, T other_m2,
                                              T other_count) {
  const T total = count + other_count;
  const T other_fraction = total > T(0) ? other_count * reciprocal_of_count(total) : T(0);
  const T delta = other_mean - mean;
  mean = merged_mean(mean, delta, other_fraction, other_mean);
  m2 += other_m2 + delta * (count * other_fraction) * delta;
  count = total;
}

template <typename T>
__device__ __forceinline__ void warp_merge_moments(T& mean, T& m2, T& count) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const T other_mean = __shfl_down_sync(kFullWarpMask, mean, offset);
    const T other_m2 = __shfl_down_sync(kFullWarpMask, m2, offset);
    const T other_count = __shfl_down_sync(kFullWarpMask, count, offset);
    merge_moments(mean, m2, count, other_mean, other_m2, other_count);
  }
}

// 1-D block, blockDim.x a multiple of 32; the result lands in thread 0.
template <typename T>
__device__ __forceinline__ void block_merge_moments(T& mean, T& m2, T& count) {
  __shared__ T warp_mean[kMaxThreads / kWarpSize];
  __shared__ T warp_m2[kMaxThreads / kWarpSize];
  __shared__ T warp_count[kMaxThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  warp_merge_moments(mean, m2, count);
  if (lane == 0) {
    warp_mean[warp] = mean;
    warp_m2[warp] = m2;
    warp_count[warp] = count;
  }
  __syncthreads();
  if (warp == 0) {
    mean = lane < warps ? warp_mean[lane] : T(0);
    m2 = lane < warps ? warp_m2[lane] : T(0);
    count = lane < warps ? warp_count[lane] : T(0);
    warp_merge_moments(mean, m2, count);
  }
}

template <typename T, int kValues>
__device__ __forceinline__ void warp_sum(T (&v)[kValues]) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) v[i] += __shfl_down_sync(kFullWarpMask, v[i], offset);
  }
}

// 1-D block, blockDim.x a multiple of 32; the result lands in thread 0.
template <typename T, int kValues>
__device__ __forceinline__ void block_sum(T (&v)[kValues]) {
  __shared__ T warp_v[kValues][kMaxThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  warp_sum(v);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) warp_v[i][warp] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) v[i] = lane < warps ? warp_v[i][lane] : T(0);
    warp_sum(v);
  }
}

// Channels-last blocks are (columns x rows): merges each column's moments over
// threadIdx.y with a fixed halving tree in shared memory. Column threads hold
// kVec channels that share one count. The result lands in threadIdx.y == 0.
template <typename T, int kVec>
__device__ __forceinline__ void block_merge_column_moments(T (&mean)[kVec], T (&m2)[kVec], T& count) {
  __shared__ T shared_mean[kVec * kMaxThreads];
  __shared__ T shared_m2[kVec * kMaxThreads];
  __shared__ T shared_count[kMaxThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    shared_mean[j * kMaxThreads + tid] = mean[j];
    shared_m2[j * kMaxThreads + tid] = m2[j];
  }
  shared_count[tid] = count;
  // Rows [half, active) fold into rows [0, active - half): reads and writes of
  // one step touch disjoint rows, so one barrier per step suffices.
  for (int active = blockDim.y; active > 1;) {
    const int half = (active + 1) / 2;
    __syncthreads();
    if (static_cast<int>(threadIdx.y) < active - half) {
      const int other = tid + half * blockDim.x;
      const T other_count = shared_count[other];
      const T total = count + other_count;
      const T other_fraction = total > T(0) ? other_count * reciprocal_of_count(total) : T(0);
      const T own_weight = count * other_fraction;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const T other_mean = shared_mean[j * kMaxThreads + other];
        const T delta = other_mean - mean[j];
        mean[j] = merged_mean(mean[j], delta, other_fraction, other_mean);
        m2[j] += shared_m2[j * kMaxThreads + other] + delta * own_weight * delta;
        shared_mean[j * kMaxThreads + tid] = mean[j];
        shared_m2[j * kMaxThreads + tid] = m2[j];
      }
      count = total;
      shared_count[tid] = count;
    }
    active = half;
  }
}

// Same tree as block_merge_column_moments, for kValues sums per channel, one
// sum after another through one shared array (a third of the shared memory of
// all at once: 16 KB for double sums of 8-wide columns).
template <typename T, int kValues, int kVec>
__device__ __forceinline__ void block_sum_columns(T (&v)[kValues][kVec]) {
  __shared__ T shared_v[kVec * kMaxThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    if (i > 0) __syncthreads();  // the previous sum's last reads are done
#pragma unroll
    for (int j = 0; j < kVec; ++j) shared_v[j * kMaxThreads + tid] = v[i][j];
    for (int active = blockDim.y; active > 1;) {
      const int half = (active + 1) / 2;
      __syncthreads();
      if (static_cast<int>(threadIdx.y) < active - half) {
        const int other = tid + half * blockDim.x;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          v[i][j] += shared_v[j * kMaxThreads + other];
          shared_v[j * kMaxThreads + tid] = v[i][j];
        }
      }
      active = half;
    }
  }
}

// Folds one load group (valid_rows x kCols values, all of one channel) into a
// thread's running moments: the group's own mean and m2 (two passes over
// registers), then one Chan merge, so one division pair per group instead of
// a division per element.
template <typename acc_t, int kRows, int kCols>
__device__ __forceinline__ void fold_channel_group(const acc_t (&values)[kRows][kCols], int valid_rows,
                                                   acc_t& mean, acc_t& m2, acc_t& count) {
  acc_t sum = acc_t(0);
#pragma unroll
  for (int u = 0; u < kRows; ++u) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) sum += values[u][j];  // invalid rows hold 0
  }
  const acc_t group_count = static_cast<acc_t>(valid_rows * kCols);
  const acc_t group_mean = sum * reciprocal_of_count(group_count);
  acc_t group_m2 = acc_t(0);
#pragma unroll
  for (int u = 0; u < kRows; ++u) {
    if (u < valid_rows) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const acc_t d = values[u][j] - group_mean;
        group_m2 += d * d;
      }
    }
  }
  merge_moments(mean, m2, count, group_mean, group_m2, group_count);
}

// Folds valid_rows rows of kCols channels (one channel per column) into
// per-channel moments that share one count.
template <typename acc_t, int kRows, int kCols>
__device__ __forceinline__ void fold_column_group(const acc_t (&values)[kRows][kCols], int valid_rows,
                                                  acc_t (&mean)[kCols], acc_t (&m2)[kCols],
                                                  acc_t& count) {
  const acc_t group_count = static_cast<acc_t>(valid_rows);
  const acc_t inverse_group_count = reciprocal_of_count(group_count);
  const acc_t total = count + group_count;
  const acc_t group_fraction = group_count * reciprocal_of_count(total);
  const acc_t own_weight = count * group_fraction;
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    acc_t sum = acc_t(0);
#pragma unroll
    for (int u = 0; u < kRows; ++u) sum += values[u][j];  // invalid rows hold 0
    const acc_t group_mean = sum * inverse_group_count;
    acc_t group_m2 = acc_t(0);
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      if (u < valid_rows) {
        const acc_t d = values[u][j] - group_mean;
        group_m2 += d * d;
      }
    }
    const acc_t delta = group_mean - mean[j];
    mean[j] = merged_mean(mean[j], delta, group_fraction, group_mean);
    m2[j] += group_m2 + delta * own_weight * delta;
  }
  count = total;
}

// ---------------------------------------------------------------------------
// Channels-first traversal: a block owns one channel's slice [begin, end) of
// the N x (HW / kVec) vector positions; each thread visits begin + tid,
// begin + tid + blockDim.x, ... The cursor keeps (image, vector in plane) and
// steps without a division per element.
class PlaneCursor {
 public:
  __device__ PlaneCursor(int64_t position, int64_t stride, int64_t plane_vectors)
      : plane_vectors_(plane_vectors),
        image_(position / plane_vectors),
        vector_(position % plane_vectors),
        stride_images_(stride / plane_vectors),
        stride_vectors_(stride % plane_vectors) {}

  // Element offset from the channel's first element; image_stride = C * HW.
  __device__ int64_t offset(int64_t image_stride, int vec) const {
    return image_ * image_stride + vector_ * vec;
  }

  __device__ void advance() {
    vector_ += stride_vectors_;
    image_ += stride_images_;
    if (vector_ >= plane_vectors_) {
      vector_ -= plane_vectors_;
      ++image_;
    }
  }

 private:
  int64_t plane_vectors_;
  int64_t image_;
  int64_t vector_;
  int64_t stride_images_;
  int64_t stride_vectors_;
};

// ---------------------------------------------------------------------------
// Training forward, pass 1: per-(split, channel) moments of x - K, K the
// channel's first element.

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_moments_kernel(const scalar_t* __restrict__ input, Geometry geometry,
                                  int64_t vectors_per_split, double* __restrict__ partial_mean,
                                  double* __restrict__ partial_m2, double* __restrict__ partial_count,
                                  const int64_t* __restrict__ counter, int64_t* __restrict__ counter_snapshot) {
  using acc_t = moments_t<scalar_t>;
  const int64_t channel = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t plane_vectors = geometry.spatial / kVec;
  const int64_t total = geometry.batch * plane_vectors;
  const int64_t begin = split * vectors_per_split;
  const int64_t end = min_index(total, begin + vectors_per_split);
  const int64_t image_stride = geometry.channels * geometry.spatial;
  const int64_t stride = blockDim.x;
  const scalar_t* __restrict__ channel_input = input + channel * geometry.spatial;

  acc_t mean = acc_t(0), m2 = acc_t(0), count = acc_t(0);
  int64_t position = begin + threadIdx.x;
  if (position < end) {
    const acc_t shift = moments_shift<acc_t>(channel_input[0]);
    PlaneCursor cursor(position, stride, plane_vectors);
    for (; position < end; position += stride * kUnroll) {
      acc_t values[kUnroll][kVec];
      int valid_rows = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (position + u * stride < end) {
          const Bundle<scalar_t, kVec> x =
              load_bundle<scalar_t, kVec>(channel_input + cursor.offset(image_stride, kVec));
#pragma unroll
          for (int j = 0; j < kVec; ++j) values[u][j] = convert<acc_t>(x.v[j]) - shift;
          valid_rows = u + 1;
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) values[u][j] = acc_t(0);
        }
        cursor.advance();
      }
      fold_channel_group(values, valid_rows, mean, m2, count);
    }
  }

  block_merge_moments(mean, m2, count);
  if (threadIdx.x == 0) {
    const int64_t slot = split * geometry.channels + channel;
    partial_mean[slot] = mean;
    partial_m2[slot] = m2;
    partial_count[slot] = count;
    if (channel == 0 && split == 0 && counter != nullptr) *counter_snapshot = *counter + 1;
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_moments_kernel(const scalar_t* __restrict__ input, Geometry geometry,
                                 int64_t rows_per_split, double* __restrict__ partial_mean,
                                 double* __restrict__ partial_m2, double* __restrict__ partial_count,
                                 const int64_t* __restrict__ counter, int64_t* __restrict__ counter_snapshot) {
  using acc_t = moments_t<scalar_t>;
  const int64_t columns = geometry.channels / kVec;
  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = geometry.batch * geometry.spatial;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t end = min_index(rows, begin + rows_per_split);
  const int64_t row_step = blockDim.y;

  acc_t mean[kVec], m2[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) mean[j] = m2[j] = acc_t(0);
  acc_t count = acc_t(0);

  int64_t row = begin + threadIdx.y;
  if (column < columns && row < end) {
    const Bundle<scalar_t, kVec> first = load_bundle<scalar_t, kVec>(input + column * kVec);
    acc_t shift[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) shift[j] = moments_shift<acc_t>(first.v[j]);
    const int64_t offset_step = row_step * geometry.channels;
    int64_t offset = row * geometry.channels + column * kVec;
    for (; row < end; row += row_step * kUnroll) {
      acc_t values[kUnroll][kVec];
      int valid_rows = 0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (row + u * row_step < end) {
          const Bundle<scalar_t, kVec> x = load_bundle<scalar_t, kVec>(input + offset);
#pragma unroll
          for (int j = 0; j < kVec; ++j) values[u][j] = convert<acc_t>(x.v[j]) - shift[j];
          valid_rows = u + 1;
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) values[u][j] = acc_t(0);
        }
        offset += offset_step;
      }
      fold_column_group(values, valid_rows, mean, m2, count);
    }
  }

  block_merge_column_moments(mean, m2, count);
  if (threadIdx.y == 0 && column < columns) {
    const int64_t slot = static_cast<int64_t>(blockIdx.y) * geometry.channels + column * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      partial_mean[slot + j] = mean[j];
      partial_m2[slot + j] = m2[j];
      partial_count[slot + j] = count;
    }
  }
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0 && counter != nullptr) {
    *counter_snapshot = *counter + 1;
  }
}

// ---------------------------------------------------------------------------
// Training forward, pass 2: per channel, merge the partials (fixed order, in
// double), write the saved statistics, update the running statistics and the
// counter, and leave the normalize coefficients in the workspace.

template <typename scalar_t, typename param_t>
struct FinalizeMomentsArgs {
  using acc_t = acc_type<scalar_t>;
  const double* partial_mean;
  const double* partial_m2;
  const double* partial_count;
  int64_t splits;
  int64_t channels;
  int64_t count_per_channel;  // N * HW
  const scalar_t* input;      // for the shift K: input[channel * first_element_stride]
  int64_t first_element_stride;
  const param_t* weight;
  const param_t* bias;
  param_t* running_mean;
  param_t* running_var;
  int64_t* counter;
  const int64_t* counter_snapshot;
  acc_t* save_mean;
  acc_t* save_invstd;
  acc_t* mean_hi;  // normalize: ((x - mean_hi) - mean_lo) * scale + shift
  acc_t* mean_lo;
  acc_t* scale;
  acc_t* shift;
  double eps;
  double momentum;
  bool cumulative_momentum;
};

template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_moments_kernel(const FinalizeMomentsArgs<scalar_t, param_t> args) {
  using acc_t = acc_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t channel =
      static_cast<int64_t>(blockIdx.x) * kFinalizeChannelsPerBlock + threadIdx.x / kWarpSize;
  // Only this kernel writes the counter, and no block of it reads the counter.
  if (blockIdx.x == 0 && threadIdx.x == 0 && args.counter != nullptr) {
    *args.counter = *args.counter_snapshot;
  }
  if (channel >= args.channels) return;  // whole warps leave together

  double mean = 0.0, m2 = 0.0, count = 0.0;
  for (int64_t split = lane; split < args.splits; split += kWarpSize) {
    const int64_t slot = split * args.channels + channel;
    merge_moments(mean, m2, count, args.partial_mean[slot], args.partial_m2[slot], args.partial_count[slot]);
  }
  warp_merge_moments(mean, m2, count);
  if (lane != 0) return;

  const double n = static_cast<double>(args.count_per_channel);
  const bool has_data = args.count_per_channel > 0;
  const double shift =
      has_data ? moments_shift<double>(args.input[channel * args.first_element_stride]) : 0.0;
  const double batch_mean = shift + mean;
  const double var = has_data ? m2 / n : 0.0;
  const double invstd = 1.0 / sqrt(var + args.eps);
  args.save_mean[channel] = static_cast<acc_t>(batch_mean);
  args.save_invstd[channel] = static_cast<acc_t>(invstd);

  double factor = args.momentum;
  if (args.cumulative_momentum) {
    const int64_t batches = args.counter != nullptr ? *args.counter_snapshot : 0;
    factor = batches > 0 ? 1.0 / static_cast<double>(batches) : 0.0;
  }
  if (has_data && args.running_mean != nullptr) {
    const double old = convert<double>(args.running_mean[channel]);
    args.running_mean[channel] = convert<param_t>((1.0 - factor) * old + factor * batch_mean);
  }
  if (has_data && args.running_var != nullptr) {
    // Unbiased; a single value per channel gives inf/nan, as in nn.BatchNorm2d.
    const double unbiased = m2 / (n - 1.0);
    const double old = convert<double>(args.running_var[channel]);
    args.running_var[channel] = convert<param_t>((1.0 - factor) * old + factor * unbiased);
  }
  const double w = args.weight != nullptr ? convert<double>(args.weight[channel]) : 1.0;
  const double b = args.bias != nullptr ? convert<double>(args.bias[channel]) : 0.0;
  args.mean_hi[channel] = static_cast<acc_t>(shift);
  args.mean_lo[channel] = static_cast<acc_t>(mean);
  args.scale[channel] = static_cast<acc_t>(invstd * w);
  args.shift[channel] = static_cast<acc_t>(b);
}

// Only launched for C == 0, where no finalize kernel runs.
__global__ void increment_counter_kernel(int64_t* counter) { *counter += 1; }

// ---------------------------------------------------------------------------
// Normalize: y = ((x - mean_hi) - mean_lo) * scale + shift, in acc_t.

template <typename acc_t, typename param_t>
struct NormalizeCoefficients {
  // Training: the finalize kernel's per-channel coefficients.
  const acc_t* mean_hi = nullptr;
  const acc_t* mean_lo = nullptr;
  const acc_t* scale = nullptr;
  const acc_t* shift = nullptr;
  // Eval (mean_hi == nullptr): derived per thread from the running statistics,
  // which saves a launch.
  const param_t* running_mean = nullptr;
  const param_t* running_var = nullptr;
  const param_t* weight = nullptr;
  const param_t* bias = nullptr;
  double eps = 0.0;

  __device__ __forceinline__ void load(int64_t c, acc_t& hi, acc_t& lo, acc_t& sc, acc_t& sh) const {
    if (mean_hi != nullptr) {
      hi = mean_hi[c];
      lo = mean_lo[c];
      sc = scale[c];
      sh = shift[c];
      return;
    }
    const double w = weight != nullptr ? convert<double>(weight[c]) : 1.0;
    const double invstd = 1.0 / sqrt(convert<double>(running_var[c]) + eps);
    hi = convert<acc_t>(running_mean[c]);
    lo = acc_t(0);
    sc = static_cast<acc_t>(invstd * w);
    sh = bias != nullptr ? convert<acc_t>(bias[c]) : acc_t(0);
  }
};

template <typename scalar_t, typename param_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_normalize_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
                                    Geometry geometry, int64_t vectors_per_split,
                                    const NormalizeCoefficients<acc_type<scalar_t>, param_t> coefficients) {
  using acc_t = acc_type<scalar_t>;
  const int64_t channel = blockIdx.x;
  const int64_t plane_vectors = geometry.spatial / kVec;
  const int64_t total = geometry.batch * plane_vectors;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * vectors_per_split;
  const int64_t end = min_index(total, begin + vectors_per_split);
  const int64_t image_stride = geometry.channels * geometry.spatial;
  const int64_t stride = blockDim.x;
  int64_t position = begin + threadIdx.x;
  if (position >= end) return;

  acc_t mean_hi, mean_lo, scale, shift;
  coefficients.load(channel, mean_hi, mean_lo, scale, shift);
  const scalar_t* __restrict__ channel_input = input + channel * geometry.spatial;
  scalar_t* __restrict__ channel_output = output + channel * geometry.spatial;
  PlaneCursor cursor(position, stride, plane_vectors);
  for (; position < end; position += stride * kUnroll) {
    Bundle<scalar_t, kVec> x[kUnroll];
    int64_t offsets[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      offsets[u] = cursor.offset(image_stride, kVec);
      if (position + u * stride < end) x[u] = load_bundle<scalar_t, kVec>(channel_input + offsets[u]);
      cursor.advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (position + u * stride < end) {
        Bundle<scalar_t, kVec> y;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          y.v[j] = convert<scalar_t>(((convert<acc_t>(x[u].v[j]) - mean_hi) - mean_lo) * scale + shift);
        }
        store_bundle<scalar_t, kVec>(channel_output + offsets[u], y);
      }
    }
  }
}

template <typename scalar_t, typename param_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_normalize_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ output,
                                   Geometry geometry, int64_t rows_per_split,
                                   const NormalizeCoefficients<acc_type<scalar_t>, param_t> coefficients) {
  using acc_t = acc_type<scalar_t>;
  const int64_t columns = geometry.channels / kVec;
  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = geometry.batch * geometry.spatial;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t end = min_index(rows, begin + rows_per_split);
  const int64_t row_step = blockDim.y;
  int64_t row = begin + threadIdx.y;
  if (column >= columns || row >= end) return;

  acc_t mean_hi[kVec], mean_lo[kVec], scale[kVec], shift[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) coefficients.load(column * kVec + j, mean_hi[j], mean_lo[j], scale[j], shift[j]);
  const int64_t offset_step = row_step * geometry.channels;
  int64_t offset = row * geometry.channels + column * kVec;
  for (; row < end; row += row_step * kUnroll) {
    Bundle<scalar_t, kVec> x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (row + u * row_step < end) x[u] = load_bundle<scalar_t, kVec>(input + offset + u * offset_step);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (row + u * row_step < end) {
        Bundle<scalar_t, kVec> y;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          y.v[j] = convert<scalar_t>(((convert<acc_t>(x[u].v[j]) - mean_hi[j]) - mean_lo[j]) * scale[j] +
                                     shift[j]);
        }
        store_bundle<scalar_t, kVec>(output + offset + u * offset_step, y);
      }
    }
    offset += kUnroll * offset_step;
  }
}

// ---------------------------------------------------------------------------
// The backward's sums and coefficients.

constexpr int kGradSums = 3;  // Σdy, Σdy·(x − mean), Σ(x − mean)

// Per-(split, channel) partial sums in the workspace, at [split][channel].
struct GradPartials {
  double* sum_dy;
  double* sum_dy_xmu;
  double* sum_xmu;

  __device__ __forceinline__ void store(int64_t slot, const double (&s)[kGradSums]) const {
    sum_dy[slot] = s[0];
    sum_dy_xmu[slot] = s[1];
    sum_xmu[slot] = s[2];
  }
  __device__ __forceinline__ void add_to(int64_t slot, double (&s)[kGradSums]) const {
    s[0] += sum_dy[slot];
    s[1] += sum_dy_xmu[slot];
    s[2] += sum_xmu[slot];
  }
};

template <typename scalar_t>
__device__ __forceinline__ void add_grad_sums(double (&s)[kGradSums], scalar_t dy, scalar_t x, double mean) {
  const double g = convert<double>(dy);
  const double xmu = convert<double>(x) - mean;
  s[0] += g;
  s[1] += g * xmu;
  s[2] += xmu;
}

// Per channel, in the accumulation type (common::GradInputCoefficients).
template <typename acc_t>
struct GradInputCoefficients {
  acc_t* scale;
  acc_t* projection;
  acc_t* shift;
};

// ---------------------------------------------------------------------------
// Backward, pass 1: per-(split, channel) Σdy, Σdy·(x − mean) and Σ(x − mean),
// in double (see MomentsAccumulate), with mean the saved (rounded) mean.

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_grad_sums_kernel(const scalar_t* __restrict__ grad_output,
                                    const scalar_t* __restrict__ input, Geometry geometry,
                                    int64_t vectors_per_split, const acc_type<scalar_t>* __restrict__ mean,
                                    GradPartials partials) {
  constexpr int kSteps = kDualUnroll<kVec>;
  const int64_t channel = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t plane_vectors = geometry.spatial / kVec;
  const int64_t total = geometry.batch * plane_vectors;
  const int64_t begin = split * vectors_per_split;
  const int64_t end = min_index(total, begin + vectors_per_split);
  const int64_t image_stride = geometry.channels * geometry.spatial;
  const int64_t stride = blockDim.x;
  const int64_t channel_offset = channel * geometry.spatial;

  double sums[kGradSums] = {0.0, 0.0, 0.0};
  int64_t position = begin + threadIdx.x;
  if (position < end) {
    const double channel_mean = static_cast<double>(mean[channel]);
    PlaneCursor cursor(position, stride, plane_vectors);
    for (; position < end; position += stride * kSteps) {
      Bundle<scalar_t, kVec> dy[kSteps], x[kSteps];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (position + u * stride < end) {
          const int64_t offset = channel_offset + cursor.offset(image_stride, kVec);
          dy[u] = load_bundle<scalar_t, kVec>(grad_output + offset);
          x[u] = load_bundle<scalar_t, kVec>(input + offset);
        }
        cursor.advance();
      }
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (position + u * stride < end) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) add_grad_sums(sums, dy[u].v[j], x[u].v[j], channel_mean);
        }
      }
    }
  }

  block_sum(sums);
  if (threadIdx.x == 0) partials.store(split * geometry.channels + channel, sums);
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_grad_sums_kernel(const scalar_t* __restrict__ grad_output,
                                   const scalar_t* __restrict__ input, Geometry geometry,
                                   int64_t rows_per_split, const acc_type<scalar_t>* __restrict__ mean,
                                   GradPartials partials) {
  constexpr int kSteps = kDualUnroll<kVec>;
  const int64_t columns = geometry.channels / kVec;
  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = geometry.batch * geometry.spatial;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t end = min_index(rows, begin + rows_per_split);
  const int64_t row_step = blockDim.y;

  double sums[kGradSums][kVec];
#pragma unroll
  for (int i = 0; i < kGradSums; ++i) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) sums[i][j] = 0.0;
  }

  int64_t row = begin + threadIdx.y;
  if (column < columns && row < end) {
    double channel_mean[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) channel_mean[j] = static_cast<double>(mean[column * kVec + j]);
    const int64_t offset_step = row_step * geometry.channels;
    int64_t offset = row * geometry.channels + column * kVec;
    for (; row < end; row += row_step * kSteps) {
      Bundle<scalar_t, kVec> dy[kSteps], x[kSteps];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (row + u * row_step < end) {
          dy[u] = load_bundle<scalar_t, kVec>(grad_output + offset + u * offset_step);
          x[u] = load_bundle<scalar_t, kVec>(input + offset + u * offset_step);
        }
      }
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        if (row + u * row_step < end) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            double one[kGradSums] = {sums[0][j], sums[1][j], sums[2][j]};
            add_grad_sums(one, dy[u].v[j], x[u].v[j], channel_mean[j]);
#pragma unroll
            for (int i = 0; i < kGradSums; ++i) sums[i][j] = one[i];
          }
        }
      }
      offset += kSteps * offset_step;
    }
  }

  block_sum_columns(sums);
  if (threadIdx.y == 0 && column < columns) {
    const int64_t slot = static_cast<int64_t>(blockIdx.y) * geometry.channels + column * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const double one[kGradSums] = {sums[0][j], sums[1][j], sums[2][j]};
      partials.store(slot + j, one);
    }
  }
}

// ---------------------------------------------------------------------------
// Backward, pass 2: per channel, merge the partials (fixed order, in double),
// write grad_weight / grad_bias and the grad-input coefficients
// (common::grad_input_coefficients, the CPU's formula).

template <typename scalar_t, typename param_t>
struct FinalizeGradArgs {
  using acc_t = acc_type<scalar_t>;
  GradPartials partials;
  int64_t splits;  // 0: no sums were taken (eval, grad_input only)
  int64_t channels;
  int64_t count_per_channel;
  const param_t* weight;
  const acc_t* invstd;
  bool training;
  param_t* grad_weight;
  param_t* grad_bias;
  GradInputCoefficients<acc_t> coefficients;
};

template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_grad_kernel(const FinalizeGradArgs<scalar_t, param_t> args) {
  using acc_t = acc_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t channel =
      static_cast<int64_t>(blockIdx.x) * kFinalizeChannelsPerBlock + threadIdx.x / kWarpSize;
  if (channel >= args.channels) return;  // whole warps leave together

  double sums[kGradSums] = {0.0, 0.0, 0.0};
  for (int64_t split = lane; split < args.splits; split += kWarpSize) {
    args.partials.add_to(split * args.channels + channel, sums);
  }
  warp_sum(sums);
  if (lane != 0) return;

  const double sum_dy = sums[0];
  const int64_t n = args.count_per_channel;
  const double sum_dy_xmu = args.training && n > 0 ? common::centered_sum_dy_xmu(sum_dy, sums[1], sums[2], n)
                                                   : sums[1];
  const double invstd = static_cast<double>(args.invstd[channel]);
  const double w = args.weight != nullptr ? convert<double>(args.weight[channel]) : 1.0;
  if (args.grad_weight != nullptr) args.grad_weight[channel] = convert<param_t>(sum_dy_xmu * invstd);
  if (args.grad_bias != nullptr) args.grad_bias[channel] = convert<param_t>(sum_dy);
  const common::GradInputCoefficients k =
      common::grad_input_coefficients(w, invstd, sum_dy, sum_dy_xmu, n, args.training);
  args.coefficients.scale[channel] = static_cast<acc_t>(k.scale);
  args.coefficients.projection[channel] = static_cast<acc_t>(k.projection);
  args.coefficients.shift[channel] = static_cast<acc_t>(k.shift);
}

// ---------------------------------------------------------------------------
// Training backward of channels of two values, x̄ ± d, one thread per channel.
// There x̂ = ±d/√(d² + ε) and dx = w·invstd·(g − ḡ − x̂·mean(g·x̂)) cancels to
// w·invstd·(g₀ − g₁)/2 · ε/(d² + ε), which the three passes would leave to the
// float rounding of their terms and of the saved invstd. So it is computed in
// double from ε and the exact variance: in closed form where every value is
// finite, else by the general formula (nn's NaN/inf pattern). The same
// arithmetic as the CPU's cpu::two_values_backward.

template <typename scalar_t, typename param_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    two_values_backward_kernel(const BackwardParams<scalar_t, param_t> p) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = p.geometry;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= g.channels) return;
  // Two rows of C channels (channels-last, or N = 2 with HW = 1), else
  // neighbours in the channel's plane (N = 1, HW = 2).
  const bool rows = g.layout == Layout::kChannelsLast || g.spatial == 1;
  const int64_t at[2] = {rows ? c : 2 * c, rows ? g.channels + c : 2 * c + 1};
  double x[2], dy[2];
  for (int i = 0; i < 2; ++i) {
    x[i] = static_cast<double>(convert<acc_t>(p.input[at[i]]));
    dy[i] = static_cast<double>(convert<acc_t>(p.grad_output[at[i]]));
  }
  const double d = (x[0] - x[1]) / 2;  // x₀ − x̄; x₁ − x̄ is −d
  const double denom = d * d + p.eps;
  const double invstd = 1.0 / sqrt(denom);
  const double sum_dy = dy[0] + dy[1], sum_dy_xmu = (dy[0] - dy[1]) * d;
  if (p.grad_weight != nullptr) p.grad_weight[c] = convert<param_t>(sum_dy_xmu * invstd);
  if (p.grad_bias != nullptr) p.grad_bias[c] = convert<param_t>(sum_dy);
  if (p.grad_input == nullptr) return;
  const double scale = (p.weight != nullptr ? convert<double>(p.weight[c]) : 1.0) * invstd;
  const bool finite = isfinite(dy[0]) && isfinite(dy[1]) && isfinite(d) && denom > 0;
  const double closed_dx0 = scale * (dy[0] - dy[1]) / 2 * (p.eps / denom);  // dx₁ = −dx₀
  for (int i = 0; i < 2; ++i) {
    const double xmu = i == 0 ? d : -d;
    const double dx = finite ? (i == 0 ? closed_dx0 : -closed_dx0)
                             : scale * (dy[i] - sum_dy / 2 - xmu * sum_dy_xmu / (2 * denom));
    p.grad_input[at[i]] = convert<scalar_t>(dx);
  }
}

// ---------------------------------------------------------------------------
// Backward, pass 3: dx = (g − shift − (x − mean) · projection) · scale. In
// eval mode projection == shift == 0 and x is not read.

template <typename acc_t>
struct GradInputArgs {
  const acc_t* mean;
  GradInputCoefficients<acc_t> coefficients;
};

// As the CPU's (fnmadd): (g − shift) − (x − mean) · projection fused, times
// scale; eval's dx is g · scale (kTraining false: shift is 0, x not read).
template <bool kTraining, typename acc_t, typename scalar_t>
__device__ __forceinline__ scalar_t grad_input_value(scalar_t dy, scalar_t x, acc_t mean, acc_t scale,
                                                     acc_t projection, acc_t shift) {
  if constexpr (!kTraining) return convert<scalar_t>(convert<acc_t>(dy) * scale);
  return convert<scalar_t>(fused_multiply_add(mean - convert<acc_t>(x), projection, convert<acc_t>(dy) - shift) *
                           scale);
}

template <typename scalar_t, int kVec, bool kTraining>
__global__ void __launch_bounds__(kMaxThreads)
    channels_first_grad_input_kernel(const scalar_t* __restrict__ grad_output,
                                     const scalar_t* __restrict__ input, scalar_t* __restrict__ grad_input,
                                     Geometry geometry, int64_t vectors_per_split,
                                     const GradInputArgs<acc_type<scalar_t>> args) {
  constexpr int kSteps = kDualUnroll<kVec>;
  using acc_t = acc_type<scalar_t>;
  const int64_t channel = blockIdx.x;
  const int64_t plane_vectors = geometry.spatial / kVec;
  const int64_t total = geometry.batch * plane_vectors;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * vectors_per_split;
  const int64_t end = min_index(total, begin + vectors_per_split);
  const int64_t image_stride = geometry.channels * geometry.spatial;
  const int64_t stride = blockDim.x;
  int64_t position = begin + threadIdx.x;
  if (position >= end) return;

  const acc_t mean = args.mean[channel];
  const acc_t scale = args.coefficients.scale[channel];
  const acc_t projection = args.coefficients.projection[channel];
  const acc_t shift = args.coefficients.shift[channel];
  const int64_t channel_offset = channel * geometry.spatial;
  PlaneCursor cursor(position, stride, plane_vectors);
  for (; position < end; position += stride * kSteps) {
    Bundle<scalar_t, kVec> dy[kSteps], x[kSteps];
    int64_t offsets[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      offsets[u] = channel_offset + cursor.offset(image_stride, kVec);
      if (position + u * stride < end) {
        dy[u] = load_bundle<scalar_t, kVec>(grad_output + offsets[u]);
        if (kTraining) x[u] = load_bundle<scalar_t, kVec>(input + offsets[u]);
      }
      cursor.advance();
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      if (position + u * stride < end) {
        Bundle<scalar_t, kVec> dx;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          dx.v[j] = grad_input_value<kTraining>(dy[u].v[j], x[u].v[j], mean, scale, projection, shift);
        }
        store_bundle<scalar_t, kVec>(grad_input + offsets[u], dx);
      }
    }
  }
}

template <typename scalar_t, int kVec, bool kTraining>
__global__ void __launch_bounds__(kMaxThreads)
    channels_last_grad_input_kernel(const scalar_t* __restrict__ grad_output,
                                    const scalar_t* __restrict__ input, scalar_t* __restrict__ grad_input,
                                    Geometry geometry, int64_t rows_per_split,
                                    const GradInputArgs<acc_type<scalar_t>> args) {
  constexpr int kSteps = kDualUnroll<kVec>;
  using acc_t = acc_type<scalar_t>;
  const int64_t columns = geometry.channels / kVec;
  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t rows = geometry.batch * geometry.spatial;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t end = min_index(rows, begin + rows_per_split);
  const int64_t row_step = blockDim.y;
  int64_t row = begin + threadIdx.y;
  if (column >= columns || row >= end) return;

  acc_t mean[kVec], scale[kVec], projection[kVec], shift[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t c = column * kVec + j;
    mean[j] = args.mean[c];
    scale[j] = args.coefficients.scale[c];
    projection[j] = args.coefficients.projection[c];
    shift[j] = args.coefficients.shift[c];
  }
  const int64_t offset_step = row_step * geometry.channels;
  int64_t offset = row * geometry.channels + column * kVec;
  for (; row < end; row += row_step * kSteps) {
    Bundle<scalar_t, kVec> dy[kSteps], x[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      if (row + u * row_step < end) {
        dy[u] = load_bundle<scalar_t, kVec>(grad_output + offset + u * offset_step);
        if (kTraining) x[u] = load_bundle<scalar_t, kVec>(input + offset + u * offset_step);
      }
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      if (row + u * row_step < end) {
        Bundle<scalar_t, kVec> dx;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          dx.v[j] = grad_input_value<kTraining>(dy[u].v[j], x[u].v[j], mean[j], scale[j], projection[j], shift[j]);
        }
        store_bundle<scalar_t, kVec>(grad_input + offset + u * offset_step, dx);
      }
    }
    offset += kSteps * offset_step;
  }
}

// ---------------------------------------------------------------------------
// Host side: grid plans, workspace layout, launches.

// 16-byte vectors when every pointer is 16-byte aligned and the contiguous run
// (HW for channels-first, C for channels-last) is a whole number of vectors,
// so no vector straddles two channels or two images; scalar accesses otherwise.
template <typename scalar_t>
int pick_vector_width(const Geometry& geometry, std::initializer_list<const void*> pointers) {
  constexpr int vec = kVectorWidth<scalar_t>;
  const int64_t run = geometry.layout == Layout::kChannelsFirst ? geometry.spatial : geometry.channels;
  if (run % vec != 0) return 1;
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return vec;
}

// Channels-first: grid (C, splits), 1-D blocks over one channel's slice of
// N x HW/vec vector positions. Channels-last: grid (column tiles, splits),
// blocks of (block.x vector columns) x (block.y rows); splits cut the N*HW rows.
struct LaunchPlan {
  dim3 grid;
  dim3 block;
  int64_t work_per_split = 0;  // vector positions (channels-first) or rows (channels-last)
  int64_t splits = 1;
  int vec = 1;
};

LaunchPlan make_plan(const Geometry& g, int vec) {
  LaunchPlan plan;
  plan.vec = vec;
  if (g.channels <= 0) return plan;  // nothing is launched for C == 0
  const int64_t target_threads = static_cast<int64_t>(std::max(g.multiprocessor_count, 1)) *
                                 kTargetThreadsPerMultiprocessor;
  if (g.layout == Layout::kChannelsFirst) {
    const int64_t total = g.batch * (g.spatial / vec);
    // Small planes get small blocks rather than idle threads.
    int threads = kMaxThreads;
    while (threads > kWarpSize && threads >= 2 * total) threads /= 2;
    const int64_t blocks_wanted = std::max<int64_t>(1, target_threads / threads);
    int64_t splits = ceil_div(blocks_wanted, g.channels);
    const int64_t splits_with_work =
        ceil_div(total, static_cast<int64_t>(threads) * kUnroll * kMinIterationsPerThread);
    splits = std::min(splits, std::max<int64_t>(1, splits_with_work));
    splits = std::max<int64_t>(1, std::min(splits, kMaxGridY));
    // Whole multiples of the block per split: every thread of a split does the
    // same number of iterations.
    plan.work_per_split = std::max<int64_t>(threads, round_up(ceil_div(total, splits), threads));
    plan.splits = std::max<int64_t>(1, ceil_div(total, plan.work_per_split));
    plan.grid = dim3(static_cast<unsigned>(g.channels), static_cast<unsigned>(plan.splits), 1);
    plan.block = dim3(static_cast<unsigned>(threads), 1, 1);
    return plan;
  }
  const int64_t columns = g.channels / vec;
  const int64_t rows = g.batch * g.spatial;
  const int block_x = static_cast<int>(std::min<int64_t>(columns, kWarpSize));
  int block_y = kMaxThreads / block_x;
  while (block_y > 1 && block_y >= 2 * rows) block_y /= 2;
  const int64_t tiles = ceil_div(columns, block_x);
  const int64_t blocks_wanted = std::max<int64_t>(1, target_threads / (block_x * block_y));
  int64_t splits = ceil_div(blocks_wanted, tiles);
  const int64_t splits_with_work = ceil_div(rows, static_cast<int64_t>(block_y) * kUnroll * kMinIterationsPerThread);
  splits = std::min(splits, std::max<int64_t>(1, splits_with_work));
  splits = std::max<int64_t>(1, std::min(splits, kMaxGridY));
  plan.work_per_split = std::max<int64_t>(block_y, round_up(ceil_div(rows, splits), block_y));
  plan.splits = std::max<int64_t>(1, ceil_div(rows, plan.work_per_split));
  plan.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(plan.splits), 1);
  plan.block = dim3(static_cast<unsigned>(block_x), static_cast<unsigned>(block_y), 1);
  return plan;
}

// f(std::integral_constant<int, kVec>) for the plan's 16-byte vectors, else
// f(std::integral_constant<int, 1>): each kernel is instantiated for both.
template <typename scalar_t, typename F>
cudaError_t with_vector_width(const LaunchPlan& plan, F&& f) {
  constexpr int kVec = kVectorWidth<scalar_t>;
  if (plan.vec == kVec) return f(std::integral_constant<int, kVec>{});
  return f(std::integral_constant<int, 1>{});
}

// Carves typed arrays out of the caller's workspace. Run with a null base it
// only measures, so the byte count and the launch agree by construction.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base) : base_(static_cast<char*>(base)) {}

  template <typename T>
  T* take(int64_t count) {
    const size_t offset = bytes_;
    bytes_ += (static_cast<size_t>(count) * sizeof(T) + kWorkspaceAlignment - 1) / kWorkspaceAlignment *
              kWorkspaceAlignment;
    return base_ != nullptr ? reinterpret_cast<T*>(base_ + offset) : nullptr;
  }

  size_t bytes() const { return bytes_; }

 private:
  char* base_;
  size_t bytes_ = 0;
};

template <typename acc_t>
struct ForwardWorkspace {
  int64_t* counter_snapshot;
  double* partial_mean;
  double* partial_m2;
  double* partial_count;
  acc_t* mean_hi;
  acc_t* mean_lo;
  acc_t* scale;
  acc_t* shift;
  size_t bytes;
};

template <typename acc_t>
ForwardWorkspace<acc_t> carve_forward_workspace(void* base, int64_t channels, int64_t splits) {
  WorkspaceCarver carver(base);
  ForwardWorkspace<acc_t> ws;
  ws.counter_snapshot = carver.take<int64_t>(1);
  ws.partial_mean = carver.take<double>(splits * channels);
  ws.partial_m2 = carver.take<double>(splits * channels);
  ws.partial_count = carver.take<double>(splits * channels);
  ws.mean_hi = carver.take<acc_t>(channels);
  ws.mean_lo = carver.take<acc_t>(channels);
  ws.scale = carver.take<acc_t>(channels);
  ws.shift = carver.take<acc_t>(channels);
  ws.bytes = carver.bytes();
  return ws;
}

template <typename acc_t>
struct BackwardWorkspace {
  GradPartials partials;
  GradInputCoefficients<acc_t> coefficients;
  size_t bytes;
};

template <typename acc_t>
BackwardWorkspace<acc_t> carve_backward_workspace(void* base, int64_t channels, int64_t splits) {
  WorkspaceCarver carver(base);
  BackwardWorkspace<acc_t> ws;
  ws.partials.sum_dy = carver.take<double>(splits * channels);
  ws.partials.sum_dy_xmu = carver.take<double>(splits * channels);
  ws.partials.sum_xmu = carver.take<double>(splits * channels);
  ws.coefficients.scale = carver.take<acc_t>(channels);
  ws.coefficients.projection = carver.take<acc_t>(channels);
  ws.coefficients.shift = carver.take<acc_t>(channels);
  ws.bytes = carver.bytes();
  return ws;
}

int64_t count_per_channel(const Geometry& g) { return g.batch * g.spatial; }

// The moments and grad-sums passes run with this plan; the workspace is sized by it.
template <typename scalar_t, typename param_t>
LaunchPlan forward_moments_plan(const TrainForwardParams<scalar_t, param_t>& p) {
  return make_plan(p.geometry, pick_vector_width<scalar_t>(p.geometry, {p.input}));
}

template <typename scalar_t, typename param_t>
bool backward_needs_sums(const BackwardParams<scalar_t, param_t>& p) {
  return (p.training && p.grad_input != nullptr) || p.grad_weight != nullptr || p.grad_bias != nullptr;
}

template <typename scalar_t, typename param_t>
LaunchPlan backward_sums_plan(const BackwardParams<scalar_t, param_t>& p) {
  return make_plan(p.geometry, pick_vector_width<scalar_t>(p.geometry, {p.input, p.grad_output}));
}

template <typename scalar_t, typename param_t>
cudaError_t launch_normalize(const Geometry& g, const scalar_t* input, scalar_t* output,
                             const NormalizeCoefficients<acc_type<scalar_t>, param_t>& coefficients,
                             cudaStream_t stream) {
  const LaunchPlan plan = make_plan(g, pick_vector_width<scalar_t>(g, {input, output}));
  return with_vector_width<scalar_t>(plan, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    if (g.layout == Layout::kChannelsFirst) {
      return launch_kernel<channels_first_normalize_kernel<scalar_t, param_t, kVec>, kMaxThreads>(
          plan.grid, plan.block, stream, input, output, g, plan.work_per_split, coefficients);
    }
    return launch_kernel<channels_last_normalize_kernel<scalar_t, param_t, kVec>, kMaxThreads>(
        plan.grid, plan.block, stream, input, output, g, plan.work_per_split, coefficients);
  });
}

}  // namespace

// ---------------------------------------------------------------------------
// Public launchers.

template <typename scalar_t, typename param_t>
size_t train_forward_workspace_bytes(const TrainForwardParams<scalar_t, param_t>& params) {
  using acc_t = acc_type<scalar_t>;
  if (params.geometry.channels == 0) return 0;
  return carve_forward_workspace<acc_t>(nullptr, params.geometry.channels, forward_moments_plan(params).splits)
      .bytes;
}

template <typename scalar_t, typename param_t>
cudaError_t launch_batch_norm_train_forward(const TrainForwardParams<scalar_t, param_t>& p,
                                            cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = p.geometry;
  if (g.channels == 0) {
    if (p.num_batches_tracked == nullptr) return cudaSuccess;
    return launch_kernel<increment_counter_kernel, 1>(dim3(1), dim3(1), stream, p.num_batches_tracked);
  }

  // Pass 1 also runs for an empty batch: its partials are empty and it takes
  // the counter snapshot the finalize pass relies on.
  const LaunchPlan plan = forward_moments_plan(p);
  const ForwardWorkspace<acc_t> ws = carve_forward_workspace<acc_t>(p.workspace, g.channels, plan.splits);
  cudaError_t err = with_vector_width<scalar_t>(plan, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    if (g.layout == Layout::kChannelsFirst) {
      return launch_kernel<channels_first_moments_kernel<scalar_t, kVec>, kMaxThreads>(
          plan.grid, plan.block, stream, p.input, g, plan.work_per_split, ws.partial_mean, ws.partial_m2,
          ws.partial_count, p.num_batches_tracked, ws.counter_snapshot);
    }
    return launch_kernel<channels_last_moments_kernel<scalar_t, kVec>, kMaxThreads>(
        plan.grid, plan.block, stream, p.input, g, plan.work_per_split, ws.partial_mean, ws.partial_m2,
        ws.partial_count, p.num_batches_tracked, ws.counter_snapshot);
  });
  if (err != cudaSuccess) return err;

  FinalizeMomentsArgs<scalar_t, param_t> args;
  args.partial_mean = ws.partial_mean;
  args.partial_m2 = ws.partial_m2;
  args.partial_count = ws.partial_count;
  args.splits = plan.splits;
  args.channels = g.channels;
  args.count_per_channel = count_per_channel(g);
  args.input = p.input;
  args.first_element_stride = g.layout == Layout::kChannelsFirst ? g.spatial : 1;
  args.weight = p.weight;
  args.bias = p.bias;
  args.running_mean = p.running_mean;
  args.running_var = p.running_var;
  args.counter = p.num_batches_tracked;
  args.counter_snapshot = ws.counter_snapshot;
  args.save_mean = p.save_mean;
  args.save_invstd = p.save_invstd;
  args.mean_hi = ws.mean_hi;
  args.mean_lo = ws.mean_lo;
  args.scale = ws.scale;
  args.shift = ws.shift;
  args.eps = p.eps;
  args.momentum = p.momentum;
  args.cumulative_momentum = p.cumulative_momentum;
  const int64_t finalize_blocks = ceil_div(g.channels, kFinalizeChannelsPerBlock);
  err = launch_kernel<finalize_moments_kernel<scalar_t, param_t>, kFinalizeThreads>(
      dim3(static_cast<unsigned>(finalize_blocks)), dim3(kFinalizeThreads), stream, args);
  if (err != cudaSuccess) return err;

  if (count_per_channel(g) == 0) return cudaSuccess;
  NormalizeCoefficients<acc_t, param_t> coefficients;
  coefficients.mean_hi = ws.mean_hi;
  coefficients.mean_lo = ws.mean_lo;
  coefficients.scale = ws.scale;
  coefficients.shift = ws.shift;
  return launch_normalize<scalar_t, param_t>(g, p.input, p.output, coefficients, stream);
}

template <typename scalar_t, typename param_t>
cudaError_t launch_batch_norm_eval_forward(const EvalForwardParams<scalar_t, param_t>& p,
                                           cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = p.geometry;
  if (g.channels == 0 || count_per_channel(g) == 0) return cudaSuccess;
  NormalizeCoefficients<acc_t, param_t> coefficients;
  coefficients.running_mean = p.running_mean;
  coefficients.running_var = p.running_var;
  coefficients.weight = p.weight;
  coefficients.bias = p.bias;
  coefficients.eps = p.eps;
  return launch_normalize<scalar_t, param_t>(g, p.input, p.output, coefficients, stream);
}

template <typename scalar_t, typename param_t>
size_t backward_workspace_bytes(const BackwardParams<scalar_t, param_t>& params) {
  using acc_t = acc_type<scalar_t>;
  if (params.geometry.channels == 0) return 0;
  const int64_t splits = backward_needs_sums(params) ? backward_sums_plan(params).splits : 0;
  return carve_backward_workspace<acc_t>(nullptr, params.geometry.channels, splits).bytes;
}

template <typename scalar_t, typename param_t>
cudaError_t launch_batch_norm_backward(const BackwardParams<scalar_t, param_t>& p, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const Geometry& g = p.geometry;
  const bool needs_sums = backward_needs_sums(p);
  if (g.channels == 0 || (!needs_sums && p.grad_input == nullptr)) return cudaSuccess;
  if (p.training && count_per_channel(g) == 2) {
    return launch_kernel<two_values_backward_kernel<scalar_t, param_t>, kFinalizeThreads>(
        dim3(static_cast<unsigned>(ceil_div(g.channels, kFinalizeThreads))), dim3(kFinalizeThreads), stream, p);
  }

  const LaunchPlan sums_plan = backward_sums_plan(p);
  const int64_t splits = needs_sums ? sums_plan.splits : 0;
  const BackwardWorkspace<acc_t> ws = carve_backward_workspace<acc_t>(p.workspace, g.channels, splits);
  if (needs_sums) {
    // Also runs for an empty batch, leaving zero sums.
    const cudaError_t err = with_vector_width<scalar_t>(sums_plan, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      if (g.layout == Layout::kChannelsFirst) {
        return launch_kernel<channels_first_grad_sums_kernel<scalar_t, kVec>, kMaxThreads>(
            sums_plan.grid, sums_plan.block, stream, p.grad_output, p.input, g, sums_plan.work_per_split, p.mean,
            ws.partials);
      }
      return launch_kernel<channels_last_grad_sums_kernel<scalar_t, kVec>, kMaxThreads>(
          sums_plan.grid, sums_plan.block, stream, p.grad_output, p.input, g, sums_plan.work_per_split, p.mean,
          ws.partials);
    });
    if (err != cudaSuccess) return err;
  }

  FinalizeGradArgs<scalar_t, param_t> args;
  args.partials = ws.partials;
  args.splits = splits;
  args.channels = g.channels;
  args.count_per_channel = count_per_channel(g);
  args.weight = p.weight;
  args.invstd = p.invstd;
  args.training = p.training;
  args.grad_weight = p.grad_weight;
  args.grad_bias = p.grad_bias;
  args.coefficients = ws.coefficients;
  const int64_t finalize_blocks = ceil_div(g.channels, kFinalizeChannelsPerBlock);
  const cudaError_t err = launch_kernel<finalize_grad_kernel<scalar_t, param_t>, kFinalizeThreads>(
      dim3(static_cast<unsigned>(finalize_blocks)), dim3(kFinalizeThreads), stream, args);
  if (err != cudaSuccess) return err;

  if (p.grad_input == nullptr || count_per_channel(g) == 0) return cudaSuccess;
  const GradInputArgs<acc_t> args_dx{p.mean, ws.coefficients};
  const LaunchPlan plan =
      make_plan(g, p.training ? pick_vector_width<scalar_t>(g, {p.grad_output, p.input, p.grad_input})
                              : pick_vector_width<scalar_t>(g, {p.grad_output, p.grad_input}));
  return with_vector_width<scalar_t>(plan, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    auto launch = [&](auto training) {
      constexpr bool kTraining = decltype(training)::value;
      if (g.layout == Layout::kChannelsFirst) {
        return launch_kernel<channels_first_grad_input_kernel<scalar_t, kVec, kTraining>, kMaxThreads>(
            plan.grid, plan.block, stream, p.grad_output, p.input, p.grad_input, g, plan.work_per_split, args_dx);
      }
      return launch_kernel<channels_last_grad_input_kernel<scalar_t, kVec, kTraining>, kMaxThreads>(
          plan.grid, plan.block, stream, p.grad_output, p.input, p.grad_input, g, plan.work_per_split, args_dx);
    };
    return p.training ? launch(std::true_type{}) : launch(std::false_type{});
  });
}

// Every (input, parameter) dtype pair batch norm accepts.
#define FUSED_BN_INSTANTIATE(scalar_t, param_t)                                                         \
  template size_t train_forward_workspace_bytes<scalar_t, param_t>(                                   \
      const TrainForwardParams<scalar_t, param_t>&);                                                  \
  template cudaError_t launch_batch_norm_train_forward<scalar_t, param_t>(                            \
      const TrainForwardParams<scalar_t, param_t>&, cudaStream_t);                                    \
  template cudaError_t launch_batch_norm_eval_forward<scalar_t, param_t>(                             \
      const EvalForwardParams<scalar_t, param_t>&, cudaStream_t);                                     \
  template size_t backward_workspace_bytes<scalar_t, param_t>(const BackwardParams<scalar_t, param_t>&); \
  template cudaError_t launch_batch_norm_backward<scalar_t, param_t>(const BackwardParams<scalar_t, param_t>&, \
                                                                     cudaStream_t);

FUSED_BN_INSTANTIATE(float, float)
FUSED_BN_INSTANTIATE(double, double)
FUSED_BN_INSTANTIATE(__half, __half)
FUSED_BN_INSTANTIATE(__half, float)
FUSED_BN_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
FUSED_BN_INSTANTIATE(__nv_bfloat16, float)

#undef FUSED_BN_INSTANTIATE

}  // namespace cuda
}  // namespace fused_bn
