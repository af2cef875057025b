"""bench.models end to end on one small model (--quick): every case of every
step (train, eval, eval_grad) is run, timed and profiled, the records carry
what the docs/benchmarks.md tables report, the eval steps' outputs are compared with the
original's, and a quick run writes its own files and leaves docs/benchmarks.md alone."""
import json
import math
import os

import pytest

from bench import models, zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_reports_every_case(tmp_path):
    reason = zoo.available("resnet18")
    if reason:
        pytest.skip(reason)
    doc = os.path.join(ROOT, "docs", "benchmarks.md")
    with open(doc) as f:
        doc_before = f.read()
    # One round (--rounds; --quick alone runs 2): each case then has exactly one
    # round's steps.
    assert models.main(["--device", "cpu", "--quick", "--rounds", "1", "--models", "resnet18",
                        "--out", str(tmp_path)]) == 0
    stems = {p.name for p in tmp_path.iterdir()}
    json_files = [s for s in stems if s.endswith("-models-quick.json")]
    assert len(json_files) == 1
    stem = json_files[0][:-len(".json")]
    assert {stem + ".md", stem + ".png"} <= stems
    with open(tmp_path / json_files[0]) as f:
        result = json.load(f)
    records = result["records"]
    assert result["meta"]["steps"] == ["train", "eval", "eval_grad"]
    assert result["meta"]["rounds"] == 1
    assert sorted((r["variant"], r["memory_format"], r["mode"], r["step"], r["freezing"]) for r in records) == sorted(
        (v, f, "eager", s, False) for v in models.VARIANTS for f in models.FORMATS for s in models.STEPS)
    for r in records:
        assert r["model"] == "resnet18"
        assert r["step_ms"] > 0 and math.isfinite(r["speedup"])
        assert r["samples"] == result["meta"]["steps_per_round"]
        # The profiler saw batch-norm ops in every variant: nn's native op in
        # the original, ours (fused ReLU included) after conversion.
        assert 0 < r["bn_share"] < 1 and r["bn_ms"] > 0 and math.isfinite(r["bn_speedup"])
        if r["variant"] == "original":
            assert r["speedup"] == 1.0 and r["bn_speedup"] == 1.0
        if r["step"] == "train":
            assert "parity" not in r
            continue
        # Eval parity: the float32 output was compared with the float64
        # original's (a real comparison: float32 differs from it), within the
        # rule's limit, and the float64 conversion with the float64 original.
        parity = r["parity"]
        assert 0 < parity["error"] <= parity["limit"] and parity["original_error"] > 0
        assert parity["float64_error"] <= parity["float64_limit"] < 1e-6
        assert parity["passed"]
        if r["variant"] == "original":
            assert parity["error"] == parity["original_error"] and parity["float64_error"] == 0
    # no_grad's forward saves nothing for a backward; grad mode's does.
    saved = {(r["step"], r["variant"], r["memory_format"]): r["memory_mb"] for r in records}
    for v in models.VARIANTS:
        for f in models.FORMATS:
            assert saved["eval", v, f] == 0 < saved["eval_grad", v, f]
    eval_parity = result["meta"]["eval_parity"]
    assert eval_parity["passed"] and eval_parity["cases"] == 2 * len(models.VARIANTS) * len(models.FORMATS)
    with open(tmp_path / (stem + ".md")) as f:
        text = f.read()
    assert "## Eval summary" in text and "original/convert" in text and "eval parity: PASS" in text
    tiny = result["meta"]["tiny_layer"]
    assert tiny["fused_bn_us"] > 0 and tiny["nn_us"] > 0
    with open(doc) as f:
        assert f.read() == doc_before


def test_eval_parity_flags_an_output_off_the_original():
    """The eval parity rule on stand-in cases: a conversion within twice the
    original's error (plus an ulp) passes, one further off fails, an eager
    case also needs its float64 result within its limit, and a frozen case
    whose output is its unfrozen twin's to the bit fails (freezing did not
    take effect: seen when plain torch.compile backends compared equal)."""
    import torch

    reference = torch.linspace(-4, 4, 40, dtype=torch.float64).reshape(4, 10)

    class Case:
        def __init__(self, variant, mode, offset):
            self.name, self.memory_format, self.step_name = "m", "contiguous", "eval"
            self.variant, self.mode, self.freezing = variant, mode.split("+")[0], mode.endswith("+freezing")
            self.offset = offset

        def eval_forward(self):
            return (reference + self.offset).float()

    offsets = {("original", "eager"): 1e-5, ("convert", "eager"): 1.5e-5, ("fuse", "eager"): 1e-3,
               ("original", "compiled"): 1e-5, ("convert", "compiled"): 1.5e-5, ("fuse", "compiled"): 1e-3,
               ("original", "compiled+freezing"): 1.25e-5, ("convert", "compiled+freezing"): 1.5e-5,
               ("fuse", "compiled+freezing"): 1.75e-5}
    cases = [Case(v, m, offset) for (v, m), offset in offsets.items()]
    float64 = {("m", v, "contiguous", "eval"): (error, 1e-9)
               for v, error in (("original", 0.0), ("convert", 2e-9), ("fuse", 0.0))}
    parity = models.eval_parity(cases, float64, {("m", "contiguous"): reference},
                                models.settings(torch.device("cpu"), True))
    passed = {(c.variant, m): parity[id(c)]["passed"] for c, m in zip(cases, [m for _, m in offsets])}
    assert passed == {("original", "eager"): True, ("convert", "eager"): False,  # float64 off
                      ("fuse", "eager"): False,
                      ("original", "compiled"): True, ("convert", "compiled"): True, ("fuse", "compiled"): False,
                      ("original", "compiled+freezing"): True,
                      ("convert", "compiled+freezing"): False,  # the unfrozen twin's bits
                      ("fuse", "compiled+freezing"): True}
    assert "float64_error" not in parity[id(cases[3])] and "differs_from_unfrozen" not in parity[id(cases[3])]
