// The kernels' one view of a batch-norm input, on both devices: N x C x HW,
// channels-first (NCHW: N planes of C channels by HW positions, also 3-D/5-D
// contiguous input) or channels-last (NHWC: N*HW rows of C channels). Filled
// by the torch glue (csrc/torch/prepare.h); no torch, no CUDA runtime.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fused_bn {
namespace common {

struct Geometry {
  int64_t N = 0;   // batch
  int64_t C = 0;   // channels
  int64_t HW = 0;  // product of the sizes after the channel dimension
  bool channels_last = false;
  // CUDA only: sizes the grids, and so is part of the determinism key (same
  // multiprocessor count, bitwise identical results). The CPU ignores it.
  int multiprocessor_count = 1;

  FUSED_BN_HOST_DEVICE int64_t per_channel() const { return N * HW; }
  FUSED_BN_HOST_DEVICE int64_t numel() const { return N * C * HW; }
};

}  // namespace common
}  // namespace fused_bn
