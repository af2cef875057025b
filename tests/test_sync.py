"""FusedSyncBatchNorm2d: statistics synchronised over torch.distributed.

The distributed tests spawn 2 and 3 gloo ranks on 127.0.0.1 (a free port each time), and
(``cuda``, on a machine with two GPUs) 2 NCCL ranks, one GPU each.
Each rank runs every scenario on its slice of a global batch that all processes
(and this one) generate from the same seed, and saves what it got; the tests then
compare against a single-process nn.BatchNorm2d and a float64 one on the whole global
batch, under the accuracy rule. Rank processes have a deadline, are killed past it,
and always destroy their process group.
"""
import copy
import datetime
import math
import os
import socket
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
import torch.nn.functional as F

import fused_bn
from _accuracy import assert_accurate
from _helpers import (BATCH_NORMS, assert_bitwise_equal, assert_state_unchanged,
                      channels_last_format, memory_formats, state_of)

ops = torch.ops.fused_bn
CL = torch.channels_last
DEADLINE_S = 240

# name -> (per-rank batch sizes by world size, C, spatial sizes, dtype, param dtype,
#          layout, momentum, affine, track_running_stats, epilogue); the spatial sizes give
#          the input's rank: () for (N, C) as BatchNorm1d takes, (L,), (H, W), (D, H, W); the
#          epilogue is (activation: a key of _ACTIVATIONS or None, whether a residual is added).
SCENARIOS = {
    "unequal": ({2: [3, 5], 3: [2, 3, 4]}, 6, (5, 7), torch.float32, torch.float32, "nchw", 0.1, True, True, (None, False)),
    "equal_cl": ({2: [4, 4], 3: [3, 3, 3]}, 5, (4, 4), torch.float32, torch.float32, "cl", 0.9, True, True, (None, False)),
    "empty_rank": ({2: [0, 6], 3: [4, 0, 3]}, 3, (3, 5), torch.float32, torch.float32, "nchw", None, True, True, (None, False)),
    "relu": ({2: [2, 5], 3: [1, 4, 2]}, 7, (3, 3), torch.float32, torch.float32, "cl", 0.1, True, True, ("relu", False)),
    "short_planes": ({2: [5, 3], 3: [2, 2, 4]}, 48, (2, 3), torch.float32, torch.float32, "nchw", 0.1, True, True, ("relu", False)),
    "no_affine_untracked": ({2: [3, 2], 3: [2, 2, 1]}, 4, (5, 5), torch.float32, torch.float32, "nchw", 0.1, False, False, (None, False)),
    "bf16_amp": ({2: [3, 4], 3: [2, 3, 2]}, 6, (6, 6), torch.bfloat16, torch.float32, "cl", 0.1, True, True, (None, False)),
    "float64": ({2: [2, 3], 3: [1, 2, 2]}, 3, (4, 5), torch.float64, torch.float64, "nchw", 0.1, True, True, ("relu", False)),
    # BatchNorm1d's and BatchNorm3d's input ranks; one value per rank at most in "rows_2d".
    "rows_2d": ({2: [1, 4], 3: [2, 0, 3]}, 9, (), torch.float32, torch.float32, "nchw", 0.1, True, True, (None, False)),
    "sequence_3d": ({2: [3, 2], 3: [1, 2, 2]}, 5, (7,), torch.float32, torch.float32, "nchw", None, True, True, ("relu", False)),
    "volume_cl3d": ({2: [2, 1], 3: [1, 1, 2]}, 4, (2, 3, 5), torch.bfloat16, torch.float32, "cl", 0.1, True, True, (None, False)),
    # The epilogue's other activations, with and without a residual (the
    # inverted-residual block's identity + add among them).
    "silu_residual": ({2: [3, 2], 3: [2, 1, 2]}, 6, (4, 5), torch.float32, torch.float32, "cl", 0.1, True, True, ("silu", True)),
    "leaky_residual_bf16": ({2: [2, 3], 3: [1, 3, 1]}, 5, (5, 3), torch.bfloat16, torch.float32, "nchw", 0.1, True, True, ("leaky_relu", True)),
    "relu6_residual_3d": ({2: [2, 2], 3: [1, 1, 2]}, 3, (2, 3, 4), torch.float32, torch.float32, "nchw", None, True, True, ("relu6", True)),
    "identity_residual": ({2: [4, 1], 3: [2, 0, 3]}, 4, (3, 3), torch.float32, torch.float32, "nchw", 0.1, False, True, (None, True)),
    "hardswish_rows": ({2: [2, 4], 3: [3, 1, 2]}, 7, (), torch.float32, torch.float32, "nchw", 0.1, True, True, ("hardswish", False)),
    "gelu_residual_f64": ({2: [3, 3], 3: [2, 2, 2]}, 3, (3, 4), torch.float64, torch.float64, "cl", 0.1, True, True, ("gelu", True)),
}
TRAIN_STEPS = 3
# The activations the scenarios use, as the nn modules the references apply
# (and the fused modules are given).
_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "leaky_relu": lambda: nn.LeakyReLU(0.1),
                "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "gelu": nn.GELU}


def _global_batch(name, step, world_size, device="cpu"):
    sizes, C, spatial, dtype, _, layout, *_ = SCENARIOS[name]
    # Not hash(): string hashes differ between processes.
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1000 * step + world_size)
    shape = (sum(sizes[world_size]), C, *spatial)
    per_channel = (1, C) + (1,) * len(spatial)
    shift = (torch.rand(C, generator=g) * 2 - 1) * 3
    scale = 0.5 + 2 * torch.rand(C, generator=g)
    x = torch.randn(shape, generator=g) * scale.view(per_channel) + shift.view(per_channel)
    dy = torch.randn(shape, generator=g)
    fmt = channels_last_format(len(shape)) if layout == "cl" else torch.contiguous_format
    return (x.to(device, dtype).contiguous(memory_format=fmt),
            dy.to(device, dtype).contiguous(memory_format=fmt))


def _global_residual(name, step, world_size, device="cpu"):
    """The residual added before the activation, in the input's dtype and
    layout (None when the scenario adds none)."""
    if not SCENARIOS[name][-1][1]:
        return None
    x, _ = _global_batch(name, step, world_size, device)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1000 * step + world_size + 7)
    return torch.randn(x.shape, generator=g).to(device, x.dtype).contiguous(
        memory_format=channels_last_format(x.dim()) if SCENARIOS[name][5] == "cl" else torch.contiguous_format)


def _activation_module(name):
    activation = SCENARIOS[name][-1][0]
    return None if activation is None else _ACTIVATIONS[activation]()


def _initial_state(name):
    _, C, *_ = SCENARIOS[name]
    g = torch.Generator().manual_seed(1234)
    return {"weight": 0.5 + torch.rand(C, generator=g), "bias": torch.rand(C, generator=g) - 0.5,
            "running_mean": torch.rand(C, generator=g) - 0.5, "running_var": 0.5 + torch.rand(C, generator=g),
            "num_batches_tracked": torch.tensor(2, dtype=torch.long)}


def _make(cls, name, dtype, device="cpu", **extra):
    _, C, _, _, _, _, momentum, affine, track, _ = SCENARIOS[name]
    m = cls(C, momentum=momentum, affine=affine, track_running_stats=track, **extra)
    state = _initial_state(name)
    with torch.no_grad():
        for key, value in state.items():
            t = getattr(m, key)
            if t is not None:
                t.copy_(value)
    return m.to(device=device, dtype=dtype)


def _rank_slice(name, world_size, rank):
    sizes = SCENARIOS[name][0][world_size]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


# ---------------------------------------------------------------------------
# What each rank runs
# ---------------------------------------------------------------------------

class _NoCollectives:
    """Collectives raise inside this block (eval must not synchronise)."""

    def __enter__(self):
        import fused_bn._sync as sync
        self._saved = (sync._all_gather_single, dist.all_reduce)

        def refuse(*args, **kwargs):
            raise AssertionError("a collective ran in eval")
        sync._all_gather_single = refuse
        dist.all_reduce = refuse

    def __exit__(self, *exc):
        import fused_bn._sync as sync
        sync._all_gather_single, dist.all_reduce = self._saved


def _run_scenario(name, rank, world_size, device):
    *_, param_dtype, _, _, _, _, _ = SCENARIOS[name]
    m = _make(fused_bn.FusedSyncBatchNorm2d, name, param_dtype, device, activation=_activation_module(name))
    rows = _rank_slice(name, world_size, rank)
    steps = []
    for step in range(TRAIN_STEPS):
        xg, dyg = _global_batch(name, step, world_size, device)
        rg = _global_residual(name, step, world_size, device)
        m.zero_grad(set_to_none=True)
        x = xg[rows].detach().requires_grad_()
        residual = None if rg is None else rg[rows].detach().requires_grad_()
        y = m(x) if residual is None else m(x, residual)
        y.backward(dyg[rows])
        steps.append({"output": y.detach().cpu(), "grad_input": x.grad.cpu(),
                      "grad_residual": None if residual is None else residual.grad.cpu(),
                      "channels_last": (memory_formats(y) == (False, True), memory_formats(x.grad) == (False, True)),
                      "grad_weight": None if m.weight is None else m.weight.grad.cpu(),
                      "grad_bias": None if m.bias is None else m.bias.grad.cpu()})
    state = {k: (None if v is None else v.cpu()) for k, v in state_of(m).items()}
    # Eval: local, no collective, exactly the fused batch norm of the input's rank.
    m.eval()
    rank_of_input = 2 + len(SCENARIOS[name][2])
    local = _make(BATCH_NORMS[rank_of_input][1], name, param_dtype, device, activation=_activation_module(name))
    local.load_state_dict(m.state_dict())
    local.eval()
    xg, _ = _global_batch(name, TRAIN_STEPS, world_size, device)
    rg = _global_residual(name, TRAIN_STEPS, world_size, device)
    eval_args = (xg[rows],) if rg is None else (xg[rows], rg[rows])
    with _NoCollectives(), torch.no_grad():
        eval_out = m(*eval_args)
    with torch.no_grad():
        eval_local = local(*eval_args)
    return {"steps": steps, "state": state, "eval": eval_out.cpu(), "eval_local": eval_local.cpu()}


def _run_errors(rank, world_size, device):
    """Bad calls raise on every rank (no rank left waiting in a collective) and
    leave the module's state as it was."""
    results = {}
    m = fused_bn.FusedSyncBatchNorm2d(3).to(device)
    before = state_of(m)
    for label, x in (("1d", torch.randn(3, device=device)),
                     ("int", torch.ones(2, 3, 2, 2, dtype=torch.long, device=device)),
                     ("channels", torch.randn(2, 4, 2, 2, device=device)),
                     # one value per channel over all ranks: rank 0 has it, the others none
                     ("one_value", torch.randn(1 if rank == 0 else 0, 3, 1, 1, device=device)),
                     ("one_value_rows", torch.randn(1 if rank == 0 else 0, 3, device=device))):
        try:
            m(x)
            results[label] = None
        except Exception as e:  # noqa: BLE001  (the type and message are what is compared)
            results[label] = (type(e).__name__, str(e).splitlines()[0])
        assert_state_unchanged(m, before, label)
    return results


class _DdpNet(nn.Module):
    """What convert_model(fuse=True) folds, each once: bn -> ReLU, bn + add ->
    Hardswish, bn -> SiLU, and an inverted-residual block's plain add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3, self.act3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.SiLU()
        self.conv4, self.bn4 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.hardswish(self.bn2(self.conv2(y)) + y)
        y = y + self.bn4(self.conv4(self.act3(self.bn3(self.conv3(y)))))
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _ddp_model():
    torch.manual_seed(7)
    return _DdpNet()


DDP_SIZES = {2: [3, 5], 3: [2, 4, 3]}
DDP_STEPS = 5


def _ddp_batch(step, world_size):
    g = torch.Generator().manual_seed(100 + step)
    n = sum(DDP_SIZES[world_size])
    return torch.randn(n, 3, 6, 6, generator=g) * 2 + 1, torch.randint(0, 4, (n,), generator=g)


def _ddp_slices(world_size):
    sizes, start, out = DDP_SIZES[world_size], 0, []
    for size in sizes:
        out.append(slice(start, start + size))
        start += size
    return out


def _run_ddp(rank, world_size, device):
    """A DDP training loop with SGD; the model's BatchNorm2d layers converted
    (the first with its ReLU fused) to FusedSyncBatchNorm2d."""
    model = fused_bn.convert_model(_ddp_model(), fuse=True)
    model = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(model).to(device)
    kinds = sorted(f"{type(mod).__name__}/{getattr(getattr(mod, 'activation', None), 'name', None)}"
                   for mod in model.modules() if isinstance(mod, nn.BatchNorm2d))
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    rows = _ddp_slices(world_size)[rank]
    for step in range(DDP_STEPS):
        x, target = _ddp_batch(step, world_size)
        opt.zero_grad()
        F.cross_entropy(ddp(x[rows].to(device)), target[rows].to(device)).backward()
        opt.step()
    residual_calls = sum(1 for node in model.graph.nodes if node.op == "call_module" and len(node.args) == 2)
    return {"kinds": kinds, "residual_calls": residual_calls,
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}


def _rank_main(rank, world_size, port, out_dir, backend):
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if os.environ.get("FUSED_BN_EMULATED_CUDA", "0") == "1":
        # As this process's conftest does: the ranks' CPU tensors go through
        # our CUDA glue and kernels on the emulated GPU (the cached build),
        # with few multiprocessors so that the reductions split.
        import emulated_cuda

        emulated_cuda.build(os.environ.get("FUSED_BN_EMULATION_VARIANT", "default"))
        emulated_cuda.configure(3, "shuffle", 11, 512)
        emulated_cuda.enable(True)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        results = {"scenarios": {name: _run_scenario(name, rank, world_size, device) for name in SCENARIOS},
                   "errors": _run_errors(rank, world_size, device),
                   "ddp": _run_ddp(rank, world_size, device)}
        if os.environ.get("FUSED_BN_EMULATED_CUDA", "0") == "1":
            import emulated_cuda

            results["emulated_launches"] = emulated_cuda.launch_count()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world_size, out_dir, backend="gloo"):
    ctx = mp.start_processes(_rank_main, args=(world_size, _free_port(), str(out_dir), backend), nprocs=world_size,
                             join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=DEADLINE_S)
    try:
        while not ctx.join(timeout=5):
            if datetime.datetime.now() > deadline:
                raise TimeoutError(f"{world_size} {backend} ranks did not finish in {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module", params=[(2, "gloo"), (3, "gloo"), pytest.param((2, "nccl"), marks=pytest.mark.cuda)],
                ids=lambda p: f"world{p[0]}" + ("-nccl" if p[1] == "nccl" else ""))
def ranks(request, tmp_path_factory):
    world_size, backend = request.param
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        pytest.skip(f"{world_size} NCCL ranks need {world_size} GPUs")
    return world_size, _spawn(world_size, tmp_path_factory.mktemp(f"world{world_size}-{backend}"), backend)


# ---------------------------------------------------------------------------
# Single-process references
# ---------------------------------------------------------------------------

def _reference_run(name, world_size, cls_dtype):
    """nn's batch norm for the input's rank (in the scenario's dtypes, or float64)
    over the global batch, then the residual add and the activation module."""
    *_, param_dtype, _, _, _, _, _ = SCENARIOS[name]
    activation = _activation_module(name) or nn.Identity()
    dtype = SCENARIOS[name][3]
    if cls_dtype == torch.float64:
        dtype = param_dtype = torch.float64
    m = _make(BATCH_NORMS[2 + len(SCENARIOS[name][2])][0], name, param_dtype)
    steps = []
    for step in range(TRAIN_STEPS):
        xg, dyg = _global_batch(name, step, world_size)
        rg = _global_residual(name, step, world_size)
        m.zero_grad(set_to_none=True)
        x = xg.to(dtype).detach().requires_grad_()
        residual = None if rg is None else rg.to(dtype).detach().requires_grad_()
        y = m(x) if residual is None else m(x) + residual
        y = activation(y)
        y.backward(dyg.to(dtype))
        steps.append({"output": y.detach(), "grad_input": x.grad,
                      "grad_residual": None if residual is None else residual.grad,
                      "grad_weight": None if m.weight is None else m.weight.grad,
                      "grad_bias": None if m.bias is None else m.bias.grad})
    m.eval()
    xg, _ = _global_batch(name, TRAIN_STEPS, world_size)
    rg = _global_residual(name, TRAIN_STEPS, world_size)
    # Eval never synchronises (as nn.SyncBatchNorm): without running statistics
    # each rank normalizes with its own batch's.
    pieces = [xg] if m.track_running_stats else [xg[_rank_slice(name, world_size, r)]
                                                 for r in range(world_size)]
    with torch.no_grad():
        y = torch.cat([m(piece.to(dtype)) if piece.shape[0] else piece.to(dtype) for piece in pieces])
        if rg is not None:
            y = y + rg.to(dtype)
        y = activation(y)
    return m, steps, y


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sync_matches_nn_on_the_global_batch(ranks, name):
    world_size, results = ranks
    nn_bn, nn_steps, nn_eval = _reference_run(name, world_size, None)
    ref_bn, ref_steps, ref_eval = _reference_run(name, world_size, torch.float64)
    dtype = SCENARIOS[name][3]
    for step in range(TRAIN_STEPS):
        label = f"[{name} world {world_size} step {step}]"
        for rank, res in enumerate(results):
            rows = _rank_slice(name, world_size, rank)
            ours = res["scenarios"][name]["steps"][step]
            for key in ("output", "grad_input", "grad_residual"):
                if nn_steps[step][key] is None:
                    assert ours[key] is None, f"{label} rank {rank} {key}"
                    continue
                assert ours[key].dtype == dtype
                assert_accurate(ours[key], nn_steps[step][key][rows], ref_steps[step][key][rows],
                                name=f"{label} rank {rank} {key}")
            assert ours["channels_last"] == ((SCENARIOS[name][5] == "cl"),) * 2 or ours["output"].numel() == 0
        # Each rank's grad_weight/grad_bias is its own share: their sum is the global gradient.
        for key in ("grad_weight", "grad_bias"):
            shares = [res["scenarios"][name]["steps"][step][key] for res in results]
            if nn_steps[step][key] is None:
                assert all(s is None for s in shares), f"{label} {key}"
                continue
            total = torch.stack([s.double() for s in shares]).sum(0).to(shares[0].dtype)
            assert_accurate(total, nn_steps[step][key], ref_steps[step][key], name=f"{label} {key} summed")
    states = [res["scenarios"][name]["state"] for res in results]
    for rank, state in enumerate(states[1:], 1):
        for key, value in state.items():
            assert_bitwise_equal(value, states[0][key], f"[{name}] rank {rank} {key} vs rank 0")
    for key in ("running_mean", "running_var"):
        ours, expected, reference = states[0][key], getattr(nn_bn, key), getattr(ref_bn, key)
        if expected is None:
            assert ours is None
            continue
        assert_accurate(ours, expected, reference, name=f"[{name} world {world_size}] {key}")
    if nn_bn.num_batches_tracked is not None:
        assert int(states[0]["num_batches_tracked"]) == int(nn_bn.num_batches_tracked)
    for rank, res in enumerate(results):
        rows = _rank_slice(name, world_size, rank)
        scenario = res["scenarios"][name]
        assert_bitwise_equal(scenario["eval"], scenario["eval_local"], f"[{name}] rank {rank} eval vs FusedBatchNorm2d")
        assert_accurate(scenario["eval"], nn_eval[rows], ref_eval[rows], name=f"[{name}] rank {rank} eval")


@pytest.mark.skipif(os.environ.get("FUSED_BN_EMULATED_CUDA", "0") != "1", reason="an emulated-GPU run only")
def test_ranks_run_the_emulated_cuda_kernels(ranks):
    """Under FUSED_BN_EMULATED_CUDA=1 every spawned rank's ops went through our
    CUDA kernels on the emulated GPU, not the CPU kernels."""
    for rank, res in enumerate(ranks[1]):
        assert res.get("emulated_launches", 0) > 0, f"rank {rank} launched no emulated kernel"


def test_sync_errors_raise_on_every_rank_as_nn(ranks):
    world_size, results = ranks
    expected = {}
    # nn.SyncBatchNorm's rank check (it takes 2-D to 5-D input); nn's batch norm
    # of the input's rank for the rest.
    for label, m, x in (("1d", nn.SyncBatchNorm(3), torch.randn(3)),
                        ("int", nn.BatchNorm2d(3), torch.ones(2, 3, 2, 2, dtype=torch.long)),
                        ("channels", nn.BatchNorm2d(3), torch.randn(2, 4, 2, 2)),
                        ("one_value", nn.BatchNorm2d(3), torch.randn(1, 3, 1, 1)),
                        ("one_value_rows", nn.BatchNorm1d(3), torch.randn(1, 3))):
        with pytest.raises(Exception) as info:
            m(x)
        expected[label] = (type(info.value).__name__, str(info.value).splitlines()[0])
    for rank, res in enumerate(results):
        assert res["errors"].keys() == expected.keys()
        for label, got in res["errors"].items():
            if label.startswith("one_value"):
                # nn's message names the input size; each rank names its own.
                assert got is not None and got[0] == expected[label][0], f"rank {rank} {label}: {got}"
                assert got[1].startswith("Expected more than 1 value per channel when training"), got
            else:
                assert got == expected[label], f"rank {rank} {label}: {got} vs nn {expected[label]}"


def test_sync_ddp_training_matches_single_process(ranks):
    world_size, results = ranks
    slices = _ddp_slices(world_size)

    def train(dtype):
        model = _ddp_model().to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(DDP_STEPS):
            x, target = _ddp_batch(step, world_size)
            opt.zero_grad()
            out = model(x.to(dtype))
            # DDP averages the ranks' gradients of their own mean losses.
            loss = sum(F.cross_entropy(out[rows], target[rows]) for rows in slices) / world_size
            loss.backward()
            opt.step()
        return model.state_dict()

    expected, reference = train(torch.float32), train(torch.float64)
    for rank, res in enumerate(results):
        assert res["ddp"]["kinds"] == [f"FusedSyncBatchNorm2d/{name}" for name in (
            "None", "hardswish", "relu", "silu")], res["ddp"]["kinds"]
        assert res["ddp"]["residual_calls"] == 2, res["ddp"]
        state = res["ddp"]["state"]
        assert state.keys() == expected.keys()
        for key, value in state.items():
            if key.endswith("num_batches_tracked"):
                assert int(value) == int(expected[key]) == DDP_STEPS
                continue
            assert_accurate(value, expected[key], reference[key], name=f"rank {rank} {key}")
            assert_bitwise_equal(value, results[0]["ddp"]["state"][key], f"rank {rank} {key} vs rank 0")


# ---------------------------------------------------------------------------
# In-process: no collectives
# ---------------------------------------------------------------------------

def _twin_steps(sync, local, x, dy, steps=2):
    for m in (sync, local):
        m.load_state_dict(local.state_dict())
    results = []
    for m in (sync, local):
        out = []
        for _ in range(steps):
            m.zero_grad(set_to_none=True)
            leaf = x.detach().requires_grad_()
            y = m(leaf)
            y.backward(dy)
            out.append((y.detach(), leaf.grad, m.weight.grad, m.bias.grad))
        out.append(tuple(v.clone() for v in (m.running_mean, m.running_var, m.num_batches_tracked)))
        results.append(out)
    for a, b in zip(*results):
        for i, (u, v) in enumerate(zip(a, b)):
            assert_bitwise_equal(u, v, f"sync vs FusedBatchNorm2d, item {i}")


@pytest.mark.parametrize("activation", [None, "relu"])
def test_sync_without_process_group_is_fused_batch_norm(activation):
    assert not dist.is_initialized()
    x, dy = torch.randn(4, 5, 6, 6) * 2 + 1, torch.randn(4, 5, 6, 6)
    local = fused_bn.FusedBatchNormReLU2d(5) if activation else fused_bn.FusedBatchNorm2d(5)
    with torch.no_grad():
        local.weight.uniform_(0.5, 1.5)
        local.bias.uniform_(-1, 1)
    _twin_steps(fused_bn.FusedSyncBatchNorm2d(5, activation=activation), local, x, dy)


def test_sync_with_one_rank_is_fused_batch_norm_and_runs_no_collective():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x, dy = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
        with _NoCollectives():
            _twin_steps(fused_bn.FusedSyncBatchNorm2d(4), fused_bn.FusedBatchNorm2d(4), x, dy)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# The ops, single process: ranks simulated by splitting the batch
# ---------------------------------------------------------------------------

SPLIT_CASES = [
    # shape, layout, batch split into "ranks"
    ((6, 5, 7, 9), "nchw", [2, 0, 4]),
    ((5, 64, 3, 3), "nchw", [1, 4]),          # short planes: channel blocks
    ((4, 3, 70, 70), "nchw", [3, 1]),         # long planes split across threads
    ((6, 24, 5, 5), "cl", [3, 3]),
    ((3, 7, 1, 1), "cl", [1, 1, 1]),
    ((9, 11), "nchw", [3, 0, 6]),             # BatchNorm1d's (N, C)
    ((4, 6, 13), "nchw", [1, 3]),             # and (N, C, L)
    ((3, 5, 2, 3, 4), "cl", [2, 1]),          # BatchNorm3d's input, channels_last_3d
]


def _layout(t, layout):
    return t.contiguous(memory_format=channels_last_format(t.dim())) if layout == "cl" else t.contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,layout,split", SPLIT_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_ops_with_split_statistics_match_nn(shape, layout, split, dtype, relu):
    C = shape[1]
    x = _layout(torch.randn(shape) * 3 + 2, layout).to(dtype)
    dy = _layout(torch.randn(shape), layout).to(dtype)
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    weight = (0.5 + torch.rand(C)).to(param_dtype)
    bias = (torch.rand(C) - 0.5).to(param_dtype)
    rm, rv = torch.zeros(C, dtype=param_dtype), torch.ones(C, dtype=param_dtype)
    nbt = torch.tensor(0)
    chunks = list(torch.split(x, split))
    act = "relu" if relu else "identity"
    all_stats = torch.stack([ops.batch_norm_stats(c, weight, bias, rm, rv) for c in chunks])
    assert all_stats.shape == (len(split), C, 3) and all_stats.dtype == torch.float64
    positions = math.prod(shape[2:])
    assert all_stats[:, :, 0].tolist() == [[float(n * positions)] * C for n in split]
    y, mean, invstd = ops.batch_norm_train_with_stats(x, weight, bias, rm, rv, nbt, 0.1, 1e-5, all_stats, act)
    sums, gw, gb, _ = ops.batch_norm_backward_sums(dy, x, weight, mean, invstd, [True, True], bias, act)
    dx = ops.batch_norm_backward_with_sums(dy, x, weight, mean, invstd, sums, torch.tensor(x.numel() // C), bias, act)

    def reference(dt):
        bn = BATCH_NORMS[len(shape)][0](C).to(param_dtype if dt != torch.float64 else dt)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        leaf = x.to(dt).detach().requires_grad_()
        out = bn(leaf)
        out = torch.relu(out) if relu else out
        out.backward(dy.to(dt))
        return out.detach(), leaf.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var

    expected, ref = reference(dtype), reference(torch.float64)
    for i, (name, value) in enumerate((("y", y), ("dx", dx), ("grad_weight", gw), ("grad_bias", gb),
                                       ("running_mean", rm), ("running_var", rv))):
        assert_accurate(value, expected[i], ref[i], name=f"{name} {shape} {layout} {split} {dtype} relu={relu}")
    assert int(nbt) == 1
    has_channels_last = channels_last_format(len(shape)) is not None
    assert memory_formats(y) == (layout != "cl" or positions == 1,
                                 has_channels_last and (layout == "cl" or positions == 1))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("activation,params,residual", [
    ("silu", [], True), ("leaky_relu", [0.1], True), ("hardswish", [], False), ("gelu_tanh", [], True),
    ("identity", [], True)], ids=str)
def test_ops_with_an_epilogue_and_one_rank_are_bitwise_the_fused_ops(activation, params, residual, layout):
    """The synced ops with an activation and a residual: the training forward
    with one rank's statistics, the sums pass (which writes the activation's g,
    the residual's gradient) and the dx pass from g give exactly what
    batch_norm_train and batch_norm_backward give (FusedSyncBatchNorm2d's path,
    fused_bn/_sync.py)."""
    shape, C = (4, 6, 5, 3), 6
    x, dy = _layout(torch.randn(shape) + 1, layout), _layout(torch.randn(shape), layout)
    r = _layout(torch.randn(shape), layout) if residual else None
    w, b = 0.5 + torch.rand(C), torch.rand(C) - 0.5
    stats = ops.batch_norm_stats(x, w, b, None, None)[None]
    y, mean, invstd = ops.batch_norm_train_with_stats(x, w, b, None, None, None, 0.1, 1e-5, stats, activation,
                                                      params, r)
    y0, mean0, invstd0 = ops.batch_norm_train(x, w, b, None, None, None, 0.1, 1e-5, activation, params, r)
    for a, e, name in ((y, y0, "y"), (mean, mean0, "mean"), (invstd, invstd0, "invstd")):
        assert_bitwise_equal(a, e, name)
    from_output = residual and ops.activation_grad_from_output(activation, params, x.dtype)
    saved_residual, saved_output = (None, y) if from_output else (r, None)
    sums, gw, gb, g = ops.batch_norm_backward_sums(dy, x, w, mean, invstd, [True, True], b, activation, params,
                                                   saved_residual, saved_output)
    dx0, gw0, gb0, g0 = ops.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5, [True, True, True], b,
                                                activation, params, saved_residual, saved_output)
    count = torch.tensor(x.numel() // C)
    if residual and activation != "identity":
        assert g.shape == x.shape, "the sums pass wrote no grad_residual"
        assert_bitwise_equal(g, g0, "grad_residual")
        dx = ops.batch_norm_backward_with_sums(g, x, w, mean, invstd, sums, count, None, "identity", [])
    else:
        assert g.shape == (0,) and g0.shape == (0,)
        dx = ops.batch_norm_backward_with_sums(dy, x, w, mean, invstd, sums, count, b, activation, params)
    for a, e, name in ((dx, dx0, "dx"), (gb, gb0, "grad_bias")):
        assert_bitwise_equal(a, e, name)


@pytest.mark.parametrize("shape,layout", [((4, 5, 6, 7), "nchw"), ((6, 64, 3, 3), "nchw"),
                                          ((2, 3, 80, 80), "nchw"), ((5, 9, 4, 4), "cl")])
@pytest.mark.parametrize("relu", [False, True])
def test_ops_with_one_rank_are_bitwise_the_fused_ops(shape, layout, relu):
    """One rank's statistics and sums through the synced ops give exactly what
    batch_norm_train and batch_norm_backward give."""
    C = shape[1]
    x, dy = _layout(torch.randn(shape) + 1, layout), _layout(torch.randn(shape), layout)
    w, b = 0.5 + torch.rand(C), torch.rand(C) - 0.5
    state = [torch.rand(C), 1 + torch.rand(C), torch.tensor(3)]
    plain_state = [t.clone() for t in state]
    stats = ops.batch_norm_stats(x, w, b, *state[:2])[None]
    act = "relu" if relu else "identity"
    y, mean, invstd = ops.batch_norm_train_with_stats(x, w, b, *state, None, 1e-5, stats, act)
    y0, mean0, invstd0 = ops.batch_norm_train(x, w, b, *plain_state, None, 1e-5, act)
    for a, e, name in ((y, y0, "y"), (mean, mean0, "mean"), (invstd, invstd0, "invstd"),
                       (state[0], plain_state[0], "running_mean"), (state[1], plain_state[1], "running_var"),
                       (state[2], plain_state[2], "num_batches_tracked")):
        assert_bitwise_equal(a, e, name)
    sums, gw, gb, g = ops.batch_norm_backward_sums(dy, x, w, mean, invstd, [True, True], b, act)
    dx = ops.batch_norm_backward_with_sums(dy, x, w, mean, invstd, sums, torch.tensor(x.numel() // C), b, act)
    dx0, gw0, gb0, g0 = ops.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5, [True, True, True], b, act)
    assert g.shape == (0,) and g0.shape == (0,), "grad_residual written without a residual or output"
    for a, e, name in ((dx, dx0, "dx"), (gb, gb0, "grad_bias")):
        assert_bitwise_equal(a, e, name)
    # A rank's grad_weight share is Σg·(x − mean) about the saved (rounded) mean,
    # as shares are summed over ranks; batch_norm_backward's takes it about the
    # exact batch mean, mean + Σ(x − mean) / count (GradSums::centered_sum_dy_xmu).
    assert_bitwise_equal(gw, (sums[:, 1] * invstd.double()).float(), "grad_weight share")
    centered = sums[:, 1] - sums[:, 0] / (x.numel() // C) * sums[:, 2]
    assert_bitwise_equal(gw0, (centered * invstd.double()).float(), "grad_weight")


def test_ops_empty_rank_and_empty_world():
    x = torch.randn(0, 3, 4, 4)
    stats = ops.batch_norm_stats(x, None, None, None, None)
    assert stats.tolist() == [[0.0, 0.0, 0.0]] * 3
    other = ops.batch_norm_stats(torch.randn(5, 3, 4, 4) * 2 + 1, None, None, None, None)
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    y, mean, invstd = ops.batch_norm_train_with_stats(x, None, None, rm, rv, nbt, 0.1, 1e-5,
                                                      torch.stack([stats, other]), "identity")
    # This rank has nothing to normalize but takes the same update as the others.
    assert y.shape == x.shape and int(nbt) == 1
    torch.testing.assert_close(mean.double(), other[:, 1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rm.double(), 0.1 * other[:, 1], rtol=1e-6, atol=1e-7)
    # Nobody has data: as nn.BatchNorm2d on an empty batch, the running statistics stay.
    before = (rm.clone(), rv.clone())
    y, _, _ = ops.batch_norm_train_with_stats(x, None, None, rm, rv, nbt, 0.1, 1e-5,
                                              torch.stack([stats, stats]), "identity")
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and int(nbt) == 2


def test_ops_reject_malformed_exchanged_tensors():
    x, w = torch.randn(2, 3, 4, 4), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"all_stats must have shape \[2, 3, 3\]"):
        ops.batch_norm_train_with_stats(x, w, None, None, None, None, 0.1, 1e-5, torch.zeros(2, 4, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="all_stats must be float64"):
        ops.batch_norm_train_with_stats(x, w, None, None, None, None, 0.1, 1e-5, torch.zeros(1, 3, 3))
    mean, invstd = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"sums must have shape \[3, 3\]"):
        ops.batch_norm_backward_with_sums(x, x, w, mean, invstd, torch.zeros(3, 2, dtype=torch.float64),
                                          torch.tensor(32))
    sums = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="count must have one element"):
        ops.batch_norm_backward_with_sums(x, x, w, mean, invstd, sums, torch.tensor([16, 16]))
    with pytest.raises(RuntimeError, match="count must be float64 or int64"):
        ops.batch_norm_backward_with_sums(x, x, w, mean, invstd, sums, torch.tensor(32.0))


def _opcheck_args(relu):
    act = "relu" if relu else "identity"
    x, dy = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    w, b = torch.rand(4) + 0.5, torch.rand(4)
    stats = torch.stack([ops.batch_norm_stats(x, w, b, None, None)] * 2)
    _, mean, invstd = ops.batch_norm_train(x, w, b, None, None, None, 0.1, 1e-5)
    sums = ops.batch_norm_backward_sums(dy, x, w, mean, invstd, [True, True], b, act)[0]
    return {
        "batch_norm_stats": (x, w, b, torch.zeros(4), torch.ones(4)),
        "batch_norm_train_with_stats": (x, w, b, torch.zeros(4), torch.ones(4), torch.tensor(0), 0.1, 1e-5, stats, act),
        "batch_norm_backward_sums": (dy, x, w, mean, invstd, [True, True], b, act),
        "batch_norm_backward_with_sums": (dy, x, w, mean, invstd, sums * 2, torch.tensor(150.0, dtype=torch.float64), b,
                                          act),
    }


@pytest.mark.parametrize("op,relu", [("batch_norm_stats", False)] + [
    (op, relu) for op in ("batch_norm_train_with_stats", "batch_norm_backward_sums", "batch_norm_backward_with_sums")
    for relu in (False, True)])
def test_sync_ops_opcheck(op, relu):
    torch.library.opcheck(getattr(ops, op), _opcheck_args(relu)[op])


# ---------------------------------------------------------------------------
# convert_sync_batchnorm
# ---------------------------------------------------------------------------

def test_convert_sync_batchnorm_shares_parameters_and_keeps_types():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
        nn.Sequential(nn.SyncBatchNorm(4, momentum=None), fused_bn.FusedBatchNorm2d(4, affine=False)),
        fused_bn.FusedBatchNormReLU2d(4, eps=1e-3), nn.BatchNorm1d(4))
    model[3].eval()
    originals = [model[1], model[2][0], model[2][1], model[3], model[4]]
    keys = list(model.state_dict().keys())
    group = object()
    converted = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(model, process_group=group)
    assert converted is model and list(model.state_dict().keys()) == keys
    new = [model[1], model[2][0], model[2][1], model[3], model[4]]
    for old, bn in zip(originals, new):
        assert type(bn) is fused_bn.FusedSyncBatchNorm2d and bn.process_group is group
        for attr in ("eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(bn, attr) == getattr(old, attr), attr
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(bn, attr) is getattr(old, attr), attr
    assert [bn.activation for bn in new] == [None, None, None, fused_bn.Activation("relu", ()), None]
    single = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(nn.BatchNorm2d(2))
    assert type(single) is fused_bn.FusedSyncBatchNorm2d


def test_convert_sync_batchnorm_converts_add_relu_forms():
    """Our add+ReLU forms become FusedSyncBatchNorm2d with activation relu taking the
    residual as forward's second argument, sharing parameters and buffers; on a single
    process the converted model computes bitwise what the original did."""
    torch.manual_seed(0)
    original = nn.Sequential(fused_bn.FusedBatchNormAddReLU2d(2, momentum=None))
    with torch.no_grad():
        original[0].weight.uniform_(0.5, 1.5)
        original[0].bias.uniform_(-1, 1)
    kept = copy.deepcopy(original)
    old = original[0]
    converted = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(original)
    bn = converted[0]
    assert type(bn) is fused_bn.FusedSyncBatchNorm2d
    assert bn.activation == fused_bn.Activation("relu", ())
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert getattr(bn, attr) is getattr(old, attr), attr
    x, z, dy = torch.randn(3, 2, 4, 5) * 2 + 1, torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    results = []
    for m in (bn, kept[0]):
        out = []
        for training in (True, True, False):
            m.train(training)
            m.zero_grad(set_to_none=True)
            leaf, res = x.detach().requires_grad_(), z.detach().requires_grad_()
            y = m(leaf, res)
            y.backward(dy)
            out.append((y.detach(), leaf.grad, res.grad, m.weight.grad, m.bias.grad))
        out.append(tuple(v.clone() for v in (m.running_mean, m.running_var, m.num_batches_tracked)))
        results.append(out)
    for step, (a, b) in enumerate(zip(*results)):
        for i, (u, v) in enumerate(zip(a, b)):
            assert_bitwise_equal(u, v, f"converted vs original, step {step} item {i}")


def test_sync_state_dict_round_trips_with_nn_modules():
    sync = fused_bn.FusedSyncBatchNorm2d(5)
    for other in (nn.BatchNorm2d(5), nn.SyncBatchNorm(5)):
        with torch.no_grad():
            other.running_mean.uniform_()
            other.num_batches_tracked.fill_(4)
        sync.load_state_dict(other.state_dict())
        other.load_state_dict(sync.state_dict())
        assert sync.state_dict().keys() == other.state_dict().keys()
        assert torch.equal(sync.running_mean, other.running_mean) and int(sync.num_batches_tracked) == 4
    with pytest.raises(ValueError, match="unsupported activation.*relu, relu6, hardtanh"):
        fused_bn.FusedSyncBatchNorm2d(3, activation=nn.Tanh())
    with pytest.raises(ValueError, match="unsupported activation 'tanh'.*relu, relu6, hardtanh"):
        fused_bn.FusedSyncBatchNorm2d(3, activation="tanh")
