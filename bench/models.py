"""End-to-end benchmark: a training step (forward, backward, SGD step) and an
eval forward of torchvision and timm models (bench/zoo.py) as they come, after
``convert_model`` and after ``convert_model(fuse=True)``, in both memory
formats, eager and (``--compile``) ``torch.compile``d, all interleaved in one
process; then the per-call host overhead of a tiny batch-norm layer
(training forward+backward), ours against nn's. A compiled variant is
compared with the compiled original: that is the choice a compile user makes.

Steps (``--steps``, default all three): ``train``; ``eval``, ``model.eval()``
forward under ``torch.no_grad()``; ``eval_grad``, the eval forward with grad
mode on (validation loops written without no_grad). The eval steps run on a
copy of each model whose batch norms carry random running statistics and
affine parameters (as after training; never trained here), and compiled
``eval`` is also timed with ``torch._inductor.config.freezing`` (which needs
no_grad: it folds an eval batch norm into the convolution before it). Eval
parity, before timing: each conversion's float64 eager eval output against
the original's (relative 1e-10), and every timed eval case's output against
the float64 original by the accuracy rule of bench/parity.py (at most twice
the error of the original run the same way, plus one ulp), and no frozen
case's output bit-identical to its unfrozen twin's (freezing took effect).

Reported per case: median step ms, speedup over the original, batch norm's
share of the step (torch.profiler: self time of every batch-norm op, fused
activation/add included for fuse, over the self time of all ops), and memory
(CUDA: peak allocated during a step above what was allocated before it; CPU,
where PyTorch keeps no allocator statistics: the bytes autograd saves for the
backward, unique storages). CPU: batch 8 at 112x112, float32. GPU: batch 128 at
224x224, bf16 autocast.

    python -m bench.models [--device cpu|cuda] [--quick] [--compile] [--steps train eval eval_grad]
                           [--models resnet50 ...]
"""
import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import textwrap
import time

import torch

from . import timing, zoo
from .impls import configure_dynamo
from .report import BENCHMARKS_DOC_PATH, RESULTS_LINK, replace_doc_block
from .run import describe_device, git_state, import_fused_bn, resolve_device

MODELS = ("resnet50", "resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
          "timm/efficientnet_b0", "timm/cspdarknet53")
VARIANTS = ("original", "convert", "fuse")
FORMATS = ("contiguous", "channels_last")
STEPS = ("train", "eval", "eval_grad")
STEP_LABELS = {"train": "training step (forward, backward, SGD step)",
               "eval": "eval forward under no_grad", "eval_grad": "eval forward with grad mode on"}
BATCH_NORM_OP_MARKERS = ("batch_norm", "batchnorm")
TINY_LAYER_SHAPE = (2, 16, 4, 4)
# Eval parity: float64 conversions against the float64 original, relative to
# the reference's largest magnitude; float32 (or autocast) cases by the rule
# of bench/parity.py against the float64 original.
FLOAT64_RELATIVE_TOLERANCE = 1e-10
ERROR_FACTOR = 2.0


def settings(device, quick):
    if device.type == "cuda":
        return {"batch": 32 if quick else 128, "side": 224, "autocast": torch.bfloat16,
                "rounds": 2 if quick else 5, "steps_per_round": 3 if quick else 10}
    return {"batch": 4 if quick else 8, "side": 64 if quick else 112, "autocast": None,
            "rounds": 2 if quick else 3, "steps_per_round": 2 if quick else 3}


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_format(memory_format):
    return torch.channels_last if memory_format == "channels_last" else torch.contiguous_format


def make_inputs(config, device, memory_format):
    """(input, labels): the same draw for every case."""
    generator = torch.Generator().manual_seed(0)
    side = config["side"]
    x = torch.randn(config["batch"], 3, side, side, generator=generator)
    labels = torch.randint(0, 1000, (config["batch"],), generator=generator).to(device)
    return x.to(device).contiguous(memory_format=_torch_format(memory_format)), labels


def eval_model(original, seed=1):
    """A copy of ``original`` whose batch norms hold random running statistics
    and affine parameters, as a trained model's do (a fresh model's are 0, 1, 1
    and 0), drawn as tests/test_zoo.py draws them: what the eval steps run."""
    model = copy.deepcopy(original)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.uniform_(-0.5, 0.5, generator=generator)
                if m.track_running_stats:
                    m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                    m.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


def mode_label(r):
    """A record's mode as the tables show it: eager, compiled or compiled+freezing."""
    return r.get("mode", "eager") + ("+freezing" if r.get("freezing") else "")


def case_key(r):
    """What a record is compared within (its original has the same key); records
    written before the eval steps are training steps without freezing."""
    return (r["model"], r["memory_format"], r.get("mode", "eager"), r.get("step", "train"),
            bool(r.get("freezing")))


def prepare_model(fused_bn, original, variant, memory_format, device):
    """A copy of ``original`` as ``variant`` converts it, in ``memory_format``."""
    model = copy.deepcopy(original)
    if variant != "original":
        model = fused_bn.convert_model(model, fuse=variant == "fuse")
    return model.to(device=device, memory_format=_torch_format(memory_format))


class Case:
    """One model variant in one memory format and one step (train: with its
    optimizer; eval, eval_grad: the model in eval mode), with its data.
    ``model``: an eval step's module from prepare_model, which the eval cases
    of one variant and format share (never trained, nothing to keep apart; a
    copy per case would hold a model per step, mode and freezing)."""

    def __init__(self, fused_bn, name, variant, memory_format, mode, device, config, original,
                 step="train", freezing=False, model=None):
        self.name, self.variant, self.memory_format, self.mode = name, variant, memory_format, mode
        self.step_name, self.freezing = step, freezing
        self.device, self.config = device, config
        if model is None or step == "train":
            model = prepare_model(fused_bn, original, variant, memory_format, device)
        if step == "train":
            model.train()
            self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        else:
            model.eval()
            self.optimizer = None
        # Freezing, torch 2.13: torch.compile(options={"freezing": True})
        # alone does not freeze (the batch norms' sqrt stays in the code),
        # the global config does, so each call of a frozen case runs under
        # the config patch (a few µs; a recompile freezes too). Dynamo does
        # not guard on the config, and plain torch.compile backends compare
        # equal: a frozen case of a model class compiled before without
        # freezing ran that graph (no compile, unfrozen times). The option
        # makes the backend differ, so Dynamo compiles the frozen case anew.
        options = {"freezing": True} if freezing else None
        self.model = torch.compile(model, options=options) if mode == "compiled" else model
        if freezing:
            import torch._inductor.config as inductor_config

            self._step_context = lambda: inductor_config.patch(freezing=True)
        else:
            self._step_context = contextlib.nullcontext
        self.x, self.labels = make_inputs(config, device, memory_format)

    def _forward_loss(self):
        autocast = self.config["autocast"]
        with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            output = self.model(self.x)
            logits = output.logits if hasattr(output, "logits") else output
            return torch.nn.functional.cross_entropy(logits.float(), self.labels)

    def eval_forward(self):
        """The eval step's forward (no_grad for eval, grad mode on for eval_grad)."""
        autocast = self.config["autocast"]
        with torch.set_grad_enabled(self.step_name == "eval_grad"), \
                torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None), \
                self._step_context():
            return _logits(self.model(self.x))

    def step(self):
        if self.step_name != "train":
            self.eval_forward()
            return
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

        if self.step_name != "train":  # eval_grad: what the graph holds until the output is dropped
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                self.eval_forward()
            return sum(storages.values()) / 2**20
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


def _max_abs_error(actual, reference):
    err = (actual.detach().double() - reference.detach().double()).abs().max().item()
    return math.inf if math.isnan(err) else err


def float64_eval_parity(fused_bn, evaluated, device, config, steps):
    """The eval steps in float64, eager: ({(variant, memory_format, step): (error,
    limit)}, {memory_format: the original's no_grad output}), each variant's
    output against the original's in the same format (error: max absolute
    difference; limit: FLOAT64_RELATIVE_TOLERANCE times the reference's
    largest magnitude, at least 1)."""
    models = {v: evaluated if v == "original" else fused_bn.convert_model(copy.deepcopy(evaluated), fuse=v == "fuse")
              for v in VARIANTS}
    results, references = {}, {}
    for memory_format in FORMATS:
        x = make_inputs(config, device, memory_format)[0].double()
        outputs = {}
        for variant, model in models.items():  # the original first: the reference
            model = copy.deepcopy(model).to(device=device, dtype=torch.float64,
                                             memory_format=_torch_format(memory_format)).eval()
            with torch.no_grad():
                no_grad_output = _logits(model(x))
            if variant == "original":
                reference = references[memory_format] = no_grad_output
            for step in steps:
                if step == "eval":
                    outputs[variant, step] = no_grad_output
                else:
                    with torch.enable_grad():
                        outputs[variant, step] = _logits(model(x)).detach()
            del model
        limit = FLOAT64_RELATIVE_TOLERANCE * max(1.0, reference.abs().max().item())
        for (variant, step), output in outputs.items():
            results[variant, memory_format, step] = (_max_abs_error(output, reference), limit)
    return results, references


def eval_parity(cases, float64_results, references, config):
    """Every timed eval case's output (its dtype, eager or compiled, frozen or
    not) against the float64 original in its format, by bench/parity.py's rule:
    error <= ERROR_FACTOR * the original's error, run the same way, + one ulp
    of the compared dtype at the reference's largest magnitude. Eager cases
    also carry their float64 result. Returns {id(case): parity dict}."""
    compare_dtype = config["autocast"] or torch.float32
    errors, outputs = {}, {}
    for case in cases:
        output = case.eval_forward().detach()  # in the case's own grad mode
        errors[id(case)] = _max_abs_error(output, references[case.name, case.memory_format])
        outputs[case.name, case.variant, case.memory_format, case.mode, case.step_name, case.freezing] = output
    originals = {(c.name, c.memory_format, c.mode, c.step_name, c.freezing): errors[id(c)]
                 for c in cases if c.variant == "original"}
    parity = {}
    for case in cases:
        reference = references[case.name, case.memory_format]
        original_error = originals[case.name, case.memory_format, case.mode, case.step_name, case.freezing]
        limit = ERROR_FACTOR * original_error + torch.finfo(compare_dtype).eps * max(1.0, reference.abs().max().item())
        entry = {"error": errors[id(case)], "original_error": original_error, "limit": limit,
                 "passed": errors[id(case)] <= limit}
        if case.mode == "eager":
            entry["float64_error"], entry["float64_limit"] = float64_results[
                case.name, case.variant, case.memory_format, case.step_name]
            entry["passed"] = entry["passed"] and entry["float64_error"] <= entry["float64_limit"]
        unfrozen = outputs.get((case.name, case.variant, case.memory_format, case.mode, case.step_name, False))
        if case.freezing and unfrozen is not None:
            # Folded weights round otherwise: the unfrozen graph's very bits
            # mean that graph ran (freezing did not take effect).
            entry["differs_from_unfrozen"] = not torch.equal(unfrozen, outputs[
                case.name, case.variant, case.memory_format, case.mode, case.step_name, True])
            entry["passed"] = entry["passed"] and entry["differs_from_unfrozen"]
        parity[id(case)] = entry
    return parity


EVAL_PARITY_RULE = (f"float64, eager: max|converted - original| <= {FLOAT64_RELATIVE_TOLERANCE:g} * "
                    "max(1, max|original|); every timed eval case (float32 or autocast, eager or compiled, "
                    f"frozen or not): max|case - original64| <= {ERROR_FACTOR:g} * max|original run the same "
                    "way - original64| + 1 ulp(dtype) * max(1, max|original64|); a frozen case's output not "
                    "bit-identical to its unfrozen compiled twin's (else freezing did not take effect)")


def run(fused_bn, device, model_names, quick, modes=("eager",), steps=STEPS, rounds=None):
    config = settings(device, quick)
    if rounds is not None:
        config["rounds"] = rounds
    eval_steps = [s for s in steps if s != "train"]
    cases, float64_results, references = [], {}, {}
    for name in model_names:
        reason = zoo.available(name)
        if reason is not None:
            print(f"{name}: skipped ({reason})", flush=True)
            continue
        original, _ = zoo.build(name)
        evaluated = eval_model(original) if eval_steps else None
        eval_models = {}
        for mode in modes:
            for step in steps:
                # Freezing folds constants: inference (no_grad, eval) only.
                for freezing in ((False, True) if mode == "compiled" and step == "eval" else (False,)):
                    for variant in VARIANTS:
                        for memory_format in FORMATS:
                            shared = None
                            if step != "train":
                                if (variant, memory_format) not in eval_models:
                                    eval_models[variant, memory_format] = prepare_model(
                                        fused_bn, evaluated, variant, memory_format, device)
                                shared = eval_models[variant, memory_format]
                            cases.append(Case(fused_bn, name, variant, memory_format, mode, device, config,
                                              original if step == "train" else evaluated, step, freezing, shared))
        if eval_steps:
            results, outputs = float64_eval_parity(fused_bn, evaluated, device, config, eval_steps)
            float64_results.update({(name,) + key: value for key, value in results.items()})
            references.update({(name, fmt): output for fmt, output in outputs.items()})
    for case in cases:  # warm-up: first-call costs (compilation), allocator growth
        case.timed_steps_ms(2 if case.mode == "compiled" else 1)
    eval_cases = [c for c in cases if c.step_name != "train"]
    parity = eval_parity(eval_cases, float64_results, references, config)
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
                        "mode": case.mode, "step": case.step_name, "freezing": case.freezing,
                        "step_ms": median, "iqr_ms": iqr, "samples": len(samples[id(case)]),
                        "memory_mb": case.memory_mb()})
        records[-1]["bn_share"], records[-1]["bn_ms"] = case.batch_norm_profile()
        if id(case) in parity:
            records[-1]["parity"] = parity[id(case)]
    by_key = {case_key(r) + (r["variant"],): r for r in records}
    for r in records:
        base = by_key[case_key(r) + ("original",)]
        r["speedup"] = base["step_ms"] / r["step_ms"]
        # A compiled original's batch norms are inside Inductor's kernels, where
        # the profiler cannot attribute them: no ratio then.
        r["bn_speedup"] = base["bn_ms"] / r["bn_ms"] if r["bn_ms"] and base["bn_ms"] else float("nan")
    return config, records


def geomean(values):
    values = [v for v in values if v and not math.isnan(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _or_na(value, spec, unit=""):
    """``value`` formatted by ``spec`` with ``unit``, or n/a where it was not measured (NaN)."""
    return "n/a" if value is None or math.isnan(value) else format(value, spec) + unit


def _format_name(memory_format):
    return "NHWC" if memory_format == "channels_last" else "NCHW"


def format_table(records, memory_label):
    lines = [f"| model | format | mode | step | variant | step ms | IQR ms | speedup | batch norm share | "
             f"batch norm ms | batch norm speedup | {memory_label} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {_format_name(r['memory_format'])} | "
                     f"{mode_label(r)} | {r.get('step', 'train')} | {r['variant']} | {r['step_ms']:.1f} | "
                     f"{r['iqr_ms']:.1f} | {r['speedup']:.3f}x | "
                     f"{100 * r['bn_share']:.1f}% | {r['bn_ms']:.1f} | {_or_na(r['bn_speedup'], '.2f', 'x')} | "
                     f"{_or_na(r['memory_mb'], '.0f')} |")
    return "\n".join(lines)


def format_summary(records):
    """The training steps' summary (records of the eval steps are in format_eval_summary)."""
    records = [r for r in records if r.get("step", "train") == "train"]
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
                    lines.append(f"| {mode} | {variant} | {_format_name(fmt)} | "
                                 f"{len(rs)} | {geomean([r['speedup'] for r in rs]):.3f}x | "
                                 f"{slowest['model']} {slowest['speedup']:.3f}x | "
                                 f"{_or_na(geomean([r['bn_speedup'] for r in rs]), '.2f', 'x')} |")
    return "\n".join(lines)


def _parity_ratio(r):
    """A record's worst eval parity error over its limit (float64 included), or None."""
    parity = r.get("parity")
    if not parity:
        return None
    ratios = [parity["error"] / parity["limit"] if parity["limit"] else math.inf]
    if "float64_error" in parity:
        ratios.append(parity["float64_error"] / parity["float64_limit"])
    return max(ratios)


def format_eval_table(records):
    """One row per model, format, mode and eval step: the three variants' median
    ms and original/converted, original/fused (above 1x: the conversion is
    faster), and the worst eval parity error of the conversions over its limit."""
    groups = {}
    for r in records:
        if r.get("step", "train") != "train":
            groups.setdefault(case_key(r), {})[r["variant"]] = r
    lines = ["| model | format | mode | step | original ms | convert ms | fuse ms | original/convert | "
             "original/fuse | parity (worst error / limit) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for by_variant in groups.values():
        first = next(iter(by_variant.values()))

        def cell(variant, key, fmt):
            r = by_variant.get(variant)
            return format(r[key], fmt) if r else "n/a"

        ratios = [_parity_ratio(r) for v, r in by_variant.items() if v != "original"]
        ratios = [x for x in ratios if x is not None]
        parity = (f"{'PASS' if max(ratios) <= 1 else 'FAIL'} {max(ratios):.2f}" if ratios else "n/a")
        lines.append(f"| {first['model']} | {_format_name(first['memory_format'])} | {mode_label(first)} | "
                     f"{first['step']} | {cell('original', 'step_ms', '.1f')} | {cell('convert', 'step_ms', '.1f')} | "
                     f"{cell('fuse', 'step_ms', '.1f')} | {cell('convert', 'speedup', '.3f')}x | "
                     f"{cell('fuse', 'speedup', '.3f')}x | {parity} |")
    return "\n".join(lines)


def format_eval_summary(records):
    lines = ["| mode | step | variant | format | models | geomean original/variant time (same mode) | "
             "slowest model |",
             "|---|---|---|---|---|---|---|"]
    for mode in ("eager", "compiled", "compiled+freezing"):
        for step in STEPS[1:]:
            for variant in VARIANTS[1:]:
                for fmt in FORMATS:
                    rs = [r for r in records if r.get("step", "train") == step and mode_label(r) == mode
                          and r["variant"] == variant and r["memory_format"] == fmt]
                    if rs:
                        slowest = min(rs, key=lambda r: r["speedup"])
                        lines.append(f"| {mode} | {step} | {variant} | {_format_name(fmt)} | {len(rs)} | "
                                     f"{geomean([r['speedup'] for r in rs]):.3f}x | "
                                     f"{slowest['model']} {slowest['speedup']:.3f}x |")
    return "\n".join(lines)


def write_plot(path, records, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in STEPS if any(r.get("step", "train") == s for r in records)]
    per_step = {s: sorted({(r["model"], r["memory_format"], mode_label(r)) for r in records
                           if r.get("step", "train") == s}, key=str) for s in steps}
    widest = max(len(labels) for labels in per_step.values())
    fig, axes = plt.subplots(len(steps), 1, figsize=(max(6, 1.1 * widest), 4 * len(steps)), squeeze=False)
    width = 0.38
    for ax, step in zip(axes[:, 0], steps):
        labels = per_step[step]
        for i, variant in enumerate(VARIANTS[1:]):
            values = [next((r["speedup"] for r in records
                            if (r["model"], r["memory_format"], mode_label(r)) == label
                            and r.get("step", "train") == step and r["variant"] == variant), float("nan"))
                      for label in labels]
            ax.bar([j + (i - 0.5) * width for j in range(len(labels))], values, width, label=variant)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"{m}\n{_format_name(f)}\n{mode}" for m, f, mode in labels], fontsize=7)
        ax.set_ylabel(f"{step} speedup over the original")
        ax.set_title(f"{STEP_LABELS[step]}", fontsize=9)
        ax.legend()
    fig.suptitle(textwrap.fill(title, int(14 * fig.get_figwidth())), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto picks cuda when available")
    p.add_argument("--quick", action="store_true", help="small smoke run; writes <device>-models-quick.*")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=zoo.ALL_MODELS)
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile every variant (compared with the compiled original); "
                        "compiled eval also with Inductor's freezing")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS,
                   help="train: forward, backward, SGD step; eval: model.eval() forward under no_grad; "
                        "eval_grad: the eval forward with grad mode on (default: all three)")
    p.add_argument("--rounds", type=_positive_int, default=None,
                   help="interleaved rounds per case (default: 3 on the CPU, 5 on a GPU; quick: 2)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    steps = [s for s in STEPS if s in args.steps]
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
    print(f"fused_bn end-to-end benchmark ({', '.join(steps)}) on {description}; commit {commit[:12]}"
          f"{' (dirty)' if dirty else ''}", flush=True)
    modes = ("eager", "compiled") if args.compile else ("eager",)
    if args.compile:
        # Each variant, format and step is a graph of its own, several per model class.
        configure_dynamo()
    config, records = run(fused_bn, device, args.models, args.quick, modes, steps, args.rounds)
    overhead = tiny_layer_overhead_us(fused_bn, device)
    memory_label = "peak MB" if device.type == "cuda" else "saved MB"
    eval_records = [r for r in records if "parity" in r]
    failed = [f"{r['model']} {_format_name(r['memory_format'])} {mode_label(r)} {r['step']} {r['variant']}"
              for r in eval_records if not r["parity"]["passed"]]
    eval_parity = {"passed": not failed, "cases": len(eval_records), "failed": failed, "rule": EVAL_PARITY_RULE}
    meta = {"device": description, "commit": commit, "dirty": dirty, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "run_seconds": time.time() - started,
            "batch": config["batch"], "side": config["side"],
            "autocast": str(config["autocast"]) if config["autocast"] else None,
            "rounds": config["rounds"], "steps_per_round": config["steps_per_round"], "steps": steps,
            "bandwidth_gbps": bandwidth, "tiny_layer": {"shape": list(TINY_LAYER_SHAPE), **overhead}}
    if eval_records:
        meta["eval_parity"] = eval_parity
    stem = device_name + "-models" + ("-compiled" if args.compile else "") + ("-quick" if args.quick else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    step_labels = [STEP_LABELS[s] for s in steps]
    steps_text = ", ".join(step_labels[:-1]) + (" and " if len(step_labels) > 1 else "") + step_labels[-1]
    setup = (f"{steps_text} at batch {config['batch']}, "
             f"{config['side']}x{config['side']}, {' and '.join(modes)}"
             + (" (eval also with Inductor freezing)" if args.compile and "eval" in steps else "") + ", "
             + (f"{config['autocast']} autocast" if config["autocast"] else "float32")
             + f"; median of {config['rounds']} interleaved rounds x {config['steps_per_round']} steps")
    summary = format_summary(records) if "train" in steps else ""
    eval_summary = format_eval_summary(records) if eval_records else ""
    parity_line = (f"eval parity: {'PASS' if eval_parity['passed'] else 'FAIL'} over {len(eval_records)} cases"
                   + (f" (failed: {'; '.join(failed)})" if failed else "") + f"; {EVAL_PARITY_RULE}")
    tiny = (f"Tiny layer {tuple(TINY_LAYER_SHAPE)} training forward+backward per call: fused_bn "
            f"{overhead['fused_bn_us']:.1f} µs, nn {overhead['nn_us']:.1f} µs "
            f"({overhead['fused_bn_over_nn']:.2f}x nn's time).")
    sections = []
    if summary:
        sections.append(f"## Summary\n\n{summary}")
    if eval_records:
        sections.append("## Eval summary\n\n(original ms / variant ms: above 1x the conversion is faster; "
                        "eval models carry random batch-norm statistics)\n\n" + eval_summary)
        sections.append(f"## Eval\n\n{format_eval_table(records)}")
    sections.append(f"## All cases\n\n{format_table(records, memory_label)}")
    text = (f"# fused_bn end-to-end benchmark: {device_name}\n\n"
            f"- {description}; torch {torch.__version__}; commit `{commit}`{' (dirty)' if dirty else ''}\n"
            f"- {setup}\n- batch norm share: profiler self time of batch-norm ops (fused ReLU/add "
            f"included) over all ops' self time\n- memory: "
            + ("peak allocated during a step" if device.type == "cuda"
               else "bytes autograd saves for the backward (unique storages; eval_grad: what its "
                    "forward's graph holds, eval: none)")
            + (f"\n- {parity_line}" if eval_records else "")
            + f"\n- {tiny}\n\n" + "\n\n".join(sections) + "\n")
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    write_plot(os.path.join(args.out, stem + ".png"), records, f"{description}: {setup}")
    # Only a full run (every default model and step) stands for docs/benchmarks.md's
    # table: a subset would replace it with part of it.
    full_run = not args.quick and sorted(args.models) == sorted(MODELS) and steps == list(STEPS)
    if full_run and eval_parity["passed"]:
        block = (f"**{description}**, torch {torch.__version__}, commit `{commit[:12]}`: {setup}; "
                 f"full table [`bench/results/{stem}.md`]({RESULTS_LINK}/{stem}.md).\n\n"
                 + "".join(f"{table}\n\n" for table in (summary, eval_summary) if table) + tiny)
        replace_doc_block(BENCHMARKS_DOC_PATH, f"bench-models:{device_name}" + ("-compiled" if args.compile else ""), block)
    print("\n" + format_table(records, memory_label) + "\n\n"
          + "".join(f"{table}\n\n" for table in (summary, eval_summary) if table)
          + (f"{format_eval_table(records)}\n\n{parity_line}\n\n" if eval_records else "") + tiny)
    if failed:
        print(f"\n*** EVAL PARITY FAILED ({len(failed)} case(s), docs/benchmarks.md left alone): {'; '.join(failed)} ***")
    print(f"\nwrote {os.path.join(args.out, stem)}.{{json,md,png}} in {time.time() - started:.0f} s")
    return 0 if eval_parity["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
