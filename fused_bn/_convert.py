"""convert_model, the public entry of conversion: fusion on an fx trace
(``_fuse.py``) when asked and the model traces, else the module-by-module
swap (``_swap.py``)."""
from torch import nn

from ._fuse import fuse_with_fx
from ._swap import _convert_in_place


def convert_model(module: nn.Module, fuse_relu: bool = False) -> nn.Module:
    """Replace every submodule whose type is exactly ``nn.BatchNorm1d``,
    ``nn.BatchNorm2d`` or ``nn.BatchNorm3d`` with ``FusedBatchNorm1d`` (2d, 3d)
    sharing its parameters and buffers, and return the model. An
    ``nn.LazyBatchNorm1d`` (2d, 3d) not yet run (nothing to share) becomes a
    ``FusedLazyBatchNorm1d`` (2d, 3d) with its settings; one that has run is
    already an ``nn.BatchNorm1d`` (2d, 3d). timm's ``BatchNormAct2d`` (batch norm plus its
    activation) becomes a ``FusedBatchNormAct2d``, a subclass of it with the
    same children; with ``fuse_relu=True`` a ReLU activation runs in the batch
    norm's passes. Other subclasses of nn's batch norms are left as they are.

    With ``fuse_relu=False`` the model is converted in place (the new module is
    returned when ``module`` itself is an ``nn.BatchNorm2d``).

    With ``fuse_relu=True`` a ReLU applied directly and only to a batch norm's
    output (``nn.ReLU``, in place or not, ``F.relu``, ``torch.relu``,
    ``Tensor.relu``) is folded into it (``FusedBatchNormReLU1d``, 2d, 3d), and
    so is ``relu(bn(x) + identity)`` (``FusedBatchNormAddReLU1d``, 2d, 3d). The model is
    traced with ``torch.fx`` to find these, and the return value is then a
    ``torch.fx.GraphModule`` (use it in place of the model; the original is left
    as it was, sharing its parameters and buffers with it). A model that does
    not trace is converted in place instead, folding only an ``nn.ReLU`` that
    directly follows a batch norm in an ``nn.Sequential``. Either way the
    state_dict keys stay those of the original model. The trace leaves every
    parameter, buffer and training flag as it found them, and a module whose
    code depends on its training flag (stochastic depth, a dropout path) stays
    a module the graph calls, so the GraphModule follows ``.train()`` and
    ``.eval()`` as the model does (a model whose own top-level forward reads
    ``self.training`` is converted in place).
    """
    if fuse_relu:
        traced = fuse_with_fx(module)
        if traced is not None:
            return traced
    return _convert_in_place(module, fuse_relu)
