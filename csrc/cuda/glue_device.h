// The one device-specific piece of the CUDA glue (batch_norm_cuda.cpp): which
// tensors it takes, the device guard, the stream, the multiprocessor count,
// how a launch error is raised, and the dispatch key it registers for. Built
// by nvcc's host compiler for a GPU, or (FUSED_BN_CUDA_EMULATION) by g++ for
// the emulated GPU, where the same glue serves CPU tensors on request
// (tests/emulated_cuda.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cuda_platform.h"

#if !defined(FUSED_BN_CUDA_EMULATION)
// CPU-only torch wheels ship the c10/cuda headers without their generated
// configuration header, which only carries Windows export settings: skipping
// it when absent lets this file be syntax-checked without a CUDA torch, and
// changes nothing where it exists.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fused_bn {
namespace device {

#if defined(FUSED_BN_CUDA_EMULATION)

inline void check_input_device(const at::Tensor& input) {
  TORCH_CHECK(input.is_cpu(), "batch_norm (emulated CUDA): expected a CPU input, got one on ", input.device());
}

// The emulated GPU has one device and one stream; launches finish before they return.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline cudaStream_t current_stream() { return nullptr; }

inline int multiprocessor_count() { return emulation::config().multiprocessor_count; }

inline void check_launch(cudaError_t err) {
  emulation::get_last_error();
  TORCH_CHECK(err == cudaSuccess, "CUDA error (emulated GPU): ", emulation::error_name(err), " in ",
              emulation::last_error_message());
}

#else

inline void check_input_device(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "batch_norm: expected a CUDA input, got one on ", input.device());
}

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

inline int multiprocessor_count() {
  int device_index = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device_index));
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device_index));
  return multiprocessors;
}

inline void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }

#endif

}  // namespace device
}  // namespace fused_bn
