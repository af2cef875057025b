// FUSED_BN_HOST_DEVICE: what both devices call is __host__ __device__ where
// nvcc compiles it, and plain C++ for the CPU build and the emulated GPU.
#pragma once

#if defined(__CUDACC__)
#define FUSED_BN_HOST_DEVICE __host__ __device__
#else
#define FUSED_BN_HOST_DEVICE
#endif
