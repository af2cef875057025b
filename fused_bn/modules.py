"""Drop-in modules and model conversion."""
import torch
from torch import nn

from .functional import batch_norm, batch_norm_add_relu


class FusedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` computed by fused_bn's kernels.

    A subclass with the same constructor, parameters, buffers and state_dict keys,
    so checkpoints, optimizers and ``isinstance(m, nn.BatchNorm2d)`` keep working.
    Unlike ``nn.BatchNorm2d``, an input that raises leaves ``num_batches_tracked``
    untouched: every check runs before the op mutates any state.
    """

    def _batch_norm_kwargs(self, input: torch.Tensor) -> dict:
        self._check_input_dim(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are read in eval and updated in training when tracked.
        buffers_in_use = not self.training or self.track_running_stats
        tracks_batches = self.training and self.track_running_stats
        return dict(
            running_mean=self.running_mean if buffers_in_use else None,
            running_var=self.running_var if buffers_in_use else None,
            weight=self.weight,
            bias=self.bias,
            training=use_batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if tracks_batches else None,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return batch_norm(input, **self._batch_norm_kwargs(input))


class FusedBatchNormReLU2d(FusedBatchNorm2d):
    """``relu(nn.BatchNorm2d(x))`` in the passes over memory batch norm alone
    takes; the backward recomputes the ReLU's mask from the input. Same
    constructor, parameters, buffers and state_dict keys as ``nn.BatchNorm2d``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return batch_norm(input, activation="relu", **self._batch_norm_kwargs(input))


class FusedBatchNormAddReLU2d(FusedBatchNorm2d):
    """``relu(nn.BatchNorm2d(x) + residual)``, the end of a ResNet block, in one
    op; ``forward(input, residual)``, where ``residual`` has the input's shape
    and dtype and gets a gradient. Same constructor, parameters, buffers and
    state_dict keys as ``nn.BatchNorm2d``."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return batch_norm_add_relu(input, residual, **self._batch_norm_kwargs(input))


def _fused_from(bn: nn.BatchNorm2d) -> FusedBatchNorm2d:
    fused = FusedBatchNorm2d(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, device="meta")
    # The very same Parameter and buffer objects: optimizers holding them and any
    # other reference stay valid.
    for name, param in bn.named_parameters(recurse=False):
        setattr(fused, name, param)
    for name, buf in bn.named_buffers(recurse=False):
        setattr(fused, name, buf)
    fused.train(bn.training)
    return fused


def convert_model(module: nn.Module) -> nn.Module:
    """Replace, in place, every submodule whose type is exactly ``nn.BatchNorm2d``
    with a ``FusedBatchNorm2d`` sharing its parameters and buffers; returns the
    module (the new one when ``module`` itself is an ``nn.BatchNorm2d``)."""
    if type(module) is nn.BatchNorm2d:
        return _fused_from(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, _fused_from(child))
        else:
            convert_model(child)
    return module
