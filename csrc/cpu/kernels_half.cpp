// The CPU kernels' half instances (entry_points.h; one translation unit per
// dtype): its parameters in its own dtype or in float32 (mixed precision).
#include "dtype_instances.h"

namespace fused_bn::cpu {
FUSED_BN_CPU_FORWARD_INSTANCE(at::Half, at::Half)
FUSED_BN_CPU_FORWARD_INSTANCE(at::Half, float)
FUSED_BN_CPU_BACKWARD_INSTANCE(at::Half)
}  // namespace fused_bn::cpu
