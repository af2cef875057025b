"""Every comment (and every sentence of README.md and docs/*.md) that sends the
reader to a section of bench/NOTES.md (`bench/NOTES.md, "Section title"`) names a
section that exists: a renamed or removed section leaves no dangling pointer in
the code or the docs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("csrc", "fused_bn", "bench", "tools", "tests") for p in (ROOT / folder).rglob("*")
           if p.suffix in {".h", ".cuh", ".cu", ".cpp", ".py"}
           # this test and test_notes_pointers_unquoted.py quote the pattern as an example
           and not p.name.startswith("test_notes_pointers")]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A pointer's title may run over a comment's line break: `// ... "Issue 37: exp and\n// erf ..."`.
POINTER = re.compile(r'bench/NOTES\.md, "([^"]+)"')
COMMENT_BREAK = re.compile(r"\n\s*(//|#)\s*")
# In markdown a title may run over a plain line break.
LINE_BREAK = re.compile(r"\s*\n\s*")


def _pointers(paths=None):
    for path in SOURCES + DOCS if paths is None else paths:
        text = path.read_text(errors="replace")
        text = LINE_BREAK.sub(" ", text) if path.suffix == ".md" else COMMENT_BREAK.sub(" ", text)
        for title in POINTER.findall(text):
            yield path.relative_to(ROOT), title


def _section_titles():
    return [line[3:].strip() for line in (ROOT / "bench" / "NOTES.md").read_text().splitlines()
            if line.startswith("## ")]


def test_pointers_exist():
    pointers = list(_pointers())
    assert pointers, "no bench/NOTES.md pointers found: the pattern no longer matches the comments"
    # The docs' pointers are read too (a title broken over a markdown line included).
    assert "Issue 37: bfloat16 conversions in a pair's own lane order" in [
        title for _, title in _pointers(DOCS)]


def test_every_pointer_names_a_section():
    titles = _section_titles()
    dangling = [(str(path), title) for path, title in _pointers()
                if not any(t.startswith(title) for t in titles)]
    assert not dangling, f"comments point at bench/NOTES.md sections that do not exist: {dangling}"
