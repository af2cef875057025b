"""Autograd of the two forward ops: the backward is itself a registered op
(batch_norm_backward, batch_norm_add_relu_backward), called from the
Functions below, from torch.func's transforms and forward mode, and from the C++
node of eager reverse mode (csrc/autograd.cpp). Registered as the ops'
Autograd kernels by fused_bn/_registration.py."""
import torch
from torch.autograd import forward_ad

from ._extension import ops
from ._fake import _accumulate_dtype


def check_stats_not_requiring_grad(function_name, running_mean, running_var):
    """Autograd's check (and message) for an input a function cannot
    differentiate, which nn.BatchNorm2d's native_batch_norm raises for running
    statistics that require grad while grad mode is on."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"The function '{function_name}' is not differentiable with respect "
                               f"to argument '{name}'. This input cannot have requires_grad True.")


def _grad_mask(ctx, weight, bias):
    return [
        ctx.needs_input_grad[0],
        weight is not None and ctx.needs_input_grad[1],
        bias is not None and ctx.needs_input_grad[2],
    ]


def _relu_mask(input, weight, bias, mean, invstd, output):
    """Where the forward's ReLU passed its input: output > 0 (add+relu), else
    the recomputed batch_norm(input) > 0 (relu). For the differentiable backward
    only; the kernels recompute the mask themselves."""
    if output is not None:
        return output > 0
    acc = _accumulate_dtype(input.dtype)
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    scale = invstd.to(acc).view(shape)
    if weight is not None:
        scale = scale * weight.to(acc).view(shape)
    z = (input.to(acc) - mean.to(acc).view(shape)) * scale
    if bias is not None:
        z = z + bias.to(acc).view(shape)
    return z > 0


def _differentiable_backward(grad_output, input, weight, mean, invstd, training, eps, mask):
    """First-order grads from differentiable aten ops, for double backward.

    Used only when autograd records the backward (create_graph=True, e.g. a
    gradient penalty). In training the batch statistics are recomputed from the
    input so that their dependence on it is differentiated too. A ReLU's mask
    is applied to grad_output by the caller."""
    acc = _accumulate_dtype(input.dtype)
    x, dy = input.to(acc), grad_output.to(acc)
    dims = [0] + list(range(2, input.dim()))
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    if training:
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    else:
        mean, invstd = mean.view(shape), invstd.view(shape)
    w = weight.to(acc).view(shape) if weight is not None else None
    x_hat = (x - mean) * invstd
    grad_weight = (dy * x_hat).sum(dims) if mask[1] else None
    grad_bias = dy.sum(dims) if mask[2] else None
    grad_input = None
    if mask[0]:
        scale = invstd if w is None else w * invstd
        if training:
            dy = dy - dy.mean(dims, keepdim=True) - x_hat * (dy * x_hat).mean(dims, keepdim=True)
        grad_input = (dy * scale).to(input.dtype)
    param_dtype = weight.dtype if weight is not None else acc
    return (grad_input,
            None if grad_weight is None else grad_weight.to(param_dtype),
            None if grad_bias is None else grad_bias.to(param_dtype))


def _grads_for_inputs(mask, grads, bias_dtype, n_inputs, grad_residual=None):
    grad_input, grad_weight, grad_bias = (g if m else None for g, m in zip(grads, mask))
    # The backward op returns parameter grads in the weight's dtype; F.batch_norm
    # allows a bias without a weight, or of another dtype.
    if grad_bias is not None and grad_bias.dtype != bias_dtype:
        grad_bias = grad_bias.to(bias_dtype)
    # The residual is each op's last input.
    return (grad_input, grad_weight, grad_bias) + (None,) * (n_inputs - 4) + (grad_residual,)


def _epilogue_backward(ctx, grad_output, training, eps):
    """Grads of every input of a forward op, from what its autograd saved:
    input, weight, bias, the statistics and (add+relu only) the output."""
    input, weight, bias, mean, invstd, output = _saved_for_grads(ctx, training, eps)
    n_inputs = ctx.n_inputs
    if grad_output is None or not (any(ctx.mask) or ctx.residual_needs_grad):
        return (None,) * n_inputs
    if torch.is_grad_enabled():
        if ctx.relu:
            grad_output = grad_output * _relu_mask(input, weight, bias, mean, invstd, output)
        grads = _differentiable_backward(
            grad_output, input, weight, mean, invstd, training, eps, ctx.mask)
        grad_residual = grad_output if ctx.residual_needs_grad else None
    elif ctx.has_residual:
        grad_input, grad_residual, grad_weight, grad_bias = ops.batch_norm_add_relu_backward(
            grad_output, output, input, weight, mean, invstd, training, eps, ctx.mask)
        grads = (grad_input, grad_weight, grad_bias)
    else:
        grads = ops.batch_norm_backward(
            grad_output, input, weight, mean, invstd, training, eps, ctx.mask, bias, ctx.relu)
        grad_residual = None
    if not ctx.residual_needs_grad:
        grad_residual = None
    return _grads_for_inputs(ctx.mask, grads, ctx.bias_dtype, n_inputs, grad_residual)


def _eval_statistics(running_mean, running_var, eps, input_dtype):
    """The mean and inverse std an eval forward normalized with, in the dtype
    the backward op takes; invstd as the kernels' eval_invstd computes it
    (1/sqrt in float64, then rounded), so a recomputed ReLU mask is the
    forward's, bit for bit."""
    acc = _accumulate_dtype(input_dtype)
    # A copy even in float64: the in-place steps must not touch the buffer.
    invstd = running_var.to(torch.float64, copy=True).add_(eps).sqrt_().reciprocal_()
    return running_mean.to(acc), invstd.to(acc)


def _saved_for_grads(ctx, training, eps):
    """(input, weight, bias, mean, invstd, output) for a backward or jvp. The
    training forward saved its batch statistics; the eval forward saved the
    running buffers themselves, as nn.BatchNorm2d's autograd does: no copies in
    the forward (they were most of a small layer's eval step with grad mode on),
    and a backward sees the buffers as they are then, as nn's does (a fused
    ReLU's mask is then recomputed from those values too)."""
    input, weight, bias, mean, invstd, output = ctx.saved_tensors
    if not training:
        mean, invstd = _eval_statistics(mean, invstd, eps, input.dtype)
    return input, weight, bias, mean, invstd, output


def _save_epilogue_context(ctx, n_inputs, input, weight, bias, mean, invstd, relu, residual, output):
    """mean, invstd: the batch statistics in training, the running mean and
    variance in eval (_saved_for_grads turns them into statistics)."""
    ctx.n_inputs = n_inputs
    # None, not zeros, for an input without a tangent (and an output without
    # a gradient): the eval jvp must tell running statistics with tangents
    # (which nn refuses) from ones without.
    ctx.set_materialize_grads(False)
    ctx.mask = _grad_mask(ctx, weight, bias)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.residual_needs_grad = residual is not None and ctx.needs_input_grad[n_inputs - 1]
    # The bias fixes relu's shift; the output is add+relu's mask.
    saved = (input, weight, bias if relu else None, mean, invstd,
             output if residual is not None else None)
    ctx.save_for_backward(*saved)
    if _forward_mode_active():
        ctx.save_for_forward(*saved)


def _epilogue_jvp(ctx, training, input_t, weight_t, bias_t, residual_t):
    """Forward-mode derivative (torch.func.jvp, jacfwd, hessian,
    torch.autograd.forward_ad) of a forward op's output, from aten ops:
    tangent of x_hat = invstd * (dx - mean(dx) - x_hat * mean(x_hat * dx)) in
    training (the batch statistics move with x), invstd * dx in eval."""
    input, weight, bias, mean, invstd, output = _saved_for_grads(ctx, training, ctx.eps)
    acc = _accumulate_dtype(input.dtype)
    dims = [0] + list(range(2, input.dim()))
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    invstd_b = invstd.to(acc).view(shape)
    x_hat = (input.to(acc) - mean.to(acc).view(shape)) * invstd_b
    tangent = torch.zeros_like(x_hat)
    if input_t is not None:
        dx = input_t.to(acc)
        if training:
            dx = dx - dx.mean(dims, keepdim=True) - x_hat * (x_hat * dx).mean(dims, keepdim=True)
        scale = invstd_b if weight is None else invstd_b * weight.to(acc).view(shape)
        tangent = tangent + dx * scale
    if weight_t is not None:
        tangent = tangent + x_hat * weight_t.to(acc).view(shape)
    if bias_t is not None:
        tangent = tangent + bias_t.to(acc).view(shape)
    if residual_t is not None:
        tangent = tangent + residual_t.to(acc)
    if ctx.relu:
        tangent = tangent * _relu_mask(input, weight, bias, mean, invstd, output)
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


# torch.library.register_autograd accepts only functional ops, and batch_norm_train
# mutates the running statistics and the counter (buffers, never differentiated);
# its Function also gives torch.func what register_autograd's does not (setup_context
# for grad/vjp/jacrev, jvp for forward mode, a vmap rule). So both forward ops get
# Autograd-key kernels of their own: run the op below autograd, save what the
# backward op needs.
class _BatchNormTrain(torch.autograd.Function):
    @staticmethod
    def vmap(info, in_dims, input, weight, bias, running_mean, running_var, num_batches_tracked,
             momentum, eps, relu, residual):
        """torch.func.vmap (model ensembles, per-sample batch norm): the op once
        per batch entry, on slices, so batched running statistics and counters
        are updated in place as nn.BatchNorm2d's batching rule does. Unbatched
        ones would be updated once per entry: refused, as nn refuses them."""
        args = (input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                relu, residual)
        if any(t is not None and d is None for t, d in zip(args[3:6], in_dims[3:6])):
            if in_dims[0] is not None:
                raise RuntimeError(_VMAP_UNBATCHED_STATS)
            raise RuntimeError(
                "fused_bn under vmap: the running statistics (and num_batches_tracked) are updated "
                "in place once per batch entry, so they must be batched when weight, bias or "
                "residual are; set `track_running_stats` to False, or batch the buffers too "
                "(torch.func.stack_module_state)")
        results = [
            _BatchNormTrain.forward(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
        return tuple(torch.stack(outs) for outs in zip(*results)), (0, 0, 0)

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                relu, residual):
        with torch._C._AutoDispatchBelowAutograd():
            return ops.batch_norm_train(input, weight, bias, running_mean, running_var,
                                        num_batches_tracked, momentum, eps, relu, residual)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        input, weight, bias, _, _, _, _, eps, relu, residual = inputs
        output, save_mean, save_invstd = outputs
        ctx.eps = eps
        _save_epilogue_context(ctx, 10, input, weight, bias, save_mean, save_invstd, relu, residual,
                               output)
        ctx.mark_non_differentiable(save_mean, save_invstd)

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        return _epilogue_backward(ctx, grad_output, True, ctx.eps)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, _running_mean_t, _running_var_t, _nbt_t, _momentum_t,
            _eps_t, _relu_t, residual_t):
        # Running statistics are buffers, not differentiated (reverse mode refuses
        # ones requiring grad), so their tangents are ignored.
        return _epilogue_jvp(ctx, True, input_t, weight_t, bias_t, residual_t), None, None


class _BatchNormEval(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, eps, relu, residual):
        with torch._C._AutoDispatchBelowAutograd():
            return ops.batch_norm_eval(input, weight, bias, running_mean, running_var, eps, relu,
                                       residual)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, eps, relu, residual = inputs
        ctx.eps = eps
        _save_epilogue_context(ctx, 8, input, weight, bias, running_mean, running_var, relu,
                               residual, output)

    @staticmethod
    def backward(ctx, grad_output):
        return _epilogue_backward(ctx, grad_output, False, ctx.eps)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, running_mean_t, running_var_t, _eps_t, _relu_t,
            residual_t):
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
                           running_var, args, cpp_autograd_op=None):
    if _needs_autograd():
        # The op has not run yet: this raises before any state changes.
        check_stats_not_requiring_grad(f"fused_bn::{op_name}", running_mean, running_var)
        if torch._C._are_functorch_transforms_active():
            return function.apply(input, weight, bias, running_mean, running_var, *args)
        if cpp_autograd_op is not None and forward_ad._current_level < 0:
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
                              momentum, eps, relu=False, residual=None):
    return _forward_with_autograd("batch_norm_train", _BatchNormTrain, _BatchNormTrainEager, input,
                                  weight, bias, running_mean, running_var,
                                  (num_batches_tracked, momentum, eps, relu, residual),
                                  ops.batch_norm_train_eager)


def batch_norm_eval_autograd(input, weight, bias, running_mean, running_var, eps, relu=False,
                             residual=None):
    return _forward_with_autograd("batch_norm_eval", _BatchNormEval, _BatchNormEvalEager, input,
                                  weight, bias, running_mean, running_var, (eps, relu, residual))
