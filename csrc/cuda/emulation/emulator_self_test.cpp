// Kernels that misuse CUDA on purpose, and a few that use it right, run by
// tests/test_emulation.py to show that the emulated GPU catches what a GPU
// leaves undefined (and computes what a GPU computes). Test-only.
#include <torch/library.h>

#include <ATen/ATen.h>

#include <string>

#include "../cuda_platform.h"

namespace fused_bn {
namespace emulation {
namespace {

using cuda::launch_kernel;

constexpr unsigned kFull = 0xffffffffu;

// Writes shared memory, then reads another thread's entry without a barrier.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float values[64];
  values[threadIdx.x] = static_cast<float>(threadIdx.x) + 1.0f;
  out[threadIdx.x] = values[63 - threadIdx.x];
}

__global__ void with_barrier_kernel(float* out) {
  __shared__ float values[64];
  values[threadIdx.x] = static_cast<float>(threadIdx.x) + 1.0f;
  __syncthreads();
  out[threadIdx.x] = values[63 - threadIdx.x];
}

__global__ void barrier_in_branch_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void two_barriers_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_sum_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFull, v, offset);
  float w = static_cast<float>(threadIdx.x % 32);
  for (int mask = 1; mask < 32; mask *= 2) w += __shfl_xor_sync(kFull, w, mask);
  const float up = __shfl_up_sync(kFull, static_cast<float>(threadIdx.x), 1);
  const float from_lane_3 = __shfl_sync(kFull, static_cast<float>(threadIdx.x), 3);
  const double wide = __shfl_down_sync(kFull, 0.5 + threadIdx.x, 2, 8);
  out[threadIdx.x * 5 + 0] = v;  // lane 0 of each warp: the warp's sum
  out[threadIdx.x * 5 + 1] = w;  // every lane: 0 + 1 + ... + 31
  out[threadIdx.x * 5 + 2] = up;
  out[threadIdx.x * 5 + 3] = from_lane_3;
  out[threadIdx.x * 5 + 4] = static_cast<float>(wide);
}

__global__ void partial_warp_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(kFull, 1.0f, 1);
}

__global__ void skipped_shuffle_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x != 5) v = __shfl_down_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}

__global__ void block_index_kernel(float* out) {
  out[blockIdx.y * gridDim.x + blockIdx.x] = static_cast<float>(blockIdx.x + 100 * blockIdx.y);
}

// Each block reads what the previous block (in index order) wrote: correct
// only when blocks run in index order, which a GPU does not promise.
__global__ void block_order_dependent_kernel(float* out) {
  const unsigned b = blockIdx.x;
  out[b] = (b == 0 ? 0.0f : out[b - 1]) + 1.0f;
}

at::Tensor run(const std::string& name) {
  at::Tensor out = at::zeros({64 * 5}, at::kFloat);
  float* p = out.mutable_data_ptr<float>();
  cudaError_t err = cudaSuccess;
  if (name == "missing_barrier") {
    err = launch_kernel<missing_barrier_kernel>(dim3(1), dim3(64), nullptr, p);
  } else if (name == "with_barrier") {
    err = launch_kernel<with_barrier_kernel>(dim3(1), dim3(64), nullptr, p);
  } else if (name == "barrier_in_branch") {
    err = launch_kernel<barrier_in_branch_kernel>(dim3(1), dim3(64), nullptr, p);
  } else if (name == "two_barriers") {
    err = launch_kernel<two_barriers_kernel>(dim3(1), dim3(64), nullptr, p);
  } else if (name == "shuffle_sum") {
    err = launch_kernel<shuffle_sum_kernel>(dim3(1), dim3(64), nullptr, p);
  } else if (name == "partial_warp_shuffle") {
    err = launch_kernel<partial_warp_shuffle_kernel>(dim3(1), dim3(48), nullptr, p);
  } else if (name == "skipped_shuffle") {
    err = launch_kernel<skipped_shuffle_kernel>(dim3(1), dim3(32), nullptr, p);
  } else if (name == "over_launch_bounds") {
    err = launch_kernel<with_barrier_kernel, 32>(dim3(1), dim3(64), nullptr, p);
  } else if (name == "over_1024_threads") {
    err = launch_kernel<with_barrier_kernel>(dim3(1), dim3(64, 17), nullptr, p);
  } else if (name == "grid_y_over_65535") {
    err = launch_kernel<block_index_kernel>(dim3(1), dim3(1), nullptr, p) == cudaSuccess
              ? launch_kernel<block_index_kernel>(dim3(1, 65536), dim3(1), nullptr, p)
              : cudaErrorInvalidValue;
  } else if (name == "block_index") {
    err = launch_kernel<block_index_kernel>(dim3(8, 4), dim3(1), nullptr, p);
  } else if (name == "block_order_dependent") {
    err = launch_kernel<block_order_dependent_kernel>(dim3(64), dim3(1), nullptr, p);
  } else {
    TORCH_CHECK(false, "emulated GPU self test: no case ", name);
  }
  get_last_error();
  TORCH_CHECK(err == cudaSuccess, "CUDA error (emulated GPU): ", error_name(err), " in ", last_error_message());
  return out;
}

}  // namespace
}  // namespace emulation
}  // namespace fused_bn

TORCH_LIBRARY_FRAGMENT(fused_bn_emulation, m) {
  m.def("self_test(str case) -> Tensor", &fused_bn::emulation::run);
}
