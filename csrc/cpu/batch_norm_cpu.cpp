// Torch glue for the CPU kernels: argument checks, layout and dtype dispatch,
// allocation, and registration for the CPU dispatch key. The arithmetic lives
// is the kernel layer's (entry_points.h; its instances are one translation
// unit per dtype, kernels_<dtype>.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "../torch/checks.h"
#include "../torch/dispatch.h"
#include "../torch/prepare.h"
#include "../torch/tensors.h"
#include "accumulators.h"
#include "backward.h"
#include "data_parallel.h"
#include "entry_points.h"

namespace fused_bn {
namespace {

using at::Tensor;
using c10::optional;

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const optional<Tensor>& t) {
  return is_defined(t) ? t->mutable_data_ptr<T>() : nullptr;
}

// num_batches_tracked += 1, returning the new count. nn's int64 counter is
// incremented in place without add_ and item (two dispatches: a small layer
// pays for them, bench/NOTES.md); the version bump is what add_ would have done.
double count_batch(const Tensor& num_batches_tracked) {
  if (num_batches_tracked.scalar_type() == at::kLong) {
    int64_t& count = *num_batches_tracked.mutable_data_ptr<int64_t>();
    ++count;
    // Inference tensors have no version counter.
    if (!num_batches_tracked.is_inference()) num_batches_tracked.unsafeGetTensorImpl()->bump_version();
    return static_cast<double>(count);
  }
  num_batches_tracked.add_(1);
  return num_batches_tracked.item<double>();
}

// What every forward hands the kernels: the input, its epilogue, the output
// and the per-channel tensors.
template <typename scalar_t, typename param_t>
cpu::ForwardArgs<scalar_t, param_t> forward_args(cpu::ForwardKind kind, const PreparedInput& in,
                                                 const PreparedEpilogue& epilogue, Tensor& output,
                                                 const cpu::ChannelTensors<param_t>& t, double eps) {
  cpu::ForwardArgs<scalar_t, param_t> args;
  args.kind = kind;
  args.x = in.tensor.const_data_ptr<scalar_t>();
  args.residual = data_or_null<scalar_t>(epilogue.residual);
  args.y = output.mutable_data_ptr<scalar_t>();
  args.geometry = in.geometry;
  args.channels = t;
  args.activation = epilogue.activation;
  args.eps = eps;
  return args;
}

// The training ops' shared body: checks, allocation and the counter, then the
// forward (all_stats: the ranks' gathered statistics, else undefined).
std::tuple<Tensor, Tensor, Tensor> train_cpu(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, c10::string_view activation,
    at::ArrayRef<double> activation_params, const optional<Tensor>& residual, const Tensor& all_stats = Tensor()) {
  check_forward_args(input, weight, bias, running_mean, running_var);
  check_residual(residual, input);
  check_updatable(running_mean, "running_mean");
  check_updatable(running_var, "running_var");
  check_batches_tracked(num_batches_tracked, input);
  const bool float_params = has_float_params(input, {&weight, &bias, &running_mean, &running_var});
  PreparedInput in = prepare(input);
  const PreparedEpilogue epilogue = prepare_epilogue(activation, activation_params, residual, in);
  const Tensor w = dense_or_undefined(weight), b = dense_or_undefined(bias);
  Tensor output = empty_output(input, in.format);
  const auto stats_options = input.options().dtype(accumulate_dtype(input.scalar_type()));
  Tensor save_mean = at::empty({in.geometry.C}, stats_options);
  Tensor save_invstd = at::empty({in.geometry.C}, stats_options);

  // Every check has passed: from here on, state may change.
  const double batches_tracked = is_defined(num_batches_tracked) ? count_batch(*num_batches_tracked) : 0;
  const double factor = running_average_factor(momentum, batches_tracked);

  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    using scalar_t = typename decltype(scalar)::type;
    using param_t = typename decltype(param)::type;
    using Acc = cpu::acc_type<scalar_t>;
    cpu::ChannelTensors<param_t> t{data_or_null<param_t>(w), data_or_null<param_t>(b),
                                   mutable_data_or_null<param_t>(running_mean),
                                   mutable_data_or_null<param_t>(running_var)};
    auto args = forward_args<scalar_t>(
        all_stats.defined() ? cpu::ForwardKind::kTrainWithStats : cpu::ForwardKind::kTrain, in, epilogue, output, t,
        eps);
    args.factor = factor;
    args.save_mean = save_mean.mutable_data_ptr<Acc>();
    args.save_invstd = save_invstd.mutable_data_ptr<Acc>();
    if (all_stats.defined()) {
      args.all_stats = all_stats.const_data_ptr<double>();
      args.ranks = all_stats.size(0);
    }
    cpu::run_forward(args);
  });
  return {output, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cpu(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, c10::string_view activation,
    at::ArrayRef<double> activation_params, const optional<Tensor>& residual) {
  return train_cpu(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, activation,
                   activation_params, residual);
}

// FusedSyncBatchNorm2d's forward, before its all_gather: this rank's
// per-channel (count, mean, M2) as a [C, 3] float64 tensor. The parameters
// and running statistics are only checked, so that a bad call raises on
// every rank before any collective.
Tensor batch_norm_stats_cpu(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                            const optional<Tensor>& running_mean, const optional<Tensor>& running_var) {
  check_forward_args(input, weight, bias, running_mean, running_var);
  PreparedInput in = prepare(input);
  Tensor stats = at::empty({in.geometry.C, common::kExchangedMoments}, input.options().dtype(at::kDouble));
  dispatch_input_and_params(input, false, [&](auto scalar, auto) {
    using scalar_t = typename decltype(scalar)::type;
    cpu::batch_stats(in.tensor.const_data_ptr<scalar_t>(), in.geometry, stats.mutable_data_ptr<double>());
  });
  return stats;
}

// FusedSyncBatchNorm2d's forward, after its all_gather: batch_norm_train with
// the statistics of every rank's batch, all_stats[ranks][C][3] (each rank's
// batch_norm_stats), merged in rank order.
std::tuple<Tensor, Tensor, Tensor> batch_norm_train_with_stats_cpu(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, const Tensor& all_stats,
    c10::string_view activation, at::ArrayRef<double> activation_params, const optional<Tensor>& residual) {
  check_input_tensor(input);
  TORCH_CHECK(all_stats.dim() == 3, "batch_norm: all_stats must be [ranks, C, 3], got ", all_stats.sizes());
  check_exchanged(all_stats, "all_stats", input, {all_stats.size(0)}, common::kExchangedMoments);
  const Tensor stats = all_stats.contiguous();
  return train_cpu(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, activation,
                   activation_params, residual, stats);
}

Tensor batch_norm_eval_cpu(const Tensor& input, const optional<Tensor>& weight,
                           const optional<Tensor>& bias, const Tensor& running_mean,
                           const Tensor& running_var, double eps, c10::string_view activation,
                           at::ArrayRef<double> activation_params, const optional<Tensor>& residual) {
  const optional<Tensor> mean_opt(running_mean), var_opt(running_var);
  check_forward_args(input, weight, bias, mean_opt, var_opt);
  check_residual(residual, input);
  const bool float_params = has_float_params(input, {&weight, &bias, &mean_opt, &var_opt});
  PreparedInput in = prepare(input);
  const PreparedEpilogue epilogue = prepare_epilogue(activation, activation_params, residual, in);
  Tensor output = empty_output(input, in.format);
  const Tensor w = dense_or_undefined(weight), b = dense_or_undefined(bias);
  const Tensor mean = running_mean.contiguous(), var = running_var.contiguous();
  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    using scalar_t = typename decltype(scalar)::type;
    using param_t = typename decltype(param)::type;
    cpu::ChannelTensors<param_t> t{data_or_null<param_t>(w), data_or_null<param_t>(b),
                                   const_cast<param_t*>(mean.const_data_ptr<param_t>()),
                                   const_cast<param_t*>(var.const_data_ptr<param_t>())};
    cpu::run_forward(forward_args<scalar_t>(cpu::ForwardKind::kEval, in, epilogue, output, t, eps));
  });
  return output;
}

// The epilogue a backward differentiates: its activation, and what the
// forward saved for the activation's derivative (common::GradSource).
struct BackwardEpilogue {
  common::ActivationArgs activation;
  common::GradSource source = common::GradSource::kNone;
  Tensor aux;  // the residual (kInputAndResidual) or y (kOutput), in the input's layout
};

// The backward's epilogue from the ops' arguments, checked: the bias fixes a
// recomputed z's shift, the residual or the output are read like the input.
BackwardEpilogue prepare_backward_epilogue(c10::string_view activation, at::ArrayRef<double> activation_params,
                                           const optional<Tensor>& bias, const optional<Tensor>& residual,
                                           const optional<Tensor>& output, const Tensor& input,
                                           const PreparedInput& in) {
  BackwardEpilogue e;
  e.activation = parse_activation(activation, activation_params);
  const bool has_residual = is_defined(residual), has_output = is_defined(output);
  TORCH_CHECK_VALUE(!has_output || e.activation.kind == common::Activation::kIdentity ||
                        common::grad_from_output_allowed(e.activation, is_reduced_float(input.scalar_type())),
                    "batch_norm_backward: the derivative of ", std::string(activation), " with these parameters ",
                    "cannot be taken from the output; pass the residual instead");
  e.source = common::grad_source_for(e.activation.kind, has_residual, has_output);
  switch (e.source) {
    case common::GradSource::kNone:
      break;
    case common::GradSource::kInput:
      check_channel_tensor(bias, "bias", input);
      break;
    case common::GradSource::kInputAndResidual:
      check_channel_tensor(bias, "bias", input);
      check_like_input(*residual, "residual", input);
      e.aux = residual->contiguous(in.format);
      break;
    case common::GradSource::kOutput:
      check_like_input(*output, "output", input);
      e.aux = output->contiguous(in.format);
      break;
  }
  return e;
}

// Sums for FusedSyncBatchNorm2d's two backward calls (cpu::SumsExchange):
// want_local asks for this rank's [C, 3] sums (BackwardResults::local_sums);
// a defined global is every rank's, over global_count values.
struct ExchangeArgs {
  bool want_local = false;
  Tensor global;
  int64_t global_count = 0;
};

struct BackwardResults {
  Tensor grad_input, grad_weight, grad_bias;
  Tensor grad_residual;  // the activation's g where the epilogue writes it, else [0]
  Tensor local_sums;     // ExchangeArgs::want_local
};

// The backward ops' shared body.
BackwardResults backward_cpu(const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
                             const optional<Tensor>& bias, c10::string_view activation,
                             at::ArrayRef<double> activation_params, const optional<Tensor>& residual,
                             const optional<Tensor>& forward_output, const Tensor& mean, const Tensor& invstd,
                             bool training, double eps, std::array<bool, 3> output_mask,
                             const ExchangeArgs& exchange_args = {}) {
  check_backward_args(grad_output, input, weight, mean, invstd);
  const at::ScalarType acc_dtype = accumulate_dtype(input.scalar_type());
  TORCH_CHECK(mean.scalar_type() == acc_dtype && invstd.scalar_type() == acc_dtype,
              "batch_norm_backward: mean and invstd must be ", acc_dtype, " for ",
              input.scalar_type(), " input");
  PreparedInput in = prepare(input);
  const BackwardEpilogue epilogue =
      prepare_backward_epilogue(activation, activation_params, bias, residual, forward_output, input, in);
  const bool recomputes = epilogue.source == common::GradSource::kInput ||
                          epilogue.source == common::GradSource::kInputAndResidual;
  const Tensor dy = grad_output.contiguous(in.format);
  const Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const Tensor w = dense_or_undefined(weight);
  const Tensor b = recomputes ? dense_or_undefined(bias) : Tensor();
  TORCH_CHECK(!w.defined() || !b.defined() || w.scalar_type() == b.scalar_type(),
              "batch_norm_backward: weight and bias must share a dtype");
  // The kernels take per-channel tensors in the accumulation dtype (C values
  // converted where half/bfloat16 parameters come: not the AMP case, whose
  // parameters are float32 already) and write the parameter grads in it.
  auto in_acc = [&](const Tensor& t) { return t.defined() && t.scalar_type() != acc_dtype ? t.to(acc_dtype) : t; };
  const Tensor w_acc = in_acc(w), b_acc = in_acc(b);
  const int64_t C = in.geometry.C;
  // The parameter grads' dtype: the weight's, else the bias's (a recomputed
  // z's shift only), else the accumulation dtype.
  const at::ScalarType param_dtype = w.defined() ? w.scalar_type() : b.defined() ? b.scalar_type() : acc_dtype;
  const auto acc_options = input.options().dtype(acc_dtype);
  auto like_input = [&] { return empty_output(grad_output, in.format); };

  BackwardResults r;
  r.grad_input = output_mask[0] ? like_input() : at::empty({0}, input.options());
  r.grad_weight = at::empty({output_mask[1] ? C : 0}, acc_options);
  r.grad_bias = at::empty({output_mask[2] ? C : 0}, acc_options);
  const bool writes_grad = epilogue.source == common::GradSource::kInputAndResidual ||
                           epilogue.source == common::GradSource::kOutput;
  r.grad_residual = writes_grad ? like_input() : at::empty({0}, input.options());
  // A costly derivative (common::costly_derivative) is evaluated once: the
  // reduction pass writes g into grad_input's memory and the dx pass reads it
  // there (a pass of writes and one of reads more, bench/NOTES.md: on the CPU
  // the transcendental, not memory, bounds these activations).
  const bool grad_once = training && output_mask[0] && epilogue.source == common::GradSource::kInput &&
                         !exchange_args.want_local && !exchange_args.global.defined() &&
                         common::costly_derivative(epilogue.activation.kind);
  if (exchange_args.want_local) {
    r.local_sums = at::empty({C, common::kExchangedGradSums}, input.options().dtype(at::kDouble));
  }
  const Tensor global_sums = exchange_args.global.defined() ? exchange_args.global.contiguous() : Tensor();
  cpu::SumsExchange exchange;
  if (r.local_sums.defined()) exchange.local = reinterpret_cast<cpu::GradSums*>(r.local_sums.mutable_data_ptr<double>());
  if (global_sums.defined()) {
    exchange.global = reinterpret_cast<const cpu::GradSums*>(global_sums.const_data_ptr<double>());
    exchange.global_count = exchange_args.global_count;
  }

  dispatch_input_and_params(input, false, [&](auto scalar, auto) {
    using scalar_t = typename decltype(scalar)::type;
    using Acc = cpu::acc_type<scalar_t>;
    const cpu::BackwardOutputs<scalar_t, Acc> out{
        output_mask[0] ? r.grad_input.mutable_data_ptr<scalar_t>() : nullptr,
        output_mask[1] ? r.grad_weight.mutable_data_ptr<Acc>() : nullptr,
        output_mask[2] ? r.grad_bias.mutable_data_ptr<Acc>() : nullptr,
        writes_grad ? r.grad_residual.mutable_data_ptr<scalar_t>()
        : grad_once ? r.grad_input.mutable_data_ptr<scalar_t>()
                    : nullptr};
    cpu::BackwardArgs<scalar_t> args;
    args.dy = dy.const_data_ptr<scalar_t>();
    args.x = in.tensor.const_data_ptr<scalar_t>();
    args.geometry = in.geometry;
    args.weight = data_or_null<Acc>(w_acc);
    args.bias = data_or_null<Acc>(b_acc);
    args.aux = data_or_null<scalar_t>(epilogue.aux);
    args.activation = epilogue.activation;
    args.source = epilogue.source;
    args.mean = mean_c.const_data_ptr<Acc>();
    args.invstd = invstd_c.const_data_ptr<Acc>();
    args.training = training;
    args.eps = eps;
    args.grad_once = grad_once;
    args.outputs = &out;
    args.exchange = &exchange;
    cpu::run_backward(args);
  });
  if (param_dtype != acc_dtype) {
    r.grad_weight = r.grad_weight.to(param_dtype);
    r.grad_bias = r.grad_bias.to(param_dtype);
  }
  return r;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight, const Tensor& mean,
    const Tensor& invstd, bool training, double eps, std::array<bool, 3> output_mask, const optional<Tensor>& bias,
    c10::string_view activation, at::ArrayRef<double> activation_params, const optional<Tensor>& residual,
    const optional<Tensor>& output) {
  BackwardResults r = backward_cpu(grad_output, input, weight, bias, activation, activation_params, residual, output,
                                   mean, invstd, training, eps, output_mask);
  return {r.grad_input, r.grad_weight, r.grad_bias, r.grad_residual};
}

// FusedSyncBatchNorm2d's backward, before its all_reduce: this rank's [C, 3]
// sums (Σg, Σg·(x − mean), Σ(x − mean)), grad_weight and grad_bias from them
// (each rank's own share: data-parallel training sums them across ranks), and
// the epilogue's g as batch_norm_backward gives it.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward_sums_cpu(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight, const Tensor& mean,
    const Tensor& invstd, std::array<bool, 2> param_mask, const optional<Tensor>& bias, c10::string_view activation,
    at::ArrayRef<double> activation_params, const optional<Tensor>& residual, const optional<Tensor>& output) {
  BackwardResults r = backward_cpu(grad_output, input, weight, bias, activation, activation_params, residual, output,
                                   mean, invstd, /*training=*/true, /*eps=*/0.0,
                                   {false, param_mask[0], param_mask[1]}, ExchangeArgs{/*want_local=*/true});
  return {r.local_sums, r.grad_weight, r.grad_bias, r.grad_residual};
}

// FusedSyncBatchNorm2d's backward, after its all_reduce: grad_input from the
// sums of every rank, over `count` values per channel in all.
Tensor batch_norm_backward_with_sums_cpu(const Tensor& grad_output, const Tensor& input,
                                         const optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
                                         const Tensor& sums, const Tensor& count_tensor, const optional<Tensor>& bias,
                                         c10::string_view activation, at::ArrayRef<double> activation_params) {
  check_input_tensor(input);
  check_exchanged(sums, "sums", input, {}, common::kExchangedGradSums);
  check_exchanged_count(count_tensor, input);
  const int64_t count = static_cast<int64_t>(count_tensor.item<double>());
  TORCH_CHECK(count >= 0, "batch_norm: count must be non-negative, got ", count);
  return backward_cpu(grad_output, input, weight, bias, activation, activation_params, c10::nullopt, c10::nullopt,
                      mean, invstd, /*training=*/true, /*eps=*/0.0, {true, false, false},
                      ExchangeArgs{false, sums, count})
      .grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("batch_norm_eval", &batch_norm_eval_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_train_with_stats", &batch_norm_train_with_stats_cpu);
  m.impl("batch_norm_backward_sums", &batch_norm_backward_sums_cpu);
  m.impl("batch_norm_backward_with_sums", &batch_norm_backward_with_sums_cpu);
}

}  // namespace fused_bn
