"""Registers the Python side of the fused_bn ops with torch.library: fake
kernels (fused_bn/_fake.py) and the forward ops' Autograd kernels
(fused_bn/_autograd.py). The schemas are in csrc/ops.cpp and the device
kernels in csrc/cpu and csrc/cuda. Registering through torch.library (rather
than wrapping the kernels in an autograd.Function) is what lets
torch.compile(fullgraph=True) keep fused_bn ops whole in its graph and
torch.library.opcheck verify them."""
import functools

import torch

from . import _extension  # noqa: F401  (the schemas must exist first)
from ._autograd import batch_norm_eval_autograd, batch_norm_train_autograd
from ._fake import FAKE_KERNELS
from ._inductor import COMPANIONS, register_with_inductor


def _registering_with_inductor(fake_kernel):
    """The fake kernel, first registering the layout constraints and the eval
    decomposition with Inductor (fused_bn/_inductor.py says why there)."""
    @functools.wraps(fake_kernel)
    def fake(*args, **kwargs):
        register_with_inductor()
        return fake_kernel(*args, **kwargs)
    return fake


for _name, _kernel in FAKE_KERNELS.items():
    if _name in COMPANIONS:
        _kernel = _registering_with_inductor(_kernel)
    torch.library.register_fake(f"fused_bn::{_name}")(_kernel)

_autograd_lib = torch.library.Library("fused_bn", "IMPL")
_autograd_lib.impl("batch_norm_train", batch_norm_train_autograd, "Autograd")
_autograd_lib.impl("batch_norm_eval", batch_norm_eval_autograd, "Autograd")
