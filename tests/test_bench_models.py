"""bench.models end to end on one small model (--quick): every case is run,
timed and profiled, the records carry what the README table reports, and a
quick run writes its own files and leaves the README alone."""
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
    with open(os.path.join(ROOT, "README.md")) as f:
        readme_before = f.read()
    assert models.main(["--device", "cpu", "--quick", "--models", "resnet18", "--out", str(tmp_path)]) == 0
    stems = {p.name for p in tmp_path.iterdir()}
    json_files = [s for s in stems if s.endswith("-models-quick.json")]
    assert len(json_files) == 1
    stem = json_files[0][:-len(".json")]
    assert {stem + ".md", stem + ".png"} <= stems
    with open(tmp_path / json_files[0]) as f:
        result = json.load(f)
    records = result["records"]
    assert {(r["variant"], r["memory_format"], r["mode"]) for r in records} == {
        (v, f, "eager") for v in models.VARIANTS for f in models.FORMATS}
    for r in records:
        assert r["model"] == "resnet18"
        assert r["step_ms"] > 0 and math.isfinite(r["speedup"])
        # The profiler saw batch-norm ops in every variant: nn's native op in
        # the original, ours (fused ReLU included) after conversion.
        assert 0 < r["bn_share"] < 1 and r["bn_ms"] > 0 and math.isfinite(r["bn_speedup"])
        if r["variant"] == "original":
            assert r["speedup"] == 1.0 and r["bn_speedup"] == 1.0
    tiny = result["meta"]["tiny_layer"]
    assert tiny["fused_bn_us"] > 0 and tiny["nn_us"] > 0
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f.read() == readme_before
