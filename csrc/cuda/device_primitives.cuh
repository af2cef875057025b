// Device primitives of the CUDA kernels: grid constants, accumulation types,
// half/bfloat16 conversions (through intrinsics, as PyTorch builds
// extensions), 16-byte bundles and the scalar helpers the passes share.
#pragma once

#include "batch_norm_kernels.cuh"

#include <cstdint>
#include <type_traits>

namespace fused_bn {
namespace cuda {
// Internal to the kernel layer (forward.cu, backward.cu).
namespace detail {

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

// The kernel layer's global-memory accesses go through the helpers below
// (load_bundle and store_bundle for the element and reduction passes,
// load_global and store_global for single values), so the emulated GPU can
// account for them (cuda_emulation.h, note_global_access: warp requests,
// sectors, bytes per launch); each records its caller's source line, the
// instruction a warp issues. Under nvcc the hooks expand to nothing and the
// helpers are the plain dereferences.
#if defined(FUSED_BN_CUDA_EMULATION)
#define FUSED_BN_ACCESS_SITE , const char *access_file = __builtin_FILE(), int access_line = __builtin_LINE()
#define FUSED_BN_RECORD_ACCESS(p, bytes, store, element) \
  ::fused_bn::emulation::note_global_access(p, bytes, store, element, access_file, access_line)
#else
#define FUSED_BN_ACCESS_SITE
#define FUSED_BN_RECORD_ACCESS(p, bytes, store, element) ((void)0)
#endif

template <typename T, int kVec>
__device__ __forceinline__ Bundle<T, kVec> load_bundle(const T* p FUSED_BN_ACCESS_SITE) {
  FUSED_BN_RECORD_ACCESS(p, sizeof(Bundle<T, kVec>), false, true);
  return *reinterpret_cast<const Bundle<T, kVec>*>(p);
}

template <typename T, int kVec>
__device__ __forceinline__ void store_bundle(T* p, const Bundle<T, kVec>& b FUSED_BN_ACCESS_SITE) {
  FUSED_BN_RECORD_ACCESS(p, sizeof(Bundle<T, kVec>), true, true);
  *reinterpret_cast<Bundle<T, kVec>*>(p) = b;
}

// One value of global memory (per-channel statistics and coefficients,
// partial sums, the x of two-value channels).
template <typename T>
__device__ __forceinline__ T load_global(const T* p FUSED_BN_ACCESS_SITE) {
  FUSED_BN_RECORD_ACCESS(p, sizeof(T), false, false);
  return *p;
}

template <typename T, typename V>
__device__ __forceinline__ void store_global(T* p, const V& v FUSED_BN_ACCESS_SITE) {
  FUSED_BN_RECORD_ACCESS(p, sizeof(T), true, false);
  *p = static_cast<T>(v);
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

// A per-channel parameter (the weight, the forward's bias) as the backward's
// grad-sums pass reads it. Its dtype is scalar_t's pair's
// (FUSED_BN_CUDA_DTYPE_PAIRS: scalar_t, or float beside half/bfloat16), told
// at run time, so that pass's kernels (one per activation and gradient
// source) are instantiated per input dtype rather than per pair. Read once
// per channel and thread, as a double (exact for every parameter dtype);
// nullable.
template <typename scalar_t>
struct ParamArray {
  const void* data = nullptr;
  bool is_float = false;  // float parameters beside half/bfloat16 input

  template <typename param_t>
  FUSED_BN_HOST_DEVICE static ParamArray of(const param_t* p) {
    static_assert(std::is_same_v<param_t, scalar_t> || std::is_same_v<param_t, float>,
                  "parameters are the input's dtype or float");
    ParamArray a;
    a.data = p;
    a.is_float = !std::is_same_v<param_t, scalar_t>;
    return a;
  }
  __device__ __forceinline__ bool defined() const { return data != nullptr; }
  __device__ __forceinline__ double load(int64_t c) const {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      return static_cast<double>(load_global(static_cast<const scalar_t*>(data) + c));
    } else {
      return is_float ? static_cast<double>(load_global(static_cast<const float*>(data) + c))
                      : convert<double>(load_global(static_cast<const scalar_t*>(data) + c));
    }
  }
};

__device__ __forceinline__ float fused_multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fused_multiply_add(double a, double b, double c) { return fma(a, b, c); }

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
