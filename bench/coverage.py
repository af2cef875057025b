"""Which batch norms of real models ``convert_model(fuse=True)`` fuses: per
model, how many batch norms are followed by something fused_bn can fold (an
activation it has, a residual add, an add and then an activation) and how
many of those it folded; each one left unfused is named with the reason
(``fused_bn.fusion_report``). No timing: this is about the graphs.

    python -m bench.coverage [--models ...] [--out bench/results]
"""
import argparse
import collections
import json
import os

from torch import nn

import fused_bn

from . import zoo
from .report import BENCHMARKS_DOC_PATH, replace_doc_block

# The survey (issue 38): torchvision's and timm's families whose batch
# norms are followed by ReLU, ReLU6, SiLU, LeakyReLU, Hardswish, GELU and adds.
MODELS = (
    "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_y_400mf", "densenet121",
    "shufflenet_v2_x1_0", "mnasnet1_0", "timm/efficientnet_b0", "timm/mobilenetv3_large_100",
    "timm/cspdarknet53", "timm/rexnet_100", "timm/resnet26d", "timm/dla34", "timm/mixnet_s",
    "timm/regnetx_002", "timm/hrnet_w18_small", "timm/fastvit_t8", "timm/repvit_m1", "timm/ghostnet_100",
)


def model_coverage(name):
    """{"model", "batch_norms", "followed", "fused", "folds": {spelling: count},
    "unfused": [[module path, what follows, reason]]} for one zoo model."""
    model, _ = zoo.build(name)
    records = fused_bn.fusion_report(model)
    batch_norms = sum(1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    followed = [r for r in records if r.follows is not None]
    folded = [r for r in followed if r.fused is not None]
    return {
        "model": name, "batch_norms": batch_norms, "followed": len(followed), "fused": len(folded),
        "folds": dict(collections.Counter(r.fused for r in folded)),
        "unfused": [[r.name, r.follows, r.reason] for r in followed if r.fused is None],
    }


def markdown(rows):
    lines = ["| model | batch norms | followed by an activation or add | fused | share | what was folded |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{r['fused'] / r['followed']:.0%}" if r["followed"] else "-"
        folds = ", ".join(f"{k} {v}" for k, v in sorted(r["folds"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['model']} | {r['batch_norms']} | {r['followed']} | {r['fused']} | {share} | {folds} |")
    followed = sum(r["followed"] for r in rows)
    fused = sum(r["fused"] for r in rows)
    lines.append(f"| **all** | {sum(r['batch_norms'] for r in rows)} | {followed} | {fused} | "
                 f"{fused / max(followed, 1):.0%} | |")
    unfused = [(r["model"], *u) for r in rows for u in r["unfused"]]
    if unfused:
        lines += ["", "Left unfused:", "", "| model | batch norm | followed by | reason |", "|---|---|---|---|"]
        lines += [f"| {m} | {n} | {f} | {why} |" for m, n, f, why in unfused]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=zoo.ALL_MODELS)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        reason = zoo.available(name)
        if reason is not None:
            print(f"{name}: skipped ({reason})")
            continue
        rows.append(model_coverage(name))
        r = rows[-1]
        print(f"{name:28} batch norms {r['batch_norms']:4}  followed {r['followed']:4}  fused {r['fused']:4}",
              flush=True)
    table = markdown(rows)
    print()
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fusion-coverage.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "fusion-coverage.md"), "w") as f:
        f.write(table + "\n")
    if set(args.models) == set(MODELS):
        replace_doc_block(BENCHMARKS_DOC_PATH, "fusion-coverage", table.split("\n\nLeft unfused:")[0])


if __name__ == "__main__":
    main()
