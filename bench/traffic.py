"""PREDICTED GPU memory traffic and time of fused_bn's CUDA kernels, measured
without a GPU: every global load and store the kernels issue, on the emulated
GPU (tests/emulated_cuda.py's traffic(); definitions in tests/_traffic.py).

Per op (training forward, eval forward, backward, and the backward of the
add+ReLU epilogue as autograd runs it: g = relu'(y)·dy read off the saved
output y), dtype and layout, on
ResNet-50's batch-norm shapes and odd ones: launches, blocks per launch
against an H100/H200's 132 multiprocessors (waves of what the grid aims to
keep resident: 1024 threads per multiprocessor), sector efficiency of the
element accesses, passes over each input-sized tensor, and a predicted time:

    time = Σ_launch (DRAM bytes / (bandwidth × copy fraction)) + launches × fixed cost

with DRAM bytes the bytes each launch touches (every tensor read or written
once per launch that touches it: no L2 reuse between launches, none inside
one beyond the sector), bandwidth 3.35 TB/s (H100 SXM) and 4.8 TB/s (H200),
copy fraction 0.9 (what a copy kernel reaches there) and 3 us per launch
(launch latency and the last wave's tail), all stated in the output. Beside
it, PyTorch's native CUDA batch norm from its pass structure: forward reads x
twice (statistics, then transform) and writes y, in 2 launches; eval reads x
once and writes y, 1 launch; backward reads x and dy twice each (reduce, then
elementwise) and writes dx, 2 launches; the add+ReLU backward is ReLU's
backward (reads dy and y, writes g, 1 launch; the add passes g on) and then
batch norm's on g (x and g twice each, dx), 3 launches.

The emulator runs about a million accesses a second, so batch 64 is recorded
with block sampling: only every k-th block of each launch runs (the addresses
do not depend on the data), k chosen so that at most --max-blocks blocks run
per launch, and a launch's bytes and requests are scaled by blocks / blocks
run. Grids, launches and waves are the batch-64 ones, exact. --batch picks
another batch.

Writes bench/results/traffic-predicted.json and .md. Usage:
    python -m bench.traffic [--quick] [--batch 64] [--max-blocks 24]
Nothing here was measured on a GPU: every time is PREDICTED.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import _traffic  # noqa: E402

MULTIPROCESSORS = 132
RESIDENT_THREADS = 1024  # what the grids aim for per multiprocessor (launch.cuh)
BANDWIDTH = {"H100 SXM": 3.35e12, "H200": 4.8e12}
COPY_FRACTION = 0.9
LAUNCH_COST_S = 3e-6

# ResNet-50's batch norms (torchvision, stride on the 3x3 conv): (C, H, W).
RESNET50 = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28),
            (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7)]
# Odd ones: C = 1, 3, 4096; H*W = 1, 7x7 (above), primes.
ODD = [(1, 56, 56), (3, 224, 224), (4096, 1, 1), (512, 1, 1), (128, 1, 97), (64, 1, 31)]
OPS = ["train_forward", "eval_forward", "backward", "backward_add_relu"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = ["nchw", "channels_last"]
# PyTorch native CUDA batch norm: (passes read per tensor, written, launches).
NATIVE = {"train_forward": ({"x": 2}, {"y": 1}, 2), "eval_forward": ({"x": 1}, {"y": 1}, 1),
          "backward": ({"x": 2, "dy": 2}, {"dx": 1}, 2),
          "backward_add_relu": ({"x": 2, "dy": 1, "y": 1, "g": 2}, {"g": 1, "dx": 1}, 3)}


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "unknown"


def tensor(shape, layout, dtype):
    t = torch.zeros(shape, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def run(op, shape, layout, dtype, every):
    import emulated_cuda

    ops = torch.ops.fused_bn
    C = shape[1]
    pdtype = torch.float32 if dtype != torch.float64 else dtype
    w, b = torch.ones(C, dtype=pdtype), torch.zeros(C, dtype=pdtype)
    rm, rv = torch.zeros(C, dtype=pdtype), torch.ones(C, dtype=pdtype)
    x = tensor(shape, layout, dtype)
    mean, invstd = torch.zeros(C), torch.ones(C)
    if op == "train_forward":
        with emulated_cuda.traffic(every) as t:
            y = ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, 1e-5)[0]
        return t.launches, {"x": x, "y": y}
    if op == "eval_forward":
        with emulated_cuda.traffic(every) as t:
            y = ops.batch_norm_eval(x, w, b, rm, rv, 1e-5)
        return t.launches, {"x": x, "y": y}
    dy = tensor(shape, layout, dtype)
    if op == "backward_add_relu":
        # kOutput: the reduction pass reads dy, x and y and writes g (the
        # residual's gradient), the dx pass reads g and x.
        y = tensor(shape, layout, dtype)
        with emulated_cuda.traffic(every) as t:
            dx, _, _, g = ops.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5, [True, True, True], b,
                                                  "relu", [], None, y)
        return t.launches, {"x": x, "dy": dy, "y": y, "dx": dx, "g": g}
    with emulated_cuda.traffic(every) as t:
        dx = ops.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5, [True, True, True])[0]
    return t.launches, {"x": x, "dy": dy, "dx": dx}


def blocks_of(launch):
    g = launch["grid"]
    return g[0] * g[1] * g[2]


def threads_of(launch):
    b = launch["block"]
    return b[0] * b[1] * b[2]


def sampling_for(op, shape, layout, dtype, max_blocks):
    """A first run at k = a large number learns the grids; k is then set so
    the largest launch runs at most max_blocks blocks."""
    launches, _ = run(op, shape, layout, dtype, 1 << 30)
    largest = max(blocks_of(launch) for launch in launches)
    return max(1, math.ceil(largest / max_blocks))


def measure(op, shape, layout, dtype, max_blocks):
    every = sampling_for(op, shape, layout, dtype, max_blocks)
    start = time.time()
    launches, tensors = run(op, shape, layout, dtype, every)
    seconds = time.time() - start
    tensor_bytes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    # Each launch's bytes scale by blocks / blocks run.
    scaled = [(launch, blocks_of(launch) / max(1, launch["blocks_run"])) for launch in launches]
    passes = {name: {"read": 0.0, "read_asked": 0.0, "write": 0.0, "write_asked": 0.0} for name in tensors}
    dram_bytes = 0.0
    records = []
    for launch, scale in scaled:
        per = _traffic.tensor_passes([launch], tensors)
        touched = sum(e - b for d in ("load", "store") for b, e, _ in launch[d]["ranges"]) * scale
        dram_bytes += touched
        for name in tensors:
            for key in passes[name]:
                passes[name][key] += per[name][key] * scale
        blocks = blocks_of(launch)
        per_sm = max(1, RESIDENT_THREADS // threads_of(launch))
        eff = _traffic.sector_efficiency(launch)
        eff_all = _traffic.sector_efficiency(launch, element_only=False)
        records.append({
            "kernel": _traffic.short_name(launch["kernel"]), "grid": launch["grid"], "block": launch["block"],
            "blocks": blocks, "blocks_run": launch["blocks_run"],
            "waves": blocks / (MULTIPROCESSORS * per_sm),
            "sector_efficiency": eff, "sector_efficiency_all": eff_all,
            "dram_bytes": touched,
        })
    predicted = {}
    for gpu, bw in BANDWIDTH.items():
        predicted[gpu] = dram_bytes / (bw * COPY_FRACTION) + len(launches) * LAUNCH_COST_S
    reads, writes, native_launches = NATIVE[op]
    native_bytes = sum(tensor_bytes[n] * k for n, k in reads.items()) + sum(
        tensor_bytes[n] * k for n, k in writes.items())
    native = {gpu: native_bytes / (bw * COPY_FRACTION) + native_launches * LAUNCH_COST_S
              for gpu, bw in BANDWIDTH.items()}
    hot = [r for r in records if _traffic.is_hot_kernel(r["kernel"])]
    effs = [r["sector_efficiency"] for r in hot if r["sector_efficiency"] is not None]
    return {
        "op": op, "shape": list(shape), "layout": layout, "dtype": str(dtype).replace("torch.", ""),
        "every_kth_block": every, "emulation_seconds": round(seconds, 2),
        "launches": len(launches), "kernels": records,
        "min_hot_sector_efficiency": min(effs) if effs else None,
        "passes": {n: {k: round(v, 3) for k, v in p.items()} for n, p in passes.items()},
        "tensor_bytes": tensor_bytes, "dram_bytes": dram_bytes,
        "predicted_s": predicted, "native_bytes": native_bytes, "native_launches": native_launches,
        "native_predicted_s": native,
    }


def passes_text(p):
    out = []
    for name, v in p.items():
        parts = []
        if v["read"] > 0.005:
            parts.append(f"r{v['read']:.2f}")
        if v["write"] > 0.005:
            parts.append(f"w{v['write']:.2f}")
        out.append(f"{name} {' '.join(parts) or '-'}")
    return ", ".join(out)


def markdown(results, meta):
    lines = [
        "# PREDICTED GPU traffic and time of fused_bn's CUDA kernels (no GPU measured this)",
        "",
        f"Recorded on the emulated GPU (`python -m bench.traffic`, commit {meta['commit']}, {meta['date']}), "
        f"{meta['multiprocessors']} multiprocessors, grids sized for {RESIDENT_THREADS} resident threads each. "
        f"Batch {meta['batch']}; blocks sampled (every k-th block run, at most {meta['max_blocks']} per launch, "
        "bytes scaled by blocks / blocks run). Predicted time = Σ launch DRAM bytes / (bandwidth × "
        f"{COPY_FRACTION}) + {LAUNCH_COST_S * 1e6:.0f} us per launch; H100 SXM {BANDWIDTH['H100 SXM'] / 1e12} TB/s, "
        f"H200 {BANDWIDTH['H200'] / 1e12} TB/s. DRAM bytes: what each launch touches (no L2 reuse between launches). "
        "Native: PyTorch's CUDA batch norm from its pass structure (forward x read twice + y, 2 launches; eval "
        "x + y, 1 launch; backward x and dy twice + dx, 2 launches; backward_add_relu: ReLU's backward (dy, y -> g) "
        "then batch norm's on g, 3 launches). Passes: r = reads, w = writes, per launch "
        "unique bytes over tensor bytes, summed over the op's launches. Waves: blocks / (132 × blocks resident).",
        "",
        "| op | dtype | layout | shape | launches | blocks (waves) per hot launch | min sector eff. | passes "
        "| H100 us (native) | H200 us (native) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        hot = [k for k in r["kernels"] if _traffic.is_hot_kernel(k["kernel"])]
        waves = ", ".join(f"{k['blocks']} ({k['waves']:.2f})" for k in hot)
        eff = r["min_hot_sector_efficiency"]
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['layout']} | {'x'.join(map(str, r['shape']))} | {r['launches']} | "
            f"{waves} | {'-' if eff is None else f'{eff:.1%}'} | {passes_text(r['passes'])} | "
            f"{r['predicted_s']['H100 SXM'] * 1e6:.1f} ({r['native_predicted_s']['H100 SXM'] * 1e6:.1f}) | "
            f"{r['predicted_s']['H200'] * 1e6:.1f} ({r['native_predicted_s']['H200'] * 1e6:.1f}) |")
    low = [r for r in results if r["min_hot_sector_efficiency"] is not None and r["min_hot_sector_efficiency"] < 0.9]
    lines += ["", f"Cases with a hot kernel under 90% sector efficiency: {len(low)} of {len(results)}."]
    for r in low:
        lines.append(f"- {r['op']} {r['dtype']} {r['layout']} {'x'.join(map(str, r['shape']))}: "
                     f"{r['min_hot_sector_efficiency']:.1%}")
    partial = sorted({(k["kernel"].split("<")[0], r["layout"], "x".join(map(str, r["shape"])), round(k["waves"], 2))
                      for r in results for k in r["kernels"]
                      if _traffic.is_hot_kernel(k["kernel"]) and 1 < k["waves"] and k["waves"] % 1 and
                      k["waves"] % 1 < 0.5})
    lines += ["", f"Hot launches of more than one wave whose last wave is under half full: {len(partial)}."]
    lines += [f"- {kernel} {layout} {shape}: {waves} waves" for kernel, layout, shape, waves in partial]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-blocks", type=int, default=24, help="blocks run per launch at most (sampling)")
    parser.add_argument("--quick", action="store_true", help="three shapes, float32 only")
    parser.add_argument("--ops", nargs="*", default=OPS)
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--layouts", nargs="*", default=LAYOUTS)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "traffic-predicted"))
    args = parser.parse_args()

    import fused_bn  # noqa: F401  (the op schemas)
    import emulated_cuda

    emulated_cuda.build()
    emulated_cuda.enable(True)
    emulated_cuda.configure(MULTIPROCESSORS, "forward", 0, RESIDENT_THREADS)
    shapes = RESNET50 + ODD
    dtypes = args.dtypes
    if args.quick:
        shapes, dtypes = [(256, 56, 56), (512, 7, 7), (3, 224, 224)], ["float32"]
    results = []
    start = time.time()
    for op in args.ops:
        for dtype in dtypes:
            for layout in args.layouts:
                for c, h, w in shapes:
                    shape = (args.batch, c, h, w)
                    r = measure(op, shape, layout, DTYPES[dtype], args.max_blocks)
                    results.append(r)
                    print(f"{op:14} {dtype:9} {layout:13} {'x'.join(map(str, shape)):16} launches {r['launches']} "
                          f"min eff {r['min_hot_sector_efficiency'] or 0:.1%} {passes_text(r['passes'])} "
                          f"H100 {r['predicted_s']['H100 SXM'] * 1e6:.1f} us (native "
                          f"{r['native_predicted_s']['H100 SXM'] * 1e6:.1f}) [{r['emulation_seconds']} s]", flush=True)
    meta = {"PREDICTED": "no GPU ran this: emulated addresses, assumed bandwidths", "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "batch": args.batch,
            "max_blocks": args.max_blocks, "multiprocessors": MULTIPROCESSORS, "resident_threads": RESIDENT_THREADS,
            "bandwidth_bytes_per_s": BANDWIDTH, "copy_fraction": COPY_FRACTION, "launch_cost_s": LAUNCH_COST_S,
            "native": {op: {"reads": r, "writes": w, "launches": n} for op, (r, w, n) in NATIVE.items()},
            "python": platform.python_version(), "torch": torch.__version__,
            "seconds": round(time.time() - start, 1)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results, meta))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} (PREDICTED) in {meta['seconds']} s")


if __name__ == "__main__":
    main()
