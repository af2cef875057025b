// How a block walks its share of one channel (channels-first).
#pragma once

#include "device_primitives.cuh"

#include <cstdint>

namespace fused_bn {
namespace cuda {
// Internal to the kernel layer (forward.cu, backward.cu).
namespace detail {

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

}  // namespace detail
}  // namespace cuda
}  // namespace fused_bn
