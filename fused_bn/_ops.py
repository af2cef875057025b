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
    # Mirrors batch_norm_memory_format() in csrc/batch_norm_checks.h.
    fmt = torch.contiguous_format
    if input.dim() == 4 and not input.is_contiguous():
        if (input.is_contiguous(memory_format=torch.channels_last)
                or suggest_memory_format(input) == torch.channels_last):
            fmt = torch.channels_last
    return torch.empty_like(input, memory_format=fmt)


@torch.library.register_fake("fused_bn::batch_norm_train")
def _batch_norm_train_fake(input, weight, bias, running_mean, running_var,
                           num_batches_tracked, momentum, eps):
    stats = input.new_empty((input.shape[1],), dtype=_accumulate_dtype(input.dtype))
    return _output_like(input), stats, torch.empty_like(stats)


@torch.library.register_fake("fused_bn::batch_norm_eval")
def _batch_norm_eval_fake(input, weight, bias, running_mean, running_var, eps):
    return _output_like(input)


@torch.library.register_fake("fused_bn::batch_norm_backward")
def _batch_norm_backward_fake(grad_output, input, weight, mean, invstd, training, output_mask):
    channels = input.shape[1]
    param_dtype = weight.dtype if weight is not None else _accumulate_dtype(input.dtype)
    grad_input = _output_like(input) if output_mask[0] else input.new_empty((0,))
    grad_weight = input.new_empty((channels if output_mask[1] else 0,), dtype=param_dtype)
    grad_bias = input.new_empty((channels if output_mask[2] else 0,), dtype=param_dtype)
    return grad_input, grad_weight, grad_bias


def _grad_mask(ctx, weight, bias):
    return [
        ctx.needs_input_grad[0],
        weight is not None and ctx.needs_input_grad[1],
        bias is not None and ctx.needs_input_grad[2],
    ]


def _differentiable_backward(grad_output, input, weight, mean, invstd, training, eps, mask):
    """First-order grads from differentiable aten ops, for double backward.

    Used only when autograd records the backward (create_graph=True, e.g. a
    gradient penalty). In training the batch statistics are recomputed from the
    input so that their dependence on it is differentiated too."""
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


def _grads_for_inputs(mask, grads, bias_dtype, n_inputs):
    grad_input, grad_weight, grad_bias = (g if m else None for g, m in zip(grads, mask))
    # The backward op returns parameter grads in the weight's dtype; F.batch_norm
    # allows a bias without a weight, or of another dtype.
    if grad_bias is not None and grad_bias.dtype != bias_dtype:
        grad_bias = grad_bias.to(bias_dtype)
    return (grad_input, grad_weight, grad_bias) + (None,) * (n_inputs - 3)


class _BatchNormTrain(torch.autograd.Function):
    """Autograd for batch_norm_train.

    torch.library.register_autograd accepts only functional ops, and this op
    mutates the running statistics and the counter (buffers, never differentiated).
    So it gets an Autograd-key kernel of its own, built the way register_autograd
    builds one: run the op below autograd, save what the backward op needs.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps):
        with torch._C._AutoDispatchBelowAutograd():
            output, save_mean, save_invstd = ops.batch_norm_train(
                input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
        ctx.mask = _grad_mask(ctx, weight, bias)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.eps = eps
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.mark_non_differentiable(save_mean, save_invstd)
        return output, save_mean, save_invstd

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_invstd):
        input, weight, mean, invstd = ctx.saved_tensors
        if grad_output is None or not any(ctx.mask):
            return (None,) * 8
        if torch.is_grad_enabled():
            grads = _differentiable_backward(
                grad_output, input, weight, mean, invstd, True, ctx.eps, ctx.mask)
        else:
            grads = ops.batch_norm_backward(grad_output, input, weight, mean, invstd, True, ctx.mask)
        return _grads_for_inputs(ctx.mask, grads, ctx.bias_dtype, 8)


_autograd_lib = torch.library.Library("fused_bn", "IMPL")
_autograd_lib.impl("batch_norm_train", _BatchNormTrain.apply, "Autograd")


def _eval_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, eps = inputs
    acc = _accumulate_dtype(input.dtype)
    ctx.mask = _grad_mask(ctx, weight, bias)
    ctx.bias_dtype = None if bias is None else bias.dtype
    # Snapshots: a later training step may update the running buffers in place.
    mean = running_mean.to(acc, copy=True)
    invstd = torch.rsqrt(running_var.to(torch.float64) + eps).to(acc)
    ctx.save_for_backward(input, weight, mean, invstd)


def _eval_backward(ctx, grad_output):
    input, weight, mean, invstd = ctx.saved_tensors
    if grad_output is None or not any(ctx.mask):
        return (None,) * 6
    if torch.is_grad_enabled():
        grads = _differentiable_backward(
            grad_output, input, weight, mean, invstd, False, None, ctx.mask)
    else:
        grads = ops.batch_norm_backward(grad_output, input, weight, mean, invstd, False, ctx.mask)
    return _grads_for_inputs(ctx.mask, grads, ctx.bias_dtype, 6)


torch.library.register_autograd(
    "fused_bn::batch_norm_eval", _eval_backward, setup_context=_eval_setup_context)
