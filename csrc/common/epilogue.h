// What a forward element pass does after the normalization, and which
// gradient the backward passes take: one vocabulary for both devices' kernels
// and glue (no torch, no CUDA runtime).
#pragma once

namespace fused_bn {
namespace common {

// What follows the normalization z = (x − mean) · scale + shift in a forward
// element pass: y = z, y = max(z, 0), or y = max(z + residual, 0).
enum class Epilogue { kNone, kRelu, kAddRelu };

// The gradient the backward passes reduce and scale, g:
//   kNone        : g = dy.
//   kReluOfInput : g = dy where z > 0, z recomputed from x with the forward's
//                  coefficients (the CPU's ChannelCoefs::forward_shift): the same mask
//                  as the forward's, with no tensor saved for it.
//   kReluOfOutput: g = dy where y > 0, y the forward's output (add+relu: z
//                  there includes the residual). The reduction pass writes g
//                  (it is the residual's gradient) and the dx pass reads it
//                  in place of dy, so dy and y are each read once.
enum class GradMask { kNone, kReluOfInput, kReluOfOutput };

}  // namespace common
}  // namespace fused_bn
