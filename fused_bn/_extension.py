"""Loads the compiled extension (fused_bn._C), whose import runs the op
schemas' and device kernels' static registrations (csrc/), after checking that
this CPU can run the build (fused_bn/_cpu_features.py)."""
import torch

from ._cpu_features import check_installed_build

check_installed_build()
from . import _C  # noqa: F401,E402  (importing the extension runs its op registrations)

ops = torch.ops.fused_bn
