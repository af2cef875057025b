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
        kwargs = self._batch_norm_kwargs(input)
        if (isinstance(residual, torch.Tensor) and residual.shape == input.shape
                and residual.dtype == input.dtype and residual.device == input.device):
            return batch_norm_add_relu(input, residual, **kwargs)
        # What `relu(bn(x) + residual)` does in eager PyTorch for a residual
        # that broadcasts or promotes (convert_model(fuse_relu=True) cannot see
        # shapes): unfused. A residual that cannot be added raises before any
        # state changes.
        if isinstance(residual, torch.Tensor):
            shape = torch.broadcast_shapes(input.shape, residual.shape)
            if shape != input.shape:
                raise RuntimeError(
                    f"residual of shape {list(residual.shape)} broadcasts the output of shape "
                    f"{list(input.shape)} to {list(shape)}")
        # Any other error of the add or the ReLU (a residual on another device,
        # a complex one, one that is no tensor or number), exactly as eager
        # raises it, from a dry run on empty tensors of the same ranks.
        probe = residual.new_empty([0] * residual.dim()) if isinstance(residual, torch.Tensor) else residual
        torch.relu(input.new_empty([0] * input.dim()) + probe)
        return torch.relu(batch_norm(input, **kwargs) + residual)


def _fused_from(bn: nn.BatchNorm2d, cls=FusedBatchNorm2d) -> FusedBatchNorm2d:
    fused = cls(
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


def _convert_in_place(module: nn.Module, fuse_relu: bool) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        return _fused_from(module)
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        if type(child) is not nn.BatchNorm2d:
            _convert_in_place(child, fuse_relu)
            continue
        # An nn.Sequential's BatchNorm2d right before an nn.ReLU: the pair
        # becomes the fused module and an nn.Identity at the ReLU's index, so
        # the state_dict keys stay as they were.
        following = children[i + 1][1] if i + 1 < len(children) else None
        if fuse_relu and isinstance(module, nn.Sequential) and type(following) is nn.ReLU:
            setattr(module, name, _fused_from(child, FusedBatchNormReLU2d))
            setattr(module, children[i + 1][0], nn.Identity())
            children[i + 1] = (children[i + 1][0], nn.Identity())
        else:
            setattr(module, name, _fused_from(child))
    return module


def convert_model(module: nn.Module, fuse_relu: bool = False) -> nn.Module:
    """Replace every submodule whose type is exactly ``nn.BatchNorm2d`` with a
    ``FusedBatchNorm2d`` sharing its parameters and buffers, and return the model.

    With ``fuse_relu=False`` the model is converted in place (the new module is
    returned when ``module`` itself is an ``nn.BatchNorm2d``).

    With ``fuse_relu=True`` a ReLU applied directly and only to a batch norm's
    output (``nn.ReLU``, in place or not, ``F.relu``, ``torch.relu``,
    ``Tensor.relu``) is folded into it (``FusedBatchNormReLU2d``), and so is
    ``relu(bn(x) + identity)`` (``FusedBatchNormAddReLU2d``). The model is
    traced with ``torch.fx`` to find these, and the return value is then a
    ``torch.fx.GraphModule`` (use it in place of the model; the original is left
    as it was, sharing its parameters and buffers with it). A model that does
    not trace is converted in place instead, folding only an ``nn.ReLU`` that
    directly follows a ``BatchNorm2d`` in an ``nn.Sequential``. Either way the
    state_dict keys stay those of the original model.
    """
    if fuse_relu:
        from ._fuse import fuse_with_fx

        traced = fuse_with_fx(module)
        if traced is not None:
            return traced
    return _convert_in_place(module, fuse_relu)
