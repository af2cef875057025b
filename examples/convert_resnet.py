"""Convert a torchvision ResNet, train a few steps, save a checkpoint, and load
it into the unconverted model.

fused_bn's modules keep nn.BatchNorm2d's parameters, buffers and state_dict
keys, so a checkpoint written by the converted model is an ordinary ResNet
checkpoint: this script checks that the unconverted model loaded from it gives
the converted model's eval outputs, and that training resumes from it.

    python3 examples/convert_resnet.py [--model resnet18] [--steps 3] [--fuse-relu]
        [--device cpu|cuda] [--checkpoint PATH]

Random images and labels (nothing is downloaded); exits with status 1 when
the reloaded model differs.
"""
import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fused_bn  # noqa: E402
from bench.zoo import import_torchvision  # noqa: E402  (torchvision, even from the CUDA wheel on a CPU torch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="a torchvision.models constructor (default resnet18)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--side", type=int, default=64, help="image side (default 64, quick on a CPU)")
    p.add_argument("--fuse-relu", action="store_true", help="convert_model(fuse_relu=True)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", default=None, help="where to save (default: a temporary file)")
    args = p.parse_args(argv)
    torchvision = import_torchvision()
    device = torch.device(args.device)
    torch.manual_seed(0)

    # 1. Convert: every nn.BatchNorm2d becomes a FusedBatchNorm2d sharing its
    # parameters and buffers (with --fuse-relu a torch.fx GraphModule that also
    # folds the ReLUs and the residual adds into the batch norms).
    model = getattr(torchvision.models, args.model)(weights=None, num_classes=10).to(device)
    model = fused_bn.convert_model(model, fuse_relu=args.fuse_relu)
    fused = sum(isinstance(m, fused_bn.FusedBatchNorm2d) for m in model.modules())
    print(f"{args.model}: {fused} batch norms run on fused_bn" + (" (ReLU fused)" if args.fuse_relu else ""))

    # 2. Train a few steps, as with any model.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = torch.randn(args.batch, 3, args.side, args.side, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    model.train()
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        print(f"step {step + 1}: loss {loss.item():.4f}")

    # 3. Save: an ordinary checkpoint (same keys as the unconverted model's).
    path = args.checkpoint or os.path.join(tempfile.mkdtemp(prefix="fused_bn-"), "resnet.pt")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    print(f"saved {path}")

    # 4. Load into the unconverted torchvision model: nothing of fused_bn needed.
    plain = getattr(torchvision.models, args.model)(weights=None, num_classes=10).to(device)
    checkpoint = torch.load(path, weights_only=True)
    plain.load_state_dict(checkpoint["model"])
    model.eval()
    plain.eval()
    with torch.no_grad():
        ours, theirs = model(images), plain(images)
    difference = (ours - theirs).abs().max().item()
    print(f"eval logits, converted vs unconverted loaded from the checkpoint: max |difference| {difference:.2e}")
    ok = torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)

    # 5. Resume training the unconverted model from the checkpoint.
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    plain_optimizer.load_state_dict(checkpoint["optimizer"])
    plain.train()
    plain_optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(plain(images), labels)
    loss.backward()
    plain_optimizer.step()
    print(f"resumed unconverted: loss {loss.item():.4f}")
    print("OK" if ok else "MISMATCH: the unconverted model does not reproduce the converted one")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
