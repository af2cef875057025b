"""Benchmark fused_bn.FusedBatchNorm2d against nn.BatchNorm2d (eager) and
torch.compile(nn.BatchNorm2d): parity check first, then every case timed with the
three implementations interleaved. Usage: python3 -m bench.run [--quick] [--device D]
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

import torch

from . import cases as cases_mod
from . import report, timing
from .impls import IMPLS, ShapeModules, configure_dynamo, make_inputs, make_step, no_recompiles
from .parity import format_parity, run_parity

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A case whose interquartile range exceeds this fraction of its median is flagged noisy.
NOISY_IQR_FRACTION = 0.10


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (one shape, one dtype, short timings); writes "
                        "<device>-quick.* so published results are never overwritten")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N; auto picks cuda when available (default: auto)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"),
                   help="output directory (default: bench/results)")
    p.add_argument("--modes", nargs="+", choices=cases_mod.MODES, default=None)
    p.add_argument("--dtypes", nargs="+", choices=tuple(cases_mod.DTYPES), default=None)
    p.add_argument("--layouts", nargs="+", choices=cases_mod.LAYOUTS, default=None)
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="GPU suite batch sizes (default: 64 256)")
    p.add_argument("--merge", action="store_true",
                   help="merge these cases into the existing <device>.json (same commit and "
                        "torch only), e.g. to run the GPU suite in parts; without --merge a "
                        "filtered run writes <device>-partial.*")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per case (default: 3, quick: 2)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="CPU: seconds per implementation per round (default: 0.3, quick: 0.05)")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="GPU: timed milliseconds per implementation per round (default: 40)")
    p.add_argument("--skip-parity", action="store_true", help="skip the parity check")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- environment

def _run_text(cmd):
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except Exception:
        return ""


def git_state():
    commit = _run_text(["git", "rev-parse", "HEAD"]) or "unknown"
    # --no-optional-locks: read-only, never takes index.lock (the lead may be committing).
    status = _run_text(["git", "--no-optional-locks", "status", "--porcelain",
                        "--untracked-files=no"])
    return commit, bool(status)


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def describe_device(device):
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        return _slug(name), (f"{name}, {props.total_memory / 2**30:.0f} GiB, "
                             f"{props.multi_processor_count} SMs, "
                             f"L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    model, cores = cpu_model(), os.cpu_count()
    return (f"cpu-{_slug(model)}-{cores}c",
            f"{model}, {cores} cores, ATen CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda requested but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def import_fused_bn():
    try:
        import fused_bn
    except Exception as exc:
        sys.exit(f"cannot import fused_bn ({type(exc).__name__}: {exc}); build it first "
                 "(make build)")
    return fused_bn


def verify_real_fused_bn(fused_bn):
    """Published numbers must come from the compiled kernels, never from a stand-in."""
    from torch import nn

    has_ops = hasattr(torch.ops, "fused_bn") and hasattr(torch.ops.fused_bn, "batch_norm_train")
    for cls, nn_cls in ((fused_bn.FusedBatchNorm1d, nn.BatchNorm1d), (fused_bn.FusedBatchNorm2d, nn.BatchNorm2d),
                        (fused_bn.FusedBatchNorm3d, nn.BatchNorm3d)):
        if cls.forward is nn_cls.forward or not has_ops:
            sys.exit(f"fused_bn.{cls.__name__} does not run the fused_bn ops: refusing to benchmark")


# ----------------------------------------------------------------------------- measurement

def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def observe_eager_backend(step, device):
    """Which ATen batch-norm backend nn eager dispatched to, read from the profiler's
    op names (cudnn_batch_norm vs native kernels)."""
    if device.type != "cuda":
        return "native"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        _synchronize(device)
    names = {e.name for e in prof.events()}
    if any("cudnn_batch_norm" in n for n in names):
        return "cudnn"
    if any("miopen_batch_norm" in n for n in names):
        return "miopen"
    return "native"


class Timer:
    def __init__(self, device, quick, args):
        self.device = device
        self.rounds = args.rounds or (2 if quick else 3)
        self.min_run_time = args.min_run_time or (0.05 if quick else 0.3)
        self.rep_ms = args.rep_ms or (10 if quick else 40)
        self.name = (timing.cuda_timer_name() if device.type == "cuda"
                     else "torch.utils.benchmark.Timer.blocked_autorange")
        self.contention = timing.CpuContention() if device.type == "cpu" else None

    def warm_up(self, step):
        """First call (which compiles, for the compiled module) timed separately."""
        _synchronize(self.device)
        start = time.perf_counter()
        step()
        _synchronize(self.device)
        first_call_s = time.perf_counter() - start
        if self.device.type == "cpu":
            deadline = time.perf_counter() + 0.1
            for _ in range(100):
                step()
                if time.perf_counter() > deadline:
                    break
        return first_call_s

    def samples_ms(self, step):
        """Per-call samples and the CPU share other processes took meanwhile (CPU only)."""
        if self.device.type == "cuda":
            samples, _ = timing.cuda_samples_ms(step, self.device, rep_ms=self.rep_ms)
            return samples, None
        return self.contention.measure(lambda: timing.cpu_samples_ms(step, self.min_run_time))

    def settings(self):
        if self.device.type == "cuda":
            return {"rounds": self.rounds, "rep_ms_per_round": self.rep_ms, "warmup_ms": 25}
        return {"rounds": self.rounds, "min_run_time_s_per_round": self.min_run_time,
                "threads": torch.get_num_threads(),
                "contention_threshold": self.contention.threshold,
                "contention_max_attempts": self.contention.max_attempts}


def measure_case(case, modules, timer, copy_bw_gbps):
    device = timer.device
    x, grad = make_inputs(case, device)
    modules.set_training(case.mode != "eval_fwd")
    steps = {impl: make_step(modules.module(impl), case.mode, x, grad) for impl in IMPLS}
    record = {"key": case.key, "mode": case.mode, "dtype": case.dtype, "layout": case.layout,
              "shape": list(case.shape), "numel": case.numel, "bytes_moved": case.bytes_moved,
              "errors": {}, "notes": []}

    working = []
    for impl in IMPLS:
        try:
            record[f"{impl}_first_call_s"] = timer.warm_up(steps[impl])
            working.append(impl)
        except Exception as exc:
            record["errors"][impl] = f"{type(exc).__name__}: {str(exc)[:500]}"

    record["cudnn_rule"] = cases_mod.cudnn_rule(case, device.type)
    if "eager" in working:
        record["eager_backend"] = observe_eager_backend(steps["eager"], device)
        if device.type == "cuda" and (record["eager_backend"] == "cudnn") != record["cudnn_rule"]:
            record["notes"].append(f"eager backend {record['eager_backend']} contradicts the "
                                   "cuDNN rule")
    else:
        record["eager_backend"] = "n/a"

    samples = {impl: [] for impl in working}
    foreign = {impl: [] for impl in working}
    with no_recompiles():
        for round_index in range(timer.rounds):
            # Rotate who goes first so slow drift (thermal, other processes) is shared.
            order = working[round_index % len(working):] + working[:round_index % len(working)] \
                if working else []
            for impl in order:
                try:
                    impl_samples, foreign_fraction = timer.samples_ms(steps[impl])
                except Exception as exc:
                    record["errors"][impl] = f"{type(exc).__name__}: {str(exc)[:500]}"
                    working.remove(impl)
                    samples.pop(impl)
                    break
                samples[impl] += impl_samples
                if foreign_fraction is not None:
                    foreign[impl].append(foreign_fraction)

    for impl in IMPLS:
        median, iqr = timing.summarize_samples(samples.get(impl, []))
        record[f"{impl}_ms"] = median if math.isfinite(median) else None
        record[f"{impl}_iqr_ms"] = iqr if math.isfinite(iqr) else None
        record[f"{impl}_samples"] = len(samples.get(impl, []))
        record[f"{impl}_gbps"] = (case.bytes_moved / (median * 1e-3) / 1e9
                                  if math.isfinite(median) else None)
        if math.isfinite(median) and iqr > NOISY_IQR_FRACTION * median:
            record["notes"].append(f"{impl} noisy (IQR {100 * iqr / median:.0f}%)")
        worst_foreign = max(foreign.get(impl) or [0.0])
        record[f"{impl}_foreign_cpu_fraction"] = worst_foreign if foreign.get(impl) else None
        if timer.contention and worst_foreign > timer.contention.threshold:
            record["notes"].append(f"{impl} contended (other processes took "
                                   f"{100 * worst_foreign:.0f}% CPU)")

    def ratio(other):
        if record["fused_ms"] and record[f"{other}_ms"]:
            return record[f"{other}_ms"] / record["fused_ms"]
        return None

    record["speedup_vs_eager"] = ratio("eager")
    record["speedup_vs_compiled"] = ratio("compiled")
    record["fused_frac_copy_bw"] = (record["fused_gbps"] / copy_bw_gbps
                                    if copy_bw_gbps and record["fused_gbps"] else None)
    for other in ("eager", "compiled"):
        s = record[f"speedup_vs_{other}"]
        if s is not None and s < report.SLOWER_THAN:
            record["notes"].append(f"SLOWER than {other} ({s:.2f}x)")
    for impl in record["errors"]:
        record["notes"].append(f"{impl} failed")
    return record


def run_suite(suite, timer, copy_bw_gbps):
    from tqdm import tqdm

    records = []
    modules, modules_key = None, None
    with tqdm(total=len(suite), desc="benchmark", unit="case", dynamic_ncols=True,
              file=sys.stderr) as bar:
        for case in suite:
            bar.set_postfix_str(case.key)
            rank_and_channels = (len(case.shape), case.shape[1])
            if rank_and_channels != modules_key:
                # Cases are grouped by shape: one module set (and compiled module) per shape.
                modules = None
                if timer.device.type == "cuda":
                    torch.cuda.empty_cache()
                modules = ShapeModules(*rank_and_channels, timer.device)
                modules_key = rank_and_channels
            record = measure_case(case, modules, timer, copy_bw_gbps)
            records.append(record)
            bar.write(_progress_line(record))
            bar.update(1)
    return records


def _progress_line(r):
    return (f"{r['mode']:>13} {report.case_label(r):<32} fused {report._fmt_ms(r['fused_ms']):>8} "
            f"eager {report._fmt_ms(r['eager_ms']):>8} compiled {report._fmt_ms(r['compiled_ms']):>8}"
            f" ms  vs eager {report._fmt_x(r['speedup_vs_eager']):>6}  vs compiled "
            f"{report._fmt_x(r['speedup_vs_compiled']):>6}"
            + (f"  [{'; '.join(r['notes'])}]" if r["notes"] else ""))


# ----------------------------------------------------------------------------- output

def _sort_records(records):
    mode_order = {m: i for i, m in enumerate(cases_mod.MODES)}
    dtype_order = {d: i for i, d in enumerate(cases_mod.DTYPES)}
    layout_order = {l: i for i, l in enumerate(cases_mod.LAYOUTS)}
    shape_order = {}
    for r in records:
        shape_order.setdefault(tuple(r["shape"]), len(shape_order))
    return sorted(records, key=lambda r: (mode_order[r["mode"]], dtype_order[r["dtype"]],
                                          layout_order[r["layout"]],
                                          shape_order[tuple(r["shape"])]))


def merge_with_existing(path, meta, records):
    if not os.path.exists(path):
        return records
    with open(path) as f:
        existing = json.load(f)
    old = existing["meta"]
    for field in ("git_commit", "torch_version", "device_name"):
        if old.get(field) != meta.get(field):
            sys.exit(f"--merge: {path} has {field}={old.get(field)!r}, this run "
                     f"{meta.get(field)!r}; rerun everything or move the old file away")
    new_keys = {r["key"] for r in records}
    return [r for r in existing["cases"] if r["key"] not in new_keys] + records


def print_loud(message):
    bar = "!" * 78
    print(f"\n{bar}\n{message}\n{bar}\n", flush=True)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    device = resolve_device(args.device)
    fused_bn = import_fused_bn()
    verify_real_fused_bn(fused_bn)
    configure_dynamo()

    device_name, device_description = describe_device(device)
    filtered = any(v is not None for v in (args.modes, args.dtypes, args.layouts, args.batches))
    stem = device_name + ("-quick" if args.quick else "" if args.merge or not filtered
                          else "-partial")
    commit, dirty = git_state()
    timer = Timer(device, args.quick, args)
    meta = {
        "device_name": device_name, "device_description": device_description,
        "device_type": device.type, "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "cudnn_version": (torch.backends.cudnn.version() if device.type == "cuda" else None),
        "fused_bn_version": getattr(fused_bn, "__version__", "unknown"),
        "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick,
        "timer": timer.name, "timer_settings": timer.settings(),
        "statistic": "median of all per-call samples pooled over interleaved rounds",
        "compiled": "torch.compile(nn.BatchNorm2d(C), dynamic=False, fullgraph=True), "
                    "default mode; one compiled module per shape",
        "bytes_model": cases_mod.BYTES_MODEL,
        "load_average_start": list(os.getloadavg()),
    }
    print(f"fused_bn benchmark on {device_description}\n"
          f"torch {torch.__version__}, commit {commit[:12]}{' (dirty)' if dirty else ''}, "
          f"timer {timer.name}, threads {torch.get_num_threads()}, "
          f"load average {meta['load_average_start'][0]:.2f}", flush=True)

    if device.type == "cpu":
        meta["cpu_allocator"] = timing.settle_cpu_allocator()
        print(f"allocator: {meta['cpu_allocator']}", flush=True)
        meta["memory_bandwidth_start"] = timing.cpu_memory_bandwidth_gbps()
        print(f"memory bandwidth: {report.bandwidth_text(meta['memory_bandwidth_start'])}", flush=True)

    copy_bw_gbps = None
    if device.type == "cuda":
        copy_bw_gbps, copy_bytes = timing.copy_bandwidth_gbps(device)
        meta.update({"copy_bandwidth_gbps": copy_bw_gbps, "copy_bandwidth_bytes": copy_bytes})
        print(f"device-to-device copy bandwidth: {copy_bw_gbps:.0f} GB/s "
              f"({copy_bytes / 2**20:.0f} MiB, read + write)", flush=True)

    if args.skip_parity:
        parity = {"passed": False, "skipped": True, "rule": "skipped (--skip-parity)", "cases": []}
        print_loud("PARITY CHECK SKIPPED (--skip-parity)")
    else:
        print("parity check (fused_bn and nn vs float64 reference):", flush=True)
        parity = run_parity(device)
        print(format_parity(parity), flush=True)
        if not parity["passed"]:
            print_loud("PARITY FAILED: fused_bn disagrees with nn.BatchNorm2d beyond the accuracy "
                       "rule (details above). Timings below are of an incorrect implementation.")

    suite = cases_mod.build_suite(device.type, quick=args.quick,
                                  modes=args.modes or cases_mod.MODES, dtypes=args.dtypes,
                                  layouts=args.layouts or cases_mod.LAYOUTS, batches=args.batches)
    records = run_suite(suite, timer, copy_bw_gbps)

    meta["load_average_end"] = list(os.getloadavg())
    if device.type == "cpu":
        meta["memory_bandwidth_end"] = timing.cpu_memory_bandwidth_gbps()
    meta["run_seconds"] = time.time() - started
    meta["compile_seconds"] = sum(r.get("compiled_first_call_s", 0) for r in records)
    if timer.contention:
        meta["contention_retries"] = timer.contention.retries
        meta["contention_wait_s"] = timer.contention.waited_s
    if args.merge:
        records = merge_with_existing(os.path.join(args.out, f"{stem}.json"), meta, records)
    records = _sort_records(records)
    summary = report.summarize(records)
    paths = report.write_outputs(args.out, stem, meta, parity, records, summary)
    if stem == device_name and parity["passed"]:
        # Full runs only: docs/benchmarks.md shows each device's latest complete suite.
        if report.update_benchmarks_doc(report.BENCHMARKS_DOC_PATH, meta, summary, os.path.basename(paths["md"])):
            paths["benchmarks_doc"] = report.BENCHMARKS_DOC_PATH

    print("\n" + report.format_cases_table(records, meta))
    print("\nGeometric-mean speedup of fused_bn (other's time / fused_bn's; > 1: fused_bn faster)")
    print(report.format_summary_table(summary))
    print("\n" + report.headline(summary))
    failures = [r["key"] for r in records if r["errors"]]
    if failures:
        print_loud(f"{len(failures)} case(s) had an implementation fail: {', '.join(failures)}")
    if parity.get("skipped"):
        print_loud("PARITY CHECK SKIPPED (--skip-parity)")
    elif not parity["passed"]:
        print_loud("PARITY FAILED (see above)")
    contended = [r["key"] for r in records if any("contended" in n for n in r["notes"])]
    if contended:
        print_loud(f"{len(contended)} case(s) were timed while other processes used the CPU "
                   f"(even after retries); their numbers are unreliable: {', '.join(contended)}")
    print(f"\nwrote {', '.join(paths.values())} in {meta['run_seconds']:.0f} s "
          f"(compiling {meta['compile_seconds']:.0f} s"
          + (f", {meta['contention_retries']} re-timings, {meta['contention_wait_s']:.0f} s "
             "waiting for other processes" if timer.contention else "")
          + f"); load average {meta['load_average_start'][0]:.2f} -> "
          f"{meta['load_average_end'][0]:.2f}")
    return 0 if parity["passed"] and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
