"""Data-parallel batch norm: FusedSyncBatchNorm2d over 2 ranks (gloo on the CPU, NCCL
on two GPUs; one GPU measures the local parts).

Each rank times a training step (forward + backward) on its own local batch of:
- fused_bn.FusedSyncBatchNorm2d, statistics synchronised over the ranks (one
  all_gather forward, one all_reduce backward);
- fused_bn.FusedBatchNorm2d and nn.BatchNorm2d on the same local batch, unsynchronised:
  the gap between the first two is the cost of synchronising;
- nn.SyncBatchNorm, which refuses CPU tensors (its error is recorded in the table).

On a machine with one GPU the ranks are one NCCL rank: the synchronised path
(the four data-parallel ops and one-rank collectives) against the same local
batch unsynchronised. On CUDA each case also gets its fraction of the
device-to-device copy bandwidth measured in the same run (the floor's bytes, an
input-sized read of x, write of y, read of x and dy and write of dx, over the
time).

Every rank runs the same fixed number of steps (the collectives need all ranks in
step), rank 0 reports the median over rounds of the per-step time, with one thread
per rank on the CPU.

    python -m bench.sync [--device auto|cpu|cuda] [--quick]
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

from . import timing
from .run import describe_device, git_state, resolve_device

WORLD_SIZE = 2
SHAPES = ((16, 64, 56, 56), (16, 256, 14, 14), (32, 512, 7, 7))  # per-rank local batch
GPU_SHAPES = ((64, 64, 56, 56), (64, 256, 14, 14), (128, 512, 7, 7))
# Input-sized passes a training step must make: x read, y written; x, dy read, dx written.
FLOOR_PASSES = 5
QUICK_SHAPES = ((4, 16, 8, 8),)
LAYOUTS = ("nchw", "channels_last")
IMPLS = ("sync", "fused_local", "nn_local", "nn_sync")


class _OneRankSync(nn.Module):
    """FusedSyncBatchNorm2d's synchronised path over a one-rank group (which the
    module itself skips, being exactly FusedBatchNorm2d there): the four
    data-parallel ops and their collectives, on one GPU."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        from fused_bn._activations import IDENTITY
        from fused_bn._sync import sync_batch_norm

        m = self.module
        return sync_batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, m.momentum, m.eps,
                               m.num_batches_tracked, IDENTITY, None, None, 1)


def _modules(channels, world_size, device):
    import fused_bn

    base = nn.BatchNorm2d(channels)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
        base.bias.uniform_(-0.5, 0.5)
    made = {"sync": fused_bn.FusedSyncBatchNorm2d(channels), "fused_local": fused_bn.FusedBatchNorm2d(channels),
            "nn_local": nn.BatchNorm2d(channels), "nn_sync": nn.SyncBatchNorm(channels)}
    for module in made.values():
        module.load_state_dict(base.state_dict())
        module.to(device)
    if world_size == 1:
        made["sync"] = _OneRankSync(made["sync"])
    return made


def _step(module, x, dy):
    def run():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)
    return run


def _time_ms(fn, steps, rounds, device):
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (first call allocates)
    samples = []
    for _ in range(rounds):
        synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        synchronize()
        samples.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(samples), samples


def _rank_main(rank, port, world_size, backend, shapes, steps, rounds, out_path):
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        records = []
        copy_bw_gbps = timing.copy_bandwidth_gbps(device)[0] if device.type == "cuda" else None
        for shape in shapes:
            for layout in LAYOUTS:
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                g = torch.Generator().manual_seed(rank)
                x = (torch.randn(shape, generator=g) * 2 + 1).to(device).contiguous(memory_format=fmt)
                x.requires_grad_()
                dy = torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt)
                record = {"shape": list(shape), "layout": layout, "errors": {}}
                for name, module in _modules(shape[1], world_size, device).items():
                    try:
                        median, samples = _time_ms(_step(module, x, dy), steps, rounds, device)
                        record[name + "_ms"] = median
                        record[name + "_samples_ms"] = samples
                        if copy_bw_gbps:
                            floor_gbps = x.numel() * x.element_size() * FLOOR_PASSES / (median * 1e-3) / 1e9
                            record[name + "_of_copy_bw"] = floor_gbps / copy_bw_gbps
                    except Exception as exc:  # noqa: BLE001  (nn.SyncBatchNorm's refusal is the result)
                        record["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    dist.barrier()
                records.append(record)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"records": records, "copy_bandwidth_gbps": copy_bw_gbps}, f)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def format_table(records):
    with_floor = any("sync_of_copy_bw" in r for r in records)
    lines = ["| local batch (per rank) | layout | FusedSyncBatchNorm2d ms | FusedBatchNorm2d ms (no sync) "
             "| nn.BatchNorm2d ms (no sync) | sync cost | sync vs nn local | nn.SyncBatchNorm |"
             + (" sync of copy BW | fused local of copy BW |" if with_floor else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if with_floor else "")]
    for r in records:
        nn_sync = r["errors"].get("nn_sync", f"{r.get('nn_sync_ms', float('nan')):.3f} ms")
        floor = (f" {r.get('sync_of_copy_bw', float('nan')):.0%} | {r.get('fused_local_of_copy_bw', float('nan')):.0%} |"
                 if with_floor else "")
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['sync_ms']:.3f} | {r['fused_local_ms']:.3f} "
            f"| {r['nn_local_ms']:.3f} | +{r['sync_ms'] - r['fused_local_ms']:.3f} ms "
            f"| {r['nn_local_ms'] / r['sync_ms']:.2f}x | {nn_sync} |" + floor)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cpu or cuda; auto picks cuda when available")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    started = time.time()
    device = resolve_device(args.device)
    if device.type == "cuda":
        backend, world_size = "nccl", min(WORLD_SIZE, torch.cuda.device_count())
        shapes = QUICK_SHAPES if args.quick else GPU_SHAPES
        steps, rounds = (3, 3) if args.quick else (50, 7)
        transport = (f"{world_size} NCCL ranks, one GPU each" if world_size > 1 else
                     "one GPU: one NCCL rank, the synchronised path's ops and one-rank collectives "
                     "(the local parts of a step)")
    else:
        backend, world_size = "gloo", WORLD_SIZE
        shapes = QUICK_SHAPES if args.quick else SHAPES
        steps, rounds = (3, 3) if args.quick else (20, 7)
        transport = f"{world_size} gloo ranks on 127.0.0.1, one thread each"
    device_name, description = describe_device(device)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, device_name + "-sync" + ("-quick" if args.quick else ""))
    ctx = mp.start_processes(_rank_main, args=(_free_port(), world_size, backend, shapes, steps, rounds,
                                               stem + ".json.tmp"),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.time() + 600
    try:
        while not ctx.join(timeout=5):
            if time.time() > deadline:
                sys.exit(f"bench.sync: the {backend} ranks did not finish in 600 s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    with open(stem + ".json.tmp") as f:
        result = json.load(f)
    os.remove(stem + ".json.tmp")
    records, copy_bw_gbps = result["records"], result["copy_bandwidth_gbps"]
    commit, dirty = git_state()
    meta = {"device": description, "torch": torch.__version__, "commit": commit, "dirty": dirty,
            "backend": backend, "world_size": world_size, "threads_per_rank": 1, "steps_per_round": steps,
            "rounds": rounds, "copy_bandwidth_gbps": copy_bw_gbps, "floor_passes": FLOOR_PASSES,
            "run_seconds": time.time() - started}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    table = format_table(records)
    floor_note = (f"- of copy BW: {FLOOR_PASSES} input-sized passes (the floor) / time, over the copy bandwidth "
                  f"measured in this run ({copy_bw_gbps:.0f} GB/s)\n" if copy_bw_gbps else "")
    refusal_note = "nn.SyncBatchNorm cannot run on CPU tensors (its error is shown)" if backend == "gloo" else \
        "nn.SyncBatchNorm over the same ranks"
    with open(stem + ".md", "w") as f:
        f.write(f"# fused_bn data-parallel benchmark: {device_name}\n\n"
                f"- {description}; torch {torch.__version__}; commit `{commit}`{' (dirty)' if dirty else ''}\n"
                f"- {transport}; training forward+backward of one "
                f"batch-norm layer on each rank's local batch; median over {rounds} rounds of {steps} steps "
                f"(rank 0's clock; every rank runs the same steps)\n"
                f"- sync cost = FusedSyncBatchNorm2d - FusedBatchNorm2d on the same local batch; "
                f"{refusal_note}\n{floor_note}\n{table}\n")
    print(table)
    print(f"\nwrote {stem}.{{json,md}} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
