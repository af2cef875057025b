"""fused_bn: batch normalization with hand-written fused CPU and CUDA kernels.

Drop-in for ``nn.BatchNorm2d``: ``FusedBatchNorm2d`` (a subclass, same state_dict),
``batch_norm`` (mirrors ``torch.nn.functional.batch_norm``) and ``convert_model``;
with the ReLU (and a ResNet block's residual add) fused in: ``FusedBatchNormReLU2d``,
``FusedBatchNormAddReLU2d``, ``batch_norm(..., activation="relu")``,
``batch_norm_add_relu`` and ``convert_model(model, fuse_relu=True)``; and for data-parallel
training, ``FusedSyncBatchNorm2d`` (statistics synchronised over ``torch.distributed``).
"""
from . import _registration  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from .functional import batch_norm, batch_norm_add_relu
from .modules import (FusedBatchNorm2d, FusedBatchNormAddReLU2d, FusedBatchNormReLU2d,
                      FusedLazyBatchNorm2d, FusedSyncBatchNorm2d, convert_model)

__all__ = [
    "FusedBatchNorm2d",
    "FusedBatchNormAddReLU2d",
    "FusedBatchNormReLU2d",
    "FusedLazyBatchNorm2d",
    "FusedSyncBatchNorm2d",
    "batch_norm",
    "batch_norm_add_relu",
    "convert_model",
]
__version__ = "0.1.0"
