"""Data-parallel batch norm on the CPU: FusedSyncBatchNorm2d over 2 gloo ranks.

Each rank times a training step (forward + backward) on its own local batch of:
- fused_bn.FusedSyncBatchNorm2d, statistics synchronised over the 2 ranks (one
  all_gather forward, one all_reduce backward);
- fused_bn.FusedBatchNorm2d and nn.BatchNorm2d on the same local batch, unsynchronised:
  the gap between the first two is the cost of synchronising;
- nn.SyncBatchNorm, which refuses CPU tensors (its error is recorded in the table).

Every rank runs the same fixed number of steps (the collectives need all ranks in
step), rank 0 reports the median over rounds of the per-step time, with one thread
per rank on this 2-core machine.

    python -m bench.sync [--quick]
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .run import describe_device, git_state

WORLD_SIZE = 2
SHAPES = ((16, 64, 56, 56), (16, 256, 14, 14), (32, 512, 7, 7))  # per-rank local batch
QUICK_SHAPES = ((4, 16, 8, 8),)
LAYOUTS = ("nchw", "channels_last")
IMPLS = ("sync", "fused_local", "nn_local", "nn_sync")


def _modules(channels):
    import fused_bn

    base = nn.BatchNorm2d(channels)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
        base.bias.uniform_(-0.5, 0.5)
    made = {"sync": fused_bn.FusedSyncBatchNorm2d(channels), "fused_local": fused_bn.FusedBatchNorm2d(channels),
            "nn_local": nn.BatchNorm2d(channels), "nn_sync": nn.SyncBatchNorm(channels)}
    for module in made.values():
        module.load_state_dict(base.state_dict())
    return made


def _step(module, x, dy):
    def run():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)
    return run


def _time_ms(fn, steps, rounds):
    fn()  # warm-up (first call allocates)
    samples = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        samples.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(samples), samples


def _rank_main(rank, port, shapes, steps, rounds, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        records = []
        for shape in shapes:
            for layout in LAYOUTS:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                g = torch.Generator().manual_seed(rank)
                x = (torch.randn(shape, generator=g) * 2 + 1).contiguous(memory_format=fmt).requires_grad_()
                dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
                record = {"shape": list(shape), "layout": layout, "errors": {}}
                for name, module in _modules(shape[1]).items():
                    try:
                        median, samples = _time_ms(_step(module, x, dy), steps, rounds)
                        record[name + "_ms"] = median
                        record[name + "_samples_ms"] = samples
                    except Exception as exc:  # noqa: BLE001  (nn.SyncBatchNorm's refusal is the result)
                        record["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    dist.barrier()
                records.append(record)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(records, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_table(records):
    lines = ["| local batch (per rank) | layout | FusedSyncBatchNorm2d ms | FusedBatchNorm2d ms (no sync) "
             "| nn.BatchNorm2d ms (no sync) | sync cost | sync vs nn local | nn.SyncBatchNorm |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        nn_sync = r["errors"].get("nn_sync", f"{r.get('nn_sync_ms', float('nan')):.3f} ms")
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['sync_ms']:.3f} | {r['fused_local_ms']:.3f} "
            f"| {r['nn_local_ms']:.3f} | +{r['sync_ms'] - r['fused_local_ms']:.3f} ms "
            f"| {r['nn_local_ms'] / r['sync_ms']:.2f}x | {nn_sync} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    started = time.time()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    steps, rounds = (3, 3) if args.quick else (20, 7)
    device_name, description = describe_device(torch.device("cpu"))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, device_name + "-sync" + ("-quick" if args.quick else ""))
    ctx = mp.start_processes(_rank_main, args=(_free_port(), shapes, steps, rounds, stem + ".json.tmp"),
                             nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.time() + 600
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                sys.exit("bench.sync: the gloo ranks did not finish in 600 s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    with open(stem + ".json.tmp") as f:
        records = json.load(f)
    os.remove(stem + ".json.tmp")
    commit, dirty = git_state()
    meta = {"device": description, "torch": torch.__version__, "commit": commit, "dirty": dirty,
            "world_size": WORLD_SIZE, "threads_per_rank": 1, "steps_per_round": steps, "rounds": rounds,
            "run_seconds": time.time() - started}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    table = format_table(records)
    with open(stem + ".md", "w") as f:
        f.write(f"# fused_bn data-parallel benchmark: {device_name}\n\n"
                f"- {description}; torch {torch.__version__}; commit `{commit}`{' (dirty)' if dirty else ''}\n"
                f"- {WORLD_SIZE} gloo ranks on 127.0.0.1, one thread each; training forward+backward of one "
                f"batch-norm layer on each rank's local batch; median over {rounds} rounds of {steps} steps "
                f"(rank 0's clock; every rank runs the same steps)\n"
                f"- sync cost = FusedSyncBatchNorm2d - FusedBatchNorm2d on the same local batch; "
                f"nn.SyncBatchNorm cannot run on CPU tensors (its error is shown)\n\n{table}\n")
    print(table)
    print(f"\nwrote {stem}.{{json,md}} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
