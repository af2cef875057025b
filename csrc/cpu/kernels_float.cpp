// The CPU kernels' float instances (entry_points.h; one translation unit per dtype).
#include "dtype_instances.h"

namespace fused_bn::cpu {
FUSED_BN_CPU_FORWARD_INSTANCE(float, float)
FUSED_BN_CPU_BACKWARD_INSTANCE(float)
}  // namespace fused_bn::cpu
