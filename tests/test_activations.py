"""Every fused activation, with and without a residual: parity with nn's
composite (nn's batch norm, then + residual, then nn's activation module)
under the accuracy rule (tests/_accuracy.py), on every rank, precision and
layout; gradcheck, gradgradcheck and forward AD in float64; opcheck of the
ops with activations; what autograd saves; torch.compile and torch.export;
errors. The full cross product runs on the CPU; on the emulated GPU a covering
subset (every activation with every precision, both residual forms, both
layouts and every shape)."""
import copy
import itertools
import re

import pytest
import torch
from torch import nn

import fused_bn
from _accuracy import assert_accurate
from _helpers import BATCH_NORMS, PRECISIONS, F32, F64, channels_last_format
from conftest import EMULATED_CUDA

ops = torch.ops.fused_bn

# (id, nn module) for each supported activation, parameters as real models
# use them and off their defaults.
ACTIVATIONS = [
    ("none", None),
    ("relu", nn.ReLU()),
    ("relu6", nn.ReLU6()),
    ("hardtanh", nn.Hardtanh(-0.75, 1.25)),
    ("leaky_relu_0.1", nn.LeakyReLU(0.1)),
    ("leaky_relu_neg", nn.LeakyReLU(-0.2)),
    ("elu_0.7", nn.ELU(0.7)),
    ("silu", nn.SiLU()),
    ("hardswish", nn.Hardswish()),
    ("gelu", nn.GELU()),
    ("gelu_tanh", nn.GELU(approximate="tanh")),
    ("hardsigmoid", nn.Hardsigmoid()),
]
ACTIVATION_IDS = [name for name, _ in ACTIVATIONS]
MODULES = dict(ACTIVATIONS)

# Shapes over the ranks: C = 1, N = 1, H·W = 1, primes, (N, C) rows.
SHAPES = [(4, 5, 3, 7), (6, 7, 1, 1), (3, 1, 4, 9), (5, 11), (1, 3, 13), (2, 3, 2, 3, 5)]
LAYOUTS = ["contiguous", "channels_last"]


def _cases():
    cases = list(itertools.product(ACTIVATION_IDS, [False, True], PRECISIONS))
    if not EMULATED_CUDA:
        return [(a, r, p, layout, shape) for (a, r, p), layout, shape in itertools.product(cases, LAYOUTS, SHAPES)]
    # The emulated GPU: each (activation, residual, precision) once, layout
    # and shape rotating, so every activation meets every shape and layout and
    # every precision meets every layout.
    return [(a, r, p, LAYOUTS[i % 2], SHAPES[(i // 2) % len(SHAPES)]) for i, (a, r, p) in enumerate(cases)]


def _sample(shape, dtype, layout, *, mean=0.3, std=1.5):
    t = (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)
    fmt = channels_last_format(len(shape))
    if layout == "channels_last" and fmt is not None:
        t = t.contiguous(memory_format=fmt)
    return t


def _act(name):
    module = MODULES[name]
    return nn.Identity() if module is None else module


class _ExactHardsigmoid(nn.Module):
    """hardsigmoid for the float64 references: nn's float64 backward multiplies
    by (double)(1.0f / 6.0f), 3e-8 off, which would make an exact 1/6 look
    3e-8 wrong; relu6(u + 3) / 6 has the same forward and the exact derivative."""

    def forward(self, u):
        return nn.functional.relu6(u + 3) / 6


def _reference_act(name):
    """The activation of the float64 references."""
    return _ExactHardsigmoid() if name == "hardsigmoid" else _act(name)


class _Composite(nn.Module):
    """nn's composite: act(bn(x) [+ residual])."""

    def __init__(self, bn, act):
        super().__init__()
        self.bn, self.act = bn, act

    def forward(self, x, residual=None):
        z = self.bn(x)
        return self.act(z if residual is None else z + residual)


def _trio(name, shape, precision, device):
    C = shape[1]
    nn_cls, fused_cls = BATCH_NORMS[len(shape)]
    reference = nn_cls(C, dtype=torch.float64)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    theirs = nn_cls(C).to(device=device, dtype=precision.param_dtype)
    theirs.load_state_dict(reference.state_dict())
    ours = fused_cls(C, activation=MODULES[name]).to(device=device, dtype=precision.param_dtype)
    ours.load_state_dict(reference.state_dict())
    return ours, _Composite(theirs, _act(name)), _Composite(reference, _reference_act(name))


def _step(module, x, residual, gy, params):
    x = x.detach().requires_grad_()
    r = None if residual is None else residual.detach().requires_grad_()
    y = module(x, r) if r is not None else module(x)
    grads = torch.autograd.grad(y, [x] + ([r] if r is not None else []) + params, gy)
    return [y] + list(grads)


@pytest.mark.parametrize("name,residual,precision,layout,shape", _cases(), ids=str)
def test_parity_with_nn_composite(name, residual, precision, layout, shape, device):
    ours, theirs, reference = _trio(name, shape, precision, device)
    label = f"[{name} residual={residual} {precision} {layout} {shape} {device}]"
    for step, training in enumerate([True, True, False]):
        for m in (ours, theirs, reference):
            m.train(training)
        x = _sample(shape, precision.input_dtype, layout).to(device)
        r = _sample(shape, precision.input_dtype, layout, mean=0.0, std=1.0).to(device) if residual else None
        gy = _sample(shape, precision.input_dtype, layout, mean=0.0, std=1.0).to(device)
        results = [
            _step(ours, x, r, gy, [ours.weight, ours.bias]),
            _step(theirs, x, r, gy, [theirs.bn.weight, theirs.bn.bias]),
            _step(reference, x.double(), None if r is None else r.double(), gy.double(),
                  [reference.bn.weight, reference.bn.bias]),
        ]
        names = ["output", "grad_input"] + (["grad_residual"] if residual else []) + ["grad_weight", "grad_bias"]
        for i, what in enumerate(names):
            o, n, f = (res[i] for res in results)
            assert o.dtype == n.dtype, f"{label} {what}: dtype {o.dtype}, nn's {n.dtype}"
            if what in ("output", "grad_input", "grad_residual"):
                fmt = channels_last_format(len(shape)) if layout == "channels_last" else None
                if fmt is not None and 1 not in shape[1:]:
                    assert o.is_contiguous(memory_format=fmt), f"{label} {what}: layout not kept"
            assert_accurate(o, n, f, dtype=precision.input_dtype if what.startswith("grad_") and what != "grad_weight"
                            and what != "grad_bias" else None, name=f"{label} step {step} {what}")
        if training:
            for stat in ("running_mean", "running_var"):
                assert_accurate(getattr(ours, stat), getattr(theirs.bn, stat), getattr(reference.bn, stat),
                                name=f"{label} step {step} {stat}")
            assert int(ours.num_batches_tracked) == int(theirs.bn.num_batches_tracked)


# ------------------------------------------------ transcendentals over their whole range

def _relative_errors(value, reference, dtype=torch.float32):
    """|value - reference| / |reference| element by element where the reference
    is a normal number of ``dtype`` (a tiny or zero reference has no meaningful
    relative error, and a subnormal result of a narrow type carries its own)."""
    v, r = value.double(), reference
    tiny = torch.finfo(dtype).tiny
    mask = torch.isfinite(r) & (r.abs() >= tiny)
    return torch.where(mask, (v - r).abs() / r.abs().clamp_min(tiny), torch.zeros_like(r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["silu", "elu_0.7", "gelu", "gelu_tanh"])
def test_transcendental_epilogues_hold_relative_accuracy_over_the_whole_range(name, layout, dtype, device):
    """The costly activations evaluate exp, erf and the sigmoids' division with
    our own vector code on the CPU (csrc/cpu/vec.h: exp_inlined, expm1_inlined,
    divide, times_sigmoid; for bfloat16 and float16 outputs their narrow-output
    forms): element by
    element, over u from -100 to 100 and the special values, the forward and
    the derivative stay within twice nn's own worst relative error (plus one
    float32 ulp), with NaN and inf where nn has them. Eval with unit statistics
    and eps = 0 (float32 parameters, the mixed case for the narrow types), so
    u = x exactly and nothing but the activation contributes error."""
    torch.manual_seed(11)
    C = 2
    u = torch.cat([torch.linspace(-100, 100, 40_000, dtype=torch.float64),
                   torch.randn(20_000, dtype=torch.float64) * 3,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.0, 87.4, 88.5, 88.8, 89.0, -87.0, -87.4, -88.5,
                                 -88.8, -89.0, -103.0, -104.0, float("inf"), float("-inf"), float("nan")],
                                dtype=torch.float64)]).to(dtype)
    u = u[: u.numel() // (C * 16) * (C * 16)]  # whole (N, C, 4, 4) images
    x = u.reshape(-1, C, 4, 4)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    gy = torch.ones_like(x)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    w, b = torch.ones(C, device=device), torch.zeros(C, device=device)
    module = MODULES[name]
    xr = x.detach().requires_grad_()
    ours = fused_bn.batch_norm(xr, rm, rv, w, b, False, eps=0.0, activation=module)
    assert ours.dtype == dtype
    (ours_grad,) = torch.autograd.grad(ours, xr, gy)
    xn = x.detach().requires_grad_()
    theirs = module(xn)
    (theirs_grad,) = torch.autograd.grad(theirs, xn, gy)
    x64 = x.detach().double().requires_grad_()
    reference = module(x64)
    (reference_grad,) = torch.autograd.grad(reference, x64, gy.double())
    ulp = torch.finfo(torch.float32).eps
    for what, o, n, r in (("output", ours, theirs, reference), ("derivative", ours_grad, theirs_grad, reference_grad)):
        o, n, r = o.detach().cpu(), n.detach().cpu(), r.detach().cpu()
        assert torch.equal(o.isnan(), n.isnan()), f"{name} {what}: NaN where nn has none, or none where nn has"
        assert torch.equal(o.isinf(), n.isinf()), f"{name} {what}: inf where nn has none, or none where nn has"
        err_ours, err_nn = _relative_errors(o, r, dtype), _relative_errors(n, r, dtype)
        worst = int(err_ours.argmax())
        assert float(err_ours.max()) <= 2 * float(err_nn.max()) + ulp, (
            f"{name} {what} {layout} {dtype}: relative error {float(err_ours.max()):.3e} at u = "
            f"{float(x.detach().cpu().reshape(-1)[worst]):.9g} exceeds 2 x nn's {float(err_nn.max()):.3e} + one ulp")


# ---------------------------------------------------------------- float64 derivatives

# Inputs away from each activation's kinks (a finite difference across one
# is not a derivative): a fixed draw, checked below.
def _smooth_case(name, residual, training, device):
    torch.manual_seed(3)
    shape = (3, 2, 3, 2)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    r = torch.randn(shape, dtype=torch.float64, device=device) * 0.5 if residual else None
    w = torch.rand(2, dtype=torch.float64, device=device) + 0.5
    b = torch.rand(2, dtype=torch.float64, device=device) - 0.5
    rm = torch.zeros(2, dtype=torch.float64, device=device)
    rv = torch.ones(2, dtype=torch.float64, device=device) * 1.5
    return x, r, w, b, rm, rv


def _functional(name, training, rm, rv):
    module = MODULES[name]

    def f(x, w, b, r=None):
        return fused_bn.batch_norm(x, None if training else rm, None if training else rv, w, b, training,
                                   activation=module, residual=r)
    return f


def _distance_to_kinks(name, u):
    kinks = {"relu": [0.0], "relu6": [0.0, 6.0], "hardtanh": [-0.75, 1.25], "leaky_relu_0.1": [0.0],
             "leaky_relu_neg": [0.0], "elu_0.7": [0.0], "hardswish": [-3.0, 3.0],
             "hardsigmoid": [-3.0, 3.0]}.get(name, [])
    return min([float((u - k).abs().min()) for k in kinks], default=float("inf"))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("name", ACTIVATION_IDS)
def test_gradcheck_and_gradgradcheck(name, residual, training, device):
    x, r, w, b, rm, rv = _smooth_case(name, residual, training, device)
    f = _functional(name, training, rm, rv)
    with torch.no_grad():
        u = f(x, w, b, r) if name == "none" else fused_bn.batch_norm(
            x, None if training else rm, None if training else rv, w, b, training, residual=r)
    assert _distance_to_kinks(name, u) > 1e-3, "the draw lies on a kink; pick another seed"
    inputs = [t.requires_grad_() for t in (x, w, b) + ((r,) if residual else ())]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("name", ACTIVATION_IDS)
def test_forward_ad_matches_nn(name, residual, training, device):
    x, r, w, b, rm, rv = _smooth_case(name, residual, training, device)
    f = _functional(name, training, rm, rv)
    nn_bn = nn.BatchNorm2d(2, dtype=torch.float64, device=device).train(training)
    with torch.no_grad():
        nn_bn.running_mean.copy_(rm)
        nn_bn.running_var.copy_(rv)
    act = _reference_act(name)

    def g(x, w, b, r=None):
        z = nn.functional.batch_norm(x, None if training else rm, None if training else rv, w, b, training)
        return act(z if r is None else z + r)

    primals = (x, w, b) + ((r,) if residual else ())
    tangents = tuple(torch.randn_like(p) for p in primals)
    ours = torch.func.jvp(f, primals, tangents)
    theirs = torch.func.jvp(g, primals, tangents)
    for o, t, what in zip(ours, theirs, ("output", "tangent")):
        torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-10, msg=f"{name} {what}")


# ---------------------------------------------------------------- the ops

OP_ACTIVATIONS = [("identity", []), ("relu", []), ("hardtanh", [0.0, 6.0]), ("leaky_relu", [0.1]), ("elu", [0.5]),
                  ("silu", []), ("hardswish", []), ("gelu", []), ("gelu_tanh", []), ("hardsigmoid", [])]


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation,params", OP_ACTIVATIONS, ids=[a for a, _ in OP_ACTIVATIONS])
def test_opcheck_with_activations(activation, params, residual, device):
    x = torch.randn(3, 4, 5, 2, device=device)
    r = torch.randn_like(x) if residual else None
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    nbt = torch.tensor(0, device=device)
    torch.library.opcheck(ops.batch_norm_train.default, (x, w, b, rm, rv, nbt, 0.1, 1e-5, activation, params, r))
    torch.library.opcheck(ops.batch_norm_eval.default, (x, w, b, rm, rv, 1e-5, activation, params, r))
    y, mean, invstd = ops.batch_norm_train(x, w, b, None, None, None, 0.1, 1e-5, activation, params, r)
    gy = torch.randn_like(x)
    from_output = residual and ops.activation_grad_from_output(activation, params, x.dtype)
    args = (gy, x, w, mean, invstd, True, 1e-5, [True, True, True], b, activation, params,
            None if from_output else r, y if from_output else None)
    torch.library.opcheck(ops.batch_norm_backward.default, args)


def test_grad_residual_is_written_only_where_the_backward_computes_it():
    x = torch.randn(2, 3, 4, 4)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    y, mean, invstd = ops.batch_norm_train(x, w, b, None, None, None, 0.1, 1e-5, "silu", [], x)
    gy = torch.randn_like(x)
    _, _, _, g = ops.batch_norm_backward(gy, x, w, mean, invstd, True, 1e-5, [True, True, True], b, "silu", [], x)
    assert g.shape == x.shape
    _, _, _, g = ops.batch_norm_backward(gy, x, w, mean, invstd, True, 1e-5, [True, True, True], b, "silu", [])
    assert g.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_activation_grad_from_output_follows_the_definitions(dtype):
    rounded = dtype in (torch.float16, torch.bfloat16)
    assert ops.activation_grad_from_output("relu", [], dtype)
    # A bound of hardtanh is only told from y where y is u itself.
    assert ops.activation_grad_from_output("hardtanh", [0.0, 6.0], dtype) == (not rounded)
    assert ops.activation_grad_from_output("leaky_relu", [0.1], dtype)
    assert not ops.activation_grad_from_output("leaky_relu", [-0.1], dtype)
    for name in ("identity", "silu", "hardswish", "gelu", "gelu_tanh", "hardsigmoid"):
        assert not ops.activation_grad_from_output(name, [], dtype)
    assert not ops.activation_grad_from_output("elu", [1.0], dtype)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relu6_mask_follows_u_where_y_rounds_onto_the_bound(dtype, training):
    """u = bn(x) + r just below 6 gives y = 6 once rounded to half or
    bfloat16: the backward's mask is u's, as the forward computed it (the
    gradient passes), not the rounded y's. Found by the property test
    (bfloat16, u = 5.99, ours 0 where nn and the float64 reference pass it)."""
    n = 4
    # training: the batch statistics put x̂ = ±1; eval: the running ones, x̂ ≈ x.
    x = torch.tensor([4.0, 6.0] * (n // 2) if training else [5.0] * n).view(n, 1, 1, 1).to(dtype)
    r = torch.full_like(x, 0.999 if not training else 4.999)
    rm, rv = torch.zeros(1), torch.ones(1)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = fused_bn.batch_norm(xs, None if training else rm, None if training else rv, training=training,
                            activation="relu6", residual=rs)
    y.backward(torch.ones_like(y))
    u = torch.nn.functional.batch_norm(x.double(), None if training else rm.double(),
                                       None if training else rv.double(), training=training) + r.double()
    inside = (u > 0) & (u < 6)
    assert bool(((u > 5.98) & inside).any()), "the case must put some u just below 6"
    assert bool((y.float()[(u > 5.98) & inside] == 6).all()), "y must round onto the bound there"
    assert torch.equal(rs.grad, inside.to(dtype)), f"grad_residual {rs.grad.flatten()} for u {u.flatten()}"


# ---------------------------------------------------------------- what autograd keeps

def _saved_bytes(fn):
    """Bytes of the tensors autograd saves while fn() runs, each storage once."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("name", ["relu", "leaky_relu_0.1", "silu", "hardswish", "gelu"])
def test_autograd_saves_no_more_than_the_input_and_statistics(name, residual):
    """Without a residual: the input and the per-channel statistics (nn's
    composite also keeps the activation's input, except for an in-place ReLU).
    With one: also the output (derivative read from y) or the residual."""
    shape = (4, 8, 16, 16)
    x = torch.randn(shape, requires_grad=True)
    r = torch.randn(shape, requires_grad=True) if residual else None
    m = fused_bn.FusedBatchNorm2d(8, activation=MODULES[name])
    saved, _ = _saved_bytes(lambda: m(x, r) if residual else m(x))
    tensor_bytes = x.numel() * x.element_size()
    expected = tensor_bytes * (2 if residual else 1)
    assert expected <= saved <= expected + 4096, f"saved {saved} bytes, expected {expected} (+ statistics)"
    composite = _Composite(nn.BatchNorm2d(8), _act(name))
    theirs, _ = _saved_bytes(lambda: composite(x, r))
    assert saved < theirs, f"ours saves {saved} bytes, nn's composite {theirs}"


# ---------------------------------------------------------------- API and errors

def test_names_and_modules_resolve_to_the_same_activation():
    from fused_bn._activations import resolve

    assert resolve("relu6") == resolve(nn.ReLU6()) == fused_bn.Activation("hardtanh", (0.0, 6.0))
    assert resolve(nn.LeakyReLU(0.1, inplace=True)) == fused_bn.Activation("leaky_relu", (0.1,))
    assert resolve("leaky_relu") == fused_bn.Activation("leaky_relu", (0.01,))
    assert resolve(nn.GELU(approximate="tanh")) == fused_bn.Activation("gelu_tanh")
    assert resolve(None) == resolve(nn.Identity()) == resolve("identity")
    for name in fused_bn.ACTIVATIONS:
        spec = resolve(name)
        assert resolve(spec.module()) == spec, name


@pytest.mark.parametrize("bad", ["tanh", nn.Tanh(), nn.CELU(), 3])
def test_unsupported_activation_raises_naming_the_supported(bad):
    with pytest.raises(ValueError, match="silu.*hardswish|leaky_relu"):
        fused_bn.FusedBatchNorm2d(4, activation=bad)
    with pytest.raises(ValueError, match="unsupported activation"):
        fused_bn.batch_norm(torch.randn(2, 4, 3, 3), None, None, training=True, activation=bad)


def test_ops_check_the_activation_and_its_parameters():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="unsupported activation 'mish2'.*supported: identity, relu"):
        ops.batch_norm_train(x, None, None, None, None, None, 0.1, 1e-5, "mish2", [])
    with pytest.raises(ValueError, match="'leaky_relu' takes 1 parameter"):
        ops.batch_norm_eval(x, None, None, torch.zeros(3), torch.ones(3), 1e-5, "leaky_relu", [])
    with pytest.raises(ValueError, match="max_val must be greater than min_val"):
        ops.batch_norm_train(x, None, None, None, None, None, 0.1, 1e-5, "hardtanh", [1.0, 1.0])


def test_bad_activation_leaves_the_module_state_untouched():
    m = fused_bn.FusedBatchNorm2d(3)
    m._activation = fused_bn.Activation("leaky_relu", ())  # a parameter missing
    before = (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
    with pytest.raises(ValueError):
        m(torch.randn(2, 3, 4, 4))
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])
    assert int(m.num_batches_tracked) == before[2]


def test_aliases_keep_their_state_dict_and_activation():
    relu = fused_bn.FusedBatchNormReLU2d(4)
    add_relu = fused_bn.FusedBatchNormAddReLU2d(4)
    plain = fused_bn.FusedBatchNorm2d(4, activation="relu")
    assert relu.activation == add_relu.activation == plain.activation == fused_bn.Activation("relu")
    assert relu.state_dict().keys() == plain.state_dict().keys() == nn.BatchNorm2d(4).state_dict().keys()
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.equal(relu(x), plain(x))
    assert torch.equal(add_relu(x, r), plain(x, r))
    assert "activation=Activation(name='relu'" in repr(plain)


def test_a_residual_that_broadcasts_is_added_unfused_as_eager_does():
    m = fused_bn.FusedBatchNorm2d(4, activation="silu")
    ref = _Composite(nn.BatchNorm2d(4), nn.SiLU())
    x, r = torch.randn(2, 4, 3, 3), torch.randn(4, 1, 1)
    torch.testing.assert_close(m(x, r), ref(x, r))


# ---------------------------------------------------------------- compile, export

def test_compile_fullgraph_with_activation_and_residual():
    torch._dynamo.reset()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = fused_bn.FusedBatchNorm2d(4, activation=nn.LeakyReLU(0.1))
            self.bn2 = fused_bn.FusedBatchNorm2d(4, activation="silu")

        def forward(self, x):
            return self.bn2(self.conv(self.bn(x)), x)

    torch.manual_seed(0)
    eager = Block()
    compiled_model = Block()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = torch.randn(2, 4, 6, 5)
        outs = []
        for model in (eager, compiled):
            leaf = x.clone().requires_grad_()
            y = model(leaf)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), leaf.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    torch.testing.assert_close(compiled_model.bn.running_var, eager.bn.running_var)


def test_export_with_activation():
    m = fused_bn.FusedBatchNorm2d(4, activation=nn.Hardswish()).eval()
    x = torch.randn(2, 4, 3, 3)
    exported = torch.export.export(m, (x,))
    torch.testing.assert_close(exported.module()(x), m(x))


class _EvalBlocks(nn.Module):
    """conv -> bn+ReLU6 -> conv -> bn+SiLU with a residual, statistics and
    affine parameters away from their defaults."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = fused_bn.FusedBatchNorm2d(8, activation="relu6")
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = fused_bn.FusedBatchNorm2d(8, activation=nn.SiLU())
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-1, 1)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(y), y)


@pytest.mark.parametrize("freezing", [False, True], ids=["plain", "freezing"])
def test_inductor_decomposes_eval_into_nn_composite(freezing):
    """Under Inductor an eval batch norm becomes what nn's does (ATen's inference
    batch norm, the add, the activation): Inductor fuses it with its neighbours
    and, with freezing, folds it into the convolution's weights (no square root
    of a running variance left in the code). Same numbers as eager: float64
    exactly to rounding; float32 with freezing (mkldnn has no float64), where
    the folded weights round differently, by the accuracy rule's tolerance."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    dtype = torch.float32 if freezing else torch.float64
    model = _EvalBlocks().to(dtype).eval()
    x = torch.randn(2, 3, 10, 10, dtype=dtype)
    with torch.no_grad(), inductor_config.patch(freezing=freezing):
        expected = model(x)
        got, codes = run_and_get_code(torch.compile(copy.deepcopy(model)), x)
    code = "\n".join(codes)
    assert "torch.ops.fused_bn.batch_norm_eval" not in code, "the eval op reached Inductor's lowering"
    if freezing:
        assert "sqrt" not in code, "batch norm not folded into the convolutions under freezing"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class _ActivationOutside(nn.Module):
    """conv -> bn -> act -> conv with the batch norm's output read a second
    time, so that Inductor's pre-grad fold (fused_bn/_inductor.py) leaves the
    activation outside our op."""

    def __init__(self, activation):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = fused_bn.FusedBatchNorm2d(16)
        self.act = activation
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.bn(self.conv1(x))
        return self.conv2(self.act(y)) + y.mean()


@pytest.mark.parametrize("name, fused", [("relu6", True), ("silu", True), ("relu6", False)],
                         ids=["relu6", "silu", "relu6-after-the-op"])
def test_inductor_adds_no_copy_around_the_op(name, fused):
    """conv -> bn+act -> conv with NCHW input: Inductor runs the convolutions in
    channels_last (layout optimization) and our ops take their output as it is:
    no layout-changing copy feeds or follows them. With the activation left
    outside (its output read twice: not folded under compile), its backward is an Inductor kernel whose
    output is our backward's grad_output: it must be written in the input's
    layout (fused_bn/_inductor.py), not copied there by our op."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    if fused:
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                              fused_bn.FusedBatchNorm2d(16, activation=MODULES[name]),
                              nn.Conv2d(16, 8, 3, padding=1, bias=False))
    else:
        model = _ActivationOutside(MODULES[name])
    x = torch.randn(4, 8, 12, 12, requires_grad=True)

    def step(x):
        y = model(x)
        y.sum().backward()
        return y

    compiled = torch.compile(step)
    _, codes = run_and_get_code(compiled, x)
    code = "\n".join(codes)
    assert "fused_bn.batch_norm_train" in code and "fused_bn.batch_norm_backward" in code
    # Inductor asserts the strides of each extern op's outputs: ours must be the
    # convolutions' channels_last (an op pinned to the eager strides gets NCHW
    # copies of its input and gives NCHW outputs, which Inductor then copies back).
    ours = re.findall(r"assert_size_stride\(\w+, \((\d+), (\d+), \d+, \d+\), \((\d+), (\d+), \d+, \d+\), "
                      r"'torch\.ops\.fused_bn\.(\w+)", code)
    assert {op for *_, op in ours} >= {"batch_norm_train", "batch_norm_backward"}, ours
    nchw = [op for n, c, s0, s1, op in ours if int(s1) != 1]
    assert not nchw, f"fused_bn ops with channels-first outputs under layout optimization: {nchw}"
    copies = [line for line in code.splitlines() if "aten.clone" in line or "aten.copy_" in line]
    assert not copies, "copies around fused_bn's ops:\n" + "\n".join(copies[:10])
    # Every 4-D buffer that one of our ops reads (grad_output among them) is
    # allocated channels_last: a layout the op does not take would be copied
    # inside it, where no Inductor-generated copy shows.
    allocated = dict(re.findall(r"(buf\d+) = empty_strided_\w+\(\(\d+, \d+, \d+, \d+\), \((\d+, \d+, \d+, \d+)\)",
                                code))
    read = [arg for call in re.findall(r"torch\.ops\.fused_bn\.\w+\.default\(([^)]*)\)", code)
            for arg in call.split(", ") if arg in allocated]
    nchw_read = [(b, allocated[b]) for b in read if allocated[b].split(", ")[1] != "1"]
    assert not nchw_read, f"channels-first buffers read by fused_bn's ops: {nchw_read}"
