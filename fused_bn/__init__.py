"""fused_bn: batch normalization with hand-written fused CPU and CUDA kernels.

Drop-ins for ``nn.BatchNorm1d``, ``nn.BatchNorm2d`` and ``nn.BatchNorm3d``:
``FusedBatchNorm1d``/``2d``/``3d`` (subclasses, same state_dict) and their lazy
forms, ``batch_norm`` (mirrors ``torch.nn.functional.batch_norm``) and
``convert_model``; with an activation (``activation=`` on every module and on ``batch_norm``: a
name of ``ACTIVATIONS`` or the nn module) and a residual add (``forward(input, residual)``) fused in, the
ReLU forms also as classes:
``FusedBatchNormReLU1d``/``2d``/``3d``, ``FusedBatchNormAddReLU1d``/``2d``/``3d``,
``batch_norm(..., activation="relu")``, ``batch_norm_add_relu`` and
``convert_model(model, fuse=True)`` (which folds every activation and residual add it
finds after a batch norm; ``fusion_report`` says what and why not); and for data-parallel training,
``FusedSyncBatchNorm2d`` (statistics synchronised over ``torch.distributed``, on
2-D to 5-D input like ``nn.SyncBatchNorm``). ``revert_model`` undoes
``convert_model``: nn modules again, sharing the parameters and buffers (for
ONNX export, quantization and other tools that know only nn's modules).
"""
from . import _registration  # noqa: F401  (loads the extension, registers fake kernels and autograd)
#: The names ``activation=`` takes (on every module and on ``batch_norm``), a tuple of
#: str: ``"identity"`` (none), ``"relu"``, ``"relu6"``, ``"hardtanh"``, ``"leaky_relu"``,
#: ``"elu"``, ``"silu"``, ``"hardswish"``, ``"gelu"``, ``"gelu_tanh"`` (``nn.GELU(approximate="tanh")``)
#: and ``"hardsigmoid"``, each with nn's default parameters; pass the nn module for others.
#:
#: Example::
#:
#:     assert "silu" in fused_bn.ACTIVATIONS
#:     bn = fused_bn.FusedBatchNorm2d(8, activation="gelu_tanh")
#:     assert bn.activation.name == "gelu_tanh"
from ._activations import SUPPORTED as ACTIVATIONS
from ._activations import Activation
from ._convert import convert_model, fusion_report
from ._fuse import FusionRecord
from ._revert import revert_model
from .functional import batch_norm, batch_norm_add_relu
from .modules import (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedBatchNormAddReLU1d,
                      FusedBatchNormAddReLU2d, FusedBatchNormAddReLU3d, FusedBatchNormReLU1d,
                      FusedBatchNormReLU2d, FusedBatchNormReLU3d, FusedLazyBatchNorm1d,
                      FusedLazyBatchNorm2d, FusedLazyBatchNorm3d, FusedSyncBatchNorm2d)

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "FusedBatchNorm1d",
    "FusedBatchNorm2d",
    "FusedBatchNorm3d",
    "FusedBatchNormAddReLU1d",
    "FusedBatchNormAddReLU2d",
    "FusedBatchNormAddReLU3d",
    "FusedBatchNormReLU1d",
    "FusedBatchNormReLU2d",
    "FusedBatchNormReLU3d",
    "FusedLazyBatchNorm1d",
    "FusedLazyBatchNorm2d",
    "FusedLazyBatchNorm3d",
    "FusedSyncBatchNorm2d",
    "FusionRecord",
    "batch_norm",
    "batch_norm_add_relu",
    "convert_model",
    "fusion_report",
    "revert_model",
]
__version__ = "0.1.0"
