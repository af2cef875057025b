"""Autograd of the two forward ops, one backward for every route:

* first order: the backward op (batch_norm_backward), called from the
  Functions below (torch.func's transforms, forward mode, compiled graphs) and
  from the C++ nodes of eager reverse mode (csrc/autograd.cpp);
* recorded (create_graph=True, double backward): ``batch_norm_backward_differentiable``,
  batch norm's backward written with differentiable ATen ops around PyTorch's
  own backward op of the activation (fused_bn/_activations.py), an op defined
  here so that the C++ nodes call the same one as the Functions; forward mode:
  the same pieces (_normalized, the activation's derivative) in _epilogue_jvp.

Registered as the ops' Autograd kernels by fused_bn/_registration.py.
"""
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import _activations
from ._activations import Activation
from ._extension import ops

_lib = torch.library.Library("fused_bn", "FRAGMENT")
_lib.define(
    "batch_norm_backward_differentiable(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
    "Tensor? running_mean, Tensor? running_var, bool training, float eps, str activation, "
    "float[] activation_params, Tensor? residual, Tensor? output, bool[4] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor)")


def _normalized(input, running_mean, running_var, training, eps):
    """x_hat and invstd in the accumulation dtype from differentiable ATen
    ops: the batch statistics in training (so their dependence on x is
    differentiated too), the running ones in eval; shaped to broadcast."""
    acc = _accumulate_dtype(input.dtype)
    dims = [0] + list(range(2, input.dim()))
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    x = input.to(acc)
    if training:
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    else:
        mean = running_mean.to(acc).view(shape)
        invstd = torch.rsqrt(running_var.to(acc).view(shape) + eps)
    return (x - mean) * invstd, invstd, dims, shape


def _affine_input(x_hat, weight, bias, residual, shape):
    """u = x_hat · w + b (+ residual): the activation's input."""
    acc = x_hat.dtype
    u = x_hat if weight is None else x_hat * weight.to(acc).view(shape)
    if bias is not None:
        u = u + bias.to(acc).view(shape)
    return u if residual is None else u + residual.to(acc)


def _backward_differentiable(grad_output, input, weight, bias, running_mean, running_var, training,
                             eps, activation, activation_params, residual, output, output_mask):
    """Grads of (input, weight, bias, residual) where output_mask asks ([0]
    elsewhere), from differentiable ATen ops, so autograd can differentiate
    them again: g = act'(u) · grad_output by PyTorch's own backward op of the
    activation, at u recomputed from x (and the residual), or at the
    forward's y for an activation whose derivative the kernels take from y
    (exact for those: csrc/common/activation.h, kGradFromOutput); then batch
    norm's backward of g."""
    spec = Activation(activation, tuple(activation_params))
    x_hat, invstd, dims, shape = _normalized(input, running_mean, running_var, training, eps)
    acc = x_hat.dtype
    dy = grad_output.to(acc)
    grad_residual = None
    if not spec.is_identity:
        u = output.to(acc) if output is not None and residual is None else _affine_input(
            x_hat, weight, bias, residual, shape)
        dy = spec.grad(dy, u)
        grad_residual = dy.to(input.dtype)
    elif residual is not None:
        grad_residual = grad_output
    param_dtype = weight.dtype if weight is not None else bias.dtype if bias is not None else acc
    grad_weight = (dy * x_hat).sum(dims).to(param_dtype) if output_mask[1] else None
    grad_bias = dy.sum(dims).to(param_dtype) if output_mask[2] else None
    grad_input = None
    if output_mask[0]:
        scale = invstd if weight is None else weight.to(acc).view(shape) * invstd
        if training:
            dy = dy - dy.mean(dims, keepdim=True) - x_hat * (dy * x_hat).mean(dims, keepdim=True)
        grad_input = (dy * scale).to(input.dtype)
    grads = (grad_input, grad_weight, grad_bias, grad_residual)
    return tuple(g if g is not None and m else input.new_empty(0) for g, m in zip(grads, output_mask))


_lib.impl("batch_norm_backward_differentiable", _backward_differentiable, "CompositeImplicitAutograd")


def check_stats_not_requiring_grad(function_name, running_mean, running_var):
    """Autograd's check (and message) for an input a function cannot
    differentiate, which nn.BatchNorm2d's native_batch_norm raises for running
    statistics that require grad while grad mode is on."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"The function '{function_name}' is not differentiable with respect "
                               f"to argument '{name}'. This input cannot have requires_grad True.")


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eval_statistics(running_mean, running_var, eps, input_dtype):
    """The mean and inverse std an eval forward normalized with, in the dtype
    the backward op takes; invstd as the kernels' eval_invstd computes it
    (1/sqrt in float64, then rounded), so a recomputed z is the forward's, bit
    for bit."""
    acc = _accumulate_dtype(input_dtype)
    # A copy even in float64: the in-place steps must not touch the buffer.
    invstd = running_var.to(torch.float64, copy=True).add_(eps).sqrt_().reciprocal_()
    return running_mean.to(acc), invstd.to(acc)


class _Saved:
    """Where each saved tensor sits in ctx.saved_tensors."""
    INPUT, WEIGHT, BIAS, MEAN, VAR_OR_INVSTD, RESIDUAL, OUTPUT = range(7)


def _save_epilogue_context(ctx, input_index, weight, bias, residual_index, inputs, mean,
                           var_or_invstd, activation, residual, output, eps):
    """What the backward and the jvp need. mean, var_or_invstd: the batch
    statistics in training, the running mean and variance in eval (read as
    they are at backward time, as nn.BatchNorm2d's autograd does, with no copy
    in the forward). Without a residual that is the input and the statistics;
    with one, y where the activation's derivative comes from y, else the
    residual (no copy); the identity's residual gradient is grad_output."""
    ctx.activation = activation
    ctx.eps = eps
    ctx.n_inputs = len(inputs)
    ctx.residual_index = residual_index
    # None, not zeros, for an input without a tangent (and an output without
    # a gradient): the eval jvp must tell running statistics with tangents
    # (which nn refuses) from ones without.
    ctx.set_materialize_grads(False)
    ctx.mask = [ctx.needs_input_grad[input_index], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.has_residual = residual is not None
    ctx.residual_needs_grad = residual is not None and ctx.needs_input_grad[residual_index]
    from_output = (residual is not None and not activation.is_identity
                   and _activations.grad_from_output(activation, output.dtype))
    saved = [inputs[input_index], weight, bias, mean, var_or_invstd,
             residual if residual is not None and not activation.is_identity and not from_output else None,
             output if from_output else None]
    ctx.save_for_backward(*saved)
    if _forward_mode_active():
        # The jvp differentiates the reference, which needs the residual itself.
        saved[_Saved.RESIDUAL] = residual
        ctx.save_for_forward(*saved)


def _epilogue_backward(ctx, grad_output, training):
    """Grads of every input of a forward op, from what its autograd saved."""
    n_inputs = ctx.n_inputs
    if grad_output is None or not (any(ctx.mask) or ctx.residual_needs_grad):
        return (None,) * n_inputs
    input, weight, bias, mean, var_or_invstd, residual, output = ctx.saved_tensors
    activation = ctx.activation
    mask = ctx.mask
    if torch.is_grad_enabled():
        grad_input, grad_weight, grad_bias, grad_residual = ops.batch_norm_backward_differentiable(
            grad_output, input, weight, bias, None if training else mean,
            None if training else var_or_invstd, training, ctx.eps, activation.name,
            list(activation.params), residual, output, mask + [ctx.residual_needs_grad])
        if activation.is_identity and ctx.residual_needs_grad:
            grad_residual = grad_output
    else:
        invstd = var_or_invstd
        if not training:
            mean, invstd = _eval_statistics(mean, var_or_invstd, ctx.eps, input.dtype)
        grad_input, grad_weight, grad_bias, grad_residual = ops.batch_norm_backward(
            grad_output, input, weight, mean, invstd, training, ctx.eps, mask, bias,
            activation.name, list(activation.params), residual, output)
        if activation.is_identity:
            grad_residual = grad_output
    grads = [None] * n_inputs
    grads[0] = grad_input if mask[0] else None
    grads[1] = grad_weight if mask[1] else None
    # The backward op returns parameter grads in the weight's dtype; F.batch_norm
    # allows a bias without a weight, or of another dtype.
    if mask[2]:
        grads[2] = grad_bias if grad_bias.dtype == ctx.bias_dtype else grad_bias.to(ctx.bias_dtype)
    if ctx.residual_needs_grad:
        grads[ctx.residual_index] = grad_residual
    return tuple(grads)


def _epilogue_jvp(ctx, training, input_t, weight_t, bias_t, residual_t):
    """Forward-mode derivative (torch.func.jvp, jacfwd, hessian,
    torch.autograd.forward_ad) of a forward op's output: the tangent of u =
    batch_norm(x) (+ residual) from ATen ops (x_hat's tangent invstd · (dx −
    mean(dx) − x_hat · mean(x_hat · dx)) in training, where the batch
    statistics move with x; invstd · dx in eval), then the activation's, which
    for an elementwise function is its derivative at u times that tangent
    (PyTorch's own backward op of the activation)."""
    input, weight, bias, mean, var, residual, _ = ctx.saved_tensors
    x_hat, invstd, dims, shape = _normalized(input, mean, var, training, ctx.eps)
    acc = x_hat.dtype
    tangent = torch.zeros_like(x_hat)
    if input_t is not None:
        dx = input_t.to(acc) * invstd
        if training:
            dx = dx - dx.mean(dims, keepdim=True) - x_hat * (x_hat * dx).mean(dims, keepdim=True)
        tangent = tangent + (dx if weight is None else dx * weight.to(acc).view(shape))
    if weight_t is not None:
        tangent = tangent + x_hat * weight_t.to(acc).view(shape)
    if bias_t is not None:
        tangent = tangent + bias_t.to(acc).view(shape)
    if residual_t is not None:
        tangent = tangent + residual_t.to(acc)
    if not ctx.activation.is_identity:
        tangent = ctx.activation.grad(tangent, _affine_input(x_hat, weight, bias, residual, shape))
    return tangent.to(input.dtype)


def _forward_mode_active():
    """Whether forward-mode AD or a torch.func transform (jvp among them) may ask
    for a jvp: both work under no_grad too."""
    return forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _needs_autograd():
    """Whether a call must go through the op's autograd.Function: reverse mode
    records only with grad mode on."""
    return torch.is_grad_enabled() or _forward_mode_active()


_VMAP_UNBATCHED_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will "
    "be updated in place, were not batched.\nIf you are using a module and do not need eval mode, "
    "please set `track_running_stats` to be False.If you are using a prebuilt module and do not "
    "need eval mode, please see the functorch website for resources on how to patch your module "
    "to work with vmap")


def _argument_position(op, name: str) -> int:
    """Where ``op``'s schema (csrc/ops.cpp) puts the argument ``name``: read
    from the schema, so that no position is written down twice."""
    return [argument.name for argument in op.default._schema.arguments].index(name)


_TRAIN_RESIDUAL = _argument_position(ops.batch_norm_train, "residual")
_EVAL_RESIDUAL = _argument_position(ops.batch_norm_eval, "residual")


# torch.library.register_autograd accepts only functional ops, and batch_norm_train
# mutates the running statistics and the counter (buffers, never differentiated);
# its Function also gives torch.func what register_autograd's does not (setup_context
# for grad/vjp/jacrev, jvp for forward mode, a vmap rule). So both forward ops get
# Autograd-key kernels of their own: run the op below autograd, save what the
# backward op needs.
class _BatchNormTrain(torch.autograd.Function):
    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, num_batches_tracked,
             momentum, eps, activation, activation_params, residual):
        """torch.func.vmap (model ensembles, per-sample batch norm): the op once
        per batch entry, on slices, so batched running statistics and counters
        are updated in place as nn.BatchNorm2d's batching rule does. Unbatched
        ones would be updated once per entry: refused, as nn refuses them."""
        args = (input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                activation, activation_params, residual)
        if any(t is not None and d is None for t, d in zip(args[3:6], in_dims[3:6])):
            if in_dims[0] is not None:
                raise RuntimeError(_VMAP_UNBATCHED_STATS)
            raise RuntimeError(
                "fused_bn under vmap: the running statistics (and num_batches_tracked) are updated "
                "in place once per batch entry, so they must be batched when weight, bias or "
                "residual are; set `track_running_stats` to False, or batch the buffers too "
                "(torch.func.stack_module_state)")
        # in_dims mirrors the arguments: an int for a batched tensor, None or
        # an empty list (activation_params) for the rest.
        results = [
            _BatchNormTrain.forward(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
        return tuple(torch.stack(outs) for outs in zip(*results)), (0, 0, 0)

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                activation, activation_params, residual):
        with torch._C._AutoDispatchBelowAutograd():
            return ops.batch_norm_train(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, momentum, eps, activation,
                                        activation_params, residual)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, bias, _, _, _, _, eps, activation, activation_params, residual = inputs
        output, save_mean, save_invstd = outputs
        _save_epilogue_context(ctx, 0, weight, bias, _TRAIN_RESIDUAL, inputs, save_mean, save_invstd,
                               Activation(activation, tuple(activation_params)), residual, output, eps)
        ctx.mark_non_differentiable(save_mean, save_invstd)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        return _epilogue_backward(ctx, grad_output, True)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _running_mean_t, _running_var_t, _nbt_t, _momentum_t,
            _eps_t, _activation_t, _params_t, residual_t):
        # Running statistics are buffers, not differentiated (reverse mode refuses
        # ones requiring grad), so their tangents are ignored.
        return _epilogue_jvp(ctx, True, input_t, weight_t, bias_t, residual_t), None, None


class _BatchNormEval(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, eps, activation, activation_params,
                residual):
        with torch._C._AutoDispatchBelowAutograd():
            return ops.batch_norm_eval(input, weight, bias, running_mean, running_var, eps, activation,
                                       activation_params, residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, eps, activation, activation_params, residual = inputs
        _save_epilogue_context(ctx, 0, weight, bias, _EVAL_RESIDUAL, inputs, running_mean, running_var,
                               Activation(activation, tuple(activation_params)), residual, output, eps)

    @staticmethod
    def backward(ctx, grad_output):
        return _epilogue_backward(ctx, grad_output, False)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, running_mean_t, running_var_t, _eps_t, _activation_t,
            _params_t, residual_t):
        differentiated = any(t is not None for t in (input_t, weight_t, bias_t, residual_t))
        if differentiated and (running_mean_t is not None or running_var_t is not None):
            # nn's refusal: in eval the output depends on the running
            # statistics, whose tangents it will not propagate. (With tangents
            # on them alone nn's output has no tangent; ours is zero.)
            raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, "
                               "they cannot have forward grad defined")
        return _epilogue_jvp(ctx, False, input_t, weight_t, bias_t, residual_t)


def _without_setup_context(function):
    """``function`` with a forward(ctx, ...) that runs its forward and
    setup_context. Function.apply binds the forward's signature with inspect
    on every call once a setup_context is defined (~20 µs, as much as a small
    layer's whole forward), and only torch.func's transforms need one."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            outputs = function.forward(*args)
            function.setup_context(ctx, args, outputs)
            return outputs

        backward = staticmethod(function.backward)
        jvp = staticmethod(function.jvp)

    Eager.__name__ = Eager.__qualname__ = function.__name__ + "Eager"
    return Eager


_BatchNormTrainEager = _without_setup_context(_BatchNormTrain)
_BatchNormEvalEager = _without_setup_context(_BatchNormEval)


def _forward_with_autograd(op_name, function, eager_function, input, weight, bias, running_mean,
                           running_var, args, cpp_autograd_op):
    if _needs_autograd():
        # The op has not run yet: this raises before any state changes.
        check_stats_not_requiring_grad(f"fused_bn::{op_name}", running_mean, running_var)
        if torch._C._are_functorch_transforms_active():
            return function.apply(input, weight, bias, running_mean, running_var, *args)
        if forward_ad._current_level < 0:
            # Plain reverse mode: the autograd node recorded in C++
            # (csrc/autograd.cpp), without the Python Function's host time.
            return cpp_autograd_op(input, weight, bias, running_mean, running_var, *args)
        return eager_function.apply(input, weight, bias, running_mean, running_var, *args)
    # Nothing to record (e.g. inference, or swa_utils.update_bn's training-mode
    # passes under no_grad): skip autograd.Function's bookkeeping.
    with torch._C._AutoDispatchBelowAutograd():
        return getattr(ops, op_name)(input, weight, bias, running_mean, running_var, *args)


# The dispatcher leaves out trailing arguments equal to their schema defaults,
# so these take them all by name and pass them all on.
def batch_norm_train_autograd(input, weight, bias, running_mean, running_var, num_batches_tracked,
                              momentum, eps, activation="identity", activation_params=(), residual=None):
    return _forward_with_autograd("batch_norm_train", _BatchNormTrain, _BatchNormTrainEager, input,
                                  weight, bias, running_mean, running_var,
                                  (num_batches_tracked, momentum, eps, activation,
                                   list(activation_params), residual),
                                  ops.batch_norm_train_eager)


def batch_norm_eval_autograd(input, weight, bias, running_mean, running_var, eps, activation="identity",
                             activation_params=(), residual=None):
    return _forward_with_autograd("batch_norm_eval", _BatchNormEval, _BatchNormEvalEager, input,
                                  weight, bias, running_mean, running_var,
                                  (eps, activation, list(activation_params), residual),
                                  ops.batch_norm_eval_eager)
