"""The one table of the activations fused_bn fuses after batch norm: public
names and nn modules -> what the kernels take (an activation of
csrc/common/activation.h and its parameters), and back (the nn module and
the differentiable reference used by double backward and forward AD).

Adding an activation: its struct and list entry in csrc/common/activation.h,
one row in ``_ACTIVATIONS`` here.
"""
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._extension import ops

aten = torch.ops.aten


class Activation(NamedTuple):
    """An activation as the ops take it: ``name`` is the kernels' name, ``params``
    its parameters (floats) in that activation's order. A fused module's
    ``activation`` property returns one.

    Attributes:
        name: one of ``fused_bn.ACTIVATIONS``.
        params: its parameters: ``("hardtanh", (min_val, max_val))``
            (``relu6`` is ``hardtanh`` 0, 6), ``("leaky_relu", (negative_slope,))``,
            ``("elu", (alpha,))``; empty for the others.

    Example::

        bn = fused_bn.FusedBatchNorm2d(8, activation=nn.LeakyReLU(0.2))
        assert bn.activation == fused_bn.Activation("leaky_relu", (0.2,))
        assert isinstance(bn.activation.module(), nn.LeakyReLU)
    """
    name: str
    params: Tuple[float, ...] = ()

    @property
    def is_identity(self) -> bool:
        """True for ``identity`` (no activation)."""
        return self.name == "identity"

    def module(self) -> nn.Module:
        """The nn module computing this activation (``nn.Identity`` for none)."""
        return _BY_KERNEL_NAME[self.name].module(*self.params)

    def reference(self, u: torch.Tensor) -> torch.Tensor:
        """The activation of ``u`` with differentiable ATen ops (PyTorch's own
        derivatives)."""
        return _BY_KERNEL_NAME[self.name].function(u, *self.params)

    def grad(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """g · act'(u) by PyTorch's own backward op of the activation (itself
        differentiable): what double backward and forward AD use."""
        return _BY_KERNEL_NAME[self.name].backward(g, u, *self.params)


class _Row(NamedTuple):
    kernel_name: str           # csrc/common/activation.h's kName
    defaults: Tuple[float, ...]  # the parameters a bare name gets
    module_type: type          # the nn module, matched by exact type
    module: Callable           # params -> an nn module
    function: Callable         # (u, *params) -> the activation with differentiable ops
    backward: Callable         # (g, u, *params) -> g · act'(u), PyTorch's backward op
    from_module: Callable      # nn module -> params


# public name -> row. relu6 is hardtanh(0, 6) in the kernels, as in nn.
_ACTIVATIONS = {
    "identity": _Row("identity", (), nn.Identity, nn.Identity, lambda u: u, lambda g, u: g, lambda m: ()),
    "relu": _Row("relu", (), nn.ReLU, nn.ReLU, F.relu, lambda g, u: aten.threshold_backward(g, u, 0),
                 lambda m: ()),
    "relu6": _Row("hardtanh", (0.0, 6.0), nn.ReLU6, lambda lo, hi: nn.ReLU6(), F.hardtanh,
                  aten.hardtanh_backward, lambda m: (0.0, 6.0)),
    "hardtanh": _Row("hardtanh", (-1.0, 1.0), nn.Hardtanh, nn.Hardtanh, F.hardtanh, aten.hardtanh_backward,
                     lambda m: (float(m.min_val), float(m.max_val))),
    "leaky_relu": _Row("leaky_relu", (0.01,), nn.LeakyReLU, nn.LeakyReLU, F.leaky_relu,
                       lambda g, u, slope: aten.leaky_relu_backward(g, u, slope, False),
                       lambda m: (float(m.negative_slope),)),
    "elu": _Row("elu", (1.0,), nn.ELU, nn.ELU, F.elu,
                lambda g, u, alpha: aten.elu_backward(g, alpha, 1.0, 1.0, False, u), lambda m: (float(m.alpha),)),
    # silu_backward has no derivative of its own: PyTorch's autograd uses this
    # form (infinitely_differentiable_silu_backward) when it records a backward.
    "silu": _Row("silu", (), nn.SiLU, nn.SiLU, F.silu,
                 lambda g, u: g * torch.sigmoid(u) * (1 + u * (1 - torch.sigmoid(u))), lambda m: ()),
    "hardswish": _Row("hardswish", (), nn.Hardswish, nn.Hardswish, F.hardswish, aten.hardswish_backward,
                      lambda m: ()),
    "gelu": _Row("gelu", (), nn.GELU, nn.GELU, F.gelu, aten.gelu_backward, lambda m: ()),
    "gelu_tanh": _Row("gelu_tanh", (), nn.GELU, lambda: nn.GELU(approximate="tanh"),
                      lambda u: F.gelu(u, approximate="tanh"),
                      lambda g, u: aten.gelu_backward(g, u, approximate="tanh"), lambda m: ()),
    # Not aten.hardsigmoid_backward: it multiplies by (double)(1.0f / 6.0f),
    # 3e-8 off in float64; the kernels divide by 6.
    "hardsigmoid": _Row("hardsigmoid", (), nn.Hardsigmoid, nn.Hardsigmoid, F.hardsigmoid,
                        lambda g, u: torch.where((u > -3) & (u < 3), g / 6, 0), lambda m: ()),
}
# kernel name -> its row (hardtanh(0, 6) becomes nn.Hardtanh(0, 6) again,
# which computes what nn.ReLU6 does).
_BY_KERNEL_NAME = {name: row for name, row in _ACTIVATIONS.items() if row.kernel_name == name}

SUPPORTED = tuple(_ACTIVATIONS)
IDENTITY = Activation("identity")


def _from_module(module: nn.Module) -> Optional[Activation]:
    if type(module) is nn.GELU:
        return Activation("gelu_tanh" if module.approximate == "tanh" else "gelu")
    for row in _ACTIVATIONS.values():
        if type(module) is row.module_type and row.kernel_name != "gelu_tanh":
            return Activation(row.kernel_name, row.from_module(module))
    return None


def resolve(activation) -> Activation:
    """The ``Activation`` for what a user passes as ``activation=``: None (no
    activation), a name of ``SUPPORTED`` (with nn's default parameters), an
    nn activation module (its parameters carried over; ``inplace`` does not
    matter, the kernels write a new output), or an ``Activation``."""
    if activation is None:
        return IDENTITY
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str):
        row = _ACTIVATIONS.get(activation)
        if row is not None:
            return Activation(row.kernel_name, row.defaults)
    elif isinstance(activation, nn.Module):
        resolved = _from_module(activation)
        if resolved is not None:
            return resolved
    raise ValueError(
        f"unsupported activation {activation!r}: fused_bn fuses one of {', '.join(SUPPORTED)} "
        "(by name, or as the nn module of that name, e.g. nn.LeakyReLU(0.1); nn.Identity for none)")


@functools.lru_cache(maxsize=None)
def grad_from_output(activation: Activation, dtype: torch.dtype) -> bool:
    """Whether the kernels take this activation's derivative from the
    forward's output of ``dtype`` (csrc/common/activation.h's kGradFromOutput
    and its condition on the parameters and on the output's rounding), so that
    with a residual autograd saves y rather than the residual."""
    return ops.activation_grad_from_output(activation.name, list(activation.params), dtype)
