"""fused_bn: batch normalization with hand-written fused CPU and CUDA kernels.

Drop-in for ``nn.BatchNorm2d``: ``FusedBatchNorm2d`` (a subclass, same state_dict),
``batch_norm`` (mirrors ``torch.nn.functional.batch_norm``) and ``convert_model``.
"""
from . import _ops  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from .functional import batch_norm
from .modules import FusedBatchNorm2d, convert_model

__all__ = ["FusedBatchNorm2d", "batch_norm", "convert_model"]
__version__ = "0.1.0"
