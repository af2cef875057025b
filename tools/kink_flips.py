"""Where a converted zoo model's float32 run takes the other side of an
activation's kink (ReLU's or LeakyReLU's 0) than the float64 reference does:
for each batch norm (with its fused activation, or before one that follows;
not those that fold a residual), the elements whose output sign differs from
the reference's, ours and nn's, at the state a step of tests/test_zoo.py
starts from. One such element in a layer of a few values
per channel moves that channel's gradients (and everything upstream) by far
more than rounding: the zoo test's float32 bound then fails by chance, for
whichever of ours or nn's draws the flip.

    python tools/kink_flips.py timm/resnet26d [step]
"""
import copy
import os
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import fused_bn  # noqa: E402
import test_zoo  # noqa: E402


def flips(name, step):
    original, side = test_zoo._build(name, torch.float32)
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(test_zoo.BATCH, 3, side, side, generator=generator) for _ in range(test_zoo.STEPS)]
    _, states = test_zoo._run(copy.deepcopy(original), inputs)
    original.load_state_dict(states[step][0])
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    reference = copy.deepcopy(original).double()
    outputs = {}
    for tag, model in (("nn", original), ("ours", converted), ("reference", reference)):
        for module_name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.register_forward_hook(lambda m, i, o, key=(tag, module_name): outputs.__setitem__(key, o.detach()))
        model.train()
        torch.manual_seed(100 + step)  # as test_zoo._run
        model(inputs[step].to(torch.float64 if tag == "reference" else torch.float32))
    # A model fx does not trace is converted in place: no residual folds there.
    with_residual = set()
    if hasattr(converted, "graph"):
        with_residual = {n.target for n in converted.graph.nodes if n.op == "call_module" and len(n.args) == 2}
    for layer, module in converted.named_modules():
        if ("ours", layer) not in outputs or layer in with_residual:
            continue
        ours, theirs, ref = (outputs[(tag, layer)] for tag in ("ours", "nn", "reference"))
        if ours.shape != ref.shape:
            continue
        yield layer, tuple(ours.shape), int(((ours > 0) != (ref > 0)).sum()), int(((theirs > 0) != (ref > 0)).sum())


if __name__ == "__main__":
    model_name, step = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    for layer, shape, ours, theirs in flips(model_name, step):
        if ours or theirs:
            print(f"{layer} {shape}: ours flips {ours}, nn flips {theirs}")
