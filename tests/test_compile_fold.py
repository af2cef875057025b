"""torch.compile of a model converted without fuse=True: Inductor's pre-grad
pass of fused_bn (fused_bn/_inductor.py, fold_into_training_ops) folds the
activation, the residual add, or the add and then the activation that follow a
training batch norm of ours into that op's call, as convert_model(fuse=True)
does to the module tree, and folds nothing where convert_model would not (an
output read twice, an add that writes into its residual, an add with alpha or
a broadcast operand). Each case: the compiled step of the plain-converted model
against the eager original in float64 (outputs, every gradient, running
statistics), and the op's call in Inductor's code carrying what was folded."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_bn


class _Block(nn.Module):
    """conv -> bn, then `follow(y, residual)`; the residual (a downsampled
    input, as torchvision's Bottleneck has it) computed after the batch norm."""

    def __init__(self, follow):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.down = nn.Conv2d(4, 6, 1, bias=False)
        self.head = nn.Conv2d(6, 3, 1)
        self.follow = follow

    def forward(self, x):
        y = self.bn(self.conv(x))
        residual = self.down(x)
        return self.head(self.follow(y, residual))


def _iadd_relu(y, r):
    y += r
    return F.relu(y)


def _iadd_into_residual(y, r):
    r += y  # writes into the residual: not folded
    return r


FOLDED = {
    # name: (follow, activation in the op's call or None, residual folded)
    "relu6-inplace": (lambda y, r: F.hardtanh(y, 0.0, 6.0, True), "'hardtanh', [0.0, 6.0]", False),
    "silu": (lambda y, r: F.silu(y), "'silu'", False),
    "leaky_relu-0.1": (lambda y, r: F.leaky_relu(y, 0.1), "'leaky_relu', [0.1]", False),
    "gelu-tanh": (lambda y, r: F.gelu(y, approximate="tanh"), "'gelu_tanh'", False),
    "hardswish-method": (lambda y, r: nn.Hardswish()(y), "'hardswish'", False),
    "add": (lambda y, r: y + r, None, True),
    "radd-relu": (lambda y, r: torch.relu(r + y), "'relu'", True),
    "iadd-relu": (_iadd_relu, "'relu'", True),
    "torch.add-silu": (lambda y, r: F.silu(torch.add(y, r)), "'silu'", True),
}
NOT_FOLDED = {
    "read-twice": lambda y, r: F.relu(y) + y,
    "iadd-into-residual": _iadd_into_residual,
    "add-alpha": lambda y, r: F.relu(torch.add(y, r, alpha=2.0)),
    "broadcast-add": lambda y, r: F.relu(y + r[:, :, :1, :1]),
}


def _compiled_step_against_eager(follow):
    """(Inductor's code of the plain-converted model's compiled step), after
    checking it against the eager original in float64."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    original = _Block(follow).double()
    converted = fused_bn.convert_model(copy.deepcopy(original))
    assert type(converted.bn) is fused_bn.FusedBatchNorm2d and converted.bn.activation in (None, fused_bn.Activation("identity"))
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)

    def step(model, x):
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out

    expected = step(original, x)
    got, codes = run_and_get_code(torch.compile(step), converted, x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(original.named_parameters(), converted.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")
    for (name, b), c in zip(original.named_buffers(), converted.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=f"buffer {name}")
    return "\n".join(codes)


def _training_calls(code):
    calls = re.findall(r"torch\.ops\.fused_bn\.batch_norm_train\.default\(([^\n]*)\)", code)
    assert len(calls) == 1, calls
    return calls[0]


@pytest.mark.parametrize("name", FOLDED)
def test_compile_folds_what_follows_the_training_op(name):
    follow, activation, residual = FOLDED[name]
    call = _training_calls(_compiled_step_against_eager(follow))
    arguments = call.split(", ")
    if activation is not None:
        assert activation in call, call
    else:
        assert all(a == "'identity'" for a in arguments if a.startswith("'")), call
    # The residual is the call's last argument, after the activation's name
    # and parameters (None or absent when none was folded).
    last = arguments[-1]
    assert (last.startswith("buf") or last.startswith("primals")) == residual, call


@pytest.mark.parametrize("name", NOT_FOLDED)
def test_compile_folds_nothing_convert_model_would_not(name):
    call = _training_calls(_compiled_step_against_eager(NOT_FOLDED[name]))
    # eps is the last argument: no activation, no residual
    assert re.search(r"1e-05$", call), call


def test_a_users_own_pre_grad_pass_is_kept():
    from fused_bn import _inductor

    class Config:
        pre_grad_custom_pass = None

    ours, theirs = object(), object()
    config = Config()
    _inductor._add_pre_grad_pass(config, ours)
    assert config.pre_grad_custom_pass is ours
    config.pre_grad_custom_pass = theirs
    _inductor._add_pre_grad_pass(config, ours)
    assert config.pre_grad_custom_pass == [theirs, ours]
