// The training forward's autograd in C++, for eager calls (fused_bn/_autograd.py
// takes this path when no torch.func transform and no forward-mode AD is
// active; those, torch.compile and tensor subclasses keep the Python
// autograd.Function registered for batch_norm_train). The Python Function's
// apply and its backward's trip back into Python cost a small layer more than
// the batch norm itself (bench/NOTES.md, host overhead).
//
// batch_norm_train_eager has batch_norm_train's schema and results; its
// CompositeImplicitAutograd kernel records one node whose backward calls
// batch_norm_backward (or batch_norm_add_relu_backward), or, when the backward
// itself is recorded (create_graph=True), differentiable ATen ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fused_bn {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TrainSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, optional<double>, double, bool, const optional<Tensor>&);
using BackwardSignature = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&, bool, double,
    std::array<bool, 3>, const optional<Tensor>&, bool);
using AddReluBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&, bool,
    double, std::array<bool, 3>);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

optional<Tensor> as_optional(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : c10::nullopt; }

at::ScalarType accumulate_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Where the forward's ReLU passed its input, for the differentiable backward:
// output > 0 (add+relu), else the recomputed batch_norm(input) > 0 (relu).
Tensor relu_mask(const Tensor& input, const Tensor& weight, const Tensor& bias, const Tensor& mean,
                 const Tensor& invstd, const Tensor& output) {
  if (output.defined()) return output > 0;
  const at::ScalarType acc = accumulate_dtype(input.scalar_type());
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = input.size(1);
  Tensor scale = invstd.to(acc).view(shape);
  if (weight.defined()) scale = scale * weight.to(acc).view(shape);
  Tensor z = (input.to(acc) - mean.to(acc).view(shape)) * scale;
  if (bias.defined()) z = z + bias.to(acc).view(shape);
  return z > 0;
}

// First-order grads from differentiable ATen ops, for double backward (as
// _differentiable_backward in fused_bn/_autograd.py): the batch statistics are
// recomputed from the input so that their dependence on it is differentiated.
std::tuple<Tensor, Tensor, Tensor> differentiable_backward(const Tensor& grad_output, const Tensor& input,
                                                           const Tensor& weight, double eps,
                                                           std::array<bool, 3> mask) {
  const at::ScalarType acc = accumulate_dtype(input.scalar_type());
  const Tensor x = input.to(acc);
  Tensor dy = grad_output.to(acc);
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  const Tensor mean = x.mean(dims, /*keepdim=*/true);
  const Tensor invstd = at::rsqrt(x.var(dims, /*unbiased=*/false, /*keepdim=*/true) + eps);
  const Tensor x_hat = (x - mean) * invstd;
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = input.size(1);
  const at::ScalarType param_dtype = weight.defined() ? weight.scalar_type() : acc;
  Tensor grad_weight = mask[1] ? (dy * x_hat).sum(dims).to(param_dtype) : Tensor();
  Tensor grad_bias = mask[2] ? dy.sum(dims).to(param_dtype) : Tensor();
  Tensor grad_input;
  if (mask[0]) {
    const Tensor scale = weight.defined() ? weight.to(acc).view(shape) * invstd : invstd;
    dy = dy - dy.mean(dims, true) - x_hat * (dy * x_hat).mean(dims, true);
    grad_input = (dy * scale).to(input.scalar_type());
  }
  return {grad_input, grad_weight, grad_bias};
}

struct BatchNormTrainFunction : public torch::autograd::Function<BatchNormTrainFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked,
                               optional<double> momentum, double eps, bool relu, const optional<Tensor>& residual) {
    static const auto train = op<TrainSignature>("fused_bn::batch_norm_train");
    // needs_input_grad(i) counts the defined tensor arguments only.
    int64_t edge = 1;
    auto edge_of = [&](const optional<Tensor>& t) { return t.has_value() && t->defined() ? edge++ : int64_t{-1}; };
    ctx->saved_data["weight_edge"] = edge_of(weight);
    ctx->saved_data["bias_edge"] = edge_of(bias);
    edge_of(running_mean), edge_of(running_var), edge_of(num_batches_tracked);
    ctx->saved_data["residual_edge"] = edge_of(residual);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, save_mean, save_invstd] =
        train.call(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, relu,
                   residual);
    const Tensor w = weight.has_value() ? *weight : Tensor(), b = bias.has_value() ? *bias : Tensor();
    const bool has_residual = residual.has_value() && residual->defined();
    // The bias fixes relu's shift; the output is add+relu's mask.
    ctx->save_for_backward({input, w, relu ? b : Tensor(), save_mean, save_invstd,
                            has_residual ? output : Tensor()});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    if (b.defined()) ctx->saved_data["bias_dtype"] = static_cast<int64_t>(b.scalar_type());
    ctx->mark_non_differentiable({save_mean, save_invstd});
    // The statistics' grads are never read: materializing them would cost two
    // zero-filled allocations per backward (a tiny layer pays for them, bench/NOTES.md).
    ctx->set_materialize_grads(false);
    return {output, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto backward_op = op<BackwardSignature>("fused_bn::batch_norm_backward");
    static const auto add_relu_backward_op =
        op<AddReluBackwardSignature>("fused_bn::batch_norm_add_relu_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3],
                 &invstd = saved[4], &output = saved[5];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool relu = ctx->saved_data["relu"].toBool();
    auto needs = [&](const char* name) {
      const int64_t edge = ctx->saved_data[name].toInt();
      return edge >= 0 && ctx->needs_input_grad(edge);
    };
    // One entry per forward argument; non-tensor ones stay undefined.
    variable_list result(10);
    Tensor grad_output = grads[0];
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), needs("weight_edge"), needs("bias_edge")};
    const bool residual_needs_grad = needs("residual_edge");
    if (!grad_output.defined() || !(mask[0] || mask[1] || mask[2] || residual_needs_grad)) return result;
    Tensor grad_input, grad_weight, grad_bias, grad_residual;
    if (at::GradMode::is_enabled()) {
      if (relu) grad_output = grad_output * relu_mask(input, weight, bias, mean, invstd, output);
      std::tie(grad_input, grad_weight, grad_bias) = differentiable_backward(grad_output, input, weight, eps, mask);
      grad_residual = grad_output;
    } else if (output.defined()) {
      std::tie(grad_input, grad_residual, grad_weight, grad_bias) =
          add_relu_backward_op.call(grad_output, output, input, as_optional(weight), mean, invstd, true, eps, mask);
    } else {
      std::tie(grad_input, grad_weight, grad_bias) = backward_op.call(
          grad_output, input, as_optional(weight), mean, invstd, true, eps, mask, as_optional(bias), relu);
    }
    // The backward op returns parameter grads in the weight's dtype; a bias
    // without a weight, or of another dtype, gets its own.
    if (mask[2]) {
      const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
      if (grad_bias.scalar_type() != bias_dtype) grad_bias = grad_bias.to(bias_dtype);
    }
    if (mask[0]) result[0] = grad_input;
    if (mask[1]) result[1] = grad_weight;
    if (mask[2]) result[2] = grad_bias;
    if (residual_needs_grad) result[9] = grad_residual;
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_eager(
    const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
    const optional<Tensor>& num_batches_tracked, optional<double> momentum, double eps, bool relu,
    const optional<Tensor>& residual) {
  variable_list outputs = BatchNormTrainFunction::apply(input, weight, bias, running_mean, running_var,
                                                        num_batches_tracked, momentum, eps, relu, residual);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_bn, m) {
  // batch_norm_train with its autograd recorded in C++ (see the top of this
  // file); eager calls only.
  m.def(
      "batch_norm_train_eager(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, float eps, "
      "bool relu=False, Tensor? residual=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fused_bn, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_train_eager", &batch_norm_train_eager);
}

}  // namespace fused_bn
