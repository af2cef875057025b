"""Reliability: second-order gradients of the modules, torch.export, a memory
soak, Python threads, and numerical edges.

* gradgradcheck (float64) of FusedBatchNorm2d, FusedBatchNormReLU2d and
  FusedBatchNormAddReLU2d, in train and eval, affine or not;
* torch.export.export of conv -> our module -> ReLU models (and the ReLU /
  add+ReLU modules) in eval and train: the exported program runs, matches
  eager, and (train) updates the running statistics and counter as eager does;
* soak: a small model trained for many steps does not grow the process's
  resident memory (CPU) or allocated memory (CUDA); CI runs 600 steps, the
  5,000-step run is `-m slow`;
* threads: several Python threads training their own modules at once give
  bitwise the results of the same work done one after another;
* numerical edges: constant channels, variance below eps, mean offsets of 1e5
  (float32) and 1e2 (float16), +-inf and NaN inputs, against nn.BatchNorm2d
  under the accuracy rule (same NaN/inf pattern as nn).
"""
import copy
import gc
import os
import threading

import pytest
import torch
from torch import nn
from torch.func import functional_call

import fused_bn
from _helpers import BF16, BF16_AMP, F16, F16_AMP, F32, CL, check_step, make_trio, sample

f64 = torch.float64
MODULES = {"bn": fused_bn.FusedBatchNorm2d, "bn_relu": fused_bn.FusedBatchNormReLU2d,
           "bn_add_relu": fused_bn.FusedBatchNormAddReLU2d}


# ---------------------------------------------------------------- second order

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_module_gradgradcheck(device, kind, training, affine):
    torch.manual_seed(0)
    m = MODULES[kind](3, affine=affine).to(device, f64)
    with torch.no_grad():
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 1.5)
    m.train(training)
    x = sample((3, 3, 4, 3), f64, device).requires_grad_()
    z = sample((3, 3, 4, 3), f64, device, mean=1.0).requires_grad_()
    params = {}
    if affine:
        params = {"weight": (0.5 + torch.rand(3, dtype=f64, device=device)).requires_grad_(),
                  "bias": torch.randn(3, dtype=f64, device=device).requires_grad_()}
    names = list(params)

    def f(x, z, *p):
        args = (x, z) if kind == "bn_add_relu" else (x,)
        return functional_call(m, dict(zip(names, p)), args)

    inputs = (x, z) + tuple(params.values())
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# ---------------------------------------------------------------- torch.export

class _ConvBN(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = MODULES[kind](4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "bn":
            return torch.relu(self.bn(y))
        if self.kind == "bn_relu":
            return self.conv2(self.bn(y))
        return self.bn(self.conv2(y), y)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_export_runs_and_matches_eager(device, kind, training):
    torch.manual_seed(0)
    eager = _ConvBN(kind).to(device)
    with torch.no_grad():
        eager.bn.running_mean.uniform_(-0.5, 0.5)
        eager.bn.running_var.uniform_(0.5, 1.5)
    eager.train(training)
    exported_from = copy.deepcopy(eager)
    x = sample((2, 3, 6, 5), device=device)
    program = torch.export.export(exported_from, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    op = "fused_bn.batch_norm_train.default" if training else "fused_bn.batch_norm_eval.default"
    assert op in targets, f"{op} not in the exported graph: {sorted(targets)}"
    runnable = program.module()
    for step in range(3):
        x = sample((2, 3, 6, 5), device=device)
        expected = eager(x)
        got = runnable(x)
        torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-5, msg=f"step {step}")
        # the exported program updates its running statistics as eager does (train)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(runnable.get_buffer(f"bn.{name}"), getattr(eager.bn, name),
                                       rtol=1.3e-6, atol=1e-6, msg=f"step {step} {name}")
    assert int(runnable.get_buffer("bn.num_batches_tracked")) == (3 if training else 0)


def test_export_dynamic_batch(device):
    """A batch dimension exported as dynamic runs for other batch sizes."""
    eager = _ConvBN("bn").to(device).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(copy.deepcopy(eager), (sample((2, 3, 6, 5), device=device),),
                                  dynamic_shapes={"x": {0: batch}})
    for n in (1, 5, 9):
        x = sample((n, 3, 6, 5), device=device)
        torch.testing.assert_close(program.module()(x), eager(x), rtol=1.3e-6, atol=1e-5)


# ---------------------------------------------------------------- soak

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = fused_bn.FusedBatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_relu = fused_bn.FusedBatchNormReLU2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_add_relu = fused_bn.FusedBatchNormAddReLU2d(8, momentum=None)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.bn_add_relu(self.conv3(self.bn_relu(self.conv2(y))), y)


def _soak(device, steps, warmup=200):
    """Train the tiny model (plus an eval step every 10) for ``steps`` steps
    after ``warmup``; returns the memory before and after (RSS on the CPU,
    allocated bytes on CUDA)."""
    torch.manual_seed(0)
    model = _Tiny().to(device)
    if device == "cpu":
        model = model.to(memory_format=CL)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = sample((4, 3, 8, 8), device=device)
    if device == "cpu":
        x = x.contiguous(memory_format=CL)
    target = torch.randn(4, 8, 8, 8, device=device)

    def step(i):
        model.train(i % 10 != 9)
        if model.training:
            opt.zero_grad(set_to_none=True)
            loss = (model(x) - target).square().mean()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)

    def measure():
        gc.collect()
        if device == "cpu":
            return _rss_bytes()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    for i in range(warmup):
        step(i)
    before = measure()
    for i in range(steps):
        step(warmup + i)
    after = measure()
    assert torch.isfinite(model.bn.running_var).all()
    assert int(model.bn.num_batches_tracked) == sum(1 for i in range(warmup + steps) if i % 10 != 9)
    return before, after


def _check_soak(device, steps, warmup=200):
    before, after = _soak(device, steps, warmup)
    growth = after - before
    print(f"\nsoak {device}: {steps} steps, memory before {before / 2**20:.2f} MiB, "
          f"after {after / 2**20:.2f} MiB, growth {growth / 2**10:.1f} KiB")
    if device == "cpu":
        # One leaked activation per step (4x8x8x8 float32 = 8 KiB) would add
        # steps * 8 KiB (4.7 MiB for 600 steps); allocator and interpreter
        # noise after the warm-up stays far below 1 MiB.
        assert growth < 1 * 2**20, f"RSS grew by {growth / 2**20:.2f} MiB over {steps} steps"
    else:
        # The caching allocator hands out the same blocks every step: exact.
        assert growth == 0, f"allocated memory grew by {growth} bytes over {steps} steps"


def test_soak_memory_ci(device):
    _check_soak(device, 600)


@pytest.mark.slow
def test_soak_memory_5000_steps(device):
    # RSS settles over the first few thousand steps (about 0.5 MiB, bounded:
    # the same after 10,000 and 20,000 steps), hence the longer warm-up
    _check_soak(device, 5000, warmup=1000)


# ---------------------------------------------------------------- threads

def _thread_work(kind, device, seed, steps=8):
    """Train and evaluate one module of ``kind`` on its own inputs; returns
    every output, grad and buffer along the way."""
    g = torch.Generator().manual_seed(seed)
    shape = [(4, 16, 7, 7), (2, 37, 9, 11), (3, 70, 5, 5), (2, 8, 33, 31)][seed % 4]
    m = MODULES[kind](shape[1], momentum=None if seed % 2 else 0.1).to(device)
    results = []
    for step in range(steps):
        m.train(step % 4 != 3)
        x = torch.randn(shape, generator=g).to(device)
        if seed % 2:
            x = x.contiguous(memory_format=CL)
        z = torch.randn(shape, generator=g).to(device)
        gy = torch.randn(shape, generator=g).to(device)
        m.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        y = m(leaf, z) if kind == "bn_add_relu" else m(leaf)
        y.backward(gy)
        results.append([y.detach(), leaf.grad, m.weight.grad, m.bias.grad, m.running_mean.clone(),
                        m.running_var.clone(), m.num_batches_tracked.clone()])
    return results


def test_threads_with_separate_modules(device):
    """Six Python threads (two per module class) train their own modules at
    once; each gets bitwise what the same work gives run alone."""
    jobs = [(kind, seed) for seed, kind in enumerate(list(MODULES) * 2)]
    expected = [_thread_work(kind, device, seed) for kind, seed in jobs]
    got, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def worker(i):
        try:
            start.wait()
            got[i] = _thread_work(*jobs[i][:1], device, jobs[i][1])
        except Exception as e:  # surfaced below with the job
            errors.append((jobs[i], repr(e)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for (kind, seed), want, have in zip(jobs, expected, got):
        assert have is not None, f"{kind} thread {seed} did not finish"
        for step, (a, b) in enumerate(zip(want, have)):
            for i, (u, v) in enumerate(zip(a, b)):
                assert torch.equal(u, v), f"{kind} thread {seed} step {step} result {i} differs under threads"


# ---------------------------------------------------------------- numerical edges

def _edge_steps(trio, make_x, label, device, steps=(True, True, False, True)):
    for step, training in enumerate(steps):
        for m in trio:
            m.train(training)
        x = make_x()
        gy = sample(tuple(x.shape), x.dtype, device, mean=0.5, std=1.0)
        check_step(trio, x, gy, f"[{label} step {step} training={training}]")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("precision", [F32, BF16, F16_AMP], ids=str)
def test_all_equal_channels(device, precision, layout):
    """Channels holding one value each (zero, a small and a large one) next to
    ordinary channels: output = bias there, no NaN, accurate grads."""
    trio = make_trio(5, precision, device)

    def make_x():
        x = sample((4, 5, 6, 7), torch.float32, device)
        x[:, 0] = 0.0
        x[:, 2] = -3.25
        x[:, 4] = 1000.0
        x = x.to(precision.input_dtype)
        return x.contiguous(memory_format=CL) if layout == "channels_last" else x

    _edge_steps(trio, make_x, f"all-equal channels {precision} {layout}", device)
    assert torch.isfinite(trio[0].running_var).all()


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@pytest.mark.parametrize("precision", [F32, BF16_AMP], ids=str)
def test_variance_below_eps(device, precision, eps):
    trio = make_trio(4, precision, device, eps=eps)
    _edge_steps(trio, lambda: sample((8, 4, 5, 5), precision.input_dtype, device, mean=1.0, std=1e-3),
                f"variance below eps={eps} {precision}", device)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("precision,offset", [(F32, 1e5), (F32, -1e5), (F16, 1e2), (F16_AMP, 1e2), (F16, -1e2)],
                         ids=["f32+1e5", "f32-1e5", "f16+1e2", "f16amp+1e2", "f16-1e2"])
def test_large_mean_offset(device, precision, offset, layout):
    """Means of 1e5 (float32) and 1e2 (float16) with unit spread: the
    statistics must not cancel away (naive E[x^2] - E[x]^2 fails here)."""
    trio = make_trio(3, precision, device)

    def make_x():
        x = (offset + torch.randn(6, 3, 9, 8)).to(device, precision.input_dtype)
        return x.contiguous(memory_format=CL) if layout == "channels_last" else x

    _edge_steps(trio, make_x, f"mean offset {offset} {precision} {layout}", device)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("precision", [F32, F16_AMP], ids=str)
@pytest.mark.parametrize("values", ["+inf", "-inf", "nan", "inf-and-nan"])
def test_nonfinite_inputs(device, values, precision, layout):
    """+-inf and NaN in one channel: outputs, grads and running statistics have
    nn's NaN/inf pattern exactly (check_step compares it), other channels stay
    accurate."""
    trio = make_trio(3, precision, device)
    specials = {"+inf": [float("inf")], "-inf": [float("-inf")], "nan": [float("nan")],
                "inf-and-nan": [float("inf"), float("nan"), float("-inf")]}[values]

    def make_x():
        x = sample((4, 3, 5, 6), torch.float32, device)
        for i, v in enumerate(specials):
            x[i, 1, 2, i] = v
        x = x.to(precision.input_dtype)
        return x.contiguous(memory_format=CL) if layout == "channels_last" else x

    # eval first: the running statistics are still finite
    _edge_steps(trio, make_x, f"{values} {precision} {layout}", device, steps=(False, True, False))
    assert torch.isfinite(trio[0].running_mean[[0, 2]]).all()
