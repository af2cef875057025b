// An emulated GPU for the kernel layer: the CUDA built-ins csrc/cuda uses,
// for host C++ (g++), so the same .cu source runs on the CPU under the test
// suite (FUSED_BN_CUDA_EMULATION; see docs/testing.md, "Testing the CUDA kernels without a GPU"). Never included by nvcc.
//
// Execution model (emulation.cpp): a launch runs its blocks one at a time in a
// configurable order (forward, reverse, seeded shuffle); a block's threads are
// fibers switched only at __syncthreads and __shfl_*_sync, resumed between two
// such points in a permuted order with the same seed, so a missing barrier or
// a result that depends on block order changes the output. Misuse that is
// undefined on a GPU fails the launch with the kernel's name: a barrier not
// reached by every thread or threads at different barriers, a shuffle whose
// mask names a lane that is absent (a partial warp) or that does not reach the
// same call, block or grid sizes over the hardware's limits.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is for host compilers; nvcc compiles the kernels for a real GPU"
#endif

// Defined before the CUDA headers, which otherwise define them as nothing (a
// __shared__ array would silently become per-thread). One emulated block runs
// at a time, so a function-local static is exactly one block's shared array
// (and AddressSanitizer bounds-checks statics, not thread_local arrays).
#define __host__
#define __device__
#define __global__
#define __shared__ static
// g++ cannot see the attribute: the launch states the bound instead
// (cuda::launch_kernel's kMaxThreadsPerBlock), and the emulated launch checks it.
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

using std::fma;
using std::isfinite;
using std::sqrt;

#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif

namespace fused_bn {
namespace emulation {

// The emulated device: what a kernel may ask of it, and how launches run.
enum class BlockOrder : int { kForward = 0, kReverse = 1, kShuffle = 2 };

struct DeviceConfig {
  int multiprocessor_count = 4;
  BlockOrder order = BlockOrder::kForward;
  uint64_t seed = 0;  // kShuffle's block order, and every order's thread order
  // What the occupancy query answers for every kernel: threads of one
  // multiprocessor's resident blocks (a GPU's depends on each kernel's
  // registers and shared memory; the grids are sized by it).
  int resident_threads_per_multiprocessor = 1024;
};

void set_config(const DeviceConfig& config);
DeviceConfig config();
// Launches (of any kernel) since the process started: tests use it to prove
// that an op went through the emulated kernels.
int64_t launch_count();

const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

void sync_threads(const char* file, int line);

enum class ShuffleKind : int { kIndex = 0, kUp = 1, kDown = 2, kXor = 3 };
// The 32-bit or 64-bit payload of one lane's shuffle, exchanged at the call.
uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t value, int lane_argument, int width,
                 const char* file, int line);

// rcp.approx.ftz: the hardware's approximation is not specified bit for bit.
// The float one returns the correctly rounded reciprocal and the double one the
// float reciprocal widened (about 2^-24 relative, the precision class of the
// hardware's), so the Newton steps that follow in the kernels start from an
// approximation as good as the GPU's, not from the same bits (docs/testing.md, "What only a real GPU can prove").
float rcp_approx_ftz(float x);
double rcp_approx_ftz(double x);

// One type-erased kernel body per thread of each block.
using KernelBody = void (*)(const void* closure);
cudaError_t launch(const char* kernel_name, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                   unsigned max_threads_per_block, KernelBody body, const void* closure);
// The failed launch's kernel, block and reason.
const char* last_error_message();
cudaError_t get_last_error();
const char* error_name(cudaError_t err);

// Global-memory traffic accounting (tests/emulated_cuda.py's traffic(); off
// by default). Every load and store of the kernel layer's access helpers
// (device_primitives.cuh: load_bundle, store_bundle, load_global,
// store_global) calls note_global_access, which costs one branch while off.
// The emulator groups the k-th access of one source site by the lanes of a
// warp between the same two synchronisation points (__syncthreads, a shuffle)
// into one warp request, as a GPU issues one instruction for the warp, and
// counts per launch requests, 32-byte sectors, 128-byte lines, bytes asked and
// the address ranges touched (emulation.cpp, traffic_json).
inline bool traffic_recording = false;
// element: an element pass's access (load_bundle, store_bundle: the bulk
// traffic), not a single per-channel value (load_global, store_global).
void record_global_access(const void* address, unsigned bytes, bool store, bool element, const char* file,
                          int line);
inline void note_global_access(const void* address, unsigned bytes, bool store, bool element, const char* file,
                               int line) {
  if (traffic_recording) record_global_access(address, bytes, store, element, file, line);
}
// Starts (clearing what was recorded) or stops recording. every_kth_block > 1
// runs only the blocks whose linear index is a multiple of it while recording
// (bench/traffic.py's large shapes: the addresses do not depend on the data,
// but the results are garbage); each launch's record says how many ran.
void set_traffic_recording(bool on, int64_t every_kth_block = 1);
// The launches recorded since recording started or the last take, as JSON
// (a list of per-launch objects), and forgets them.
std::string take_traffic_json();

template <typename T>
T shuffle_as(ShuffleKind kind, unsigned mask, T value, int lane_argument, int width, const char* file,
             int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t),
                "the emulated shuffle moves 32- and 64-bit values");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(kind, mask, bits, lane_argument, width, file, line);
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

}  // namespace emulation
}  // namespace fused_bn

#define threadIdx (::fused_bn::emulation::thread_index())
#define blockIdx (::fused_bn::emulation::block_index())
#define blockDim (::fused_bn::emulation::block_dim())
#define gridDim (::fused_bn::emulation::grid_dim())
#define warpSize 32
#define __syncthreads() ::fused_bn::emulation::sync_threads(__FILE__, __LINE__)

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return ::fused_bn::emulation::shuffle_as(::fused_bn::emulation::ShuffleKind::kIndex, mask, value, source_lane,
                                           width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return ::fused_bn::emulation::shuffle_as(::fused_bn::emulation::ShuffleKind::kUp, mask, value,
                                           static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::fused_bn::emulation::shuffle_as(::fused_bn::emulation::ShuffleKind::kDown, mask, value,
                                           static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return ::fused_bn::emulation::shuffle_as(::fused_bn::emulation::ShuffleKind::kXor, mask, value, lane_mask, width,
                                           file, line);
}
