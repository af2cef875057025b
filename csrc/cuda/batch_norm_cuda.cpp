// Torch glue for the CUDA kernels: argument checks (shared with the CPU glue),
// layout and dtype dispatch, allocation of outputs and workspace, and
// registration for the CUDA dispatch key. The arithmetic lives in the kernel
// layer (forward.cu, backward.cu and their headers) and never sees a torch type.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <type_traits>

#include "../torch/checks.h"
#include "../torch/dispatch.h"
#include "../torch/prepare.h"
#include "../torch/tensors.h"
#include "batch_norm_kernels.cuh"
#include "glue_device.h"

namespace fused_bn {
namespace {

using at::Tensor;
using c10::optional;

// at::Half / at::BFloat16 have the bit layout of CUDA's __half / __nv_bfloat16.
template <typename T>
struct DeviceScalar {
  using type = T;
};
template <>
struct DeviceScalar<at::Half> {
  using type = __half;
};
template <>
struct DeviceScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename T>
using device_t = typename DeviceScalar<T>::type;

template <typename T>
const device_t<T>* device_data(const Tensor& t) {
  return t.defined() ? reinterpret_cast<const device_t<T>*>(t.const_data_ptr<T>()) : nullptr;
}

template <typename T>
device_t<T>* mutable_device_data(const Tensor& t) {
  return t.defined() ? reinterpret_cast<device_t<T>*>(t.mutable_data_ptr<T>()) : nullptr;
}

void check_on_input_device(const Tensor& t, const char* name, const Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), "Expected all tensors to be on the same device, but ", name,
              " is on ", t.device(), " and input is on ", input.device());
}

// The shared preparation (csrc/torch/prepare.h), with the CUDA kernels'
// choices: with HW == 1 (or C == 1) both layouts address memory identically,
// so take the one whose contiguous run is longer (loads vectorize and
// coalesce), and size the grids for this device.
PreparedInput prepare_for_cuda(const Tensor& input) {
  PreparedInput in = prepare(input);
  cuda::Geometry& g = in.geometry;
  if (g.HW == 1) {
    g.channels_last = true;
  } else if (g.C == 1) {
    g.channels_last = false;
  }
  g.multiprocessor_count = device::multiprocessor_count();
  return in;
}

Tensor allocate_workspace(size_t bytes, const Tensor& input) {
  // The caching allocator's blocks are at least 512-byte aligned.
  return at::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
}

// ---------------------------------------------------------------------------
// Training forward.

struct TrainForwardTensors {
  const PreparedInput& in;
  const Tensor& weight;
  const Tensor& bias;
  const Tensor& running_mean;
  const Tensor& running_var;
  const Tensor& num_batches_tracked;
  optional<double> momentum;
  double eps;
  Tensor& output;
  Tensor& save_mean;
  Tensor& save_invstd;
};

struct RunTrainForward {
  template <typename scalar_t, typename param_t>
  static void run(const TrainForwardTensors& t) {
    using kernel_scalar_t = device_t<scalar_t>;
    using kernel_param_t = device_t<param_t>;
    using acc_t = cuda::acc_type<kernel_scalar_t>;
    cuda::TrainForwardParams<kernel_scalar_t, kernel_param_t> p;
    p.geometry = t.in.geometry;
    p.input = device_data<scalar_t>(t.in.tensor);
    p.output = mutable_device_data<scalar_t>(t.output);
    p.weight = device_data<param_t>(t.weight);
    p.bias = device_data<param_t>(t.bias);
    p.running_mean = mutable_device_data<param_t>(t.running_mean);
    p.running_var = mutable_device_data<param_t>(t.running_var);
    p.num_batches_tracked =
        t.num_batches_tracked.defined() ? t.num_batches_tracked.mutable_data_ptr<int64_t>() : nullptr;
    p.save_mean = t.save_mean.mutable_data_ptr<acc_t>();
    p.save_invstd = t.save_invstd.mutable_data_ptr<acc_t>();
    p.eps = t.eps;
    p.cumulative_momentum = !t.momentum.has_value();
    p.momentum = t.momentum.value_or(0.0);
    Tensor workspace = allocate_workspace(cuda::train_forward_workspace_bytes(p), t.in.tensor);
    p.workspace = workspace.mutable_data_ptr();
    device::check_launch(cuda::launch_batch_norm_train_forward(p, device::current_stream()));
  }
};

// The ReLU and add+ReLU epilogues have CPU kernels only so far: refused here
// before any state changes, rather than computed without them.
void check_no_epilogue(bool relu, const optional<Tensor>& residual) {
  TORCH_CHECK_NOT_IMPLEMENTED(!relu && !is_defined(residual),
                              "fused_bn: relu/residual epilogues are not implemented for CUDA yet");
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cuda(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, bool relu,
    const optional<Tensor>& residual) {
  check_forward_args(input, weight, bias, running_mean, running_var);
  check_epilogue(relu, residual, input);
  check_no_epilogue(relu, residual);
  check_updatable(running_mean, "running_mean");
  check_updatable(running_var, "running_var");
  check_batches_tracked(num_batches_tracked, input);
  device::check_input_device(input);
  const bool float_params = has_float_params(input, {&weight, &bias, &running_mean, &running_var});
  const device::DeviceGuard device_guard(input.device());

  PreparedInput in = prepare_for_cuda(input);
  const Tensor w = dense_or_undefined(weight), b = dense_or_undefined(bias);
  const Tensor rm = as_tensor_or_undefined(running_mean), rv = as_tensor_or_undefined(running_var);
  // The kernels count in int64 on the device (no host sync): a counter of
  // another dtype counts through an int64 copy.
  const Tensor counter = as_tensor_or_undefined(num_batches_tracked);
  const bool counter_is_long = !counter.defined() || counter.scalar_type() == at::kLong;
  const Tensor counter64 = counter_is_long ? counter : counter.to(at::kLong);
  Tensor output = empty_output(input, in.format);
  const auto stats_options = input.options().dtype(accumulate_dtype(input.scalar_type()));
  Tensor save_mean = at::empty({in.geometry.C}, stats_options);
  Tensor save_invstd = at::empty({in.geometry.C}, stats_options);

  // Every check has passed: from here on, the kernels may change state.
  const TrainForwardTensors tensors{in, w, b, rm, rv, counter64, momentum, eps, output, save_mean, save_invstd};
  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    RunTrainForward::run<typename decltype(scalar)::type, typename decltype(param)::type>(tensors);
  });
  if (!counter_is_long) num_batches_tracked->copy_(counter64);
  return {output, save_mean, save_invstd};
}

// ---------------------------------------------------------------------------
// Eval forward.

struct EvalForwardTensors {
  const PreparedInput& in;
  const Tensor& weight;
  const Tensor& bias;
  const Tensor& running_mean;
  const Tensor& running_var;
  double eps;
  Tensor& output;
};

struct RunEvalForward {
  template <typename scalar_t, typename param_t>
  static void run(const EvalForwardTensors& t) {
    cuda::EvalForwardParams<device_t<scalar_t>, device_t<param_t>> p;
    p.geometry = t.in.geometry;
    p.input = device_data<scalar_t>(t.in.tensor);
    p.output = mutable_device_data<scalar_t>(t.output);
    p.weight = device_data<param_t>(t.weight);
    p.bias = device_data<param_t>(t.bias);
    p.running_mean = device_data<param_t>(t.running_mean);
    p.running_var = device_data<param_t>(t.running_var);
    p.eps = t.eps;
    device::check_launch(cuda::launch_batch_norm_eval_forward(p, device::current_stream()));
  }
};

Tensor batch_norm_eval_cuda(const Tensor& input, const optional<Tensor>& weight,
                            const optional<Tensor>& bias, const Tensor& running_mean,
                            const Tensor& running_var, double eps, bool relu,
                            const optional<Tensor>& residual) {
  const optional<Tensor> mean_opt(running_mean), var_opt(running_var);
  check_forward_args(input, weight, bias, mean_opt, var_opt);
  check_epilogue(relu, residual, input);
  check_no_epilogue(relu, residual);
  device::check_input_device(input);
  const bool float_params = has_float_params(input, {&weight, &bias, &mean_opt, &var_opt});
  const device::DeviceGuard device_guard(input.device());

  PreparedInput in = prepare_for_cuda(input);
  Tensor output = empty_output(input, in.format);
  const Tensor w = dense_or_undefined(weight), b = dense_or_undefined(bias);
  const Tensor mean = running_mean.contiguous(), var = running_var.contiguous();
  const EvalForwardTensors tensors{in, w, b, mean, var, eps, output};
  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    RunEvalForward::run<typename decltype(scalar)::type, typename decltype(param)::type>(tensors);
  });
  return output;
}

// ---------------------------------------------------------------------------
// Backward.

struct BackwardTensors {
  const PreparedInput& in;
  const Tensor& grad_output;
  const Tensor& weight;
  const Tensor& mean;
  const Tensor& invstd;
  bool training;
  double eps;
  std::array<bool, 3> output_mask;
  Tensor& grad_input;
  Tensor& grad_weight;
  Tensor& grad_bias;
};

struct RunBackward {
  // grad_param_t: the weight's dtype, or the accumulation dtype without a weight.
  template <typename scalar_t, typename grad_param_t>
  static void run_with(const BackwardTensors& t) {
    using kernel_scalar_t = device_t<scalar_t>;
    using acc_t = cuda::acc_type<kernel_scalar_t>;
    cuda::BackwardParams<kernel_scalar_t, device_t<grad_param_t>> p;
    p.geometry = t.in.geometry;
    p.grad_output = device_data<scalar_t>(t.grad_output);
    p.input = device_data<scalar_t>(t.in.tensor);
    p.weight = device_data<grad_param_t>(t.weight);
    p.mean = t.mean.const_data_ptr<acc_t>();
    p.invstd = t.invstd.const_data_ptr<acc_t>();
    p.training = t.training;
    p.eps = t.eps;
    p.grad_input = t.output_mask[0] ? mutable_device_data<scalar_t>(t.grad_input) : nullptr;
    p.grad_weight = t.output_mask[1] ? mutable_device_data<grad_param_t>(t.grad_weight) : nullptr;
    p.grad_bias = t.output_mask[2] ? mutable_device_data<grad_param_t>(t.grad_bias) : nullptr;
    Tensor workspace = allocate_workspace(cuda::backward_workspace_bytes(p), t.in.tensor);
    p.workspace = workspace.mutable_data_ptr();
    device::check_launch(cuda::launch_batch_norm_backward(p, device::current_stream()));
  }

  template <typename scalar_t, typename param_t>
  static void run(const BackwardTensors& t) {
    using acc_scalar_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (t.weight.defined()) {
      run_with<scalar_t, param_t>(t);
    } else {
      run_with<scalar_t, acc_scalar_t>(t);
    }
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const Tensor& mean, const Tensor& invstd, bool training,
    double eps,
    std::array<bool, 3> output_mask, const optional<Tensor>& bias, bool relu) {
  check_backward_args(grad_output, input, weight, mean, invstd);
  check_no_epilogue(relu, c10::nullopt);
  const at::ScalarType acc_dtype = accumulate_dtype(input.scalar_type());
  TORCH_CHECK(mean.scalar_type() == acc_dtype && invstd.scalar_type() == acc_dtype,
              "batch_norm_backward: mean and invstd must be ", acc_dtype, " for ", input.scalar_type(),
              " input");
  check_on_input_device(grad_output, "grad_output", input);
  device::check_input_device(input);
  const bool float_params = has_float_params(input, {&weight});
  const device::DeviceGuard device_guard(input.device());

  PreparedInput in = prepare_for_cuda(input);
  const Tensor dy = grad_output.contiguous(in.format);
  const Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const Tensor w = dense_or_undefined(weight);
  const int64_t channels = in.geometry.C;
  const auto param_options = input.options().dtype(is_defined(weight) ? weight->scalar_type() : acc_dtype);
  Tensor grad_input = output_mask[0] ? empty_output(grad_output, in.format) : at::empty({0}, input.options());
  Tensor grad_weight = at::empty({output_mask[1] ? channels : 0}, param_options);
  Tensor grad_bias = at::empty({output_mask[2] ? channels : 0}, param_options);

  const BackwardTensors tensors{in, dy, w, mean_c, invstd_c, training, eps, output_mask,
                                grad_input, grad_weight, grad_bias};
  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    RunBackward::run<typename decltype(scalar)::type, typename decltype(param)::type>(tensors);
  });
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_add_relu_backward_cuda(
    const Tensor& grad_output, const Tensor& output, const Tensor& input, const optional<Tensor>& weight,
    const Tensor& mean, const Tensor& invstd, bool training, double eps, std::array<bool, 3> output_mask) {
  check_no_epilogue(true, c10::nullopt);
  return {};
}

}  // namespace

void register_cuda_glue(torch::Library& m) {
  m.impl("batch_norm_train", &batch_norm_train_cuda);
  m.impl("batch_norm_eval", &batch_norm_eval_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_add_relu_backward", &batch_norm_add_relu_backward_cuda);
}

#if !defined(FUSED_BN_CUDA_EMULATION)
// The emulated build registers the same glue for CPU tensors on request
// (emulation/emulated_ops.cpp).
TORCH_LIBRARY_IMPL(fused_bn, CUDA, m) { register_cuda_glue(m); }
#endif

}  // namespace fused_bn
