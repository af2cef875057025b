// Torch-side helpers shared by the CPU and CUDA glue (csrc/cpu/batch_norm_cpu.cpp,
// csrc/cuda/batch_norm_cuda.cpp): optional-tensor handling, the checks on the
// mutated buffers, and the dtype dispatch. The argument checks that mirror
// nn.BatchNorm2d's messages live in batch_norm_checks.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <initializer_list>
#include <type_traits>

#include "batch_norm_checks.h"

namespace fused_bn {

inline bool is_defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Per-channel tensors are read through raw pointers: make them dense first
// (a no-op for the usual contiguous parameters).
inline at::Tensor dense_or_undefined(const c10::optional<at::Tensor>& t) {
  return is_defined(t) ? t->contiguous() : at::Tensor();
}

// An output of `like`'s shape laid out by the batch-norm rule (`format`). An
// empty one keeps `like`'s own strides: nn.BatchNorm2d returns input.clone()
// for an empty input, and a gradient laid out as grad_output.
inline at::Tensor empty_output(const at::Tensor& like, at::MemoryFormat format) {
  if (like.numel() == 0) return at::empty_like(like);
  return at::empty(like.sizes(), like.options().memory_format(format));
}

inline at::Tensor as_tensor_or_undefined(const c10::optional<at::Tensor>& t) {
  return is_defined(t) ? *t : at::Tensor();
}

// Running statistics are updated in place, so they cannot go through a copy.
inline void check_updatable(const c10::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK(!is_defined(t) || t->is_contiguous(), "batch_norm: ", name,
              " must be contiguous to be updated in place");
}

// The counter is nn.BatchNorm2d's one-element buffer on the input's device:
// int64, or any real dtype once module.type()/to(dtype) cast every buffer
// (nn counts in that dtype too).
inline void check_batches_tracked(const c10::optional<at::Tensor>& t, const at::Tensor& input) {
  if (!is_defined(t)) return;
  TORCH_CHECK(t->device() == input.device(),
              "Expected all tensors to be on the same device, but num_batches_tracked is on ",
              t->device(), " and input is on ", input.device());
  const at::ScalarType dtype = t->scalar_type();
  TORCH_CHECK(t->numel() == 1 && dtype != at::kBool && !at::isComplexType(dtype),
              "batch_norm: num_batches_tracked must be a real tensor with one element, got ",
              dtype, " of shape ", t->sizes());
}

// Parameters come in the input's dtype, or float32 for float16/bfloat16 input.
inline bool has_float_params(const at::Tensor& input,
                             std::initializer_list<const c10::optional<at::Tensor>*> params) {
  if (!is_reduced_float(input.scalar_type())) return false;
  for (auto* p : params) {
    if (is_defined(*p)) return (*p)->scalar_type() == at::kFloat;
  }
  return false;
}

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
