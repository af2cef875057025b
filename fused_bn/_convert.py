"""convert_model, the public entry of conversion: fusion on an fx trace
(``_fuse.py``) when asked and the model traces, else the module-by-module
swap (``_swap.py``)."""
from typing import List

from torch import nn

from ._fuse import FusionRecord, _in_place_records, _structural_copy, fuse_with_fx
from ._swap import _convert_in_place


def _require_module(model, function: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fused_bn.{function} expects an nn.Module, got {type(model).__name__}")


def convert_model(module: nn.Module, fuse: bool = False, *, fuse_relu: bool = False) -> nn.Module:
    """Replace every submodule whose type is exactly ``nn.BatchNorm1d``,
    ``nn.BatchNorm2d`` or ``nn.BatchNorm3d`` with ``FusedBatchNorm1d`` (2d, 3d)
    sharing its parameters and buffers, and return the model. An
    ``nn.LazyBatchNorm1d`` (2d, 3d) not yet run (nothing to share) becomes a
    ``FusedLazyBatchNorm1d`` (2d, 3d) with its settings; one that has run is
    already an ``nn.BatchNorm1d`` (2d, 3d). timm's ``BatchNormAct2d`` (batch norm plus its
    activation) becomes a ``FusedBatchNormAct2d``, a subclass of it with the
    same children. Other subclasses of nn's batch norms are left as they are.

    With ``fuse=False`` the model is converted in place (the new module is
    returned when ``module`` itself is an ``nn.BatchNorm2d``).

    With ``fuse=True`` (``fuse_relu=True`` is the same, its older name) what
    directly and only follows a batch norm's output runs in the batch norm's
    own passes:

    * an activation of ``fused_bn.ACTIVATIONS``, as a module (``nn.ReLU``,
      ``ReLU6``, ``Hardtanh``, ``LeakyReLU``, ``ELU``, ``SiLU``, ``Hardswish``,
      ``Hardsigmoid``, ``GELU``; in place or not), a function (``F.relu``,
      ``F.relu6``, ``F.hardtanh``, ``F.leaky_relu``, ``F.elu``, ``F.silu``,
      ``F.hardswish``, ``F.hardsigmoid``, ``F.gelu`` with either
      ``approximate``, ``torch.relu`` and the in-place forms) or a method
      (``.relu()``, ``.relu_()``), with its parameters exactly;
    * a residual add, ``bn(x) + r`` in either order, ``bn(x) += r`` or
      ``torch.add`` without alpha, with one of those activations after it or
      none (an inverted-residual block's plain add);
    * in timm's ``BatchNormAct2d``, its own activation (when fused_bn has it
      and no dropout comes before it), and after one without an activation,
      the add and activation that follow.

    ReLU folds become ``FusedBatchNormReLU1d`` (2d, 3d) and
    ``FusedBatchNormAddReLU1d`` (2d, 3d), the others ``FusedBatchNorm2d``
    (1d, 3d) with ``activation=`` (its ``forward`` takes the residual). The
    model is traced with ``torch.fx`` to find these, and the return value is then a
    ``torch.fx.GraphModule`` (use it in place of the model; the original is left
    as it was, sharing its parameters and buffers with it). A batch norm whose
    output is read twice, a module called from several places, and an add
    that writes into the residual stay unfused. A model that does
    not trace is converted in place instead, folding only an activation module that
    directly follows a batch norm in an ``nn.Sequential``. Either way the
    state_dict keys stay those of the original model. The trace leaves every
    parameter, buffer and training flag as it found them, and a module whose
    code depends on its training flag (stochastic depth, a dropout path) stays
    a module the graph calls, so the GraphModule follows ``.train()`` and
    ``.eval()`` as the model does (a model whose own top-level forward reads
    ``self.training`` is converted in place).

    Args:
        module: the model (or a single batch norm) to convert.
        fuse: fold the activations and residual adds that follow batch norms
            into them (default False: swap the modules only).
        fuse_relu: keyword only; the older name of ``fuse``.

    Returns:
        ``module`` converted in place (the new module when ``module`` is itself
        a batch norm); with ``fuse=True`` and a model ``torch.fx`` traces, a
        ``torch.fx.GraphModule``.

    Shapes and dtypes:
        The converted modules take what the originals took (see
        ``FusedBatchNorm2d``); parameters and buffers keep their dtype and
        device (they are the same objects).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` (as ``revert_model``).

    Example::

        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        fused = fused_bn.convert_model(model, fuse=True)
        assert isinstance(fused.get_submodule("1"), fused_bn.FusedBatchNormReLU2d)
        x = torch.randn(2, 3, 12, 12)
        torch.testing.assert_close(fused(x), model(x))   # model: still nn's modules
    """
    _require_module(module, "convert_model")
    fuse = fuse or fuse_relu
    if fuse:
        traced = fuse_with_fx(module)
        if traced is not None:
            return traced
    return _convert_in_place(module, fuse)


def fusion_report(model: nn.Module) -> List[FusionRecord]:
    """What ``convert_model(model, fuse=True)`` folds into each batch norm, and
    why it folds nothing where something fused_bn could fold follows: a
    ``FusionRecord(name, follows, fused, reason)`` per batch norm, in graph
    order. The model is left as it was (the conversion runs on a copy of its
    module tree sharing its tensors).

    Args:
        model: the model ``convert_model(model, fuse=True)`` would convert.

    Returns:
        A list of ``FusionRecord``, one per batch norm.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example::

        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU())
        [record] = fused_bn.fusion_report(model)
        assert record == fused_bn.FusionRecord("1", "silu", "silu", None)
    """
    _require_module(model, "fusion_report")
    report = []
    if fuse_with_fx(model, report) is None:
        report = list(_in_place_records("", model, _convert_in_place(_structural_copy(model), fuse=True)))
    return report
