"""Parity check run before timing: fused_bn and nn's batch norm (BatchNorm1d, 2d or
3d by the input's rank) against a float64 nn reference, over several training steps (forward + backward, running
statistics updates) and then eval.

Accuracy rule, per compared tensor: err(fused_bn) <= 2 * err(nn) + floor, with err
the max absolute difference from the float64 reference (NaN counts as infinite) and
floor one unit in the last place of the compared dtype at the reference's largest
magnitude (so an exact nn result does not demand an exact fused_bn result).
"""
import math

import torch

from .cases import batch_norm_classes, channels_last_format

STEPS = 3
ERROR_FACTOR = 2.0

CPU_PARITY_CASES = (
    ("float32", "nchw", (64, 300)),
    ("float32", "channels_last", (3, 8, 4, 5, 7)),
    ("float32", "nchw", (4, 8, 9, 11)),
    ("float32", "channels_last", (4, 8, 9, 11)),
    ("float32", "nchw", (2, 3, 33, 35)),
    ("float32", "channels_last", (16, 64, 7, 7)),
    ("bfloat16", "nchw", (6, 16, 7, 5)),
    ("bfloat16", "channels_last", (6, 16, 7, 5)),
)
CUDA_PARITY_CASES = CPU_PARITY_CASES + (
    ("float16", "nchw", (6, 16, 7, 5)),
    ("float16", "channels_last", (6, 16, 7, 5)),
    ("float32", "nchw", (8, 64, 28, 28)),
    ("float16", "channels_last", (8, 64, 28, 28)),
    ("bfloat16", "channels_last", (32, 256, 14, 14)),
    ("float32", "nchw", (16, 1, 64, 64)),
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _max_abs_error(actual, reference):
    err = (actual.detach().double() - reference.detach()).abs().max().item()
    return math.inf if math.isnan(err) else err


def _ulp_floor(dtype, reference):
    return torch.finfo(dtype).eps * max(1.0, reference.detach().abs().max().item())


def _in_layout(t, layout):
    return t.contiguous(memory_format=channels_last_format(t.dim())) if layout == "channels_last" else t


def _run_training_step(module, x, dy):
    x = x.detach().requires_grad_(True)
    module.weight.grad = None
    module.bias.grad = None
    y = module(x)
    y.backward(dy)
    return {"y": y, "dx": x.grad, "dweight": module.weight.grad, "dbias": module.bias.grad}


def _check_case(dtype_name, layout, shape, device, seed):
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    nn_cls, fused_cls = batch_norm_classes(len(shape))
    reference = nn_cls(channels).double()
    with torch.no_grad():
        reference.weight.copy_(1 + 0.1 * torch.randn(channels, generator=generator))
        reference.bias.copy_(0.1 * torch.randn(channels, generator=generator))
    eager = nn_cls(channels)
    eager.load_state_dict(reference.state_dict())
    fused = fused_cls(channels)
    fused.load_state_dict(reference.state_dict())
    reference.to(device)
    eager.to(device)
    fused.to(device)

    # tensor name -> [worst nn error, worst fused_bn error, worst floor]
    errors = {}
    problems = []

    def record(name, eager_out, fused_out, ref_out, compare_dtype):
        if fused_out is None:
            problems.append(f"{name}: fused_bn produced no tensor")
            return
        if fused_out.dtype != eager_out.dtype:
            problems.append(f"{name}: dtype {fused_out.dtype} != nn's {eager_out.dtype}")
        channels_last = channels_last_format(fused_out.dim())
        if (channels_last is not None and eager_out.is_contiguous(memory_format=channels_last)
                and not fused_out.is_contiguous(memory_format=channels_last)):
            problems.append(f"{name}: not {channels_last} like nn's output")
        e = errors.setdefault(name, [0.0, 0.0, 0.0])
        e[0] = max(e[0], _max_abs_error(eager_out, ref_out))
        e[1] = max(e[1], _max_abs_error(fused_out, ref_out))
        e[2] = max(e[2], _ulp_floor(compare_dtype, ref_out))

    # Shifted, scaled input: a mean far from zero exposes naive sum-of-squares variance.
    for step in range(STEPS):
        x = torch.randn(shape, generator=generator) * 3 + 5 * (step + 1)
        dy = torch.randn(shape, generator=generator)
        x = _in_layout(x.to(dtype).to(device), layout)
        dy = _in_layout(dy.to(dtype).to(device), layout)
        ref = _run_training_step(reference, x.double(), dy.double())
        out_eager = _run_training_step(eager, x, dy)
        out_fused = _run_training_step(fused, x, dy)
        for name in ref:
            compare_dtype = dtype if name in ("y", "dx") else torch.float32
            record(name, out_eager[name], out_fused[name], ref[name], compare_dtype)

    for name in ("running_mean", "running_var"):
        record(name, getattr(eager, name), getattr(fused, name), getattr(reference, name),
               torch.float32)
    if fused.num_batches_tracked.item() != eager.num_batches_tracked.item():
        problems.append(f"num_batches_tracked {fused.num_batches_tracked.item()} != "
                        f"nn's {eager.num_batches_tracked.item()}")

    for m in (reference, eager, fused):
        m.eval()
    x = _in_layout((torch.randn(shape, generator=generator) * 3 + 5).to(dtype).to(device), layout)
    with torch.no_grad():
        record("eval_y", eager(x), fused(x), reference(x.double()), dtype)

    tensors = []
    for name, (err_eager, err_fused, floor) in errors.items():
        limit = ERROR_FACTOR * err_eager + floor
        tensors.append({"tensor": name, "err_nn": err_eager, "err_fused": err_fused,
                        "limit": limit, "passed": err_fused <= limit})
    passed = not problems and all(t["passed"] for t in tensors)
    return {"passed": passed, "problems": problems, "tensors": tensors}


def run_parity(device):
    cases = CUDA_PARITY_CASES if device.type == "cuda" else CPU_PARITY_CASES
    results = []
    for seed, (dtype_name, layout, shape) in enumerate(cases):
        entry = {"dtype": dtype_name, "layout": layout, "shape": list(shape)}
        try:
            entry.update(_check_case(dtype_name, layout, shape, device, seed))
        except Exception as exc:  # a crash is a parity failure, not the end of the run
            entry.update({"passed": False, "problems": [f"{type(exc).__name__}: {exc}"],
                          "tensors": []})
        results.append(entry)
    return {
        "passed": all(r["passed"] for r in results),
        "rule": f"max|fused - ref64| <= {ERROR_FACTOR:g} * max|nn - ref64| + 1 ulp(dtype) * "
                "max(1, max|ref64|), for y, dx, dweight, dbias over "
                f"{STEPS} training steps, running_mean, running_var, and eval y; plus equal "
                "num_batches_tracked, output dtype and channels_last-ness",
        "cases": results,
    }


def format_parity(parity):
    lines = []
    for r in parity["cases"]:
        label = f"{r['dtype']:>8} {r['layout']:<13} {'x'.join(map(str, r['shape'])):<12}"
        status = "PASS" if r["passed"] else "FAIL"
        worst = max(r["tensors"], key=lambda t: t["err_fused"] / t["limit"] if t["limit"] else 0,
                    default=None)
        detail = (f"worst {worst['tensor']}: fused {worst['err_fused']:.2e} vs nn "
                  f"{worst['err_nn']:.2e} (limit {worst['limit']:.2e})" if worst else "")
        lines.append(f"  {status}  {label} {detail}")
        for t in r["tensors"]:
            if not t["passed"]:
                lines.append(f"        {t['tensor']}: fused {t['err_fused']:.3e} > limit "
                             f"{t['limit']:.3e} (nn {t['err_nn']:.3e})")
        for p in r["problems"]:
            lines.append(f"        {p}")
    return "\n".join(lines)
