// The forward ops' autograd in C++, for eager calls (fused_bn/_autograd.py
// takes this path when no torch.func transform and no forward-mode AD is
// active; those, torch.compile and tensor subclasses keep the Python
// autograd.Functions registered for batch_norm_train and batch_norm_eval). The Python Function's
// apply and its backward's trip back into Python cost a small layer more than
// the batch norm itself (bench/NOTES.md, host overhead).
//
// batch_norm_train_eager (batch_norm_eval_eager) has batch_norm_train's
// (batch_norm_eval's) schema and results; its CompositeImplicitAutograd
// kernel records one node. Its backward is the one
// both routes share: batch_norm_backward (the op) for first-order grads, and,
// when the backward itself is recorded (create_graph=True),
// batch_norm_backward_differentiable (batch norm's backward in differentiable
// ATen ops around PyTorch's own backward op of the activation,
// fused_bn/_autograd.py), as the Python Function's.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/epilogue.h"
#include "torch/checks.h"

namespace fused_bn {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TrainSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, optional<double>, double, c10::string_view,
    at::ArrayRef<double>, const optional<Tensor>&);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&, bool, double,
    std::array<bool, 3>, const optional<Tensor>&, c10::string_view, at::ArrayRef<double>, const optional<Tensor>&,
    const optional<Tensor>&);
using DifferentiableSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, bool, double, c10::string_view, at::ArrayRef<double>, const optional<Tensor>&,
    const optional<Tensor>&, std::array<bool, 4>);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

optional<Tensor> as_optional(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : c10::nullopt; }

// The forward's arguments a backward reads, by name: the node's saved
// tensors are these, in this order.
enum Saved { kInput, kWeight, kBias, kMean, kInvstd, kResidual, kOutput, kSavedCount };

using EvalSignature = Tensor(const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
                             const Tensor&, double, c10::string_view, at::ArrayRef<double>, const optional<Tensor>&);

// needs_input_grad(i) counts the defined tensor arguments only: the edge of
// each optional one, in argument order (input is edge 0), -1 where undefined.
struct Edges {
  int64_t next = 1;
  int64_t of(const optional<Tensor>& t) { return t.has_value() && t->defined() ? next++ : int64_t{-1}; }
};

// What both forward nodes save and their shared backward. mean and
// var_or_invstd: the batch statistics (training) or the running mean and
// variance (eval; read as they are at backward time, as nn's autograd does).
void save_epilogue(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                   const optional<Tensor>& bias, const Tensor& mean, const Tensor& var_or_invstd,
                   const optional<Tensor>& residual, const Tensor& output, double eps, c10::string_view activation,
                   at::ArrayRef<double> activation_params) {
  const common::ActivationArgs args = parse_activation(activation, activation_params);
  const Tensor w = weight.has_value() ? *weight : Tensor(), b = bias.has_value() ? *bias : Tensor();
  const bool has_residual = residual.has_value() && residual->defined();
  const bool identity = args.kind == common::Activation::kIdentity;
  // What the activation's derivative needs (common::GradSource): nothing
  // for the identity, y where it can come from y, else the residual and the
  // bias (a recomputed z's shift).
  const bool from_output =
      has_residual && !identity && common::grad_from_output_allowed(args, is_reduced_float(input.scalar_type()));
  std::vector<Tensor> saved(kSavedCount);
  saved[kInput] = input;
  saved[kWeight] = w;
  saved[kBias] = b;
  saved[kMean] = mean;
  saved[kInvstd] = var_or_invstd;
  if (has_residual && !identity && !from_output) saved[kResidual] = *residual;
  if (from_output) saved[kOutput] = output;
  ctx->save_for_backward(saved);
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["activation_params"] = std::vector<double>(activation_params.begin(), activation_params.end());
  if (b.defined()) ctx->saved_data["bias_dtype"] = static_cast<int64_t>(b.scalar_type());
}

// One entry per forward argument of `schema` (the op's, csrc/ops.cpp:
// positions read from it, never written down twice); non-tensor ones stay
// undefined.
variable_list epilogue_backward(AutogradContext* ctx, const variable_list& grads, bool training,
                                const c10::FunctionSchema& schema) {
  static const auto backward_op = op<BackwardSignature>("fused_bn::batch_norm_backward");
  const variable_list saved = ctx->get_saved_variables();
  const double eps = ctx->saved_data["eps"].toDouble();
  const std::string activation = ctx->saved_data["activation"].toStringRef();
  const std::vector<double> params = ctx->saved_data["activation_params"].toDoubleVector();
  const bool identity = parse_activation(activation, params).kind == common::Activation::kIdentity;
  auto needs = [&](const char* name) {
    const int64_t edge = ctx->saved_data[name].toInt();
    return edge >= 0 && ctx->needs_input_grad(edge);
  };
  const size_t residual_argument = schema.argumentIndexWithName("residual").value();
  variable_list result(schema.arguments().size());
  const Tensor& grad_output = grads[0];
  const std::array<bool, 3> mask{ctx->needs_input_grad(0), needs("weight_edge"), needs("bias_edge")};
  const bool residual_needs_grad = needs("residual_edge");
  if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2] || residual_needs_grad)) return result;
  Tensor grad_input, grad_weight, grad_bias, grad_residual;
  if (at::GradMode::is_enabled()) {
    // The backward is recorded (a gradient penalty): PyTorch's derivatives
    // of the same function written with differentiable ATen ops, as the
    // Python Function's (fused_bn/_autograd.py).
    static const auto differentiable = op<DifferentiableSignature>("fused_bn::batch_norm_backward_differentiable");
    const optional<Tensor> running_mean = training ? c10::nullopt : as_optional(saved[kMean]);
    const optional<Tensor> running_var = training ? c10::nullopt : as_optional(saved[kInvstd]);
    std::tie(grad_input, grad_weight, grad_bias, grad_residual) = differentiable.call(
        grad_output, saved[kInput], as_optional(saved[kWeight]), as_optional(saved[kBias]), running_mean, running_var,
        training, eps, activation, params, as_optional(saved[kResidual]), as_optional(saved[kOutput]),
        {mask[0], mask[1], mask[2], residual_needs_grad});
  } else {
    Tensor mean = saved[kMean], invstd = saved[kInvstd];
    if (!training) {
      // What the eval forward normalized with, as the kernels' eval_invstd
      // computes it (1/sqrt in float64, then rounded: a recomputed z is the
      // forward's bit for bit); copies, the buffers stay as they are.
      const auto acc = saved[kInput].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      invstd = invstd.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).add_(eps).sqrt_().reciprocal_().to(acc);
      mean = mean.to(acc);
    }
    std::tie(grad_input, grad_weight, grad_bias, grad_residual) = backward_op.call(
        grad_output, saved[kInput], as_optional(saved[kWeight]), mean, invstd, training, eps, mask,
        as_optional(saved[kBias]), activation, params, as_optional(saved[kResidual]), as_optional(saved[kOutput]));
  }
  if (identity) grad_residual = grad_output;
  // The backward op returns parameter grads in the weight's dtype; a bias
  // without a weight, or of another dtype, gets its own.
  if (mask[2]) {
    const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
    if (grad_bias.scalar_type() != bias_dtype) grad_bias = grad_bias.to(bias_dtype);
  }
  if (mask[0]) result[0] = grad_input;
  if (mask[1]) result[1] = grad_weight;
  if (mask[2]) result[2] = grad_bias;
  if (residual_needs_grad) result[residual_argument] = grad_residual;
  return result;
}

struct BatchNormTrainFunction : public torch::autograd::Function<BatchNormTrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked,
                               optional<double> momentum, double eps, c10::string_view activation,
                               at::ArrayRef<double> activation_params, const optional<Tensor>& residual) {
    static const auto train = op<TrainSignature>("fused_bn::batch_norm_train");
    Edges edges;
    ctx->saved_data["weight_edge"] = edges.of(weight);
    ctx->saved_data["bias_edge"] = edges.of(bias);
    edges.of(running_mean), edges.of(running_var), edges.of(num_batches_tracked);
    ctx->saved_data["residual_edge"] = edges.of(residual);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, save_mean, save_invstd] = train.call(input, weight, bias, running_mean, running_var,
                                                       num_batches_tracked, momentum, eps, activation,
                                                       activation_params, residual);
    save_epilogue(ctx, input, weight, bias, save_mean, save_invstd, residual, output, eps, activation,
                  activation_params);
    ctx->mark_non_differentiable({save_mean, save_invstd});
    // The statistics' grads are never read: materializing them would cost two
    // zero-filled allocations per backward (a tiny layer pays for them, bench/NOTES.md).
    ctx->set_materialize_grads(false);
    return {output, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const c10::FunctionSchema& schema = op<TrainSignature>("fused_bn::batch_norm_train").schema();
    return epilogue_backward(ctx, grads, /*training=*/true, schema);
  }
};

// The eval forward's node: the Python Function's apply cost a small layer's
// eval forward with grad mode on (a validation loop that forgets no_grad)
// about a third more than nn's (bench/NOTES.md, issue 42).
struct BatchNormEvalFunction : public torch::autograd::Function<BatchNormEvalFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const Tensor& running_mean, const Tensor& running_var,
                               double eps, c10::string_view activation, at::ArrayRef<double> activation_params,
                               const optional<Tensor>& residual) {
    static const auto evaluate = op<EvalSignature>("fused_bn::batch_norm_eval");
    Edges edges;
    ctx->saved_data["weight_edge"] = edges.of(weight);
    ctx->saved_data["bias_edge"] = edges.of(bias);
    edges.of(running_mean), edges.of(running_var);
    ctx->saved_data["residual_edge"] = edges.of(residual);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor output =
        evaluate.call(input, weight, bias, running_mean, running_var, eps, activation, activation_params, residual);
    save_epilogue(ctx, input, weight, bias, running_mean, running_var, residual, output, eps, activation,
                  activation_params);
    ctx->set_materialize_grads(false);
    return {output};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const c10::FunctionSchema& schema = op<EvalSignature>("fused_bn::batch_norm_eval").schema();
    return epilogue_backward(ctx, grads, /*training=*/false, schema);
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_eager(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, c10::string_view activation,
    at::ArrayRef<double> activation_params, const optional<Tensor>& residual) {
  variable_list outputs =
      BatchNormTrainFunction::apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                    eps, activation, activation_params, residual);
  return {outputs[0], outputs[1], outputs[2]};
}

Tensor batch_norm_eval_eager(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                             const Tensor& running_mean, const Tensor& running_var, double eps,
                             c10::string_view activation, at::ArrayRef<double> activation_params,
                             const optional<Tensor>& residual) {
  return BatchNormEvalFunction::apply(input, weight, bias, running_mean, running_var, eps, activation,
                                      activation_params, residual)[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_bn, m) {
  // batch_norm_train with its autograd recorded in C++ (see the top of this
  // file); eager calls only.
  m.def(
      "batch_norm_train_eager(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps, "
      "str activation=\"identity\", float[] activation_params=[], Tensor? residual=None) "
      "-> (Tensor, Tensor, Tensor)");
  // batch_norm_eval likewise.
  m.def(
      "batch_norm_eval_eager(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor running_mean, Tensor running_var, float eps, "
      "str activation=\"identity\", float[] activation_params=[], Tensor? residual=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_bn, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_train_eager", &batch_norm_train_eager);
  m.impl("batch_norm_eval_eager", &batch_norm_eval_eager);
}

}  // namespace fused_bn
