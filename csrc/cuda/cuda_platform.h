// What the kernel layer needs of CUDA: its types and headers, and one way to
// launch a kernel. Under FUSED_BN_CUDA_EMULATION (a host compiler) the same
// names come from the emulated GPU (emulation/cuda_emulation.h), and a launch
// runs the kernel on the CPU before returning.
#pragma once

#if defined(FUSED_BN_CUDA_EMULATION)
#include "emulation/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

#include <cstddef>
#include <string>
#include <string_view>

namespace fused_bn {
namespace cuda {

#if defined(FUSED_BN_CUDA_EMULATION)
// "ns::kernel<float, 4>", read off the compiler's name of this instantiation.
template <auto kKernel>
const char* kernel_name() {
  const std::string_view pretty = __PRETTY_FUNCTION__;  // this function's, not a lambda's
  static const std::string name = [pretty] {
    const size_t begin = pretty.find("kKernel = ");
    if (begin == std::string_view::npos) return std::string(pretty);
    const std::string_view rest = pretty.substr(begin + 10);
    return std::string(rest.substr(0, rest.rfind(']')));
  }();
  return name.c_str();
}
#endif

#if defined(__CUDACC__) || defined(FUSED_BN_CUDA_EMULATION)
// kernel<<<grid, block, 0, stream>>>(args...), returning the launch's error.
// kMaxThreadsPerBlock is the kernel's __launch_bounds__ (the emulated launch
// checks the block against it; a GPU refuses such a launch too).
template <auto kKernel, unsigned kMaxThreadsPerBlock = 1024, typename... Args>
cudaError_t launch_kernel(dim3 grid, dim3 block, cudaStream_t stream, const Args&... args) {
#if defined(FUSED_BN_CUDA_EMULATION)
  (void)stream;
  auto body = [&]() { kKernel(args...); };
  using Body = decltype(body);
  return emulation::launch(kernel_name<kKernel>(), grid, block, 0, kMaxThreadsPerBlock,
                           [](const void* closure) { (*static_cast<const Body*>(closure))(); }, &body);
#else
  kKernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
#endif
}
#endif

#if defined(__CUDACC__) || defined(FUSED_BN_CUDA_EMULATION)
// Threads of kKernel's blocks of kBlockThreads that one multiprocessor holds
// at once, as its registers and shared memory allow
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor, asked once per kernel); 0
// when the runtime cannot tell. The emulated GPU answers its configured count.
template <auto kKernel, int kBlockThreads>
int resident_threads_per_multiprocessor() {
#if defined(FUSED_BN_CUDA_EMULATION)
  return emulation::config().resident_threads_per_multiprocessor / kBlockThreads * kBlockThreads;
#else
  static const int threads = [] {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, kBlockThreads, 0) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return blocks * kBlockThreads;
  }();
  return threads;
#endif
}
#endif

}  // namespace cuda
}  // namespace fused_bn
