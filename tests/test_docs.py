"""The documentation cannot rot: every python block of README.md and docs/*.md
runs (a block marked ``<!-- not-run: reason -->`` just above it is skipped, and
must say why); docs/api.md is what tools/gen_api_docs.py generates from the
docstrings, and every public name's docstring is complete; the benchmark
tables' markers are where bench/ writes them; relative links resolve."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_bn

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->\s*\n```python\n", re.S)
ANY_NOT_RUN = re.compile(r"^<!--\s*not-run", re.M)
MAX_NOT_RUN = 3


def _gen_api_docs():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "tools" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks():
    """(path, line, code, not-run reason or None) of every python block."""
    for path in DOCS:
        text = path.read_text()
        skipped = {m.end(): m.group(1).strip() for m in NOT_RUN.finditer(text)}
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            yield path, line, m.group(1), skipped.get(m.start(1))


BLOCKS = list(_blocks())


@pytest.mark.parametrize("path,line,code,reason", BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _, _ in BLOCKS])
def test_python_block_runs(path, line, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(f"not-run: {reason}")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__", "torch": torch, "nn": nn, "F": F, "fused_bn": fused_bn}
    exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)


def test_blocks_found_and_not_run_marks_are_few_and_explained():
    by_file = {path.name: 0 for path in DOCS}
    for path, _, _, _ in BLOCKS:
        by_file[path.name] += 1
    assert by_file["README.md"] >= 1 and by_file["usage.md"] >= 1
    # api.md: at least one example per public name.
    assert by_file["api.md"] >= len(fused_bn.__all__)
    skipped = [(path.name, line, reason) for path, line, _, reason in BLOCKS if reason is not None]
    assert len(skipped) <= MAX_NOT_RUN, f"too many not-run blocks: {skipped}"
    for name, line, reason in skipped:
        assert len(reason.split()) >= 3, f"{name}:{line}: a not-run mark must say why"
    # Every not-run mark sits right above a python block (none is left dangling).
    marks = sum(len(ANY_NOT_RUN.findall(path.read_text())) for path in DOCS)
    assert marks == len(skipped)


def test_api_doc_is_generated_from_current_docstrings():
    gen = _gen_api_docs()
    text = gen.render()
    header = re.search(r"with torch (\S+) and Python (\S+)\.", (ROOT / "docs" / "api.md").read_text())
    assert header, "docs/api.md lacks its generator header"
    generated_with = re.search(r"with torch (\S+) and Python (\S+)\.", text)
    if header.groups() != generated_with.groups():
        # Signatures shown come from nn's constructors and Python's rendering of annotations.
        pytest.skip(f"docs/api.md was generated with torch {header.group(1)}, Python {header.group(2)}; "
                    f"this is {generated_with.group(1)}, {generated_with.group(2)}")
    assert (ROOT / "docs" / "api.md").read_text() == text, \
        "docs/api.md is stale: run python tools/gen_api_docs.py"


def test_every_public_name_has_a_complete_docstring():
    assert _gen_api_docs().problems() == []


def test_completeness_check_finds_what_a_docstring_lacks():
    gen = _gen_api_docs()

    def f(x, y, *, z=None):
        pass

    doc = """Does f.

    Args:
        x, y: inputs.
        w: no such parameter.

    Returns:
        something.

    Example::

        f(1, 2)
    """
    import inspect
    problems = gen.docstring_problems("f", f, inspect.cleandoc(doc), inspect.signature(f))
    assert "f: Args does not describe 'z'" in problems
    assert "f: Args describes 'w', which is not a parameter" in problems
    assert "f: no 'Raises:' section" in problems
    assert not any("Example" in p or "Returns" in p for p in problems)
    assert gen.docstring_problems("f", f, None, inspect.signature(f)) == ["f: no docstring"]
    # The module classes need a shapes section too.
    assert "FusedBatchNorm2d: no 'Shapes and dtypes:' section" in gen.docstring_problems(
        "FusedBatchNorm2d", fused_bn.FusedBatchNorm2d, "Summary.", None)


def test_generated_markdown_turns_examples_into_python_blocks():
    gen = _gen_api_docs()
    text = gen.to_markdown("Summary.\n\nArgs:\n    x: one\n        two.\n\nExample::\n\n    y = 1\n    z = 2\n")
    assert "- `x`: one two." in text
    assert "```python\ny = 1\nz = 2\n```" in text


def test_benchmark_tables_live_in_docs_benchmarks():
    from bench import report
    assert Path(report.BENCHMARKS_DOC_PATH) == ROOT / "docs" / "benchmarks.md"
    text = Path(report.BENCHMARKS_DOC_PATH).read_text()
    for marker in ("fusion-coverage", "bench-models:cpu-amd-epyc-2c", "bench-models:cpu-amd-epyc-2c-compiled",
                   "bench:cpu-amd-epyc-2c", "bench:cpu-intel-r-xeon-r-processor-2c"):
        assert text.count(f"<!-- {marker} -->") == 1 and text.count(f"<!-- /{marker} -->") == 1, marker
    assert text.count(report.BENCH_TABLE_MARKER) == 1
    # The README holds no generated block any more.
    readme = (ROOT / "README.md").read_text()
    assert "<!-- bench" not in readme and "<!-- fusion-coverage" not in readme


def test_generators_write_between_the_markers(tmp_path):
    from bench import report
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"intro\n\n<!-- t -->\nold\n<!-- /t -->\n\n{report.BENCH_TABLE_MARKER}\n\nend\n")
    assert report.replace_doc_block(str(doc), "t", "new")
    assert doc.read_text().startswith("intro\n\n<!-- t -->\nnew\n<!-- /t -->")
    assert not report.replace_doc_block(str(doc), "missing", "x")
    meta = {"device_name": "cpu-test", "device_description": "Test CPU", "torch_version": "2.13.0",
            "git_commit": "0123456789abcdef", "date": "2026-12-07T00:00:00"}
    records = [{"mode": mode, "dtype": "float32", "layout": "nchw", "errors": [],
                "speedup_vs_eager": 2.0, "speedup_vs_compiled": 1.5} for mode in ("train_fwd", "train_fwd_bwd")]
    summary = report.summarize(records)
    assert report.update_benchmarks_doc(str(doc), meta, summary, "cpu-test.md")
    text = doc.read_text()
    assert "<!-- bench:cpu-test -->" in text and "](../bench/results/cpu-test.md)" in text
    assert text.index(report.BENCH_TABLE_MARKER) < text.index("<!-- bench:cpu-test -->") < text.index("end")


def test_relative_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for path in DOCS:
        for target in link.findall(path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken
