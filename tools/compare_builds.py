"""Bitwise before/after check for refactors of the kernels (issue 25).

    python tools/compare_builds.py save before.pt      # with the old build installed
    python tools/compare_builds.py compare before.pt   # after rebuilding

Runs every op (training and eval forwards, all epilogues, the backward with
every output mask, the data-parallel ops) over a grid of shapes, dtypes and
layouts chosen to reach each CPU strategy (short and long planes, channel
blocks, streaming and staged outputs, one thread and two), records every
output, and compares the two records bit for bit. `--emulated` runs the same
grid through the CUDA kernels on the emulated GPU (tests/emulated_cuda.py).
"""
import argparse
import itertools
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (N, C, H, W): C=1, N=1, HW=1, primes, planes below and above the short-plane
# and streaming thresholds, wide channels, a cache-spilling case.
SHAPES = [
    (1, 1, 1, 1), (2, 1, 5, 5), (1, 3, 1, 1), (7, 5, 3, 3), (4, 13, 1, 1), (2, 3, 17, 19),
    (8, 16, 4, 4), (3, 64, 7, 7), (2, 512, 2, 2), (16, 32, 8, 8), (4, 96, 15, 15),
    (2, 8, 64, 64), (1, 4, 128, 129), (32, 64, 28, 28), (8, 256, 14, 14), (2, 2048, 1, 1),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def param_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def cases():
    for shape, dtype, layout in itertools.product(SHAPES, DTYPES, LAYOUTS):
        if dtype in (torch.bfloat16, torch.float16) and shape[0] * shape[1] * shape[2] * shape[3] > 2_000_000:
            continue
        yield shape, dtype, layout


def make_inputs(shape, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    pd = param_dtype(dtype)

    def rand(*s, dt=dtype):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dt)

    x = (rand(*shape, dt=torch.float64) * 3 + 1.5).to(dtype).contiguous(memory_format=layout)
    z = rand(*shape).contiguous(memory_format=layout)
    dy = rand(*shape).contiguous(memory_format=layout)
    w, b = rand(C, dt=pd), rand(C, dt=pd)
    rm, rv = rand(C, dt=pd), rand(C, dt=pd).abs() + 0.5
    return x, z, dy, w, b, rm, rv


def attempt(fn, *args):
    """The op's outputs, or its error (the emulated GPU has no kernel yet for
    some ops: the error is compared like any output)."""
    try:
        return fn(*args)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"


def _epilogue_api():
    """Either build's epilogue arguments, so a record saved with a build before the
    activations (``bool relu``, batch_norm_add_relu_backward) compares with one after
    (``str activation, float[] activation_params``, batch_norm_backward with the
    forward's output): (args for relu on/off, batch_norm_backward, add+ReLU backward,
    batch_norm_backward_sums), each recording what the old ops returned."""
    ops = torch.ops.fused_bn
    if "str activation" not in str(ops.batch_norm_train.default._schema):
        return (lambda relu: (relu,)), ops.batch_norm_backward, ops.batch_norm_add_relu_backward, \
            ops.batch_norm_backward_sums

    def act(relu):
        return ("relu" if relu else "identity", [])

    def backward(*args):
        # (grad_input, grad_weight, grad_bias); grad_residual is [0] without a residual or output
        return ops.batch_norm_backward(*args)[:3]

    def add_relu_backward(dy, y, x, w, mean, invstd, training, eps, mask):
        dx, dw, db, dz = ops.batch_norm_backward(dy, x, w, mean, invstd, training, eps, mask, None, "relu", [],
                                                 None, y)
        return dx, dz, dw, db

    def backward_sums(*args):
        return ops.batch_norm_backward_sums(*args)[:3]

    return act, backward, add_relu_backward, backward_sums


def run_case(shape, dtype, layout, seed):
    ops = torch.ops.fused_bn
    act, backward, add_relu_backward, backward_sums = _epilogue_api()
    x, z, dy, w, b, rm, rv = make_inputs(shape, dtype, layout, seed)
    out = {}
    eps = 1e-5
    count = x.numel() // x.shape[1]
    # The count became a device tensor (issue 26): either build's schema.
    if "Tensor count" in str(torch.ops.fused_bn.batch_norm_backward_with_sums.default._schema):
        count = torch.tensor(count)
    for relu, residual, momentum in [(False, None, 0.1), (True, None, None), (True, z, 0.3)]:
        key = f"relu={relu},res={residual is not None},m={momentum}"
        rmc, rvc, nbt = rm.clone(), rv.clone(), torch.zeros((), dtype=torch.long)
        train = attempt(ops.batch_norm_train, x, w, b, rmc, rvc, nbt, momentum, eps, *act(relu), residual)
        out[f"train/{key}"] = (train, rmc, rvc, nbt)
        out[f"eval/{key}"] = attempt(ops.batch_norm_eval, x, w, b, rm, rv, eps, *act(relu), residual)
        if isinstance(train, str):  # no training kernel: take the saved statistics from float64
            x64 = x.double()
            mean = x64.mean((0, 2, 3)).to(param_dtype(dtype))
            invstd = (x64.var((0, 2, 3), unbiased=False) + eps).rsqrt().to(param_dtype(dtype))
            y = torch.relu(x) if residual is None else torch.relu(x + z)
        else:
            y, mean, invstd = train
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            if residual is None:
                out[f"backward/{key}/{mask}"] = attempt(
                    backward, dy, x, w, mean, invstd, True, eps, mask, b, *act(relu))
            else:
                out[f"add_relu_backward/{key}/{mask}"] = attempt(
                    add_relu_backward, dy, y, x, w, mean, invstd, True, eps, mask)
        eval_invstd = (rv + eps).rsqrt()
        out[f"eval_backward/{key}"] = attempt(
            backward, dy, x, w, rm, eval_invstd, False, eps, [True, True, True], b, *act(relu))
        # Data-parallel ops, one rank (the saved statistics of the fused op).
        stats = attempt(ops.batch_norm_stats, x, w, b, rm, rv)
        rmc, rvc, nbt = rm.clone(), rv.clone(), torch.zeros((), dtype=torch.long)
        if not isinstance(stats, str) and residual is None:
            out[f"sync/{key}/forward"] = (stats, attempt(ops.batch_norm_train_with_stats, x, w, b, rmc, rvc, nbt,
                                                         momentum, eps, stats[None], *act(relu)), rmc, rvc, nbt)
        else:
            out[f"sync/{key}/forward"] = stats
        sums = attempt(backward_sums, dy, x, w, mean, invstd, [True, True], b, *act(relu))
        out[f"sync/{key}/sums"] = sums
        if not isinstance(sums, str):
            out[f"sync/{key}/dx"] = attempt(ops.batch_norm_backward_with_sums, dy, x, w, mean, invstd, sums[0],
                                            count, b, *act(relu))
    out["train/no_affine"] = attempt(ops.batch_norm_train, x, None, None, None, None, None, 0.1, eps)
    return out


def flatten(value):
    if isinstance(value, (torch.Tensor, str)):
        return [value]
    return [t for v in value for t in flatten(v)]


def fingerprint(v):
    if isinstance(v, str):
        return (v,)
    data = v.contiguous().view(-1).view(torch.uint8).clone() if v.numel() else v.clone()
    return (tuple(v.shape), tuple(v.stride()), v.dtype, data)


def record(threads):
    results = {}
    for i, (shape, dtype, layout) in enumerate(cases()):
        for t in threads:
            torch.set_num_threads(t)
            name = f"{shape}/{dtype}/{'NHWC' if layout == torch.channels_last else 'NCHW'}/threads={t}"
            for key, value in run_case(shape, dtype, layout, seed=i).items():
                results[f"{name}/{key}"] = [fingerprint(v) for v in flatten(value)]
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["save", "compare"])
    p.add_argument("path")
    p.add_argument("--emulated", action="store_true", help="through the CUDA kernels on the emulated GPU")
    args = p.parse_args(argv)
    import fused_bn  # noqa: F401  (registers the ops)

    threads = [1, 2]
    if args.emulated:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import emulated_cuda

        emulated_cuda.build()
        emulated_cuda.configure()
        emulated_cuda.enable(True)
        threads = [1]
    results = record(threads)
    if args.action == "save":
        torch.save(results, args.path)
        print(f"saved {len(results)} cases to {args.path}")
        return 0
    before = torch.load(args.path)
    mismatches = []
    for key in sorted(set(before) | set(results)):
        if key not in before or key not in results:
            mismatches.append(f"{key}: only in {'after' if key in results else 'before'}")
            continue
        for j, (old, new) in enumerate(zip(before[key], results[key])):
            if len(old) == 1 or len(new) == 1:
                if old != new:
                    mismatches.append(f"{key}[{j}]: {old[0] if len(old) == 1 else 'tensor'} -> "
                                      f"{new[0] if len(new) == 1 else 'tensor'}")
            elif old[:3] != new[:3] or not torch.equal(old[3], new[3]):
                mismatches.append(f"{key}[{j}]: shape/stride/dtype {old[:3]} -> {new[:3]}"
                                  if old[:3] != new[:3] else f"{key}[{j}]: values differ")
    print(f"compared {len(results)} cases: {len(mismatches)} differ")
    for m in mismatches[:50]:
        print("  " + m)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
