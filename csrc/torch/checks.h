// Argument checks and layout rules shared by the CPU and CUDA glue, so both
// devices reject bad input with nn.BatchNorm2d's messages and pick the same
// output layout. All checks run before any state is touched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "../common/activation.h"
#include "../common/channel_math.h"

namespace fused_bn {

inline bool is_reduced_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// float32 for float32/float16/bfloat16 input, float64 for float64 input: the
// dtype of the saved statistics and of every accumulation.
inline at::ScalarType accumulate_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// PyTorch's CPU batch norm rule (suggest_memory_format_contig): contiguous
// stays contiguous, a channels-last-contiguous 4-D or 5-D input (also one
// torch's stride heuristic would not call channels-last, e.g. a permuted HWC
// image) gives channels_last (channels_last_3d) output, anything else follows
// suggest_memory_format(). Inputs of other ranks come out contiguous.
inline at::MemoryFormat batch_norm_memory_format(const at::Tensor& input) {
  if (input.is_contiguous() || (input.dim() != 4 && input.dim() != 5)) return at::MemoryFormat::Contiguous;
  const at::MemoryFormat channels_last =
      input.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  if (input.is_contiguous(channels_last)) return channels_last;
  return input.suggest_memory_format() == channels_last ? channels_last : at::MemoryFormat::Contiguous;
}

inline void check_channel_tensor(const c10::optional<at::Tensor>& t, const char* name,
                                 const at::Tensor& input) {
  if (!t.has_value() || !t->defined()) return;
  const int64_t channels = input.size(1);
  TORCH_CHECK(t->numel() == channels, name, " should contain ", channels, " elements not ",
              t->numel());
  TORCH_CHECK(t->device() == input.device(), "Expected all tensors to be on the same device, but ",
              name, " is on ", t->device(), " and input is on ", input.device());
}

// Same rule and messages as PyTorch's batch norm: parameters and running
// statistics share the input's dtype, except that float16/bfloat16 input may
// come with float32 parameters (the AMP case).
inline void check_parameter_dtypes(const at::Tensor& input,
                                   std::initializer_list<const c10::optional<at::Tensor>*> params) {
  const char* device = input.is_cuda() ? "CUDA" : "CPU";
  const at::Tensor* first = nullptr;
  for (auto* p : params) {
    if (p->has_value() && (*p)->defined()) {
      first = &**p;
      break;
    }
  }
  if (first == nullptr) return;
  const bool mixed = is_reduced_float(input.scalar_type()) && first->scalar_type() == at::kFloat;
  for (auto* p : params) {
    if (!p->has_value() || !(*p)->defined()) continue;
    const at::ScalarType t = (*p)->scalar_type();
    TORCH_CHECK(first->scalar_type() != input.scalar_type() || t == input.scalar_type(),
                "expected scalar type ", input.scalar_type(), " but found ", t);
    if (mixed || t != input.scalar_type()) {
      const bool share_message = !mixed && input.scalar_type() == at::kDouble && t == at::kFloat;
      TORCH_CHECK(mixed ? t == at::kFloat : false, "mixed dtype (", device, "): ",
                  share_message ? "all inputs must share same datatype."
                                : "expect parameter to have scalar type of Float");
    }
  }
}

inline void check_input_tensor(const at::Tensor& input) {
  TORCH_CHECK_NOT_IMPLEMENTED(at::isFloatingType(input.scalar_type()), "\"batch_norm\" not implemented for '",
                              c10::toString(input.scalar_type()), "'");
  TORCH_CHECK(input.dim() >= 2, "batch_norm: expected input with at least 2 dimensions (got ",
              input.dim(), "D input)");
}

inline void check_forward_args(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var) {
  check_input_tensor(input);
  // nn's order, so the first mismatch reported is the one nn reports.
  check_channel_tensor(running_mean, "running_mean", input);
  check_channel_tensor(running_var, "running_var", input);
  check_channel_tensor(weight, "weight", input);
  check_channel_tensor(bias, "bias", input);
  check_parameter_dtypes(input, {&weight, &bias, &running_mean, &running_var});
  // nn reads (and updates) the running statistics through 1-D accessors and
  // rejects any other rank with this message, even when the element count is
  // right (a [1, C] or, for C = 1, a 0-d tensor).
  for (const auto* stat : {&running_mean, &running_var}) {
    if (stat->has_value() && (*stat)->defined()) {
      TORCH_CHECK((*stat)->dim() == 1, "TensorAccessor expected 1 dims but tensor has ", (*stat)->dim());
    }
  }
}

inline void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                const at::Tensor& invstd) {
  check_input_tensor(input);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "batch_norm_backward: grad_output of shape ",
              grad_output.sizes(), " does not match input of shape ", input.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "batch_norm_backward: grad_output dtype ", grad_output.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  check_channel_tensor(weight, "weight", input);
  check_channel_tensor(mean, "mean", input);
  check_channel_tensor(invstd, "invstd", input);
  check_parameter_dtypes(input, {&weight});
}

// A tensor read alongside the input element by element (the residual of
// add+relu, the forward's output in its backward): same shape, dtype, device.
inline void check_like_input(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.sizes() == input.sizes(), "batch_norm: ", name, " of shape ", t.sizes(),
              " does not match input of shape ", input.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "batch_norm: ", name, " dtype ", t.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "Expected all tensors to be on the same device, but ", name,
              " is on ", t.device(), " and input is on ", input.device());
}

// The epilogue's activation from the ops' arguments (its name and parameters,
// as fused_bn/_activations.py passes them), checked against the one list of
// activations (csrc/common/activation.h).
inline common::ActivationArgs parse_activation(c10::string_view name, at::ArrayRef<double> params) {
  common::ActivationArgs args;
  bool found = false;
  int expected_params = 0;
  std::string supported;
#define FUSED_BN_ACTIVATION_NAME(Type, enumerator, kind_name, param_count) \
  supported += std::string(supported.empty() ? "" : ", ") + kind_name;       \
  if (name == kind_name) {                                                   \
    args.kind = common::Activation::enumerator;                              \
    expected_params = param_count;                                           \
    found = true;                                                            \
  }
  FUSED_BN_ACTIVATIONS(FUSED_BN_ACTIVATION_NAME)
#undef FUSED_BN_ACTIVATION_NAME
  TORCH_CHECK_VALUE(found, "batch_norm: unsupported activation '", std::string(name), "'; supported: ", supported);
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == expected_params, "batch_norm: activation '",
                    std::string(name), "' takes ", expected_params, " parameter(s), got ", params.size());
  for (size_t i = 0; i < params.size(); ++i) args.params[i] = params[i];
  if (args.kind == common::Activation::kHardtanh) {
    // nn.Hardtanh's own check.
    TORCH_CHECK_VALUE(args.params[1] > args.params[0], "max_val must be greater than min_val");
  }
  return args;
}

// A residual added before the activation: shaped, typed and placed as the input.
inline void check_residual(const c10::optional<at::Tensor>& residual, const at::Tensor& input) {
  if (residual.has_value() && residual->defined()) check_like_input(*residual, "residual", input);
}

// Per-channel statistics exchanged between data-parallel ranks
// (FusedSyncBatchNorm2d): float64, on the input's device, of shape
// [*leading, C, values] with the leading sizes given (e.g. {ranks} or {}).
inline void check_exchanged(const at::Tensor& t, const char* name, const at::Tensor& input,
                            std::initializer_list<int64_t> leading, int64_t values) {
  std::vector<int64_t> expected(leading);
  expected.push_back(input.size(1));
  expected.push_back(values);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), "batch_norm: ", name, " must have shape ",
              at::IntArrayRef(expected), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kDouble, "batch_norm: ", name, " must be float64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "Expected all tensors to be on the same device, but ", name,
              " is on ", t.device(), " and input is on ", input.device());
}

// The data-parallel backward's count of values per channel over all ranks:
// a one-element tensor on the input's device, so that it can stay where the
// gathered statistics are (no host read on a GPU).
inline void check_exchanged_count(const at::Tensor& count, const at::Tensor& input) {
  TORCH_CHECK(count.numel() == 1, "batch_norm: count must have one element, got shape ", count.sizes());
  TORCH_CHECK(count.scalar_type() == at::kDouble || count.scalar_type() == at::kLong,
              "batch_norm: count must be float64 or int64, got ", count.scalar_type());
  TORCH_CHECK(count.device() == input.device(), "Expected all tensors to be on the same device, but count is on ",
              count.device(), " and input is on ", input.device());
}

// The momentum actually applied to the running statistics: nn.BatchNorm2d's
// cumulative average (1/num_batches_tracked, after the increment) when
// momentum is None. `batches_tracked` is the counter's value after increment.
inline double running_average_factor(c10::optional<double> momentum, double batches_tracked) {
  if (momentum.has_value()) return *momentum;
  return common::cumulative_average_factor(batches_tracked);
}

}  // namespace fused_bn
