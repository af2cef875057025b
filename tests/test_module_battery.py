"""PyTorch's own module battery for nn.BatchNorm1d/2d/3d (the ModuleInfo inputs and
error inputs of ``torch.testing._internal.common_modules``, which torch's
test_modules.py runs on nn's modules) driven through our modules:
FusedBatchNorm2d, FusedLazyBatchNorm2d, FusedBatchNormReLU2d and
FusedSyncBatchNorm2d (no process group: its local path) on BatchNorm2d's
inputs, FusedBatchNorm1d on BatchNorm1d's, FusedBatchNorm3d and
FusedLazyBatchNorm3d on BatchNorm3d's. Each input is run on
ours and on nn's module built from the same constructor arguments, and
compared: forward, backward, error inputs, pickling, torch.save/load,
``to``/``to_empty``, memory formats, non-contiguous input, gradcheck.
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fused_bn
from _helpers import channels_last_format

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules",
    reason="torch's internal module battery needs expecttest (make test-deps installs it)")

MODULE_INFO = {info.module_cls: info for info in common_modules.module_db
               if info.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}
BATCH_NORM_2D = MODULE_INFO[nn.BatchNorm2d]

# name: (our class, nn's class, what ours adds to nn's output, lazy, the ModuleInfo whose inputs it runs)
KINDS = {
    "FusedBatchNorm2d": (fused_bn.FusedBatchNorm2d, nn.BatchNorm2d, None, False, BATCH_NORM_2D),
    "FusedLazyBatchNorm2d": (fused_bn.FusedLazyBatchNorm2d, nn.LazyBatchNorm2d, None, True, BATCH_NORM_2D),
    "FusedBatchNormReLU2d": (fused_bn.FusedBatchNormReLU2d, nn.BatchNorm2d, torch.relu, False, BATCH_NORM_2D),
    "FusedSyncBatchNorm2d": (fused_bn.FusedSyncBatchNorm2d, nn.BatchNorm2d, None, False, BATCH_NORM_2D),
    "FusedBatchNorm1d": (fused_bn.FusedBatchNorm1d, nn.BatchNorm1d, None, False, MODULE_INFO[nn.BatchNorm1d]),
    "FusedBatchNorm3d": (fused_bn.FusedBatchNorm3d, nn.BatchNorm3d, None, False, MODULE_INFO[nn.BatchNorm3d]),
    "FusedLazyBatchNorm3d": (fused_bn.FusedLazyBatchNorm3d, nn.LazyBatchNorm3d, None, True,
                             MODULE_INFO[nn.BatchNorm3d]),
}
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def module_inputs(kind, device, dtype, training, requires_grad=True):
    info = KINDS[kind][4]
    return info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=requires_grad,
                                   training=training)


def constructor_args(kind, module_input):
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    return (args[1:] if KINDS[kind][3] else args), kwargs


def build_pair(kind, module_input, device, dtype, training):
    """(ours, nn's) from the input's constructor arguments, same initial state."""
    ours_cls, nn_cls, _, _, _ = KINDS[kind]
    args, kwargs = constructor_args(kind, module_input)
    ours = ours_cls(*args, **kwargs, device=device, dtype=dtype).train(training)
    theirs = nn_cls(*args, **kwargs, device=device, dtype=dtype).train(training)
    if not KINDS[kind][3]:
        ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def nn_output(kind, theirs, x):
    epilogue = KINDS[kind][2]
    y = theirs(x)
    return epilogue(y) if epilogue else y


def the_input(module_input):
    return module_input.forward_input.args[0]


def state(module):
    """The state_dict's values (an uninitialized lazy tensor as a marker)."""
    return {k: "uninitialized" if nn.parameter.is_lazy(v) else v.detach().clone()
            for k, v in module.state_dict().items()}


def assert_states_equal(ours, theirs, tol):
    a, b = state(ours), state(theirs)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], **tol, msg=key)


def run_step(kind, module, x, grad_output, is_ours):
    x = x.detach().requires_grad_()
    y = module(x) if is_ours else nn_output(kind, module, x)
    y.backward(grad_output)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return y.detach(), grads


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_backward_match_nn(device, kind, dtype, training):
    """Every ModuleInput: two steps of forward and backward, outputs, grads,
    running statistics and counters as nn's."""
    tol = TOLERANCES[dtype]
    for module_input in module_inputs(kind, device, dtype, training):
        ours, theirs = build_pair(kind, module_input, device, dtype, training)
        x = the_input(module_input)
        for step in range(2):
            g = torch.randn_like(x)
            y_ours, grads_ours = run_step(kind, ours, x, g, True)
            y_nn, grads_nn = run_step(kind, theirs, x, g, False)
            label = f"{module_input.desc or 'default'} step {step}"
            assert y_ours.dtype == y_nn.dtype and y_ours.shape == y_nn.shape, label
            torch.testing.assert_close(y_ours, y_nn, **tol, msg=label)
            for i, (a, b) in enumerate(zip(grads_ours, grads_nn)):
                assert (a is None) == (b is None), f"{label} grad {i}"
                if a is not None:
                    torch.testing.assert_close(a, b, **tol, msg=f"{label} grad {i}")
            assert_states_equal(ours, theirs, tol)
            for m in (ours, theirs):
                m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_error_inputs_match_nn(device, kind, training):
    """torch's error inputs (eps <= 0): our exception type and message as the
    ModuleInfo expects them, nn's raising too, our state untouched."""
    info = KINDS[kind][4]
    errors = info.module_error_inputs_func(info, device=device, dtype=torch.float32, requires_grad=False,
                                           training=training)
    assert errors, f"torch lists error inputs for {info.module_cls.__name__}"
    for error_input in errors:
        module_input = error_input.module_error_input
        ours, theirs = build_pair(kind, module_input, device, torch.float32, True)
        x = the_input(module_input)
        before = state(ours)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            nn_output(kind, theirs, x)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            ours(x)
        after = state(ours)
        assert after.keys() == before.keys()
        for key in after:
            if isinstance(before[key], str):
                # A lazy module infers its shapes before the forward's checks,
                # as nn's does: its fresh initial values, not an update.
                expected = state(theirs)[key]
                if key == "num_batches_tracked":
                    expected = torch.zeros_like(expected)  # nn counts before it raises
            else:
                expected = before[key]
            assert torch.equal(after[key], expected), f"{key} changed by a failing call"


def _first_run(kind, module_input, device, training):
    ours, theirs = build_pair(kind, module_input, device, torch.float32, training)
    x = the_input(module_input).detach()
    ours(x), theirs(x)  # a lazy module materializes; running statistics move
    return ours, theirs, x


@pytest.mark.parametrize("via", ["pickle", "torch.save", "state_dict"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_serialization_round_trip(device, kind, via):
    for module_input in module_inputs(kind, device, torch.float32, True):
        ours, _, x = _first_run(kind, module_input, device, True)
        if via == "pickle":
            restored = pickle.loads(pickle.dumps(ours))
        elif via == "torch.save":
            buffer = io.BytesIO()
            torch.save(ours, buffer)
            buffer.seek(0)
            restored = torch.load(buffer, weights_only=False)
        else:
            buffer = io.BytesIO()
            torch.save(ours.state_dict(), buffer)
            buffer.seek(0)
            restored = copy.deepcopy(ours)
            for t in restored.state_dict().values():
                t.zero_()
            restored.load_state_dict(torch.load(buffer, weights_only=True))
        assert type(restored) is type(ours)
        assert_states_equal(restored, ours, dict(rtol=0, atol=0))
        for m in (ours, restored):
            m.eval()
        torch.testing.assert_close(restored(x), ours(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_to_and_to_empty(device, kind):
    """``to(dtype)`` casts parameters and buffers as nn's does (the counter
    stays int64); ``to_empty`` from the meta device then load_state_dict gives
    a working module."""
    for module_input in module_inputs(kind, device, torch.float32, True):
        ours, theirs, x = _first_run(kind, module_input, device, True)
        ours64, theirs64 = ours.to(torch.float64), theirs.to(torch.float64)
        assert_states_equal(ours64, theirs64, TOLERANCES[torch.float32])  # a float32 step's
        x64 = x.to(torch.float64)
        torch.testing.assert_close(ours64(x64), nn_output(kind, theirs64, x64),
                                   **TOLERANCES[torch.float64])
        if KINDS[kind][3]:
            continue  # a lazy module on the meta device has no shape to make
        args, kwargs = constructor_args(kind, module_input)
        empty = KINDS[kind][0](*args, **kwargs, device="meta").to_empty(device=device)
        assert all(t.device.type == torch.device(device).type for t in empty.state_dict().values())
        empty.load_state_dict(theirs64.to(torch.float32).state_dict())
        theirs32 = theirs64.to(torch.float32)
        torch.testing.assert_close(empty.eval()(x), nn_output(kind, theirs32.eval(), x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_memory_formats_and_non_contiguous_input(device, kind, training):
    """channels_last input gives channels_last output and grads, a strided view
    is read through its strides, both with nn's values."""
    tol = TOLERANCES[torch.float32]
    for module_input in module_inputs(kind, device, torch.float32, training):
        x = the_input(module_input).detach()
        wide = torch.cat([x, x.flip(-1)], dim=-1)
        channels_last = channels_last_format(x.dim())
        layouts = {"strided": wide[..., ::2].detach()}
        if channels_last is not None:
            layouts["channels_last"] = x.contiguous(memory_format=channels_last)
        if x.dim() >= 4:
            layouts["transposed"] = x.transpose(-2, -1)
        for name, variant in layouts.items():
            ours, theirs = build_pair(kind, module_input, device, torch.float32, training)
            g = torch.randn_like(variant)
            y_ours, grads_ours = run_step(kind, ours, variant, g, True)
            y_nn, grads_nn = run_step(kind, theirs, variant.contiguous(), g.contiguous(), False)
            label = f"{module_input.desc or 'default'} {name}"
            torch.testing.assert_close(y_ours, y_nn, **tol, msg=label)
            for a, b in zip(grads_ours, grads_nn):
                if a is not None:
                    torch.testing.assert_close(a, b, **tol, msg=label)
            if name == "channels_last" and x.numel() > 0:
                assert y_ours.is_contiguous(memory_format=channels_last), label
                assert grads_ours[0].is_contiguous(memory_format=channels_last), label


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_gradcheck(device, kind, training):
    """gradcheck and gradgradcheck in float64 of the input and parameters, as
    torch's test_modules runs them."""
    for module_input in module_inputs(kind, device, torch.float64, training):
        ours, _ = build_pair(kind, module_input, device, torch.float64, training)
        x = the_input(module_input).detach()
        if x.numel() == 0:
            continue
        x = x[(slice(None), slice(None)) + (slice(0, 3),) * (x.dim() - 2)].contiguous().requires_grad_()
        # (at most 3 positions per spatial dimension: gradcheck's cost grows with numel)
        if KINDS[kind][3]:
            ours(x.detach())  # materialize the lazy parameters first
        params = [p for p in ours.parameters()]
        names = [n for n, _ in ours.named_parameters()]

        def f(x, *values):
            return torch.func.functional_call(ours, dict(zip(names, values)), (x,))

        assert torch.autograd.gradcheck(f, (x, *params))
        assert torch.autograd.gradgradcheck(f, (x, *params))
