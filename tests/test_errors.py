"""Every error path raises nn's exception type and message, and leaves our module
state (running_mean, running_var, num_batches_tracked, parameters) untouched.

Expected errors are not hard-coded: nn's module (BatchNorm1d, 2d, 3d, SyncBatchNorm)
or F.batch_norm is run on the same input and state and what they raise is what we must raise. (nn itself bumps
num_batches_tracked before some of these errors; ours must not.)"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_bn
from _helpers import assert_state_unchanged, state_of

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _make_input(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype=dtype, device=device)
    return torch.randint(-3, 4, shape, dtype=dtype, device=device)


# id: (num_features, module kwargs, module dtype, training, input shape, input dtype);
# 4-D shapes are the 2-D batch norm's and are recast for the other modules
# (_shape_for), the others are rank errors for the modules of RANK_ERROR_CASES.
MODULE_CASES = {
    "one-value-per-channel": (3, {}, f32, True, (1, 3, 1, 1), f32),
    "one-value-per-channel-notrack": (3, dict(track_running_stats=False), f32, True, (1, 3, 1, 1), f32),
    "one-value-per-channel-notrack-eval": (3, dict(track_running_stats=False), f32, False, (1, 3, 1, 1), f32),
    "4-channels-into-3-train": (3, {}, f32, True, (2, 4, 4, 4), f32),
    "4-channels-into-3-eval": (3, {}, f32, False, (2, 4, 4, 4), f32),
    "3-channels-into-4-train": (4, {}, f32, True, (2, 3, 4, 4), f32),
    "channels-noaffine": (3, dict(affine=False), f32, True, (2, 4, 4, 4), f32),
    "channels-notrack": (3, dict(track_running_stats=False), f32, True, (2, 4, 4, 4), f32),
    "channels-notrack-eval": (3, dict(track_running_stats=False), f32, False, (2, 4, 4, 4), f32),
    "long-train": (3, {}, f32, True, (2, 3, 4, 4), torch.int64),
    "long-eval": (3, {}, f32, False, (2, 3, 4, 4), torch.int64),
    "int32-train": (3, {}, f32, True, (2, 3, 4, 4), torch.int32),
    "long-no-params": (3, dict(affine=False, track_running_stats=False), f32, True, (2, 3, 4, 4), torch.int64),
    "f64-in-f32-train": (3, {}, f32, True, (2, 3, 4, 4), f64),
    "f64-in-f32-eval": (3, {}, f32, False, (2, 3, 4, 4), f64),
    "f64-in-f32-noaffine": (3, dict(affine=False), f32, True, (2, 3, 4, 4), f64),
    "f64-in-f32-notrack": (3, dict(track_running_stats=False), f32, True, (2, 3, 4, 4), f64),
    "f32-in-f64-train": (3, {}, f64, True, (2, 3, 4, 4), f32),
    "f32-in-bf16-train": (3, {}, bf16, True, (2, 3, 4, 4), f32),
    "f16-in-bf16-train": (3, {}, bf16, True, (2, 3, 4, 4), f16),
    "bf16-in-f16-eval": (3, {}, f16, False, (2, 3, 4, 4), bf16),
    "f64-in-f16-train": (3, {}, f16, True, (2, 3, 4, 4), f64),
    "eps-zero-train": (3, dict(eps=0.0), f32, True, (2, 3, 4, 4), f32),
    "eps-negative-train": (3, dict(eps=-1.0), f32, True, (2, 3, 4, 4), f32),
    "eps-negative-eval": (3, dict(eps=-1.0), f32, False, (2, 3, 4, 4), f32),
    "eps-zero-and-f64-in-f32-train": (3, dict(eps=0.0), f32, True, (2, 3, 4, 4), f64),
    "one-value-per-channel-before-eps": (3, dict(eps=0.0), f32, True, (1, 3, 1, 1), f32),
    "eps-zero-notrack-train": (3, dict(eps=0.0, track_running_stats=False), f32, True, (2, 3, 4, 4), f32),
}


def _expect_same_error(nn_call, ours_call, label):
    with pytest.raises(Exception) as nn_exc:
        nn_call()
    expected_type, expected_msg = type(nn_exc.value), str(nn_exc.value)
    try:
        ours_call()
    except Exception as e:  # noqa: BLE001  (compared with nn's below)
        assert type(e) is expected_type and str(e) == expected_msg, (
            f"{label}: ours raised {type(e).__name__}: {str(e)!r}; "
            f"nn raises {expected_type.__name__}: {expected_msg!r}")
    else:
        raise AssertionError(f"{label}: ours did not raise; nn raises "
                             f"{expected_type.__name__}: {expected_msg!r}")


# The modules checked, each against nn's: BatchNorm1d, 2d, 3d and the synchronised
# one (which, as nn.SyncBatchNorm, takes 2-D to 5-D input; without a process group
# both run the local batch norm).
MODULES = {"1d": (nn.BatchNorm1d, fused_bn.FusedBatchNorm1d), "2d": (nn.BatchNorm2d, fused_bn.FusedBatchNorm2d),
           "3d": (nn.BatchNorm3d, fused_bn.FusedBatchNorm3d),
           "sync": (nn.SyncBatchNorm, fused_bn.FusedSyncBatchNorm2d)}

# module -> inputs of a rank it refuses (and, for sync, of no channels), as
# (id, num_features, training, shape).
RANK_ERROR_CASES = {
    "1d": [("1d-train", 3, True, (3,)), ("4d-train", 3, True, (2, 3, 4, 4)), ("5d-eval", 3, False, (2, 3, 2, 2, 2))],
    "2d": [("3d-train", 3, True, (3, 4, 4)), ("3d-eval", 3, False, (3, 4, 4)), ("2d-train", 3, True, (2, 3)),
           ("5d-eval", 3, False, (2, 3, 2, 2, 2))],
    "3d": [("4d-train", 3, True, (2, 3, 4, 4)), ("3d-eval", 3, False, (2, 3, 4)), ("6d-train", 3, True, (2, 3, 2, 2, 2, 2))],
    "sync": [("1d-train", 3, True, (3,)), ("0d-eval", 3, False, ()), ("no-channels-train", 3, True, (2, 0, 3, 3)),
             ("no-channels-eval", 3, False, (4, 0))],
}


def _shape_for(module, shape):
    """A 4-D case's input for ``module``: (N, C, H·W) for BatchNorm1d, (N, C, 1, H, W)
    for BatchNorm3d, and (N, C, H, W) for the 2-D and synchronised ones; one value
    per channel stays one value."""
    n, c, h, w = shape
    return {"1d": (n, c, h * w), "3d": (n, c, 1, h, w)}.get(module, shape)


def _check_module_error(module, features, kwargs, module_dtype, training, shape, input_dtype, device, label):
    nn_cls, fused_cls = MODULES[module]
    theirs = nn_cls(features, **kwargs)
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
        if theirs.track_running_stats:
            theirs.running_mean.uniform_(-0.5, 0.5)
            theirs.running_var.uniform_(0.5, 1.5)
            theirs.num_batches_tracked.fill_(5)
    theirs = theirs.to(device=device, dtype=module_dtype).train(training)
    ours = fused_cls(features, **kwargs).to(device=device, dtype=module_dtype)
    ours.load_state_dict(theirs.state_dict())
    ours.train(training)
    x = _make_input(shape, input_dtype, device)
    before = state_of(ours)
    _expect_same_error(lambda: theirs(x), lambda: ours(x), label)
    assert_state_unchanged(ours, before, f"{label} after the error")


@pytest.mark.parametrize("case", list(MODULE_CASES))
@pytest.mark.parametrize("module", list(MODULES))
def test_module_error_matches_nn(device, module, case):
    features, kwargs, module_dtype, training, shape, input_dtype = MODULE_CASES[case]
    _check_module_error(module, features, kwargs, module_dtype, training, _shape_for(module, shape), input_dtype,
                        device, f"[{module} {case}]")


@pytest.mark.parametrize("module,case", [(module, case) for module, cases in RANK_ERROR_CASES.items()
                                         for case in cases], ids=lambda v: v if isinstance(v, str) else v[0])
def test_module_rank_error_matches_nn(device, module, case):
    label, features, training, shape = case
    _check_module_error(module, features, {}, f32, training, shape, f32, device, f"[{module} {label}]")


def test_rows_of_one_value_per_channel_match_nn(device):
    """(1, C) is one value per channel for BatchNorm1d (and its synchronised form)."""
    for module in ("1d", "sync"):
        _check_module_error(module, 3, {}, f32, True, (1, 3), f32, device, f"[{module} (1, 3)]")


def _functional_args(device, *, input_shape=(4, 3, 2, 2), input_dtype=f32, rm=(3, f32), rv=(3, f32),
                     weight=None, bias=None, eps=1e-5):
    def t(spec, fill):
        if spec is None:
            return None
        n, dtype = spec
        return torch.full((n,), fill, dtype=dtype, device=device)
    return (_make_input(input_shape, input_dtype, device), t(rm, 0.25), t(rv, 1.5), t(weight, 1.25),
            t(bias, -0.5), eps)


# id: (training, argument spec for _functional_args)
FUNCTIONAL_CASES = {
    "eval-no-running-stats": (False, dict(rm=None, rv=None)),
    "eval-no-running-var": (False, dict(rv=None)),
    "eval-no-running-mean": (False, dict(rm=None)),
    "train-only-running-mean": (True, dict(rv=None)),
    "train-only-running-var": (True, dict(rm=None)),
    "one-value-per-channel-2d": (True, dict(input_shape=(1, 3))),
    "one-value-per-channel-5d": (True, dict(input_shape=(1, 3, 1, 1, 1))),
    "weight-mismatch": (True, dict(rm=None, rv=None, weight=(4, f32))),
    "bias-mismatch-eval": (False, dict(weight=(3, f32), bias=(4, f32))),
    "running-var-mismatch": (True, dict(rv=(4, f32))),
    "running-mean-mismatch-before-weight": (True, dict(rm=(4, f32), rv=(4, f32), weight=(4, f32))),
    "long-train": (True, dict(rm=None, rv=None, input_dtype=torch.int64)),
    "long-eval": (False, dict(input_dtype=torch.int64)),
    "f64-input-f32-stats": (True, dict(input_dtype=f64)),
    "f32-input-f64-stats": (False, dict(rm=(3, f64), rv=(3, f64))),
    "bf16-input-f32-weight-bf16-stats": (True, dict(input_dtype=bf16, rm=(3, bf16), rv=(3, bf16), weight=(3, f32))),
    "bf16-input-bf16-weight-f32-stats": (True, dict(input_dtype=bf16, weight=(3, bf16), bias=(3, bf16))),
    "f32-input-f32-weight-f64-bias": (False, dict(weight=(3, f32), bias=(3, f64))),
    "f16-input-f32-weight-f16-bias": (True, dict(input_dtype=f16, rm=None, rv=None, weight=(3, f32), bias=(3, f16))),
    "eps-zero-train": (True, dict(eps=0.0)),
    "eps-negative-eval": (False, dict(eps=-1e-3)),
    "eps-negative-before-dtype-eval": (False, dict(eps=-1.0, input_dtype=f64)),
    "eps-negative-before-missing-stats-eval": (False, dict(eps=-1.0, rm=None, rv=None)),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_error_matches_F(device, case):
    training, spec = FUNCTIONAL_CASES[case]
    x, rm, rv, w, b, eps = _functional_args(device, **spec)
    counter = torch.tensor(7, device=device)
    snapshots = [None if t is None else t.clone() for t in (rm, rv, w, b, counter)]
    _expect_same_error(
        lambda: F.batch_norm(x, None if rm is None else rm.clone(), None if rv is None else rv.clone(),
                             w, b, training, 0.1, eps),
        lambda: fused_bn.batch_norm(x, rm, rv, w, b, training, 0.1, eps,
                                    num_batches_tracked=counter if training else None),
        f"[functional {case}]")
    for name, t, snap in zip(("running_mean", "running_var", "weight", "bias", "num_batches_tracked"),
                             (rm, rv, w, b, counter), snapshots):
        if t is not None:
            assert torch.equal(t, snap), f"[functional {case}] {name} changed by a failing call"


def test_module_still_works_after_error(device):
    """A rejected call leaves the module fully usable: the next good step matches a
    module that never saw the bad input."""
    ours = fused_bn.FusedBatchNorm2d(3).to(device)
    fresh = fused_bn.FusedBatchNorm2d(3).to(device)
    with pytest.raises(RuntimeError):
        ours(torch.randn(2, 4, 3, 3, device=device))
    with pytest.raises(ValueError):
        ours(torch.randn(1, 3, 1, 1, device=device))
    x = torch.randn(2, 3, 3, 3, device=device)
    torch.testing.assert_close(ours(x), fresh(x), rtol=0, atol=0)
    for a, b in zip(ours.buffers(), fresh.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("counter_spec", [
    pytest.param((torch.bool, ()), id="bool"),
    pytest.param((torch.complex64, ()), id="complex"),
    pytest.param((torch.int64, (2,)), id="two-elements"),
])
def test_counter_must_be_one_real_element(device, counter_spec):
    """nn has no such argument (its counter is always its own buffer), so the
    functional form's num_batches_tracked gets a clear error of its own, on every
    device alike, before any state changes."""
    dtype, shape = counter_spec
    x = torch.randn(2, 3, 4, 4, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    counter = torch.zeros(shape, dtype=dtype, device=device)
    with pytest.raises(RuntimeError, match="num_batches_tracked must be a real tensor with one element"):
        fused_bn.batch_norm(x, rm, rv, None, None, True, None, 1e-5, num_batches_tracked=counter)
    assert not counter.any() and not rm.any() and bool((rv == 1).all())


def test_eval_eps_zero_is_allowed_like_nn(device):
    """eps = 0 is refused in training only (nn normalizes by the running
    variance as it is in eval)."""
    ours, theirs = fused_bn.FusedBatchNorm2d(3, eps=0.0), nn.BatchNorm2d(3, eps=0.0)
    for m in (ours, theirs):
        m.to(device).eval()
        m.running_var.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 4, 4, device=device)
    torch.testing.assert_close(ours(x), theirs(x))
