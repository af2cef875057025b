"""End-to-end benchmark: a training step (forward, backward, SGD step) of
torchvision and timm models (bench/zoo.py) as they come, after
``convert_model`` and after ``convert_model(fuse=True)``, in both memory
formats, eager and (``--compile``) ``torch.compile``d, all interleaved in one
process; then the per-call host overhead of a tiny batch-norm layer
(training forward+backward), ours against nn's. A compiled variant is
compared with the compiled original: that is the choice a compile user makes.

Reported per case: median step ms, speedup over the original, batch norm's
share of the step (torch.profiler: self time of every batch-norm op, fused
activation/add included for fuse, over the self time of all ops), and memory
(CUDA: peak allocated during a step above what was allocated before it; CPU,
where PyTorch keeps no allocator statistics: the bytes autograd saves for the
backward, unique storages). CPU: batch 8 at 112x112, float32. GPU: batch 128 at
224x224, bf16 autocast.

    python -m bench.models [--device cpu|cuda] [--quick] [--compile] [--models resnet50 ...]
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch

from . import timing, zoo
from .report import README_PATH, replace_readme_block
from .run import describe_device, git_state, import_fused_bn, resolve_device

MODELS = ("resnet50", "resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
          "timm/efficientnet_b0", "timm/cspdarknet53")
VARIANTS = ("original", "convert", "fuse")
FORMATS = ("contiguous", "channels_last")
BATCH_NORM_OP_MARKERS = ("batch_norm", "batchnorm")
TINY_LAYER_SHAPE = (2, 16, 4, 4)


def settings(device, quick):
    if device.type == "cuda":
        return {"batch": 32 if quick else 128, "side": 224, "autocast": torch.bfloat16,
                "rounds": 2 if quick else 5, "steps_per_round": 3 if quick else 10}
    return {"batch": 4 if quick else 8, "side": 64 if quick else 112, "autocast": None,
            "rounds": 2 if quick else 3, "steps_per_round": 2 if quick else 3}


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Case:
    """One model variant in one memory format, with its optimizer and data."""

    def __init__(self, fused_bn, name, variant, memory_format, mode, device, config, original):
        self.name, self.variant, self.memory_format, self.mode = name, variant, memory_format, mode
        self.device, self.config = device, config
        model = copy.deepcopy(original)
        if variant != "original":
            model = fused_bn.convert_model(model, fuse=variant == "fuse")
        fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        model = model.to(device=device, memory_format=fmt).train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.model = torch.compile(model) if mode == "compiled" else model
        generator = torch.Generator().manual_seed(0)
        side = config["side"]
        x = torch.randn(config["batch"], 3, side, side, generator=generator)
        self.x = x.to(device).contiguous(memory_format=fmt)
        self.labels = torch.randint(0, 1000, (config["batch"],), generator=generator).to(device)

    def _forward_loss(self):
        autocast = self.config["autocast"]
        with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            output = self.model(self.x)
            logits = output.logits if hasattr(output, "logits") else output
            return torch.nn.functional.cross_entropy(logits.float(), self.labels)

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        self._forward_loss().backward()
        self.optimizer.step()

    def timed_steps_ms(self, count):
        times = []
        for _ in range(count):
            _synchronize(self.device)
            start = time.perf_counter()
            self.step()
            _synchronize(self.device)
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def batch_norm_profile(self, steps=3):
        """(share of the step's op time, ms per step) of the batch-norm ops
        inside the model, medians over profiled steps: the layers' time with
        the inputs, thread pool and allocator state a model gives them, which
        a loop over one layer does not."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        attr = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        shares, times_ms = [], []
        for _ in range(steps):
            with profile(activities=activities) as prof:
                self.step()
                _synchronize(self.device)
            total = bn = 0.0
            for event in prof.key_averages():
                t = getattr(event, attr, 0.0) or 0.0
                total += t
                if any(marker in event.key.lower() for marker in BATCH_NORM_OP_MARKERS):
                    bn += t
            shares.append(bn / total if total else float("nan"))
            times_ms.append(bn / 1e3)
        return statistics.median(shares), statistics.median(times_ms)

    def memory_mb(self):
        if self.mode == "compiled" and self.device.type != "cuda":
            return float("nan")  # saved-tensor hooks do not see inside a compiled graph's saved values
        if self.device.type == "cuda":
            _synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            _synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        self.optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self._forward_loss()
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(storages.values()) / 2**20


def tiny_layer_overhead_us(fused_bn, device, rounds=5, calls=400):
    """Per-call wall time (µs) of a tiny layer's training forward+backward: all
    host time, the batch norm's own work being a few hundred bytes."""
    results = {}
    layers = {"nn": torch.nn.BatchNorm2d(TINY_LAYER_SHAPE[1]).to(device),
              "fused_bn": fused_bn.FusedBatchNorm2d(TINY_LAYER_SHAPE[1]).to(device)}
    x = torch.randn(TINY_LAYER_SHAPE, device=device, requires_grad=True)
    g = torch.randn(TINY_LAYER_SHAPE, device=device)
    samples = {name: [] for name in layers}
    for layer in layers.values():
        for _ in range(50):
            layer(x).backward(g)
    for round_index in range(rounds):
        for name in (list(layers) if round_index % 2 == 0 else list(layers)[::-1]):
            layer = layers[name]
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                layer(x).backward(g)
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    for name, values in samples.items():
        results[f"{name}_us"] = statistics.median(values)
    results["fused_bn_over_nn"] = results["fused_bn_us"] / results["nn_us"]
    return results


def run(fused_bn, device, model_names, quick, modes=("eager",)):
    config = settings(device, quick)
    cases = []
    for name in model_names:
        reason = zoo.available(name)
        if reason is not None:
            print(f"{name}: skipped ({reason})", flush=True)
            continue
        original, _ = zoo.build(name)
        for mode in modes:
            for variant in VARIANTS:
                for memory_format in FORMATS:
                    cases.append(Case(fused_bn, name, variant, memory_format, mode, device, config, original))
    for case in cases:  # warm-up: first-call costs (compilation), allocator growth
        case.timed_steps_ms(2 if case.mode == "compiled" else 1)
    samples = {id(c): [] for c in cases}
    for round_index in range(config["rounds"]):
        shift = round_index % max(1, len(cases))
        for case in cases[shift:] + cases[:shift]:
            # One untimed step first: the first step after another model's
            # pays for that model's allocations and caches (seen: every
            # original, first of its model in the order, ~20% slower).
            case.step()
            samples[id(case)] += case.timed_steps_ms(config["steps_per_round"])
        print(f"round {round_index + 1}/{config['rounds']} done", flush=True)
    records = []
    for case in cases:
        median, iqr = timing.summarize_samples(samples[id(case)])
        records.append({"model": case.name, "variant": case.variant, "memory_format": case.memory_format,
                        "mode": case.mode,
                        "step_ms": median, "iqr_ms": iqr, "samples": len(samples[id(case)]),
                        "memory_mb": case.memory_mb()})
        records[-1]["bn_share"], records[-1]["bn_ms"] = case.batch_norm_profile()
    by_key = {(r["model"], r["memory_format"], r["mode"], r["variant"]): r for r in records}
    for r in records:
        base = by_key[(r["model"], r["memory_format"], r["mode"], "original")]
        r["speedup"] = base["step_ms"] / r["step_ms"]
        r["bn_speedup"] = base["bn_ms"] / r["bn_ms"] if r["bn_ms"] else float("nan")
    return config, records


def geomean(values):
    values = [v for v in values if v and not math.isnan(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def format_table(records, memory_label):
    lines = [f"| model | format | mode | variant | step ms | IQR ms | speedup | batch norm share | "
             f"batch norm ms | batch norm speedup | {memory_label} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {'NHWC' if r['memory_format'] == 'channels_last' else 'NCHW'} | "
                     f"{r.get('mode', 'eager')} | {r['variant']} | {r['step_ms']:.1f} | {r['iqr_ms']:.1f} | {r['speedup']:.3f}x | "
                     f"{100 * r['bn_share']:.1f}% | {r['bn_ms']:.1f} | {r['bn_speedup']:.2f}x | "
                     f"{r['memory_mb']:.0f} |")
    return "\n".join(lines)


def format_summary(records):
    lines = ["| mode | variant | format | models | geomean step speedup over the original (same mode) | "
             "slowest model | geomean batch-norm time speedup (profiled in the step) |",
             "|---|---|---|---|---|---|---|"]
    for mode in ("eager", "compiled"):
        for variant in VARIANTS[1:]:
            for fmt in FORMATS:
                rs = [r for r in records if r["variant"] == variant and r["memory_format"] == fmt
                      and r.get("mode", "eager") == mode]
                if rs:
                    slowest = min(rs, key=lambda r: r["speedup"])
                    lines.append(f"| {mode} | {variant} | {'NHWC' if fmt == 'channels_last' else 'NCHW'} | "
                                 f"{len(rs)} | {geomean([r['speedup'] for r in rs]):.3f}x | "
                                 f"{slowest['model']} {slowest['speedup']:.3f}x | "
                                 f"{geomean([r['bn_speedup'] for r in rs]):.2f}x |")
    return "\n".join(lines)


def write_plot(path, records, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["model"], r["memory_format"], r.get("mode", "eager")) for r in records}, key=str)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    width = 0.38
    for i, variant in enumerate(VARIANTS[1:]):
        values = [next((r["speedup"] for r in records
                        if (r["model"], r["memory_format"], r.get("mode", "eager")) == label
                        and r["variant"] == variant), float("nan")) for label in labels]
        ax.bar([j + (i - 0.5) * width for j in range(len(labels))], values, width, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{m}\n{'NHWC' if f == 'channels_last' else 'NCHW'}\n{mode}" for m, f, mode in labels],
                       fontsize=7)
    ax.set_ylabel("training step speedup over the original")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto picks cuda when available")
    p.add_argument("--quick", action="store_true", help="small smoke run; writes <device>-models-quick.*")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=zoo.ALL_MODELS)
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile every variant (compared with the compiled original)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    started = time.time()
    device = resolve_device(args.device)
    fused_bn = import_fused_bn()
    device_name, description = describe_device(device)
    if device.type == "cpu":
        timing.settle_cpu_allocator()
        bandwidth = timing.cpu_memory_bandwidth_gbps()
    else:
        bandwidth = {"copy": timing.copy_bandwidth_gbps(device)}
    commit, dirty = git_state()
    print(f"fused_bn end-to-end training-step benchmark on {description}; commit {commit[:12]}"
          f"{' (dirty)' if dirty else ''}", flush=True)
    modes = ("eager", "compiled") if args.compile else ("eager",)
    config, records = run(fused_bn, device, args.models, args.quick, modes)
    overhead = tiny_layer_overhead_us(fused_bn, device)
    memory_label = "peak MB" if device.type == "cuda" else "saved MB"
    meta = {"device": description, "commit": commit, "dirty": dirty, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "run_seconds": time.time() - started,
            "batch": config["batch"], "side": config["side"],
            "autocast": str(config["autocast"]) if config["autocast"] else None,
            "rounds": config["rounds"], "steps_per_round": config["steps_per_round"],
            "bandwidth_gbps": bandwidth, "tiny_layer": {"shape": list(TINY_LAYER_SHAPE), **overhead}}
    stem = device_name + "-models" + ("-compiled" if args.compile else "") + ("-quick" if args.quick else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    setup = (f"training step (forward, backward, SGD step) at batch {config['batch']}, "
             f"{config['side']}x{config['side']}, {' and '.join(modes)}, "
             + (f"{config['autocast']} autocast" if config["autocast"] else "float32")
             + f"; median of {config['rounds']} interleaved rounds x {config['steps_per_round']} steps")
    summary = format_summary(records)
    tiny = (f"Tiny layer {tuple(TINY_LAYER_SHAPE)} training forward+backward per call: fused_bn "
            f"{overhead['fused_bn_us']:.1f} µs, nn {overhead['nn_us']:.1f} µs "
            f"({overhead['fused_bn_over_nn']:.2f}x nn's time).")
    text = (f"# fused_bn end-to-end benchmark: {device_name}\n\n"
            f"- {description}; torch {torch.__version__}; commit `{commit}`{' (dirty)' if dirty else ''}\n"
            f"- {setup}\n- batch norm share: profiler self time of batch-norm ops (fused ReLU/add "
            f"included) over all ops' self time\n- memory: "
            + ("peak allocated during a step" if device.type == "cuda"
               else "bytes autograd saves for the backward (unique storages)")
            + f"\n- {tiny}\n\n## Summary\n\n{summary}\n\n## All cases\n\n"
            f"{format_table(records, memory_label)}\n")
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    write_plot(os.path.join(args.out, stem + ".png"), records, f"{description}: {setup}")
    if not args.quick:
        block = (f"**{description}**, torch {torch.__version__}, commit `{commit[:12]}`: {setup}; "
                 f"full table [`bench/results/{stem}.md`](bench/results/{stem}.md).\n\n{summary}\n\n{tiny}")
        replace_readme_block(README_PATH, f"bench-models:{device_name}" + ("-compiled" if args.compile else ""), block)
    print("\n" + format_table(records, memory_label) + "\n\n" + summary + "\n\n" + tiny)
    print(f"\nwrote {os.path.join(args.out, stem)}.{{json,md,png}} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
