// The CPU passes' epilogue and gradient-mask helpers (the enums are both
// devices', csrc/common/epilogue.h).
#pragma once

#include "../common/epilogue.h"
#include "vec.h"

namespace fused_bn::cpu {

using common::Epilogue;
using common::GradMask;

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
                                                       const Vectorized<acc_type<scalar_t>>& mean,
                                                       const Vectorized<acc_type<scalar_t>>& scale,
                                                       const Vectorized<acc_type<scalar_t>>& shift) {
  return {keep_where_positive(dy.first, at::vec::fmadd(x.first - mean, scale, shift)),
          keep_where_positive(dy.second, at::vec::fmadd(x.second - mean, scale, shift))};
}

}  // namespace fused_bn::cpu
