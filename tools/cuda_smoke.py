#!/usr/bin/env python3
"""Run every CUDA kernel once per path on small odd shapes, for
compute-sanitizer (memcheck, racecheck, initcheck, synccheck) and as a quick
smoke test. Each case runs training and eval, forward and backward, against
nn's composite (nn.BatchNorm, the residual added, the activation) in float64
on the same input:
- plain batch norm: every shape x dtype pairing x layout x output mask (vector
  and scalar loads: H*W or C a multiple of the vector width or not; C = 1,
  N = 1, H*W = 1, two values per channel, an empty batch, zero channels);
- every activation fused_bn has (and parameterised forms), with and without a
  residual, each with every dtype pairing and both layouts, on shapes (2-D to
  5-D) and output masks taken in turn;
- the data-parallel ops through FusedSyncBatchNorm's autograd function on one
  rank of a real process group (NCCL on a GPU, gloo otherwise; an in-memory
  store, no network), and rank 0's forward given two ranks' moments (their
  merge);
- a channel of two values with an infinite gradient; no running statistics;
  momentum=None.
Exits non-zero when an output is not finite where nn's is (or the reverse) or
differs from nn by more than a loose bound (the parity suite holds the real
tolerances).

Usage: python3 tools/cuda_smoke.py            (needs a CUDA build of fused_bn)
       compute-sanitizer --tool memcheck python3 tools/cuda_smoke.py
       python3 tools/cuda_smoke.py cpu        (the same cases on the CPU kernels)
       python3 tools/cuda_smoke.py emulated   (the emulated GPU: CPU tensors, our CUDA kernels)
`make test` runs the emulated form with gcov (it must reach every line of the
kernel layer) and under ASan+UBSan (FUSED_BN_EMULATION_VARIANT=asan).
"""
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fused_bn
from fused_bn import _sync
from fused_bn._activations import resolve

SHAPES = [(2, 3, 5, 7), (4, 16, 8, 8), (1, 1, 3, 3), (3, 8, 1, 1), (1, 5, 1, 2), (2, 4, 1, 1),
          (0, 3, 4, 4), (5, 24, 7, 7), (2, 64, 4, 4), (2, 0, 3, 3)]
# The epilogue groups also take 2-D, 3-D and 5-D input.
EPILOGUE_SHAPES = SHAPES + [(6, 12), (3, 8, 10), (2, 4, 3, 5, 3), (2, 8, 2, 2, 2)]
PRECISIONS = [(torch.float32, torch.float32), (torch.float64, torch.float64),
              (torch.float16, torch.float16), (torch.float16, torch.float32),
              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
MASKS = [(True, True, True), (True, False, False), (False, True, True)]
TWO_RANK_SHAPES = [(4, 16, 8, 8), (5, 24, 7, 7), (3, 8, 1, 1), (2, 3, 5, 7)]
# Module options beside the defaults: no running statistics (no counter to
# increment) and the cumulative average (momentum=None).
OPTIONS = [(("track_running_stats", False),), (("momentum", None),)]
# Every activation by name, and parameterised forms beside nn's defaults.
ACTIVATIONS = [resolve(name) for name in fused_bn.ACTIVATIONS] + [
    resolve(nn.LeakyReLU(0.1)), resolve(nn.Hardtanh(-2.0, 0.5)), resolve(nn.ELU(0.5))]
LOOSE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.float16: 5e-2, torch.bfloat16: 2e-1}
_MODULES = {2: fused_bn.FusedBatchNorm1d, 3: fused_bn.FusedBatchNorm1d, 4: fused_bn.FusedBatchNorm2d,
            5: fused_bn.FusedBatchNorm3d}
_NN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


class _ActivationReference(torch.autograd.Function):
    """The activation table's reference forward and its backward op
    (fused_bn/_activations.py): nn's own derivatives, except hardsigmoid's,
    whose float64 backward in nn is 3e-8 off (it multiplies by float(1/6))."""

    @staticmethod
    def forward(ctx, u, activation):
        ctx.save_for_backward(u)
        ctx.activation = activation
        return activation.reference(u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return ctx.activation.grad(grad, u), None


class _Reference(nn.Module):
    """nn's composite, run in float64: batch norm, the residual added, the activation."""

    def __init__(self, rank, channels, activation, **options):
        super().__init__()
        self.bn = _NN[rank](channels, **options)
        self.activation = activation

    def forward(self, x, residual=None):
        z = self.bn(x)
        return _ActivationReference.apply(z if residual is None else z + residual, self.activation)


class _Fused(nn.Module):
    """fused_bn's module with the activation (and the residual) fused; with
    `data_parallel`, its training calls go through FusedSyncBatchNorm's
    autograd function (the data-parallel ops and their collectives) on a world
    of one, which the module itself would skip."""

    def __init__(self, rank, channels, activation, data_parallel=False, **options):
        super().__init__()
        self.bn = _MODULES[rank](channels, activation=activation, **options)
        self.activation = activation
        self.data_parallel = data_parallel

    def forward(self, x, residual=None):
        bn = self.bn
        if self.data_parallel and bn.training:
            return _sync.sync_batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.momentum,
                                         bn.eps, bn.num_batches_tracked, self.activation, residual, None, 1)
        return bn(x, residual)


def _two_ranks_difference(device, shape, input_dtype, param_dtype, channels_last, activation, residual):
    """Rank 0 of two: batch_norm_train_with_stats on the first part of a batch,
    given both parts' batch_norm_stats as a two-rank all-gather stacks them
    (the ranks' moments merged in rank order), against nn on the whole batch:
    the output on that part and the running statistics."""
    torch.manual_seed(0)
    ops = torch.ops.fused_bn
    ours = _MODULES[len(shape)](shape[1]).to(device, param_dtype)
    theirs = _Reference(len(shape), shape[1], activation).to(device, torch.float64)
    x = torch.randn(shape, device=device).to(input_dtype)
    r = torch.randn(shape, device=device).to(input_dtype) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=_CHANNELS_LAST[len(shape)])
        r = r.contiguous(memory_format=_CHANNELS_LAST[len(shape)]) if residual else None
    parts = x.tensor_split(2)
    all_stats = torch.stack([ops.batch_norm_stats(part, ours.weight, ours.bias, ours.running_mean,
                                                  ours.running_var) for part in parts])
    y, _, _ = ops.batch_norm_train_with_stats(
        parts[0], ours.weight, ours.bias, ours.running_mean, ours.running_var, ours.num_batches_tracked,
        ours.momentum, ours.eps, all_stats, activation.name, list(activation.params),
        None if r is None else r.tensor_split(2)[0])
    expected = theirs(x.double(), None if r is None else r.double())[:parts[0].shape[0]]
    worst = 0.0
    for a, b in ((y, expected), (ours.running_mean, theirs.bn.running_mean),
                 (ours.running_var, theirs.bn.running_var)):
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, float((a - b).abs().max()) / max(1.0, float(b.abs().max())))
    return worst


def _layouts(rank):
    return (False, True) if rank in _CHANNELS_LAST else (False,)


def _worst_difference(device, shape, input_dtype, param_dtype, channels_last, masks, ours, theirs,
                      residual, infinite_grad=False):
    """Max over outputs, gradients and running statistics of |ours - nn| /
    max(1, |nn|), training then eval, both modules starting from the same
    state; nn runs in float64 on the same (rounded) input, so that a reduced
    precision's kink flips (an element rounding to the other side of
    ReLU6's 0 in nn's bfloat16 but not in ours) do not count."""
    torch.manual_seed(0)
    ours.to(device, param_dtype)
    theirs.to(device, torch.float64)
    x = torch.randn(shape, device=device).to(input_dtype)
    r = torch.randn(shape, device=device).to(input_dtype) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=_CHANNELS_LAST[len(shape)])
        r = r.contiguous(memory_format=_CHANNELS_LAST[len(shape)]) if residual else None
    g = torch.randn_like(x)
    if infinite_grad:
        g.view(-1)[0] = float("inf")
    values_per_channel = x.numel() // shape[1] if shape[1] else 0
    worst = 0.0
    for training in (True, False):
        if training and values_per_channel == 1:
            continue
        if not training and theirs.bn.track_running_stats:
            # Eval normalizes with the running statistics as ours stores them
            # (rounded to a bfloat16 or float16 parameter dtype): nn's float64
            # ones would move u across an activation's kink where ours does not.
            theirs.bn.running_mean.copy_(ours.bn.running_mean)
            theirs.bn.running_var.copy_(ours.bn.running_var)
        results = []
        # nn cannot run zero channels (an IndexError on the CPU); ours runs them
        # (no kernel but the counter's increment), compared with nothing.
        for m in (ours, theirs) if shape[1] else (ours,):
            m.train(training)
            bn = m.bn
            wide = m is theirs
            leaf = (x.double() if wide else x).detach().requires_grad_(masks[0])
            res = (r.double() if wide else r).detach().requires_grad_(masks[0]) if residual else None
            bn.weight.requires_grad_(masks[1])
            bn.bias.requires_grad_(masks[2])
            m.zero_grad(set_to_none=True)
            y = m(leaf) if res is None else m(leaf, res)
            if any(masks):
                y.backward(g.double() if wide else g)
            results.append([y, leaf.grad, bn.weight.grad, bn.bias.grad, None if res is None else res.grad,
                            bn.running_mean, bn.running_var])
        if not shape[1]:
            if results[0][0].shape != x.shape:
                raise AssertionError(f"output shape {tuple(results[0][0].shape)} for zero channels")
            continue
        for a, b in zip(*results):
            if a is None or b is None or a.numel() == 0:
                continue
            a, b = a.detach().double(), b.detach().double()
            if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
                raise AssertionError("non-finite values where nn's are finite (or the reverse)")
            finite = torch.isfinite(b)
            if finite.any():
                scale = max(1.0, float(b[finite].abs().max()))
                worst = max(worst, float((a - b)[finite].abs().max()) / scale)
    return worst


def _cases():
    """(group, shape, precision, channels_last, masks, activation, residual);
    a group of module options is a tuple of (name, value)."""
    for shape, precision, channels_last, masks in itertools.product(SHAPES, PRECISIONS, (False, True), MASKS):
        yield "plain", shape, precision, channels_last, masks, resolve("identity"), False
    turn = itertools.count()
    for activation, residual, precision in itertools.product(ACTIVATIONS, (False, True), PRECISIONS):
        for channels_last in (False, True):
            i = next(turn)
            shape = EPILOGUE_SHAPES[i % len(EPILOGUE_SHAPES)]
            if channels_last and len(shape) not in _CHANNELS_LAST:
                shape = SHAPES[i % len(SHAPES)]
            yield "epilogue", shape, precision, channels_last, MASKS[i % len(MASKS)], activation, residual
    for activation, residual, channels_last in itertools.product(ACTIVATIONS, (False, True), (False, True)):
        i = next(turn)
        shape = SHAPES[i % len(SHAPES)]
        yield ("data-parallel", shape, PRECISIONS[i % len(PRECISIONS)], channels_last, MASKS[i % len(MASKS)],
               activation, residual)
    # Two ranks' moments merged (the data-parallel forward of rank 0), odd splits.
    for activation, residual, channels_last in itertools.product(ACTIVATIONS, (False, True), (False, True)):
        i = next(turn)
        yield ("two ranks", TWO_RANK_SHAPES[i % len(TWO_RANK_SHAPES)], PRECISIONS[i % len(PRECISIONS)],
               channels_last, None, activation, residual)
    # A channel of two values with an infinite gradient: the general formula
    # in place of the closed form, nn's inf/NaN pattern kept.
    for precision, channels_last in itertools.product(PRECISIONS, (False, True)):
        yield "infinite gradient", (2, 4, 1, 1), precision, channels_last, MASKS[0], resolve("identity"), False
    for options, precision, channels_last in itertools.product(OPTIONS, PRECISIONS, (False, True)):
        i = next(turn)
        yield (options, SHAPES[i % len(SHAPES)], precision, channels_last, MASKS[i % len(MASKS)],
               ACTIVATIONS[i % len(ACTIVATIONS)], bool(i % 2))


def _start_emulated_gpu():
    """Our CUDA kernels serve fused_bn's ops on CPU tensors (tests/emulated_cuda.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import emulated_cuda

    # FUSED_BN_EMULATION_VARIANT=asan: the sanitized build (Python under the
    # ASan runtime, as the Makefile runs it).
    emulated_cuda.build(os.environ.get("FUSED_BN_EMULATION_VARIANT", "default"))
    emulated_cuda.enable(True)
    # Few multiprocessors and a small occupancy answer split the small shapes
    # over several blocks, as a full GPU splits large ones.
    emulated_cuda.configure(multiprocessor_count=2, block_order="shuffle", seed=1, resident_threads=256)


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    assert mode != "cuda" or torch.cuda.is_available(), "cuda_smoke.py needs a GPU (or: cpu, emulated)"
    if mode == "emulated":
        _start_emulated_gpu()
    device = "cuda" if mode == "cuda" else "cpu"
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    failures = 0
    cases = 0
    for group, shape, (input_dtype, param_dtype), channels_last, masks, activation, residual in _cases():
        cases += 1
        options = dict(group) if isinstance(group, tuple) else {}
        ours = _Fused(len(shape), shape[1], activation, data_parallel=group == "data-parallel", **options)
        theirs = _Reference(len(shape), shape[1], activation, **options)
        try:
            if group == "two ranks":
                worst = _two_ranks_difference(device, shape, input_dtype, param_dtype, channels_last, activation,
                                              residual)
            else:
                worst = _worst_difference(device, shape, input_dtype, param_dtype, channels_last, masks, ours,
                                          theirs, residual, infinite_grad=group == "infinite gradient")
            if worst > LOOSE[input_dtype]:
                raise AssertionError(f"max relative difference from nn {worst:.3e}")
        except Exception as e:  # noqa: BLE001  (report every failing case)
            failures += 1
            print(f"FAIL {group} {shape} {input_dtype}/{param_dtype} "
                  f"{'channels_last' if channels_last else 'contiguous'} masks {masks} {activation}"
                  f"{' + residual' if residual else ''}: {e}")
    if device == "cuda":
        torch.cuda.synchronize()
    dist.destroy_process_group()
    print(f"cuda_smoke ({mode}): {cases - failures}/{cases} cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
