"""Validation of every public entry point, beyond tests/test_errors.py (which
covers the input's rank and channel count, one value per channel, integer input,
running statistics of the wrong length and mixed float dtypes for
FusedBatchNorm2d and fused_bn.batch_norm):

* all three modules (FusedBatchNorm2d, FusedBatchNormReLU2d,
  FusedBatchNormAddReLU2d, and their 1d and 3d forms on input of every rank
  they take), fused_bn.batch_norm(activation=None/"relu"),
  fused_bn.batch_norm_add_relu and the raw ops torch.ops.fused_bn.*;
* bool, complex and int8 input; integer, bool and complex parameters or
  running statistics; running statistics of the wrong length or rank, or of
  another float dtype; running statistics that require grad; tensors on
  another device (a meta tensor among CPU ones everywhere, CPU among CUDA ones
  where a GPU is present); a residual of the wrong shape, dtype or device, or
  no tensor at all.

Where nn has an error, ours has nn's exception type and message (found by
running nn on the same input, never hard-coded); where nn has none, a clear
one. Every failing call leaves the module state (running statistics,
num_batches_tracked, parameters) and the functional form's tensors untouched.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_bn
from _helpers import ADD_RELU_BATCH_NORMS, BATCH_NORMS, RELU_BATCH_NORMS, assert_state_unchanged, state_of
from test_errors import _expect_same_error

ops = torch.ops.fused_bn
f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
SHAPE = (4, 3, 2, 2)

MODULE_KINDS = ("bn", "bn_relu", "bn_add_relu")
# An input of each rank the batch norms take; the modules are those of its rank.
RANK_SHAPES = {"1d-rows": (4, 3), "1d": (4, 3, 5), "2d": SHAPE, "3d": (4, 3, 1, 2, 3)}


def _classes(rank):
    """(nn's class, ours by kind) for the inputs of RANK_SHAPES[rank]."""
    dims = len(RANK_SHAPES[rank])
    return BATCH_NORMS[dims][0], {"bn": BATCH_NORMS[dims][1], "bn_relu": RELU_BATCH_NORMS[dims],
                                  "bn_add_relu": ADD_RELU_BATCH_NORMS[dims]}


def _input(dtype, device, shape=SHAPE):
    x = torch.randn(shape)
    if dtype == torch.bool:
        return (x > 0).to(device)
    if dtype.is_complex or dtype.is_floating_point:
        return x.to(dtype=dtype, device=device)
    return torch.randint(-3, 4, shape, dtype=dtype, device=device)


def _replace_buffer(name, make):
    def edit(m):
        setattr(m, name, make(getattr(m, name)))
    return edit


def _set_requires_grad(name):
    def edit(m):
        getattr(m, name).requires_grad_()
    return edit


# id: (training, input dtype, edit applied to both modules, or None)
MODULE_CASES = {
    "bool-input-train": (True, torch.bool, None),
    "bool-input-eval": (False, torch.bool, None),
    "complex-input-train": (True, torch.complex64, None),
    "complex-input-eval": (False, torch.complex64, None),
    "int8-input-train": (True, torch.int8, None),
    "running-mean-requires-grad-train": (True, f32, _set_requires_grad("running_mean")),
    "running-mean-requires-grad-eval": (False, f32, _set_requires_grad("running_mean")),
    "running-var-requires-grad-train": (True, f32, _set_requires_grad("running_var")),
    "running-var-requires-grad-eval": (False, f32, _set_requires_grad("running_var")),
    "running-mean-4-of-3-train": (True, f32, _replace_buffer("running_mean", lambda t: torch.zeros(4, device=t.device))),
    "running-var-2-of-3-eval": (False, f32, _replace_buffer("running_var", lambda t: torch.ones(2, device=t.device))),
    "running-mean-1x3-train": (True, f32, _replace_buffer("running_mean", lambda t: t.reshape(1, 3).clone())),
    "running-var-3x1-eval": (False, f32, _replace_buffer("running_var", lambda t: t.reshape(3, 1).clone())),
    "running-var-float64-train": (True, f32, _replace_buffer("running_var", lambda t: t.double())),
    "running-mean-bfloat16-eval": (False, f32, _replace_buffer("running_mean", lambda t: t.to(bf16))),
    "running-mean-int64-train": (True, f32, _replace_buffer("running_mean", lambda t: t.long())),
    "running-var-bool-eval": (False, f32, _replace_buffer("running_var", lambda t: t > 0)),
    "weight-int-train": (True, f32, lambda m: setattr(m, "weight", nn.Parameter(m.weight.long(), requires_grad=False))),
    "bias-complex-eval": (False, f32, lambda m: setattr(m, "bias", nn.Parameter(m.bias.to(torch.complex64)))),
    "weight-float64-eval": (False, f32, lambda m: setattr(m, "weight", nn.Parameter(m.weight.double()))),
}


def _module_pair(kind, device, edit, training, rank="2d"):
    nn_cls, fused_classes = _classes(rank)
    theirs = nn_cls(3)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
        theirs.running_mean.uniform_(-0.5, 0.5)
        theirs.running_var.uniform_(0.5, 1.5)
        theirs.num_batches_tracked.fill_(5)
    theirs = theirs.to(device)
    ours = fused_classes[kind](3).to(device)
    ours.load_state_dict(theirs.state_dict())
    for m in (theirs, ours):
        if edit is not None:
            edit(m)
        m.train(training)
    return theirs, ours


def _eager(kind, bn, x, residual):
    """What each fused module replaces, in eager PyTorch."""
    y = bn(x)
    if kind == "bn":
        return y
    return torch.relu(y if kind == "bn_relu" else y + residual)


def _call(kind, module, x, residual):
    return module(x, residual) if kind == "bn_add_relu" else module(x)


@pytest.mark.parametrize("case", list(MODULE_CASES))
@pytest.mark.parametrize("kind", MODULE_KINDS)
@pytest.mark.parametrize("rank", list(RANK_SHAPES))
def test_module_error_matches_nn(device, rank, kind, case):
    training, input_dtype, edit = MODULE_CASES[case]
    theirs, ours = _module_pair(kind, device, edit, training, rank)
    shape = RANK_SHAPES[rank]
    x = _input(input_dtype, device, shape)
    residual = _input(input_dtype, device, shape)  # same shape and dtype: the fused path
    before = state_of(ours)
    _expect_same_error(lambda: _eager(kind, theirs, x, residual), lambda: _call(kind, ours, x, residual),
                       f"[{rank} {kind} {case}]")
    assert_state_unchanged(ours, before, f"[{rank} {kind} {case}] after the error")


@pytest.mark.parametrize("kind", MODULE_KINDS)
def test_module_stats_requiring_grad_allowed_under_no_grad(device, kind):
    """nn refuses running statistics that require grad only while grad mode is
    on; under no_grad both run (and update them) alike."""
    theirs, ours = _module_pair(kind, device, _set_requires_grad("running_mean"), True)
    x = _input(f32, device)
    residual = _input(f32, device)
    with torch.no_grad():
        expected = _eager(kind, theirs, x, residual)
        got = _call(kind, ours, x, residual)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    assert ours.running_mean.requires_grad
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 6


# ---------------------------------------------------------------- other devices

def _off_device_edits(other):
    return {
        "input": None,
        "weight": lambda m: setattr(m, "weight", nn.Parameter(m.weight.detach().to(other))),
        "bias": lambda m: setattr(m, "bias", nn.Parameter(m.bias.detach().to(other))),
        "running_mean": _replace_buffer("running_mean", lambda t: t.to(other)),
        "running_var": _replace_buffer("running_var", lambda t: t.to(other)),
    }


def _check_off_device(kind, device, other, which, training):
    edit = _off_device_edits(other)[which]
    theirs, ours = _module_pair(kind, device, edit, training)
    x = _input(f32, other if which == "input" else device)
    residual = _input(f32, device)
    # meta tensors hold no values to compare
    before = {k: v for k, v in state_of(ours).items() if v is None or v.device.type != "meta"}
    with pytest.raises(RuntimeError) as nn_exc:
        _eager(kind, theirs, x, residual)
    with pytest.raises(RuntimeError) as our_exc:
        _call(kind, ours, x, residual)
    label = f"[{kind} {which} on {other}, module on {device}, training={training}]"
    assert_state_unchanged(ours, before, f"{label} after the error")
    return str(nn_exc.value), str(our_exc.value), label


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["input", "weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("kind", MODULE_KINDS)
def test_module_tensor_on_meta_device(kind, which, training):
    """A meta tensor among CPU ones sends the op to its fake kernel, which used
    to return an uninitialized tensor; now it raises as the real kernels do
    (nn raises a RuntimeError too, with its meta kernel's wording)."""
    nn_msg, our_msg, label = _check_off_device(kind, "cpu", "meta", which, training)
    off, on = ("meta", "cpu") if which != "input" else ("cpu", "meta")
    if kind == "bn_add_relu" and which == "input":
        # the residual (on the CPU) is off the input's device: eager's own add error
        assert our_msg == "Tensor on device cpu is not on the expected device meta!", f"{label}: {our_msg}"
    else:
        name = which if which != "input" else "running_mean"
        assert our_msg == (f"Expected all tensors to be on the same device, but {name} is on {off} and "
                           f"input is on {on}"), f"{label}: {our_msg}"


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["input", "weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("kind", MODULE_KINDS)
def test_module_tensor_on_cpu_with_cuda_module(kind, which, training):
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    nn_msg, our_msg, label = _check_off_device(kind, "cuda", "cpu", which, training)
    prefix = "Expected all tensors to be on the same device"
    assert nn_msg.startswith(prefix), f"{label}: nn says {nn_msg!r}"
    assert our_msg.startswith(prefix), f"{label}: ours says {our_msg!r} (nn: {nn_msg!r})"


# ---------------------------------------------------------------- the residual

def _residual_cases(device):
    other = "meta" if device == "cpu" else "cpu"
    return {
        "other-device": lambda x: x.detach().to(other),
        "other-device-scalar-shape": lambda x: torch.ones(1, 3, 1, 1, device=other),
        "complex": lambda x: x.detach().to(torch.complex64),
        "string": lambda x: "identity",
        "none": lambda x: None,
        "list": lambda x: [1.0, 2.0],
        "too-many-dims": lambda x: torch.zeros(2, 1, 1, 1, 1, device=x.device),
        "wrong-width": lambda x: torch.zeros(4, 3, 2, 3, device=x.device),
    }


@pytest.mark.parametrize("case", list(_residual_cases("cpu")))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_add_relu_module_bad_residual(device, training, case):
    """A residual eager `relu(bn(x) + residual)` cannot add: our module raises
    what eager raises (or, for one that would broadcast the output, its own
    error), before any state changes. Before this test the eager fallback ran
    the batch norm first, so the counter and running statistics moved."""
    theirs, ours = _module_pair("bn_add_relu", device, None, training)
    x = _input(f32, device)
    residual = _residual_cases(device)[case](x)
    before = state_of(ours)
    if case == "too-many-dims":
        with pytest.raises(RuntimeError, match=r"residual of shape \[2, 1, 1, 1, 1\] broadcasts the output"):
            ours(x, residual)
    elif case == "wrong-width":
        # the module's shape check (torch.broadcast_shapes' wording, see
        # tests/test_fused_relu.py), ahead of eager's add
        with pytest.raises(RuntimeError, match="Attempting to broadcast a dimension of length 3 at -1"):
            ours(x, residual)
        with pytest.raises(RuntimeError, match="must match the size of tensor b"):
            _eager("bn_add_relu", theirs, x, residual)
    else:
        _expect_same_error(lambda: _eager("bn_add_relu", theirs, x, residual), lambda: ours(x, residual),
                           f"[residual {case}]")
    assert_state_unchanged(ours, before, f"[residual {case}] after the error")


@pytest.mark.parametrize("residual_kind", ["int64", "bool", "0-d-float64", "python-float"])
def test_add_relu_module_promoting_residual_still_works(device, residual_kind):
    """The eager fallback for a residual that promotes is kept, and its dry run
    does not get in the way."""
    theirs, ours = _module_pair("bn_add_relu", device, None, True)
    x = _input(f32, device)
    residual = {"int64": lambda: _input(torch.int64, device), "bool": lambda: _input(torch.bool, device),
                "0-d-float64": lambda: torch.tensor(0.25, dtype=f64, device=device),
                "python-float": lambda: 0.25}[residual_kind]()
    expected = _eager("bn_add_relu", theirs, x, residual)
    got = ours(x, residual)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 6


# ---------------------------------------------------------------- functional forms

def _functional_tensors(device, input_dtype=f32, rm=(3, f32), rv=(3, f32), weight=(3, f32), bias=(3, f32),
                        rm_grad=False, rv_grad=False):
    def t(spec, fill, requires_grad=False):
        if spec is None:
            return None
        shape, dtype = spec
        shape = (shape,) if isinstance(shape, int) else shape
        value = torch.full(shape, fill, device=device)
        value = (value > 0) if dtype == torch.bool else value.to(dtype)
        return value.requires_grad_() if requires_grad else value
    return (_input(input_dtype, device), t(rm, 0.25, rm_grad), t(rv, 1.5, rv_grad), t(weight, 1.25),
            t(bias, -0.5))


# id: (training, spec for _functional_tensors)
FUNCTIONAL_CASES = {
    "bool-input-train": (True, dict(input_dtype=torch.bool)),
    "complex-input-eval": (False, dict(input_dtype=torch.complex128)),
    "int8-input-no-params": (True, dict(input_dtype=torch.int8, rm=None, rv=None, weight=None, bias=None)),
    "running-mean-requires-grad-train": (True, dict(rm_grad=True)),
    "running-var-requires-grad-eval": (False, dict(rv_grad=True)),
    "running-mean-1x3-train": (True, dict(rm=((1, 3), f32))),
    "running-var-3x1-eval": (False, dict(rv=((3, 1), f32))),
    "running-var-5-of-3-eval": (False, dict(rv=(5, f32))),
    "running-mean-int-train": (True, dict(rm=(3, torch.int64))),
    "running-var-bool-eval": (False, dict(rv=(3, torch.bool))),
    "weight-complex-train": (True, dict(weight=(3, torch.complex64))),
    "bias-int32-eval": (False, dict(bias=(3, torch.int32))),
    "weight-bfloat16-train": (True, dict(weight=(3, bf16))),
    "running-mean-float64-eval": (False, dict(rm=(3, f64))),
}


def _snapshots(*tensors):
    return [None if t is None else t.detach().clone() for t in tensors]


def _assert_unchanged(tensors, snapshots, label):
    for i, (t, s) in enumerate(zip(tensors, snapshots)):
        if t is not None and t.device.type != "meta":  # meta tensors hold no values
            assert torch.equal(t, s), f"{label}: argument {i} changed by a failing call"


@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
@pytest.mark.parametrize("entry", ["batch_norm", "batch_norm_relu", "batch_norm_add_relu"])
def test_functional_error_matches_F(device, entry, case):
    training, spec = FUNCTIONAL_CASES[case]
    x, rm, rv, w, b = _functional_tensors(device, **spec)
    residual = x.clone()
    counter = torch.tensor(7, device=device)
    snaps = _snapshots(rm, rv, w, b, counter)

    def ours():
        kwargs = dict(num_batches_tracked=counter if training else None)
        if entry == "batch_norm_add_relu":
            return fused_bn.batch_norm_add_relu(x, residual, rm, rv, w, b, training, 0.1, 1e-5, **kwargs)
        return fused_bn.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5,
                                   activation="relu" if entry == "batch_norm_relu" else None, **kwargs)

    clone = lambda t: None if t is None else t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
    _expect_same_error(lambda: F.batch_norm(x, clone(rm), clone(rv), w, b, training, 0.1, 1e-5), ours,
                       f"[{entry} {case}]")
    _assert_unchanged((rm, rv, w, b, counter), snaps, f"[{entry} {case}]")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["input", "running_mean", "weight", "bias", "residual", "num_batches_tracked"])
def test_functional_tensor_on_another_device(device, which, training):
    other = "meta" if device == "cpu" else "cpu"
    if which == "num_batches_tracked" and not training:
        pytest.skip("the counter is read in training only")
    tensors = dict(zip(("input", "running_mean", "running_var", "weight", "bias"),
                       _functional_tensors(device)))
    tensors["residual"] = tensors["input"].clone()
    tensors["num_batches_tracked"] = torch.tensor(7, device=device)
    tensors[which] = tensors[which].to(other)
    snaps = _snapshots(*tensors.values())
    t = tensors
    calls = (
        lambda: fused_bn.batch_norm(t["input"], t["running_mean"], t["running_var"], t["weight"], t["bias"],
                                    training, num_batches_tracked=t["num_batches_tracked"] if training else None),
        lambda: fused_bn.batch_norm_add_relu(t["input"], t["residual"], t["running_mean"], t["running_var"],
                                             t["weight"], t["bias"], training,
                                             num_batches_tracked=t["num_batches_tracked"] if training else None),
    )
    for call in calls[1:] if which == "residual" else calls:
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device, but") as e:
            call()
        if which != "input":
            assert f"{which} is on {other}" in str(e.value), str(e.value)
        _assert_unchanged(tensors.values(), snaps, f"[{which} on {other}]")


# ---------------------------------------------------------------- raw ops

@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_raw_ops_refuse_stats_requiring_grad(device, which):
    """The ops' own autograd refuses running statistics that require grad (as
    autograd does for nn's native_batch_norm), naming the op, before the
    training op updates anything; under no_grad they run."""
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    stats = {"running_mean": torch.zeros(3, device=device), "running_var": torch.ones(3, device=device)}
    stats[which].requires_grad_()
    counter = torch.tensor(2, device=device)
    rm, rv = stats["running_mean"], stats["running_var"]
    for op_name, call in (
        ("fused_bn::batch_norm_train", lambda: ops.batch_norm_train(x, None, None, rm, rv, counter, 0.1, 1e-5)),
        ("fused_bn::batch_norm_eval", lambda: ops.batch_norm_eval(x, None, None, rm, rv, 1e-5)),
    ):
        snaps = _snapshots(rm, rv, counter)
        expected = (f"The function '{op_name}' is not differentiable with respect to argument '{which}'. "
                    f"This input cannot have requires_grad True.")
        with pytest.raises(RuntimeError) as e:
            call()
        assert str(e.value) == expected
        _assert_unchanged((rm, rv, counter), snaps, op_name)
        with torch.no_grad():
            call()
    # the no_grad training call did run: the counter moved once
    assert int(counter) == 3


def _backward_args(device):
    x = torch.randn(SHAPE, device=device)
    with torch.no_grad():
        y, mean, invstd = ops.batch_norm_train(x, None, None, None, None, None, 0.1, 1e-5, "relu", [], x.clone())
    return dict(grad_output=torch.randn_like(x), output=y, input=x, weight=torch.ones(3, device=device),
                mean=mean, invstd=invstd)


# id: (edit of the backward arguments, expected message regex)
BACKWARD_CASES = {
    "grad-output-shape": (lambda a: a.update(grad_output=a["grad_output"][..., :1]),
                          r"grad_output of shape \[4, 3, 2, 1\] does not match input of shape \[4, 3, 2, 2\]"),
    "grad-output-dtype": (lambda a: a.update(grad_output=a["grad_output"].double()),
                          "grad_output dtype Double does not match input dtype Float"),
    "mean-dtype": (lambda a: a.update(mean=a["mean"].double()),
                   "mean and invstd must be Float for Float input"),
    "invstd-length": (lambda a: a.update(invstd=a["invstd"][:2]), "invstd should contain 3 elements not 2"),
    "weight-dtype": (lambda a: a.update(weight=a["weight"].double()),
                     r"mixed dtype \(\w+\): expect parameter to have scalar type of Float"),
    "bool-input": (lambda a: a.update(input=a["input"] > 0, grad_output=a["grad_output"] > 0),
                   "\"batch_norm\" not implemented for 'Bool'"),
    "output-shape": (lambda a: a.update(output=a["output"][:2]),
                     r"output of shape \[2, 3, 2, 2\] does not match input"),
    "weight-on-meta": (lambda a: a.update(weight=a["weight"].to("meta")),
                       "Expected all tensors to be on the same device, but weight is on meta"),
    "grad-output-on-meta": (lambda a: a.update(grad_output=a["grad_output"].to("meta")),
                            "Expected all tensors to be on the same device, but grad_output is on meta"),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES))
# batch_norm_backward_add_relu: batch_norm_backward with "relu" and the forward's output
# (what batch_norm_add_relu_backward was).
@pytest.mark.parametrize("op", ["batch_norm_backward", "batch_norm_backward_add_relu"])
def test_raw_backward_ops_validate(device, op, case):
    edit, message = BACKWARD_CASES[case]
    if device != "cpu" and "meta" in case:
        pytest.skip("the meta cases are CPU ones")
    if op == "batch_norm_backward" and case == "output-shape":
        pytest.skip("batch_norm_backward takes no output")
    a = _backward_args(device)
    edit(a)
    mask = [True, True, True]
    exc = NotImplementedError if case == "bool-input" else RuntimeError
    with pytest.raises(exc, match=message):
        if op == "batch_norm_backward":
            ops.batch_norm_backward(a["grad_output"], a["input"], a["weight"], a["mean"], a["invstd"], True, 1e-5, mask)
        else:
            ops.batch_norm_backward(a["grad_output"], a["input"], a["weight"], a["mean"], a["invstd"], True, 1e-5,
                                    mask, None, "relu", [], None, a["output"])
