"""Helpers shared by the test files: precisions, layouts, inputs, and the
three-way (ours / nn / float64 nn) parity runner built on tests/_accuracy.py."""
import copy
from dataclasses import dataclass

import torch
from torch import nn

import fused_bn
from _accuracy import FLOOR, assert_accurate, assert_same_nonfinite, check_bound, max_abs_error

CL = torch.channels_last


@dataclass(frozen=True)
class Precision:
    name: str
    input_dtype: torch.dtype
    param_dtype: torch.dtype  # module parameters and running statistics

    def __str__(self):
        return self.name


F32 = Precision("float32", torch.float32, torch.float32)
F64 = Precision("float64", torch.float64, torch.float64)
BF16 = Precision("bfloat16", torch.bfloat16, torch.bfloat16)        # fully-bf16 module
F16 = Precision("float16", torch.float16, torch.float16)            # fully-fp16 module
BF16_AMP = Precision("bfloat16-amp", torch.bfloat16, torch.float32)  # bf16 input, fp32 module
F16_AMP = Precision("float16-amp", torch.float16, torch.float32)     # fp16 input, fp32 module
PRECISIONS = (F32, F64, BF16, F16, BF16_AMP, F16_AMP)

LAYOUTS = ("contiguous", "channels_last", "strided", "permuted")

# nn's batch norm and ours for each input rank.
BATCH_NORMS = {2: (nn.BatchNorm1d, fused_bn.FusedBatchNorm1d), 3: (nn.BatchNorm1d, fused_bn.FusedBatchNorm1d),
               4: (nn.BatchNorm2d, fused_bn.FusedBatchNorm2d), 5: (nn.BatchNorm3d, fused_bn.FusedBatchNorm3d)}
RELU_BATCH_NORMS = {2: fused_bn.FusedBatchNormReLU1d, 3: fused_bn.FusedBatchNormReLU1d,
                    4: fused_bn.FusedBatchNormReLU2d, 5: fused_bn.FusedBatchNormReLU3d}
ADD_RELU_BATCH_NORMS = {2: fused_bn.FusedBatchNormAddReLU1d, 3: fused_bn.FusedBatchNormAddReLU1d,
                        4: fused_bn.FusedBatchNormAddReLU2d, 5: fused_bn.FusedBatchNormAddReLU3d}


def channels_last_format(rank):
    """torch's channels-last memory format for input of this rank, or None."""
    return {4: CL, 5: torch.channels_last_3d}.get(rank)


def to_layout(t, layout):
    """``t``'s values in the requested memory layout. ``channels_last`` is
    channels_last (4-D), channels_last_3d (5-D), the (N, L, C) memory of a
    transposed (N, C, L) tensor (3-D) and row-major (2-D, which already is).
    ``strided`` is a view that skips every other element along the last
    dimension (the gaps hold NaN, so a kernel that ignores strides produces
    NaN); ``permuted`` is a dense view that is neither contiguous nor channels
    last (4-D: strides ordered C < W < N < H; other ranks: dimensions in
    reverse order, for 2-D the transpose)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        fmt = channels_last_format(t.dim())
        if fmt is not None:
            return t.contiguous(memory_format=fmt)
        return t.transpose(1, -1).contiguous().transpose(1, -1)
    if layout == "strided":
        base = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        base[..., ::2] = t
        return base[..., ::2]
    if layout == "permuted":
        if t.dim() == 4:
            return t.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
        reverse = list(range(t.dim() - 1, -1, -1))
        return t.permute(reverse).contiguous().permute(reverse)
    raise ValueError(layout)


def sample(shape, dtype=torch.float32, device="cpu", *, mean=2.0, std=2.0, layout="contiguous"):
    """Random input with a different mean (in [-mean, mean]) and std (in [std/4, std])
    per channel, drawn in float32 on the CPU (so CPU and CUDA see identical values),
    then cast and laid out."""
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    shift = (torch.rand(c) * 2 - 1) * mean
    scale = std * (0.25 + 0.75 * torch.rand(c))
    x = torch.randn(shape) * scale.view(view) + shift.view(view)
    return to_layout(x.to(dtype=dtype, device=device), layout)


def memory_formats(t):
    """(contiguous, channels-last for its rank)."""
    fmt = channels_last_format(t.dim())
    return (t.is_contiguous(), fmt is not None and t.is_contiguous(memory_format=fmt))


def make_trio(num_features, precision=F32, device="cpu", *, momentum=0.1, affine=True,
              track_running_stats=True, eps=1e-5, bias=True, rank=4):
    """(ours, nn, float64 nn reference) with identical, non-default state, the
    batch norms for input of ``rank`` dimensions (BatchNorm1d, 2d or 3d).

    ours and nn live on ``device`` with ``precision.param_dtype`` parameters; the
    reference lives on the CPU in float64 with the very same values upcast."""
    nn_cls, fused_cls = BATCH_NORMS[rank]
    kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
    if not bias:
        kwargs["bias"] = False  # a weight without a bias (newer torch's keyword)
    nn_bn = nn_cls(num_features, **kwargs)
    with torch.no_grad():
        if affine:
            nn_bn.weight.uniform_(0.5, 1.5)
        if nn_bn.bias is not None:
            nn_bn.bias.uniform_(-0.5, 0.5)
        if track_running_stats:
            nn_bn.running_mean.uniform_(-0.5, 0.5)
            nn_bn.running_var.uniform_(0.5, 1.5)
    nn_bn = nn_bn.to(device=device, dtype=precision.param_dtype)
    ours = fused_cls(num_features, **kwargs).to(device=device, dtype=precision.param_dtype)
    ours.load_state_dict(nn_bn.state_dict())
    ref = nn_cls(num_features, **kwargs).to(torch.float64)
    ref.load_state_dict(nn_bn.state_dict())
    return ours, nn_bn, ref


def forward_backward(module, x, grad_output):
    """Run ``module`` on a fresh leaf sharing ``x``'s storage and strides; backprop
    ``grad_output``. Returns the output and the gradients."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    y = module(leaf)
    y.backward(grad_output)
    return {
        "output": y.detach(),
        "grad_input": leaf.grad,
        "grad_weight": module.weight.grad if module.weight is not None else None,
        "grad_bias": module.bias.grad if module.bias is not None else None,
    }


def state_of(module):
    return {k: (None if v is None else v.detach().clone())
            for k, v in (("running_mean", module.running_mean), ("running_var", module.running_var),
                         ("num_batches_tracked", module.num_batches_tracked),
                         ("weight", module.weight), ("bias", module.bias))}


def assert_bitwise_equal(a, b, name):
    if a is None or b is None:
        assert a is None and b is None, f"{name}: one is None: {a} vs {b}"
        return
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(a.cpu().reshape(-1).view(torch.uint8) if a.is_floating_point() else a.cpu(),
                       b.cpu().reshape(-1).view(torch.uint8) if b.is_floating_point() else b.cpu()), \
        f"{name}: not bitwise identical (max abs diff {float((a.double() - b.double()).abs().max())})"


def assert_state_unchanged(module, before, label=""):
    after = state_of(module)
    for k in before:
        assert_bitwise_equal(after[k], before[k], f"{label} {k} changed")


def compare_results(r_ours, r_nn, r_ref, label, floor_dtype=None):
    for key in ("output", "grad_input", "grad_weight", "grad_bias"):
        o, n, r = r_ours[key], r_nn[key], r_ref[key]
        if n is None:
            assert o is None, f"{label} {key}: nn gives None, ours {type(o)}"
            continue
        assert o is not None, f"{label} {key}: ours is None, nn is not"
        assert o.dtype == n.dtype, f"{label} {key}: dtype {o.dtype}, nn {n.dtype}"
        assert o.device == n.device, f"{label} {key}: device {o.device}, nn {n.device}"
        assert_accurate(o, n, r, floor_dtype, name=f"{label} {key}")
    for key in ("output", "grad_input"):
        assert memory_formats(r_ours[key]) == memory_formats(r_nn[key]), (
            f"{label} {key}: layout (contiguous, channels-last) = {memory_formats(r_ours[key])}, "
            f"nn {memory_formats(r_nn[key])}; strides {r_ours[key].stride()} vs {r_nn[key].stride()}")


def compare_accurate(r_ours, r_nn, r_ref, label):
    """Every quantity of nn's result dict, ours against nn and the float64
    reference under the accuracy rule (None where nn gives None)."""
    for key in r_nn:
        if r_nn[key] is None:
            assert r_ours[key] is None, f"{label} {key}"
            continue
        assert r_ours[key].dtype == r_nn[key].dtype, f"{label} {key} dtype"
        assert_accurate(r_ours[key], r_nn[key], r_ref[key], name=f"{label} {key}")


def compare_states(ours, nn_bn, ref, label, floor_dtype=None):
    for key in ("running_mean", "running_var"):
        o, n, r = getattr(ours, key), getattr(nn_bn, key), getattr(ref, key)
        if n is None:
            assert o is None, f"{label} {key}: nn has None, ours {o}"
            continue
        assert o.dtype == n.dtype, f"{label} {key}: dtype {o.dtype}, nn {n.dtype}"
        assert_accurate(o, n, r, floor_dtype, name=f"{label} {key}")
    o, n = ours.num_batches_tracked, nn_bn.num_batches_tracked
    if n is None:
        assert o is None
    else:
        assert o.dtype == torch.int64 and o.shape == n.shape
        assert int(o) == int(n) == int(ref.num_batches_tracked), (
            f"{label} num_batches_tracked: ours {int(o)}, nn {int(n)}")


def nn_values_without_layout_bug(r_nn, nn_twin, x, grad_output):
    """nn's results to judge ours by, for contiguous_reference steps. nn's CPU
    backward gives a wrong grad_input for some grad_output layouts
    (test_nn_backward_layout_bug_counterexample): it then bounds our error
    loosely, and where its wrong values overflow float16 the NaN/inf pattern
    no longer says anything (test_nn_layout_bug_overflow_counterexample). Where
    nn's grad_input for contiguous copies of the same values differs from it by
    more than rounding, those copies' results are nn's (its rounding without its
    bug; the stricter bound), laid out as nn's own, so layouts are still
    compared with what nn returns for the strided input."""
    r_contiguous = forward_backward(nn_twin, x.detach().contiguous(), grad_output.contiguous())
    strided, contiguous = r_nn["grad_input"].double(), r_contiguous["grad_input"].double()
    finite = torch.isfinite(contiguous)
    scale = float(contiguous[finite].abs().max()) if bool(finite.any()) else 0.0
    if torch.allclose(strided, contiguous, rtol=1e-2, atol=1e-2 * scale, equal_nan=True):
        return r_nn
    return {key: None if value is None else torch.empty_like(r_nn[key]).copy_(value)
            for key, value in r_contiguous.items()}


def check_step(trio, x, grad_output, label, floor_dtype=None, contiguous_reference=False):
    """One forward+backward of all three modules on the same input; checks every
    quantity under the accuracy rule and that ``x`` is left untouched.

    contiguous_reference: the float64 reference gets contiguous copies of the
    input and grad_output (the same values), so it cannot share a
    layout-dependent bug with nn: nn's CPU backward gives a wrong grad_input
    for some grad_output layouts (test_nn_backward_layout_bug_counterexample in
    tests/test_properties.py)."""
    ours, nn_bn, ref = trio
    x_before = x.detach().clone()
    r_ours = forward_backward(ours, x, grad_output)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0, equal_nan=True,
                               msg=f"{label}: our forward/backward modified its input")
    # Contiguous copies of contiguous tensors are the tensors: nothing to rerun.
    rerun_nn_contiguous = contiguous_reference and not (x.is_contiguous() and grad_output.is_contiguous())
    nn_twin = copy.deepcopy(nn_bn) if rerun_nn_contiguous else None
    r_nn = forward_backward(nn_bn, x, grad_output)
    x_ref, grad_ref = x.detach().cpu().double(), grad_output.detach().cpu().double()
    if contiguous_reference:
        x_ref, grad_ref = x_ref.contiguous(), grad_ref.contiguous()
    if rerun_nn_contiguous:
        r_nn = nn_values_without_layout_bug(r_nn, nn_twin, x, grad_output)
    r_ref = forward_backward(ref, x_ref, grad_ref)
    compare_results(r_ours, r_nn, r_ref, label, floor_dtype)
    compare_states(ours, nn_bn, ref, label, floor_dtype)
    return r_ours, r_nn, r_ref


def run_parity(shape, precision=F32, layout="contiguous", device="cpu", *, train_steps=3,
               eval_steps=1, train_after_eval=0, mean=2.0, std=2.0, **module_kwargs):
    """Several training steps, then eval steps (then optionally training again), all
    checked against nn's batch norm for the shape's rank and a float64 reference."""
    trio = make_trio(shape[1], precision, device, rank=len(shape), **module_kwargs)
    phases = [True] * train_steps + [False] * eval_steps + [True] * train_after_eval
    for step, training in enumerate(phases):
        for m in trio:
            m.train(training)
        x = sample(shape, precision.input_dtype, device, mean=mean, std=std, layout=layout)
        gy = sample(shape, precision.input_dtype, device, mean=0.5, std=1.0, layout=layout)
        label = (f"[{'train' if training else 'eval'} step {step}; shape {tuple(shape)} "
                 f"{precision} {layout} {device} {module_kwargs}]")
        check_step(trio, x, gy, label)
    return trio




class EndToEndErrors:
    """The accuracy rule for whole models, on each quantity's errors summed over
    independent draws. Past a model's first layer ours and nn's no longer see the
    same input (each layer gets the previous one's slightly different rounding),
    so one draw compares two compounded random errors; per-layer parity on
    identical inputs is checked draw by draw elsewhere. NaN/Inf patterns and
    counters are checked on every draw."""

    def __init__(self):
        self.totals = {}

    def add(self, step, ours, theirs, ref, label):
        """One draw's step: dicts of the same keys (outputs, gradients, buffers)."""
        assert ours.keys() == theirs.keys() == ref.keys(), label
        for key in ours:
            o, n, r = (t.detach().cpu().double() for t in (ours[key], theirs[key], ref[key]))
            if key.endswith("num_batches_tracked"):
                assert int(o) == int(n), f"{label} {key}"
                continue
            assert o.shape == n.shape == r.shape, f"{label} {key}"
            assert_same_nonfinite(o, n, f"{label} {key}")
            mask = torch.isfinite(n) & torch.isfinite(r)
            scale = float(r[mask].abs().max()) if bool(mask.any()) else 0.0
            total = self.totals.setdefault((step, key), [0.0, 0.0, 0.0])
            total[0] += max_abs_error(o, r, mask)[0]
            total[1] += max_abs_error(n, r, mask)[0]
            total[2] += FLOOR[torch.float32] * scale

    def check(self, label, draws):
        for (step, key), (err_ours, err_nn, floor) in self.totals.items():
            # check_bound adds FLOOR * scale: pass the summed floor through scale.
            check_bound(err_ours, err_nn, floor / FLOOR[torch.float32], torch.float32,
                        f"{label}, step {step}] {key}, errors summed over {draws} draws")


def timm_batch_norm_act():
    """timm's BatchNormAct2d, or a skip where the model zoo is not installed."""
    import pytest
    from bench import zoo
    if zoo.available("timm/efficientnet_b0") is not None:
        pytest.skip(zoo.available("timm/efficientnet_b0"))
    from timm.layers.norm_act import BatchNormAct2d
    return BatchNormAct2d


def timm_residual_block():
    """conv -> timm's BatchNormAct2d without an activation of its own -> drop
    path -> + the block's input -> hardswish (timm's inverted-residual and
    ResNet-style blocks): what convert_model(fuse=True) folds into one call."""
    BatchNormAct2d = timm_batch_norm_act()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = BatchNormAct2d(4, apply_act=False)
            self.drop_path = nn.Identity()

        def forward(self, x):
            return torch.nn.functional.hardswish(self.drop_path(self.bn(self.conv(x))) + x)

    return Block
