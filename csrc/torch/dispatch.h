// Dtype and enum dispatch shared by the CPU and CUDA glue: the kernels'
// (scalar_t, param_t) pair and Epilogue / GradMask as compile-time constants.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <type_traits>

namespace fused_bn {

// The kernels' Epilogue / GradMask value as a compile-time constant:
// f(std::integral_constant<E, value>{}).
template <typename E, E... kValues, typename F>
void dispatch_enum(E value, F&& f) {
  const bool matched = ((value == kValues ? (f(std::integral_constant<E, kValues>{}), true) : false) || ...);
  TORCH_INTERNAL_ASSERT(matched, "fused_bn: unhandled enum value");
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<scalar_t>{}, TypeTag<param_t>{}) for the input's dtype, with
// param_t float for float16/bfloat16 input with float32 parameters (mixed
// precision) and scalar_t otherwise. Integer input raises nn's
// NotImplementedError: "batch_norm" not implemented for 'Long'.
template <typename F>
void dispatch_input_and_params(const at::Tensor& input, bool float_params, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (float_params) {
        f(TypeTag<scalar_t>{}, TypeTag<float>{});
        return;
      }
    }
    f(TypeTag<scalar_t>{}, TypeTag<scalar_t>{});
  });
}

}  // namespace fused_bn
