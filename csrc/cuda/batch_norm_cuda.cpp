// Torch glue for the CUDA kernels: argument checks (shared with the CPU glue),
// layout and dtype dispatch, allocation of outputs and workspace, and
// registration for the CUDA dispatch key. The arithmetic lives in the kernel
// layer (forward.cu, backward.cu and their headers) and never sees a torch type.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <type_traits>

#include "../common/exchange.h"
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

// The shared preparation (csrc/torch/prepare.h), with the grids sized for
// this device.
PreparedInput prepare_for_cuda(const Tensor& input) {
  PreparedInput in = prepare(input);
  in.geometry.multiprocessor_count = device::multiprocessor_count();
  return in;
}

Tensor allocate_workspace(size_t bytes, const Tensor& input) {
  // The caching allocator's blocks are at least 512-byte aligned.
  return at::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
}

// ---------------------------------------------------------------------------
// Training forward (batch_norm_train, and batch_norm_train_with_stats with all
// ranks' gathered moments).

struct TrainForwardTensors {
  const PreparedInput& in;
  const PreparedEpilogue& epilogue;
  const Tensor& weight;
  const Tensor& bias;
  const Tensor& running_mean;
  const Tensor& running_var;
  const Tensor& num_batches_tracked;
  const Tensor& gathered_moments;  // undefined: this batch's own moments
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
    p.activation = t.epilogue.activation;
    p.residual = device_data<scalar_t>(t.epilogue.residual);
    if (t.gathered_moments.defined()) {
      p.gathered_moments = t.gathered_moments.const_data_ptr<double>();
      p.ranks = t.gathered_moments.size(0);
    }
    Tensor workspace = allocate_workspace(cuda::train_forward_workspace_bytes(p), t.in.tensor);
    p.workspace = workspace.mutable_data_ptr();
    device::check_launch(cuda::launch_batch_norm_train_forward(p, device::current_stream()));
  }
};

std::tuple<Tensor, Tensor, Tensor> train_cuda(const Tensor& input, const optional<Tensor>& weight,
                                              const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                                              const optional<Tensor>& running_var,
                                              const optional<Tensor>& num_batches_tracked, optional<double> momentum,
                                              double eps, c10::string_view activation,
                                              at::ArrayRef<double> activation_params,
                                              const optional<Tensor>& residual, const Tensor& gathered_moments) {
  check_forward_args(input, weight, bias, running_mean, running_var);
  check_residual(residual, input);
  check_updatable(running_mean, "running_mean");
  check_updatable(running_var, "running_var");
  check_batches_tracked(num_batches_tracked, input);
  device::check_input_device(input);
  const bool float_params = has_float_params(input, {&weight, &bias, &running_mean, &running_var});
  const device::DeviceGuard device_guard(input.device());

  PreparedInput in = prepare_for_cuda(input);
  // Before any state changes: an unknown activation raises here.
  const PreparedEpilogue epilogue = prepare_epilogue(activation, activation_params, residual, in);
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
  const TrainForwardTensors tensors{in,       epilogue, w,    b,      rm,        rv,         counter64,
                                    gathered_moments, momentum, eps, output, save_mean, save_invstd};
  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    RunTrainForward::run<typename decltype(scalar)::type, typename decltype(param)::type>(tensors);
  });
  if (!counter_is_long) num_batches_tracked->copy_(counter64);
  return {output, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cuda(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, c10::string_view activation,
    at::ArrayRef<double> activation_params, const optional<Tensor>& residual) {
  return train_cuda(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, activation,
                    activation_params, residual, Tensor());
}

// FusedSyncBatchNorm2d's forward, before its all_gather: this rank's
// per-channel (count, mean, M2) as a [C, 3] float64 tensor (the CPU's
// format). The parameters and running statistics are only checked, so that a
// bad call raises on every rank before any collective.
struct RunStats {
  template <typename scalar_t>
  static void run(const PreparedInput& in, Tensor& stats) {
    cuda::StatsParams<device_t<scalar_t>> p;
    p.geometry = in.geometry;
    p.input = device_data<scalar_t>(in.tensor);
    p.exchanged_moments = stats.mutable_data_ptr<double>();
    Tensor workspace = allocate_workspace(cuda::stats_workspace_bytes(p), in.tensor);
    p.workspace = workspace.mutable_data_ptr();
    device::check_launch(cuda::launch_batch_norm_stats(p, device::current_stream()));
  }
};

Tensor batch_norm_stats_cuda(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                             const optional<Tensor>& running_mean, const optional<Tensor>& running_var) {
  check_forward_args(input, weight, bias, running_mean, running_var);
  device::check_input_device(input);
  const device::DeviceGuard device_guard(input.device());
  PreparedInput in = prepare_for_cuda(input);
  Tensor stats = at::empty({in.geometry.C, common::kExchangedMoments}, input.options().dtype(at::kDouble));
  dispatch_input_and_params(input, false, [&](auto scalar, auto) {
    RunStats::run<typename decltype(scalar)::type>(in, stats);
  });
  return stats;
}

// FusedSyncBatchNorm2d's forward, after its all_gather: batch_norm_train with
// the statistics of every rank's batch, all_stats[ranks][C][3], merged in
// rank order on the device.
std::tuple<Tensor, Tensor, Tensor> batch_norm_train_with_stats_cuda(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, const Tensor& all_stats,
    c10::string_view activation, at::ArrayRef<double> activation_params, const optional<Tensor>& residual) {
  check_input_tensor(input);
  TORCH_CHECK(all_stats.dim() == 3, "batch_norm: all_stats must be [ranks, C, 3], got ", all_stats.sizes());
  check_exchanged(all_stats, "all_stats", input, {all_stats.size(0)}, common::kExchangedMoments);
  return train_cuda(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, activation,
                    activation_params, residual, all_stats.contiguous());
}

// ---------------------------------------------------------------------------
// Eval forward.

struct EvalForwardTensors {
  const PreparedInput& in;
  const PreparedEpilogue& epilogue;
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
    p.activation = t.epilogue.activation;
    p.residual = device_data<scalar_t>(t.epilogue.residual);
    Tensor workspace = allocate_workspace(cuda::eval_forward_workspace_bytes(p), t.in.tensor);
    p.workspace = workspace.mutable_data_ptr();
    device::check_launch(cuda::launch_batch_norm_eval_forward(p, device::current_stream()));
  }
};

Tensor batch_norm_eval_cuda(const Tensor& input, const optional<Tensor>& weight,
                            const optional<Tensor>& bias, const Tensor& running_mean,
                            const Tensor& running_var, double eps, c10::string_view activation,
                            at::ArrayRef<double> activation_params, const optional<Tensor>& residual) {
  const optional<Tensor> mean_opt(running_mean), var_opt(running_var);
  check_forward_args(input, weight, bias, mean_opt, var_opt);
  check_residual(residual, input);
  device::check_input_device(input);
  const bool float_params = has_float_params(input, {&weight, &bias, &mean_opt, &var_opt});
  const device::DeviceGuard device_guard(input.device());

  PreparedInput in = prepare_for_cuda(input);
  const PreparedEpilogue epilogue = prepare_epilogue(activation, activation_params, residual, in);
  Tensor output = empty_output(input, in.format);
  const Tensor w = dense_or_undefined(weight), b = dense_or_undefined(bias);
  const Tensor mean = running_mean.contiguous(), var = running_var.contiguous();
  const EvalForwardTensors tensors{in, epilogue, w, b, mean, var, eps, output};
  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    RunEvalForward::run<typename decltype(scalar)::type, typename decltype(param)::type>(tensors);
  });
  return output;
}

// ---------------------------------------------------------------------------
// Backward (batch_norm_backward and the two data-parallel backward ops).

// FusedSyncBatchNorm2d's two backward calls: want_local asks for this rank's
// [C, 3] sums; a defined global is every rank's, over *global_count values
// per channel.
struct ExchangeArgs {
  bool want_local = false;
  Tensor global;
  Tensor global_count;
};

// The epilogue's part of a backward call: the activation, where its
// derivative comes from (common::grad_source_for), and the tensors that
// source reads (undefined where it reads none).
struct BackwardEpilogue {
  common::ActivationArgs activation;
  common::GradSource source = common::GradSource::kNone;
  Tensor bias;      // kInput, kInputAndResidual: the forward's
  Tensor residual;  // kInputAndResidual
  Tensor output;    // kOutput
};

struct BackwardTensors {
  const PreparedInput& in;
  const BackwardEpilogue& epilogue;
  const Tensor& grad_output;
  const Tensor& weight;
  const Tensor& mean;
  const Tensor& invstd;
  bool training;
  double eps;
  std::array<bool, 3> output_mask;
  const ExchangeArgs& exchange;
  Tensor& grad_input;
  Tensor& grad_weight;
  Tensor& grad_bias;
  Tensor& grad_residual;
  Tensor& local_sums;
};

struct RunBackward {
  // grad_param_t: the weight's (or bias's) dtype, or the accumulation dtype
  // without either.
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
    p.activation = t.epilogue.activation;
    p.source = t.epilogue.source;
    p.bias = device_data<grad_param_t>(t.epilogue.bias);
    p.residual = device_data<scalar_t>(t.epilogue.residual);
    p.output = device_data<scalar_t>(t.epilogue.output);
    p.grad_residual = t.grad_residual.defined() ? mutable_device_data<scalar_t>(t.grad_residual) : nullptr;
    p.local_sums = t.local_sums.defined() ? t.local_sums.mutable_data_ptr<double>() : nullptr;
    p.global_sums = t.exchange.global.defined() ? t.exchange.global.const_data_ptr<double>() : nullptr;
    p.global_count = t.exchange.global_count.defined() ? t.exchange.global_count.const_data_ptr<double>() : nullptr;
    Tensor workspace = allocate_workspace(cuda::backward_workspace_bytes(p), t.in.tensor);
    p.workspace = workspace.mutable_data_ptr();
    device::check_launch(cuda::launch_batch_norm_backward(p, device::current_stream()));
  }

  template <typename scalar_t, typename param_t>
  static void run(const BackwardTensors& t) {
    using acc_scalar_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (t.weight.defined() || t.epilogue.bias.defined()) {
      run_with<scalar_t, param_t>(t);
    } else {
      run_with<scalar_t, acc_scalar_t>(t);
    }
  }
};

struct BackwardResult {
  Tensor grad_input, grad_weight, grad_bias, grad_residual, local_sums;
};

// The backward ops' shared body (the CPU glue's backward_cpu). The
// activation's derivative comes from `output` (the forward's y) when it is
// given, else from u = z (+ residual) recomputed from input with the forward's
// coefficients (bias is the forward's); grad_residual is written where the
// source writes g (kInputAndResidual, kOutput), an empty [0] tensor otherwise.
BackwardResult backward_cuda(const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
                             const optional<Tensor>& bias, c10::string_view activation,
                             at::ArrayRef<double> activation_params, const optional<Tensor>& residual,
                             const optional<Tensor>& output, const Tensor& mean, const Tensor& invstd, bool training,
                             double eps, std::array<bool, 3> output_mask, const ExchangeArgs& exchange = {}) {
  check_backward_args(grad_output, input, weight, mean, invstd);
  const common::ActivationArgs args = parse_activation(activation, activation_params);
  const bool has_residual = residual.has_value() && residual->defined();
  const bool has_output = output.has_value() && output->defined();
  // As the CPU glue (batch_norm_cpu.cpp): the identity ignores y (its g is dy).
  TORCH_CHECK_VALUE(!has_output || args.kind == common::Activation::kIdentity ||
                        common::grad_from_output_allowed(args, is_reduced_float(input.scalar_type())),
                    "batch_norm_backward: the derivative of ", std::string(activation), " with these parameters ",
                    "cannot be taken from the output; pass the residual instead");
  const common::GradSource source = common::grad_source_for(args.kind, has_residual, has_output);
  const bool recomputes = source == common::GradSource::kInput || source == common::GradSource::kInputAndResidual;
  // Only what the source reads is checked (and used).
  if (recomputes) check_channel_tensor(bias, "bias", input);
  if (source == common::GradSource::kInputAndResidual) check_residual(residual, input);
  if (source == common::GradSource::kOutput) check_like_input(*output, "output", input);
  const at::ScalarType acc_dtype = accumulate_dtype(input.scalar_type());
  TORCH_CHECK(mean.scalar_type() == acc_dtype && invstd.scalar_type() == acc_dtype,
              "batch_norm_backward: mean and invstd must be ", acc_dtype, " for ", input.scalar_type(),
              " input");
  check_on_input_device(grad_output, "grad_output", input);
  device::check_input_device(input);
  const bool float_params = has_float_params(input, {&weight, &bias});
  const device::DeviceGuard device_guard(input.device());

  PreparedInput in = prepare_for_cuda(input);
  const Tensor dy = grad_output.contiguous(in.format);
  BackwardEpilogue epilogue;
  epilogue.activation = args;
  epilogue.source = source;
  if (recomputes) epilogue.bias = dense_or_undefined(bias);
  if (source == common::GradSource::kInputAndResidual) epilogue.residual = residual->contiguous(in.format);
  if (source == common::GradSource::kOutput) epilogue.output = output->contiguous(in.format);
  const Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const Tensor w = dense_or_undefined(weight);
  const Tensor& b = epilogue.bias;
  TORCH_CHECK(!w.defined() || !b.defined() || w.scalar_type() == b.scalar_type(),
              "batch_norm_backward: weight and bias must share a dtype");
  const int64_t channels = in.geometry.C;
  const at::ScalarType param_dtype =
      w.defined() ? w.scalar_type() : (b.defined() ? b.scalar_type() : acc_dtype);
  const auto param_options = input.options().dtype(param_dtype);
  auto like_input = [&] { return empty_output(grad_output, in.format); };
  const bool writes_residual_grad =
      source == common::GradSource::kInputAndResidual || source == common::GradSource::kOutput;
  BackwardResult r;
  r.grad_input = output_mask[0] ? like_input() : at::empty({0}, input.options());
  r.grad_weight = at::empty({output_mask[1] ? channels : 0}, param_options);
  r.grad_bias = at::empty({output_mask[2] ? channels : 0}, param_options);
  r.grad_residual = writes_residual_grad ? like_input() : at::empty({0}, input.options());
  if (exchange.want_local) {
    r.local_sums = at::empty({channels, common::kExchangedGradSums}, input.options().dtype(at::kDouble));
  }
  Tensor grad_residual_out = writes_residual_grad ? r.grad_residual : Tensor();
  const BackwardTensors tensors{in,          epilogue,      dy,          w,           mean_c,
                                invstd_c,    training,      eps,         output_mask, exchange,
                                r.grad_input, r.grad_weight, r.grad_bias, grad_residual_out, r.local_sums};
  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    RunBackward::run<typename decltype(scalar)::type, typename decltype(param)::type>(tensors);
  });
  return r;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight, const Tensor& mean,
    const Tensor& invstd, bool training, double eps, std::array<bool, 3> output_mask, const optional<Tensor>& bias,
    c10::string_view activation, at::ArrayRef<double> activation_params, const optional<Tensor>& residual,
    const optional<Tensor>& output) {
  BackwardResult r = backward_cuda(grad_output, input, weight, bias, activation, activation_params, residual, output,
                                   mean, invstd, training, eps, output_mask);
  return {r.grad_input, r.grad_weight, r.grad_bias, r.grad_residual};
}

// FusedSyncBatchNorm2d's backward, before its all_reduce: this rank's [C, 3]
// sums, its share of grad_weight and grad_bias, and grad_residual as
// batch_norm_backward gives it.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_sums_cuda(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight, const Tensor& mean,
    const Tensor& invstd, std::array<bool, 2> param_mask, const optional<Tensor>& bias, c10::string_view activation,
    at::ArrayRef<double> activation_params, const optional<Tensor>& residual, const optional<Tensor>& output) {
  ExchangeArgs exchange;
  exchange.want_local = true;
  BackwardResult r = backward_cuda(grad_output, input, weight, bias, activation, activation_params, residual, output,
                                   mean, invstd, /*training=*/true, /*eps=*/0.0, {false, param_mask[0], param_mask[1]},
                                   exchange);
  return {r.local_sums, r.grad_weight, r.grad_bias, r.grad_residual};
}

// FusedSyncBatchNorm2d's backward, after its all_reduce: grad_input from the
// sums of every rank, over `count` values per channel in all (read on the
// device: the host never waits for the gathered counts). With a residual the
// caller passes g (batch_norm_backward_sums' grad_residual) and "identity".
Tensor batch_norm_backward_with_sums_cuda(const Tensor& grad_output, const Tensor& input,
                                          const optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
                                          const Tensor& sums, const Tensor& count, const optional<Tensor>& bias,
                                          c10::string_view activation, at::ArrayRef<double> activation_params) {
  check_input_tensor(input);
  check_exchanged(sums, "sums", input, {}, common::kExchangedGradSums);
  check_exchanged_count(count, input);
  ExchangeArgs exchange;
  exchange.global = sums.contiguous();
  exchange.global_count = count.reshape({1}).to(at::kDouble);
  BackwardResult r = backward_cuda(grad_output, input, weight, bias, activation, activation_params, c10::nullopt,
                                   c10::nullopt, mean, invstd, /*training=*/true, /*eps=*/0.0, {true, false, false},
                                   exchange);
  return r.grad_input;
}

}  // namespace

void register_cuda_glue(torch::Library& m) {
  m.impl("batch_norm_train", &batch_norm_train_cuda);
  m.impl("batch_norm_eval", &batch_norm_eval_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_train_with_stats", &batch_norm_train_with_stats_cuda);
  m.impl("batch_norm_backward_sums", &batch_norm_backward_sums_cuda);
  m.impl("batch_norm_backward_with_sums", &batch_norm_backward_with_sums_cuda);
}

#if !defined(FUSED_BN_CUDA_EMULATION)
// The emulated build registers the same glue for CPU tensors on request
// (emulation/emulated_ops.cpp).
TORCH_LIBRARY_IMPL(fused_bn, CUDA, m) { register_cuda_glue(m); }
#endif

}  // namespace fused_bn
