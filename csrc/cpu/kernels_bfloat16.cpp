// The CPU kernels' bfloat16 instances (entry_points.h; one translation unit per
// dtype): its parameters in its own dtype or in float32 (mixed precision).
#include "dtype_instances.h"

namespace fused_bn::cpu {
FUSED_BN_CPU_FORWARD_INSTANCE(at::BFloat16, at::BFloat16)
FUSED_BN_CPU_FORWARD_INSTANCE(at::BFloat16, float)
FUSED_BN_CPU_BACKWARD_INSTANCE(at::BFloat16)
}  // namespace fused_bn::cpu
