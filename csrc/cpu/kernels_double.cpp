// The CPU kernels' double instances (entry_points.h; one translation unit per dtype).
#include "dtype_instances.h"

namespace fused_bn::cpu {
FUSED_BN_CPU_FORWARD_INSTANCE(double, double)
FUSED_BN_CPU_BACKWARD_INSTANCE(double)
}  // namespace fused_bn::cpu
