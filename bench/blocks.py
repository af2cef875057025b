"""Benchmark of the fused epilogues: bn_<act> = act(bn(x)) and bn_add_<act> =
act(bn(x) + z) for every activation fused_bn fuses, training forward+backward,
against the eager block they replace (nn.BatchNorm2d, then the add in place, then
the activation module, in place where nn has that, as torchvision's and timm's
blocks write it) and torch.compile of that same eager block.

Memory: on CUDA, the peak allocation during one forward+backward above what was
allocated before it (torch.cuda.max_memory_allocated). On the CPU, PyTorch keeps no
allocator statistics, so the column is what autograd saves for the backward
(unique storages seen by saved_tensors_hooks): the activation memory a training
step holds between its forward and its backward, where the implementations differ.

    python -m bench.blocks [--device cpu|cuda] [--quick] [--activations relu silu ...]
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn

from . import cases as cases_mod
from . import timing
from .impls import configure_dynamo, no_recompiles
from .run import Timer, describe_device, git_state, import_fused_bn, resolve_device

# The activations measured, as real networks set them (name -> nn module maker).
ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "hardtanh": lambda: nn.Hardtanh(-1.0, 1.0, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "hardsigmoid": lambda: nn.Hardsigmoid(inplace=True),
}
IMPLS = ("fused", "eager", "compiled")
# The CPU's block shape: 12.8 MB of float32, far beyond its L2 (and most of its L3).
BLOCK_CPU_SHAPES = ((16, 64, 56, 56),)
# Passes over an input-sized tensor the fused kernels make in a training step:
#   bn_<act>:     forward 3 (read x twice, write y) + backward 5 (read x, dy twice; write dx)
#   bn_add_<act>: forward 4 (+ read z) + backward 7 (read x, dy and y or z; write g = dz;
#                 read g, x; write dx)
PASSES = {False: 8, True: 11}
# The floor: the passes no implementation can avoid (forward reads x (and z),
# writes y; backward reads x, dy (and y or z), writes dx (and dz)).
# Floor bytes / time over the copy bandwidth measured in the same run is each
# case's fraction of the bandwidth the machine reaches (on the shared CPU VM,
# whose bandwidth moves 2x over hours, the measure a target can be met by).
FLOOR_PASSES = {False: 5, True: 8}


def block_name(activation, add):
    return f"bn_add_{activation}" if add else f"bn_{activation}"


class EagerBlock(nn.Module):
    def __init__(self, channels, activation, add):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.act = ACTIVATIONS[activation]()
        self.add = add

    def forward(self, x, z=None):
        out = self.bn(x)
        if self.add:
            out += z
        return self.act(out)


def make_modules(fused_bn, activation, add, channels, device):
    generator = torch.Generator().manual_seed(channels)
    eager = EagerBlock(channels, activation, add)
    with torch.no_grad():
        eager.bn.weight.copy_(1 + 0.1 * torch.randn(channels, generator=generator))
        eager.bn.bias.copy_(0.1 * torch.randn(channels, generator=generator))
    fused = fused_bn.FusedBatchNorm2d(channels, activation=ACTIVATIONS[activation]())
    fused.load_state_dict(eager.bn.state_dict())
    compiled_source = EagerBlock(channels, activation, add)
    compiled_source.load_state_dict(eager.state_dict())
    modules = {"fused": fused.to(device), "eager": eager.to(device),
               "compiled_source": compiled_source.to(device)}
    modules["compiled"] = torch.compile(modules["compiled_source"], dynamic=False, fullgraph=True)
    return modules


def make_step(module, x, z, grad):
    params = list(module.parameters())

    def step():
        x.grad = None
        if z is not None:
            z.grad = None
        for p in params:
            p.grad = None
        out = module(x) if z is None else module(x, z)
        out.backward(grad)
    return step


def saved_bytes(module, x, z):
    """Bytes of the unique storages autograd saves for the backward of one forward."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x) if z is None else module(x, z)
    del out
    return sum(storages.values())


def peak_bytes(step, device):
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure(fused_bn, activation, add, dtype, layout, shape, timer, device, copy_bw_gbps=None):
    modules = make_modules(fused_bn, activation, add, shape[1], device)
    generator = torch.Generator(device=device).manual_seed(0)
    torch_dtype = cases_mod.DTYPES[dtype]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def tensor(scale, shift):
        t = torch.randn(shape, device=device, generator=generator) * scale + shift
        return t.to(torch_dtype).contiguous(memory_format=memory_format)

    x = tensor(2, 0.5).requires_grad_()
    z = tensor(1, 0).requires_grad_() if add else None
    grad = tensor(1, 0)
    steps = {impl: make_step(modules[impl], x, z, grad) for impl in IMPLS}
    record = {"block": block_name(activation, add), "activation": activation, "residual": add, "dtype": dtype, "layout": layout, "shape": list(shape), "errors": {}}
    for impl in IMPLS:
        try:
            timer.warm_up(steps[impl])
        except Exception as exc:  # noqa: BLE001  (reported, the other implementations still run)
            record["errors"][impl] = f"{type(exc).__name__}: {str(exc)[:300]}"
    working = [impl for impl in IMPLS if impl not in record["errors"]]
    samples = {impl: [] for impl in working}
    with no_recompiles():
        for round_index in range(timer.rounds):
            order = working[round_index % len(working):] + working[:round_index % len(working)]
            for impl in order:
                samples[impl] += timer.samples_ms(steps[impl])[0]
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    for impl in working:
        median, iqr = timing.summarize_samples(samples[impl])
        record[f"{impl}_ms"] = median
        record[f"{impl}_iqr_ms"] = iqr
        record[f"{impl}_gbps"] = numel * itemsize * PASSES[add] / (median * 1e-3) / 1e9
        if copy_bw_gbps:
            floor_gbps = numel * itemsize * FLOOR_PASSES[add] / (median * 1e-3) / 1e9
            record[f"{impl}_of_copy_bw"] = floor_gbps / copy_bw_gbps
        if device.type == "cuda":
            record[f"{impl}_peak_mb"] = peak_bytes(steps[impl], device) / 2**20
        else:
            module = modules["compiled_source" if impl == "compiled" else impl]
            record[f"{impl}_saved_mb"] = saved_bytes(module, x, z) / 2**20
    for other in ("eager", "compiled"):
        if record.get("fused_ms") and record.get(f"{other}_ms"):
            record[f"speedup_vs_{other}"] = record[f"{other}_ms"] / record["fused_ms"]
    return record


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def format_table(records, memory_key, memory_label):
    with_floor = any("fused_of_copy_bw" in r for r in records)
    floor_header = " fused of copy BW | eager of copy BW |" if with_floor else ""
    lines = [f"| block | dtype | layout | shape | fused_bn ms | eager ms | compiled ms | vs eager | "
             f"vs compiled | fused {memory_label} | eager {memory_label} | compiled {memory_label} |"
             + floor_header,
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_floor else "")]
    for r in records:
        def cell(key, fmt):
            v = r.get(key)
            return format(v, fmt) if v is not None else "n/a"
        lines.append(
            f"| {r['block']} | {r['dtype']} | {'NHWC' if r['layout'] == 'channels_last' else 'NCHW'} | "
            f"{'x'.join(map(str, r['shape']))} | {cell('fused_ms', '.3f')} | {cell('eager_ms', '.3f')} | "
            f"{cell('compiled_ms', '.3f')} | {cell('speedup_vs_eager', '.2f')}x | "
            f"{cell('speedup_vs_compiled', '.2f')}x | {cell('fused_' + memory_key, '.1f')} | "
            f"{cell('eager_' + memory_key, '.1f')} | {cell('compiled_' + memory_key, '.1f')} |"
            + (f" {cell('fused_of_copy_bw', '.0%')} | {cell('eager_of_copy_bw', '.0%')} |" if with_floor else ""))
    return "\n".join(lines)


def format_summary(records):
    lines = ["| block | dtype | layout | cases | geomean vs eager | geomean vs compiled |",
             "|---|---|---|---|---|---|"]
    groups = {}
    for r in records:
        for key in ((r["block"], r["dtype"], r["layout"]), (r["block"], r["dtype"], "all"),
                    ("all", r["dtype"], "all")):
            groups.setdefault(key, []).append(r)
    for (block, dtype, layout), rs in groups.items():
        lines.append(f"| {block} | {dtype} | {layout} | {len(rs)} | "
                     f"{geomean([r.get('speedup_vs_eager') for r in rs]):.2f}x | "
                     f"{geomean([r.get('speedup_vs_compiled') for r in rs]):.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto picks cuda when available")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtypes", nargs="+", choices=list(cases_mod.DTYPES), default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--activations", nargs="+", choices=list(ACTIVATIONS), default=list(ACTIVATIONS))
    p.add_argument("--shapes", nargs="+", default=None, help="NxCxHxW shapes (default: the device's)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--min-run-time", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    args = p.parse_args(argv)
    started = time.time()
    device = resolve_device(args.device)
    fused_bn = import_fused_bn()
    configure_dynamo()
    device_name, description = describe_device(device)
    timer = Timer(device, args.quick, args)
    if device.type == "cpu":
        timing.settle_cpu_allocator()
        # One shape well beyond the caches per layout and dtype: 19 blocks x 2 x 2
        # cases, each compiled once, is most of make bench's time already.
        shapes = cases_mod.CPU_QUICK_SHAPES if args.quick else BLOCK_CPU_SHAPES
        dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
        memory_key, memory_label = "saved_mb", "saved MB"
    else:
        shapes = cases_mod.GPU_QUICK_SHAPES if args.quick else cases_mod.gpu_shapes((64,))
        dtypes = args.dtypes or ["float32", "float16", "bfloat16"]
        memory_key, memory_label = "peak_mb", "peak MB"
    if args.shapes:
        shapes = [tuple(int(v) for v in text.split("x")) for text in args.shapes]
    # Measured in every run: FLOOR_PASSES' comment says why.
    if device.type == "cuda":
        copy_bw_gbps, _ = timing.copy_bandwidth_gbps(device)
        copy_bw_source = "device-to-device copy"
    else:
        copy_bw_gbps = timing.cpu_memory_bandwidth_gbps()["copy"]
        copy_bw_source = f"a 256 MB tensor copy with the run's {torch.get_num_threads()} threads"
    print(f"copy bandwidth ({copy_bw_source}): {copy_bw_gbps:.0f} GB/s", flush=True)
    commit, dirty = git_state()
    print(f"fused_bn epilogue benchmark (training forward+backward) on {description}; commit "
          f"{commit[:12]}{' (dirty)' if dirty else ''}", flush=True)
    records = []
    for shape in shapes:
        for dtype in dtypes:
            for layout in cases_mod.LAYOUTS:
                for activation, add in ((a, add) for a in args.activations for add in (False, True)):
                    r = measure(fused_bn, activation, add, dtype, layout, shape, timer, device, copy_bw_gbps)
                    records.append(r)
                    print(f"{r['block']:18s} {dtype:9s} {layout:13s} {'x'.join(map(str, shape)):14s} "
                          f"fused {r.get('fused_ms', float('nan')):.3f} ms  "
                          f"{r.get('speedup_vs_eager', float('nan')):.2f}x eager  "
                          f"{r.get('speedup_vs_compiled', float('nan')):.2f}x compiled  "
                          f"{memory_label} fused {r.get('fused_' + memory_key, float('nan')):.1f} "
                          f"eager {r.get('eager_' + memory_key, float('nan')):.1f}"
                          + (f"  errors {r['errors']}" if r["errors"] else ""), flush=True)
    meta = {"device": description, "commit": commit, "dirty": dirty, "torch": torch.__version__,
            "timer": timer.name, "threads": torch.get_num_threads(),
            "run_seconds": time.time() - started, "passes": PASSES, "floor_passes": FLOOR_PASSES,
            "copy_bandwidth_gbps": copy_bw_gbps,
            "memory": "peak allocated during fwd+bwd" if device.type == "cuda"
            else "bytes saved for backward (unique storages)"}
    stem = device_name + "-blocks" + ("-quick" if args.quick else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    text = (f"# fused_bn epilogue benchmark: {device_name}\n\n"
            f"- {description}; torch {torch.__version__}; commit `{commit}`{' (dirty)' if dirty else ''}\n"
            f"- training forward+backward of act(bn(x)) and act(bn(x) + z); eager = nn.BatchNorm2d, "
            f"in-place add, the activation module (in place where nn has that); compiled = torch.compile "
            f"of that eager block "
            f"(fullgraph, dynamic=False); timer {timer.name}, median of interleaved rounds\n"
            f"- memory: {meta['memory']}\n"
            + (f"- of copy BW: the floor's bytes ({FLOOR_PASSES} input-sized passes) / time, over the "
               f"copy bandwidth measured in this run ({copy_bw_source}: {copy_bw_gbps:.0f} GB/s)\n"
               if copy_bw_gbps else "") + "\n"
            f"## Summary (geometric means; other's time / fused_bn's)\n\n{format_summary(records)}\n\n"
            f"## All cases (median ms)\n\n{format_table(records, memory_key, memory_label)}\n")
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    print("\n" + format_summary(records))
    print(f"\nwrote {os.path.join(args.out, stem)}.{{json,md}} in {time.time() - started:.0f} s")
    return 1 if any(r["errors"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
