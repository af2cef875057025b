#!/usr/bin/env python3
"""Run every CUDA kernel once per path on small odd shapes, for
compute-sanitizer (memcheck, racecheck, initcheck) and as a quick smoke test:
training forward, eval forward, backward (all output masks), both layouts,
every dtype pairing, vector and scalar loads (HW or C a multiple of the vector
width or not), C = 1, N = 1, H*W = 1, two values per channel, an empty batch.
Exits non-zero when an output is not finite or differs from nn.BatchNorm2d by
more than a loose bound (the parity suite holds the real tolerances).

Usage: python3 tools/cuda_smoke.py            (needs a CUDA build of fused_bn)
       compute-sanitizer --tool memcheck python3 tools/cuda_smoke.py
       python3 tools/cuda_smoke.py cpu        (the same cases on the CPU kernels)
"""
import itertools
import sys

import torch
from torch import nn

import fused_bn

SHAPES = [(2, 3, 5, 7), (4, 16, 8, 8), (1, 1, 3, 3), (3, 8, 1, 1), (1, 5, 1, 2), (2, 4, 1, 1),
          (0, 3, 4, 4), (5, 24, 7, 7), (2, 64, 4, 4)]
PRECISIONS = [(torch.float32, torch.float32), (torch.float64, torch.float64),
              (torch.float16, torch.float16), (torch.float16, torch.float32),
              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
LOOSE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.float16: 5e-2, torch.bfloat16: 2e-1}


def run_case(device, shape, input_dtype, param_dtype, channels_last, masks):
    torch.manual_seed(0)
    ours = fused_bn.FusedBatchNorm2d(shape[1]).to(device, param_dtype)
    theirs = nn.BatchNorm2d(shape[1]).to(device, param_dtype)
    x = torch.randn(shape, device=device).to(input_dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    worst = 0.0
    for training in (True, False):
        if training and shape[0] * shape[2] * shape[3] == 1:
            continue
        for m in (ours, theirs):
            m.train(training)
        results = []
        for m in (ours, theirs):
            leaf = x.detach().requires_grad_(masks[0])
            m.weight.requires_grad_(masks[1])
            m.bias.requires_grad_(masks[2])
            m.zero_grad(set_to_none=True)
            y = m(leaf)
            if any(masks):
                y.backward(g)
            results.append([y, leaf.grad, m.weight.grad, m.bias.grad])
        for a, b in zip(*results):
            if a is None or b is None or a.numel() == 0:
                continue
            a, b = a.detach().double(), b.detach().double()
            if not torch.isfinite(a).all():
                raise AssertionError(f"non-finite output {shape} {input_dtype}/{param_dtype}")
            scale = max(1.0, float(b.abs().max()))
            worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    assert device != "cuda" or torch.cuda.is_available(), "cuda_smoke.py needs a GPU (or: cpu)"
    failures = 0
    cases = 0
    for shape, (input_dtype, param_dtype), channels_last in itertools.product(
            SHAPES, PRECISIONS, (False, True)):
        for masks in ((True, True, True), (True, False, False), (False, True, True)):
            cases += 1
            try:
                worst = run_case(device, shape, input_dtype, param_dtype, channels_last, masks)
                if worst > LOOSE[input_dtype]:
                    raise AssertionError(f"max relative difference from nn {worst:.3e}")
            except Exception as e:  # noqa: BLE001  (report every failing case)
                failures += 1
                print(f"FAIL {shape} {input_dtype}/{param_dtype} "
                      f"{'channels_last' if channels_last else 'contiguous'} masks {masks}: {e}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_smoke ({device}): {cases - failures}/{cases} cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
