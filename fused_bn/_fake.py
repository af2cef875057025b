"""Fake (meta) kernels of the fused_bn ops: output shapes, dtypes, strides and
the device check, as the real kernels give them (csrc/torch/tensors.h,
csrc/torch/checks.h), for torch.compile, FakeTensor and opcheck.
Registered by fused_bn/_registration.py."""
import torch
from torch._prims_common import suggest_memory_format


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _output_like(input):
    # Mirrors empty_output() in csrc/torch/tensors.h and batch_norm_memory_format()
    # in csrc/torch/checks.h.
    if input.numel() == 0:
        return torch.empty_like(input)
    fmt = torch.contiguous_format
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(input.dim())
    if channels_last is not None and not input.is_contiguous():
        if (input.is_contiguous(memory_format=channels_last)
                or suggest_memory_format(input) == channels_last):
            fmt = channels_last
    return torch.empty_like(input, memory_format=fmt)


def _grad_input_like(grad_output, input):
    return torch.empty_like(grad_output) if input.numel() == 0 else _output_like(input)


def _check_same_device(input, **tensors):
    """The device check of the real kernels (csrc/torch/checks.h), with
    their message. A meta tensor among CPU or CUDA ones sends the call to the
    fake kernel, which must refuse it as the real kernel would."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"Expected all tensors to be on the same device, but {name} is on "
                               f"{t.device} and input is on {input.device}")


def _batch_norm_train_fake(input, weight, bias, running_mean, running_var,
                           num_batches_tracked, momentum, eps, activation="identity",
                           activation_params=(), residual=None):
    _check_same_device(input, running_mean=running_mean, running_var=running_var, weight=weight,
                       bias=bias, residual=residual, num_batches_tracked=num_batches_tracked)
    stats = input.new_empty((input.shape[1],), dtype=_accumulate_dtype(input.dtype))
    return _output_like(input), stats, torch.empty_like(stats)


def _batch_norm_eval_fake(input, weight, bias, running_mean, running_var, eps, activation="identity",
                          activation_params=(), residual=None):
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


def _epilogue_grad_fake(grad_output, input, activation, residual, output):
    """The activation's g (grad_residual): written where the backward reads a
    residual or y for a non-identity activation, else [0]."""
    if activation != "identity" and (residual is not None or output is not None):
        return _grad_input_like(grad_output, input)
    return input.new_empty((0,))


def _backward_params(weight, bias, activation, residual, output):
    """The tensors whose dtype the parameter grads take (the weight's, else a
    recomputed z's bias: csrc/cpu/batch_norm_cpu.cpp's backward_cpu)."""
    recomputes = activation != "identity" and output is None
    return (weight, bias) if recomputes else (weight,)


def _batch_norm_backward_fake(grad_output, input, weight, mean, invstd, training, eps, output_mask,
                              bias=None, activation="identity", activation_params=(), residual=None,
                              output=None):
    _check_same_device(input, grad_output=grad_output, weight=weight, mean=mean, invstd=invstd,
                       bias=bias, residual=residual, output=output)
    grad_input = _grad_input_like(grad_output, input) if output_mask[0] else input.new_empty((0,))
    grad_weight, grad_bias = _param_grads_fake(
        input, _backward_params(weight, bias, activation, residual, output), output_mask)
    return grad_input, grad_weight, grad_bias, _epilogue_grad_fake(grad_output, input, activation,
                                                                   residual, output)


# FusedSyncBatchNorm2d's ops (the collectives between them are in fused_bn/_sync.py).
def _batch_norm_stats_fake(input, weight, bias, running_mean, running_var):
    return input.new_empty((input.shape[1], 3), dtype=torch.float64)


def _batch_norm_train_with_stats_fake(input, weight, bias, running_mean, running_var,
                                      num_batches_tracked, momentum, eps, all_stats,
                                      activation="identity", activation_params=(), residual=None):
    return _batch_norm_train_fake(input, weight, bias, running_mean, running_var,
                                  num_batches_tracked, momentum, eps, activation, activation_params,
                                  residual)


def _batch_norm_backward_sums_fake(grad_output, input, weight, mean, invstd, param_mask, bias=None,
                                   activation="identity", activation_params=(), residual=None,
                                   output=None):
    sums = input.new_empty((input.shape[1], 3), dtype=torch.float64)
    grad_weight, grad_bias = _param_grads_fake(
        input, _backward_params(weight, bias, activation, residual, output), [False, *param_mask])
    return sums, grad_weight, grad_bias, _epilogue_grad_fake(grad_output, input, activation, residual,
                                                             output)


def _batch_norm_backward_with_sums_fake(grad_output, input, weight, mean, invstd, sums, count,
                                        bias=None, activation="identity", activation_params=()):
    return _grad_input_like(grad_output, input)


# op name -> fake kernel
FAKE_KERNELS = {
    "batch_norm_train": _batch_norm_train_fake,
    "batch_norm_eval": _batch_norm_eval_fake,
    "batch_norm_backward": _batch_norm_backward_fake,
    "batch_norm_stats": _batch_norm_stats_fake,
    "batch_norm_train_with_stats": _batch_norm_train_with_stats_fake,
    "batch_norm_backward_sums": _batch_norm_backward_sums_fake,
    "batch_norm_backward_with_sums": _batch_norm_backward_with_sums_fake,
}
