// Torch glue for the CPU kernels: argument checks, layout and dtype dispatch,
// allocation, and registration for the CPU dispatch key. The arithmetic lives
// in kernels.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "../torch/checks.h"
#include "../torch/dispatch.h"
#include "../torch/prepare.h"
#include "../torch/tensors.h"
#include "kernels.h"

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

template <typename F>
void dispatch_epilogue(cpu::Epilogue e, F&& f) {
  dispatch_enum<cpu::Epilogue, cpu::Epilogue::kNone, cpu::Epilogue::kRelu, cpu::Epilogue::kAddRelu>(e, f);
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

// The training ops' shared body: checks, allocation and the counter, then
// kernel(scalar, param, epilogue, in, residual, output, t, factor, save_mean,
// save_invstd) with the TypeTags and Epilogue constant of the call.
template <typename Kernel>
std::tuple<Tensor, Tensor, Tensor> train_cpu(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, bool relu,
    const optional<Tensor>& residual, Kernel&& kernel) {
  check_forward_args(input, weight, bias, running_mean, running_var);
  check_epilogue(relu, residual, input);
  check_updatable(running_mean, "running_mean");
  check_updatable(running_var, "running_var");
  check_batches_tracked(num_batches_tracked, input);
  const bool float_params = has_float_params(input, {&weight, &bias, &running_mean, &running_var});
  PreparedInput in = prepare(input);
  const PreparedEpilogue epilogue = prepare_epilogue(relu, residual, in);
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
    dispatch_epilogue(epilogue.kind, [&](auto kind) {
      kernel(scalar, param, kind, in, data_or_null<scalar_t>(epilogue.residual), output.mutable_data_ptr<scalar_t>(),
             t, factor, save_mean.mutable_data_ptr<Acc>(), save_invstd.mutable_data_ptr<Acc>());
    });
  });
  return {output, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cpu(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, bool relu,
    const optional<Tensor>& residual) {
  return train_cpu(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, relu,
                   residual,
                   [&](auto scalar, auto param, auto kind, const PreparedInput& in, const auto* z, auto* y,
                       const auto& t, double factor, auto* save_mean, auto* save_invstd) {
                     using scalar_t = typename decltype(scalar)::type;
                     using param_t = typename decltype(param)::type;
                     cpu::train_forward<scalar_t, param_t, decltype(kind)::value>(
                         in.tensor.const_data_ptr<scalar_t>(), z, y, in.geometry, t, factor, eps, save_mean,
                         save_invstd);
                   });
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
    bool relu) {
  check_input_tensor(input);
  TORCH_CHECK(all_stats.dim() == 3, "batch_norm: all_stats must be [ranks, C, 3], got ", all_stats.sizes());
  check_exchanged(all_stats, "all_stats", input, {all_stats.size(0)}, common::kExchangedMoments);
  const Tensor stats = all_stats.contiguous();
  return train_cpu(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, relu,
                   c10::nullopt,
                   [&](auto scalar, auto param, auto kind, const PreparedInput& in, const auto*, auto* y,
                       const auto& t, double factor, auto* save_mean, auto* save_invstd) {
                     using scalar_t = typename decltype(scalar)::type;
                     using param_t = typename decltype(param)::type;
                     cpu::train_forward_with_stats<scalar_t, param_t, decltype(kind)::value>(
                         in.tensor.const_data_ptr<scalar_t>(), y, in.geometry, t, factor, eps,
                         stats.const_data_ptr<double>(), stats.size(0), save_mean, save_invstd);
                   });
}

Tensor batch_norm_eval_cpu(const Tensor& input, const optional<Tensor>& weight,
                           const optional<Tensor>& bias, const Tensor& running_mean,
                           const Tensor& running_var, double eps, bool relu,
                           const optional<Tensor>& residual) {
  const optional<Tensor> mean_opt(running_mean), var_opt(running_var);
  check_forward_args(input, weight, bias, mean_opt, var_opt);
  check_epilogue(relu, residual, input);
  const bool float_params = has_float_params(input, {&weight, &bias, &mean_opt, &var_opt});
  PreparedInput in = prepare(input);
  const PreparedEpilogue epilogue = prepare_epilogue(relu, residual, in);
  Tensor output = empty_output(input, in.format);
  const Tensor w = dense_or_undefined(weight), b = dense_or_undefined(bias);
  const Tensor mean = running_mean.contiguous(), var = running_var.contiguous();
  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    using scalar_t = typename decltype(scalar)::type;
    using param_t = typename decltype(param)::type;
    cpu::ChannelTensors<param_t> t{data_or_null<param_t>(w), data_or_null<param_t>(b),
                                   const_cast<param_t*>(mean.const_data_ptr<param_t>()),
                                   const_cast<param_t*>(var.const_data_ptr<param_t>())};
    dispatch_epilogue(epilogue.kind, [&](auto kind) {
      cpu::eval_forward<scalar_t, param_t, decltype(kind)::value>(
          in.tensor.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(epilogue.residual),
          output.mutable_data_ptr<scalar_t>(), in.geometry, t, eps);
    });
  });
  return output;
}

// Sums for FusedSyncBatchNorm2d's two backward calls (cpu::SumsExchange):
// want_local asks for this rank's [C, 3] sums (returned as the fourth
// tensor); a defined global is every rank's, over global_count values.
struct ExchangeArgs {
  bool want_local = false;
  Tensor global;
  int64_t global_count = 0;
};

// The backward ops' shared body. mask: kNone (batch_norm), kReluOfInput
// (relu(batch_norm): bias is the forward's), kReluOfOutput (relu(batch_norm +
// residual): output is the forward's y, and grad_residual is returned).
std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cpu(
    cpu::GradMask mask, const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const Tensor& forward_output, const Tensor& mean, const Tensor& invstd,
    bool training, double eps, std::array<bool, 3> output_mask, const ExchangeArgs& exchange_args = {}) {
  check_backward_args(grad_output, input, weight, mean, invstd);
  if (mask == cpu::GradMask::kReluOfInput) check_channel_tensor(bias, "bias", input);
  if (mask == cpu::GradMask::kReluOfOutput) check_like_input(forward_output, "output", input);
  const at::ScalarType acc_dtype = accumulate_dtype(input.scalar_type());
  TORCH_CHECK(mean.scalar_type() == acc_dtype && invstd.scalar_type() == acc_dtype,
              "batch_norm_backward: mean and invstd must be ", acc_dtype, " for ",
              input.scalar_type(), " input");
  const bool float_params = has_float_params(input, {&weight, &bias});
  PreparedInput in = prepare(input);
  const Tensor dy = grad_output.contiguous(in.format);
  const Tensor y = mask == cpu::GradMask::kReluOfOutput ? forward_output.contiguous(in.format) : Tensor();
  const Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const Tensor w = dense_or_undefined(weight);
  const Tensor b = mask == cpu::GradMask::kReluOfInput ? dense_or_undefined(bias) : Tensor();
  TORCH_CHECK(!w.defined() || !b.defined() || w.scalar_type() == b.scalar_type(),
              "batch_norm_backward: weight and bias must share a dtype");
  const int64_t C = in.geometry.C;
  const auto param_options =
      input.options().dtype(is_defined(weight) ? weight->scalar_type() : acc_dtype);
  auto like_input = [&] { return empty_output(grad_output, in.format); };

  Tensor grad_input = output_mask[0] ? like_input() : at::empty({0}, input.options());
  Tensor grad_weight = at::empty({output_mask[1] ? C : 0}, param_options);
  Tensor grad_bias = at::empty({output_mask[2] ? C : 0}, param_options);
  Tensor grad_residual = mask == cpu::GradMask::kReluOfOutput ? like_input() : Tensor();
  Tensor local_sums = exchange_args.want_local
                          ? at::empty({C, common::kExchangedGradSums}, input.options().dtype(at::kDouble))
                          : Tensor();
  const Tensor global_sums = exchange_args.global.defined() ? exchange_args.global.contiguous() : Tensor();
  cpu::SumsExchange exchange;
  if (local_sums.defined()) exchange.local = reinterpret_cast<cpu::GradSums*>(local_sums.mutable_data_ptr<double>());
  if (global_sums.defined()) {
    exchange.global = reinterpret_cast<const cpu::GradSums*>(global_sums.const_data_ptr<double>());
    exchange.global_count = exchange_args.global_count;
  }

  dispatch_input_and_params(input, float_params, [&](auto scalar, auto param) {
    using scalar_t = typename decltype(scalar)::type;
    using param_t = typename decltype(param)::type;
    using Acc = cpu::acc_type<scalar_t>;
    // Without a weight the parameter grads are in the accumulation dtype.
    using grad_param_t = std::conditional_t<std::is_same_v<param_t, scalar_t>, Acc, param_t>;
    auto run = [&]<typename out_param_t>() {
      cpu::BackwardOutputs<scalar_t, out_param_t> out{
          output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[1] ? grad_weight.mutable_data_ptr<out_param_t>() : nullptr,
          output_mask[2] ? grad_bias.mutable_data_ptr<out_param_t>() : nullptr,
          grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr};
      dispatch_enum<cpu::GradMask, cpu::GradMask::kNone, cpu::GradMask::kReluOfInput,
                    cpu::GradMask::kReluOfOutput>(mask, [&](auto kind) {
        cpu::backward<scalar_t, out_param_t, decltype(kind)::value>(
            dy.const_data_ptr<scalar_t>(), in.tensor.const_data_ptr<scalar_t>(), in.geometry,
            data_or_null<out_param_t>(w), data_or_null<out_param_t>(b), data_or_null<scalar_t>(y),
            mean_c.const_data_ptr<Acc>(), invstd_c.const_data_ptr<Acc>(), training, eps, out, exchange);
      });
    };
    // The parameter dtype follows the weight, else the bias (relu's shift
    // only), else the accumulation dtype.
    if (w.defined() || b.defined()) {
      run.template operator()<param_t>();
    } else {
      run.template operator()<grad_param_t>();
    }
  });
  return {grad_input, grad_weight, grad_bias, exchange_args.want_local ? local_sums : grad_residual};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight,
    const Tensor& mean, const Tensor& invstd, bool training, double eps, std::array<bool, 3> output_mask,
    const optional<Tensor>& bias, bool relu) {
  auto [grad_input, grad_weight, grad_bias, unused] =
      backward_cpu(relu ? cpu::GradMask::kReluOfInput : cpu::GradMask::kNone, grad_output, input, weight,
                   bias, Tensor(), mean, invstd, training, eps, output_mask);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_add_relu_backward_cpu(
    const Tensor& grad_output, const Tensor& output, const Tensor& input, const optional<Tensor>& weight,
    const Tensor& mean, const Tensor& invstd, bool training, double eps, std::array<bool, 3> output_mask) {
  auto [grad_input, grad_weight, grad_bias, grad_residual] =
      backward_cpu(cpu::GradMask::kReluOfOutput, grad_output, input, weight, c10::nullopt, output, mean, invstd,
                   training, eps, output_mask);
  return {grad_input, grad_residual, grad_weight, grad_bias};
}

// FusedSyncBatchNorm2d's backward, before its all_reduce: this rank's [C, 3]
// sums (Σg, Σg·(x − mean), Σ(x − mean)), and grad_weight and grad_bias from them (each
// rank's own share: data-parallel training sums them across ranks).
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_sums_cpu(
    const Tensor& grad_output, const Tensor& input, const optional<Tensor>& weight, const Tensor& mean,
    const Tensor& invstd, std::array<bool, 2> param_mask, const optional<Tensor>& bias, bool relu) {
  auto [unused, grad_weight, grad_bias, sums] =
      backward_cpu(relu ? cpu::GradMask::kReluOfInput : cpu::GradMask::kNone, grad_output, input, weight, bias,
                   Tensor(), mean, invstd, /*training=*/true, /*eps=*/0.0, {false, param_mask[0], param_mask[1]},
                   ExchangeArgs{/*want_local=*/true});
  return {sums, grad_weight, grad_bias};
}

// FusedSyncBatchNorm2d's backward, after its all_reduce: grad_input from the
// sums of every rank, over `count` values per channel in all.
Tensor batch_norm_backward_with_sums_cpu(const Tensor& grad_output, const Tensor& input,
                                         const optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
                                         const Tensor& sums, const Tensor& count_tensor,
                                         const optional<Tensor>& bias, bool relu) {
  check_input_tensor(input);
  check_exchanged(sums, "sums", input, {}, common::kExchangedGradSums);
  check_exchanged_count(count_tensor, input);
  const int64_t count = static_cast<int64_t>(count_tensor.item<double>());
  TORCH_CHECK(count >= 0, "batch_norm: count must be non-negative, got ", count);
  auto [grad_input, unused_w, unused_b, unused_sums] =
      backward_cpu(relu ? cpu::GradMask::kReluOfInput : cpu::GradMask::kNone, grad_output, input, weight, bias,
                   Tensor(), mean, invstd, /*training=*/true, /*eps=*/0.0, {true, false, false},
                   ExchangeArgs{false, sums, count});
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_bn, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("batch_norm_eval", &batch_norm_eval_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_add_relu_backward", &batch_norm_add_relu_backward_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_train_with_stats", &batch_norm_train_with_stats_cpu);
  m.impl("batch_norm_backward_sums", &batch_norm_backward_sums_cpu);
  m.impl("batch_norm_backward_with_sums", &batch_norm_backward_with_sums_cpu);
}

}  // namespace fused_bn
