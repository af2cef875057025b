// Tensor handling shared by the CPU and CUDA glue: optional tensors, dense
// per-channel views, output allocation by the batch-norm layout rule, and the
// checks on the buffers the training ops mutate.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

#include "checks.h"

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

}  // namespace fused_bn
