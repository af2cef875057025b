// What the element passes do after the normalization (Epilogue), the
// gradient the backward passes take (GradMask), and their vector helpers.
#pragma once

#include "vec.h"

namespace fused_bn::cpu {

// What follows the normalization z = (x − mean) · scale + shift in a forward
// element pass: y = z, y = max(z, 0), or y = max(z + residual, 0).
enum class Epilogue { kNone, kRelu, kAddRelu };

// The gradient the backward passes reduce and scale, g:
//   kNone        : g = dy.
//   kReluOfInput : g = dy where z > 0, z recomputed from x with the forward's
//                  coefficients (ChannelCoefs::forward_shift): the same mask
//                  as the forward's, with no tensor saved for it.
//   kReluOfOutput: g = dy where y > 0, y the forward's output (add+relu: z
//                  there includes the residual). The reduction pass writes g
//                  (it is the residual's gradient) and the dx pass reads it
//                  in place of dy, so dy and y are each read once.
enum class GradMask { kNone, kReluOfInput, kReluOfOutput };

// max(v, 0), NaN kept (as torch.relu).
template <typename V>
inline V relu(const V& v) {
  return at::vec::maximum(v, V(0));
}

// g where z > 0, else 0 (a NaN z gives 0, as relu's backward on a NaN output).
template <typename V>
inline V keep_where_positive(const V& g, const V& z) {
  return V::blendv(V(0), g, z > V(0));
}

// g of one pair under kReluOfInput: dy where (x − mean) · scale + shift > 0.
template <typename scalar_t>
inline typename VecPair<scalar_t>::Pair relu_of_input(const typename VecPair<scalar_t>::Pair& x,
                                                       const typename VecPair<scalar_t>::Pair& dy,
                                                       const Vectorized<acc_t<scalar_t>>& mean,
                                                       const Vectorized<acc_t<scalar_t>>& scale,
                                                       const Vectorized<acc_t<scalar_t>>& shift) {
  return {keep_where_positive(dy.first, at::vec::fmadd(x.first - mean, scale, shift)),
          keep_where_positive(dy.second, at::vec::fmadd(x.second - mean, scale, shift))};
}

}  // namespace fused_bn::cpu
