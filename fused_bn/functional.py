"""Functional batch norm backed by the fused_bn ops."""
from typing import Optional

import torch
from torch import Tensor

from ._ops import ops


def _verify_batch_size(size):
    # Same check and message as torch.nn.functional.batch_norm.
    values_per_channel = size[0]
    for s in size[2:]:
        values_per_channel *= s
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}")


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Mirrors ``torch.nn.functional.batch_norm``.

    In training the batch statistics normalize the input and, when given, the
    running statistics are updated in place. ``num_batches_tracked`` (an int64
    scalar tensor, keyword only) is incremented in place by each training call;
    with ``momentum=None`` the update is then the cumulative average
    ``1 / num_batches_tracked``, as in ``nn.BatchNorm2d``.
    """
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError(
                "running_mean and running_var must either both be None or neither be None")
        if input.dim() >= 2:
            _verify_batch_size(input.size())
        output, _, _ = ops.batch_norm_train(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)
        return output
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is None:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    return ops.batch_norm_eval(input, weight, bias, running_mean, running_var, eps)
