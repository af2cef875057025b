"""Python side of the registered ops: fake (meta) kernels and autograd.

The schemas live in csrc/ops.cpp and the device kernels in csrc/cpu and csrc/cuda.
Registering fake kernels and autograd through ``torch.library`` (rather than wrapping
the kernels in an ``autograd.Function``) is what lets ``torch.compile(fullgraph=True)``
keep ``fused_bn`` ops whole in its graph and ``torch.library.opcheck`` verify them.
"""
import torch
from torch._prims_common import suggest_memory_format

from . import _C  # noqa: F401  (importing the extension runs its op registrations)

ops = torch.ops.fused_bn


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _output_like(input):
    # Mirrors empty_output() in csrc/glue_helpers.h and batch_norm_memory_format()
    # in csrc/batch_norm_checks.h.
    if input.numel() == 0:
        return torch.empty_like(input)
    fmt = torch.contiguous_format
    if input.dim() == 4 and not input.is_contiguous():
        if (input.is_contiguous(memory_format=torch.channels_last)
                or suggest_memory_format(input) == torch.channels_last):
            fmt = torch.channels_last
    return torch.empty_like(input, memory_format=fmt)


def _grad_input_like(grad_output, input):
    return torch.empty_like(grad_output) if input.numel() == 0 else _output_like(input)


def _check_same_device(input, **tensors):
    """The device check of the real kernels (csrc/batch_norm_checks.h), with
    their message. A meta tensor among CPU or CUDA ones sends the call to the
    fake kernel, which must refuse it as the real kernel would."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is on "
                               f"{t.device} and input is on {input.device}")


def check_stats_not_requiring_grad(function_name, running_mean, running_var):
    """Autograd's check (and message) for an input a function cannot
    differentiate, which nn.BatchNorm2d's native_batch_norm raises for running
    statistics that require grad while grad mode is on."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:
            raise RuntimeError(f"The function '{function_name}' is not differentiable with respect "
                               f"to argument '{name}'. This input cannot have requires_grad True.")


@torch.library.register_fake("fused_bn::batch_norm_train")
def _batch_norm_train_fake(input, weight, bias, running_mean, running_var,
                           num_batches_tracked, momentum, eps, relu=False, residual=None):
    _check_same_device(input, running_mean=running_mean, running_var=running_var, weight=weight,
                       bias=bias, residual=residual, num_batches_tracked=num_batches_tracked)
    stats = input.new_empty((input.shape[1],), dtype=_accumulate_dtype(input.dtype))
    return _output_like(input), stats, torch.empty_like(stats)


@torch.library.register_fake("fused_bn::batch_norm_eval")
def _batch_norm_eval_fake(input, weight, bias, running_mean, running_var, eps, relu=False,
                          residual=None):
    _check_same_device(input, running_mean=running_mean, running_var=running_var, weight=weight,
                       bias=bias, residual=residual)
    return _output_like(input)


def _param_grads_fake(input, params, output_mask):
    channels = input.shape[1]
    param = next((p for p in params if p is not None), None)
    param_dtype = param.dtype if param is not None else _accumulate_dtype(input.dtype)
    grad_weight = input.new_empty((channels if output_mask[1] else 0,), dtype=param_dtype)
    grad_bias = input.new_empty((channels if output_mask[2] else 0,), dtype=param_dtype)
    return grad_weight, grad_bias


@torch.library.register_fake("fused_bn::batch_norm_backward")
def _batch_norm_backward_fake(grad_output, input, weight, mean, invstd, training, eps, output_mask,
                              bias=None, relu=False):
    _check_same_device(input, grad_output=grad_output, weight=weight, mean=mean, invstd=invstd,
                       bias=bias)
    grad_input = _grad_input_like(grad_output, input) if output_mask[0] else input.new_empty((0,))
    params = (weight, bias) if relu else (weight,)
    return (grad_input,) + _param_grads_fake(input, params, output_mask)


@torch.library.register_fake("fused_bn::batch_norm_add_relu_backward")
def _batch_norm_add_relu_backward_fake(grad_output, output, input, weight, mean, invstd, training,
                                       eps, output_mask):
    _check_same_device(input, grad_output=grad_output, output=output, weight=weight, mean=mean,
                       invstd=invstd)
    grad_input = _grad_input_like(grad_output, input) if output_mask[0] else input.new_empty((0,))
    grad_weight, grad_bias = _param_grads_fake(input, (weight,), output_mask)
    return grad_input, _grad_input_like(grad_output, input), grad_weight, grad_bias


# FusedSyncBatchNorm2d's ops (the collectives between them are in fused_bn/_sync.py).
@torch.library.register_fake("fused_bn::batch_norm_stats")
def _batch_norm_stats_fake(input, weight, bias, running_mean, running_var):
    return input.new_empty((input.shape[1], 3), dtype=torch.float64)


@torch.library.register_fake("fused_bn::batch_norm_train_with_stats")
def _batch_norm_train_with_stats_fake(input, weight, bias, running_mean, running_var,
                                      num_batches_tracked, momentum, eps, all_stats, relu=False):
    return _batch_norm_train_fake(input, weight, bias, running_mean, running_var,
                                  num_batches_tracked, momentum, eps, relu)


@torch.library.register_fake("fused_bn::batch_norm_backward_sums")
def _batch_norm_backward_sums_fake(grad_output, input, weight, mean, invstd, param_mask,
                                   bias=None, relu=False):
    params = (weight, bias) if relu else (weight,)
    sums = input.new_empty((input.shape[1], 3), dtype=torch.float64)
    return (sums,) + _param_grads_fake(input, params, [False, *param_mask])


@torch.library.register_fake("fused_bn::batch_norm_backward_with_sums")
def _batch_norm_backward_with_sums_fake(grad_output, input, weight, mean, invstd, sums, count,
                                        bias=None, relu=False):
    return _grad_input_like(grad_output, input)


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
    input, weight, bias, mean, invstd and (add+relu only) the output."""
    input, weight, bias, mean, invstd, output = ctx.saved_tensors
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


def _save_epilogue_context(ctx, n_inputs, input, weight, bias, mean, invstd, relu, residual, output):
    ctx.n_inputs = n_inputs
    ctx.mask = _grad_mask(ctx, weight, bias)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.residual_needs_grad = residual is not None and ctx.needs_input_grad[n_inputs - 1]
    # The bias fixes relu's shift; the output is add+relu's mask.
    ctx.save_for_backward(input, weight, bias if relu else None, mean, invstd,
                          output if residual is not None else None)


class _BatchNormTrain(torch.autograd.Function):
    """Autograd for batch_norm_train.

    torch.library.register_autograd accepts only functional ops, and this op
    mutates the running statistics and the counter (buffers, never differentiated).
    So it gets an Autograd-key kernel of its own, built the way register_autograd
    builds one: run the op below autograd, save what the backward op needs.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, relu=False, residual=None):
        with torch._C._AutoDispatchBelowAutograd():
            output, save_mean, save_invstd = ops.batch_norm_train(
                input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                relu, residual)
        ctx.eps = eps
        _save_epilogue_context(ctx, 10, input, weight, bias, save_mean, save_invstd, relu, residual,
                               output)
        ctx.mark_non_differentiable(save_mean, save_invstd)
        return output, save_mean, save_invstd

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        return _epilogue_backward(ctx, grad_output, True, ctx.eps)


def batch_norm_train_autograd(input, weight, bias, running_mean, running_var, *args):
    if torch.is_grad_enabled():
        check_stats_not_requiring_grad("fused_bn::batch_norm_train", running_mean, running_var)
        return _BatchNormTrain.apply(input, weight, bias, running_mean, running_var, *args)
    # Nothing to record (e.g. swa_utils.update_bn's training-mode passes under
    # no_grad): skip autograd.Function's bookkeeping.
    with torch._C._AutoDispatchBelowAutograd():
        return ops.batch_norm_train(input, weight, bias, running_mean, running_var, *args)


_autograd_lib = torch.library.Library("fused_bn", "IMPL")
_autograd_lib.impl("batch_norm_train", batch_norm_train_autograd, "Autograd")


def _eval_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, eps, relu, residual = inputs
    # Called only with grad mode on and an input requiring grad; the op has
    # run but changed no state.
    check_stats_not_requiring_grad("fused_bn::batch_norm_eval", running_mean, running_var)
    acc = _accumulate_dtype(input.dtype)
    # Snapshots: a later training step may update the running buffers in place.
    # invstd as the kernels' eval_invstd computes it (1/sqrt in float64, then
    # rounded), so a recomputed ReLU mask is the forward's, bit for bit.
    mean = running_mean.to(acc, copy=True)
    invstd = (1.0 / torch.sqrt(running_var.to(torch.float64) + eps)).to(acc)
    ctx.eps = eps
    _save_epilogue_context(ctx, 8, input, weight, bias, mean, invstd, relu, residual, output)


def _eval_backward(ctx, grad_output):
    return _epilogue_backward(ctx, grad_output, False, ctx.eps)


torch.library.register_autograd(
    "fused_bn::batch_norm_eval", _eval_backward, setup_context=_eval_setup_context)
