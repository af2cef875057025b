"""The other form of a pointer into bench/NOTES.md (test_notes_pointers.py
checks the quoted one, `bench/NOTES.md, "Section title"`): unquoted, inside
parentheses, `(bench/NOTES.md, host overhead)` or `(bench/NOTES.md, issue
42)`, the start of a section's title in any case. Each must name a section
that exists; a bare `bench/NOTES.md` (the whole file) is not a pointer."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("csrc", "fused_bn", "bench", "tools", "tests") for p in (ROOT / folder).rglob("*")
           if p.suffix in {".h", ".cuh", ".cu", ".cpp", ".py"} and p.name != Path(__file__).name]
# `(bench/NOTES.md, words)`, the words running over a comment's line break.
UNQUOTED = re.compile(r'\(bench/NOTES\.md, ([^"\s)][^")]*)\)')
COMMENT_BREAK = re.compile(r"\n\s*(//|#)\s*")


def unquoted_pointers(text):
    return [title.strip() for title in UNQUOTED.findall(COMMENT_BREAK.sub(" ", text))]


def _section_titles():
    return [line[3:].strip().lower() for line in (ROOT / "bench" / "NOTES.md").read_text().splitlines()
            if line.startswith("## ")]


def test_the_form_is_read():
    assert unquoted_pointers('// nn\'s (bench/NOTES.md, issue 42).\n// x (bench/NOTES.md,\n// host overhead)') == [
        "issue 42", "host overhead"]
    # Quoted pointers (the other test's) and bare mentions of the file are not this form.
    assert unquoted_pointers('// (bench/NOTES.md, "Fifth cut") and (bench/NOTES.md) and bench/NOTES.md: x') == []


def test_every_unquoted_pointer_names_a_section():
    titles = _section_titles()
    pointers = [(str(p.relative_to(ROOT)), t) for p in SOURCES
                for t in unquoted_pointers(p.read_text(errors="replace"))]
    assert pointers, "no unquoted bench/NOTES.md pointers found: the pattern no longer matches the comments"
    dangling = [(path, title) for path, title in pointers if not any(t.startswith(title.lower()) for t in titles)]
    assert not dangling, f"comments point at bench/NOTES.md sections that do not exist: {dangling}"
