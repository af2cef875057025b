"""Generates docs/api.md, the API reference, from the docstrings of fused_bn's
public names (``fused_bn.__all__``), and checks that each is complete.

    python tools/gen_api_docs.py           # rewrite docs/api.md
    python tools/gen_api_docs.py --check   # exit 1 when docs/api.md is stale or a docstring is incomplete

tests/test_docs.py runs both checks (our "docs build with warnings as errors"):
edit a docstring, then run this script. A complete docstring has the sections
its kind needs (``REQUIRED_SECTIONS``), its ``Args:`` name every parameter of the
signature, and its ``Example::`` runs (tests/test_docs.py runs every python
block of docs/api.md). Data names (``ACTIVATIONS``) are documented by ``#:``
comment lines right above the line of fused_bn/__init__.py that binds them.
"""
import argparse
import inspect
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_DOC_PATH = os.path.join(ROOT, "docs", "api.md")

SECTIONS = ("Args", "Attributes", "Returns", "Shapes and dtypes", "Raises")
SECTION_LINE = re.compile(r"^(%s):$" % "|".join(SECTIONS))
ITEM_LINE = re.compile(r"^    ([A-Za-z_][\w ,]*):(?:\s+(.*))?$")
# Members documented beside their class: public, defined by fused_bn, not nn's hooks.
SKIPPED_MEMBERS = {"forward", "extra_repr", "cls_to_become"}


def _fused_bn():
    sys.path.insert(0, ROOT)
    import fused_bn
    return fused_bn


def kind_of(obj):
    """"module" (an nn.Module class), "class", "function" or "data"."""
    from torch import nn
    if inspect.isclass(obj):
        return "module" if issubclass(obj, nn.Module) else "class"
    if callable(obj):
        return "function"
    return "data"


def required_sections(name, obj):
    """The sections a public name's docstring must have."""
    kind = kind_of(obj)
    if kind == "module":
        return ["Args", "Shapes and dtypes", "Raises", "Example"]
    if kind == "function":
        tensors = ["Shapes and dtypes"] if name.startswith("batch_norm") else []
        return ["Args", "Returns"] + tensors + ["Raises", "Example"]
    if kind == "class":
        return ["Attributes", "Example"]
    return ["Example"]


def data_doc(name):
    """The ``#:`` comment lines right above the line of fused_bn/__init__.py
    binding ``name`` (``... import X as name`` or ``name = ...``)."""
    lines = open(os.path.join(ROOT, "fused_bn", "__init__.py")).read().splitlines()
    binding = re.compile(r"(\bas\s+%s\s*$)|(^%s\s*=)" % (name, name))
    for i, line in enumerate(lines):
        if binding.search(line):
            doc = []
            j = i - 1
            while j >= 0 and lines[j].startswith("#:"):
                doc.insert(0, lines[j][3:] if lines[j].startswith("#: ") else lines[j][2:])
                j -= 1
            return "\n".join(doc) or None
    return None


def docstring_of(name, obj):
    """The name's own docstring (never one inherited from nn), cleaned."""
    if kind_of(obj) == "data":
        return data_doc(name)
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    return inspect.cleandoc(doc) if doc else None


def signature_of(obj):
    """The call signature, as users call it. The module classes take nn's
    constructor's arguments through ``*args, **kwargs`` plus ``activation=``:
    shown as nn's signature with ``activation`` added."""
    if kind_of(obj) == "data":
        return None
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if kind_of(obj) == "module" and any(p.kind is p.VAR_POSITIONAL for p in params):
        base = next(c for c in obj.__mro__ if c.__module__.startswith("torch.nn"))
        base_params = list(inspect.signature(base.__init__).parameters.values())[1:]
        activation = inspect.Parameter("activation", inspect.Parameter.KEYWORD_ONLY, default=None)
        sig = inspect.Signature(base_params + [activation])
    return sig


def _signature_text(name, sig):
    text = f"{name}{sig}" if sig is not None else name
    for long, short in (("torch.nn.modules.module.Module", "nn.Module"), ("fused_bn._fuse.", ""),
                        ("typing.", ""), ("torch.Tensor", "Tensor")):
        text = text.replace(long, short)
    return text


def parse_sections(doc):
    """{section: [item names]} of a docstring's Google-style sections, plus
    "Example" when it has an ``Example::`` block."""
    sections, current = {}, None
    for line in doc.splitlines():
        header = SECTION_LINE.match(line)
        if header:
            current = header.group(1)
            sections[current] = []
            continue
        if line.strip() == "Example::":
            sections["Example"] = []
            current = None
            continue
        if current and line and not line.startswith(" "):
            current = None
        if current:
            item = ITEM_LINE.match(line)
            if item:
                sections[current].extend(n.strip() for n in item.group(1).split(","))
    return sections


def docstring_problems(name, obj, doc, sig):
    """What a public name's docstring lacks: missing sections, parameters its
    ``Args:`` does not name, names it documents that the signature lacks."""
    if not doc:
        return [f"{name}: no docstring"]
    problems = []
    sections = parse_sections(doc)
    for section in required_sections(name, obj):
        if section not in sections:
            problems.append(f"{name}: no '{section}{'::' if section == 'Example' else ':'}' section")
    if "Args" in sections and sig is not None:
        params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        documented = set(sections["Args"])
        for p in params:
            if p.name not in documented:
                problems.append(f"{name}: Args does not describe '{p.name}'")
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            for extra in sorted(documented - {p.name for p in params}):
                problems.append(f"{name}: Args describes '{extra}', which is not a parameter")
    return problems


def members_of(cls):
    """(name, member) of a public class's own public methods and properties,
    those defined by fused_bn classes in its MRO."""
    seen, members = set(), []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("fused_bn"):
            continue
        for member_name, member in vars(klass).items():
            if member_name.startswith("_") or member_name in SKIPPED_MEMBERS or member_name in seen:
                continue
            if isinstance(member, (classmethod, staticmethod)):
                member = member.__func__
            if not (inspect.isfunction(member) or isinstance(member, property)):
                continue
            seen.add(member_name)
            members.append((member_name, member))
    return sorted(members)


def problems():
    """Every completeness problem of the public API's docstrings."""
    fused_bn = _fused_bn()
    found = []
    for name in fused_bn.__all__:
        obj = getattr(fused_bn, name)
        found += docstring_problems(name, obj, docstring_of(name, obj), signature_of(obj))
        if kind_of(obj) in ("module", "class"):
            for member_name, member in members_of(obj):
                target = member.fget if isinstance(member, property) else member
                if not (target.__doc__ or "").strip():
                    found.append(f"{name}.{member_name}: no docstring")
    return found


def _inline(text):
    """Sphinx roles to markdown code spans."""
    return re.sub(r":(?:func|class|meth|attr):`~?([^`]+)`", r"`\1`", text)


def to_markdown(doc):
    """A docstring as markdown: sections become bold headings with a bullet per
    item (continuation lines indented 8), ``Example::`` blocks become python
    code blocks (which tests/test_docs.py runs)."""
    out, lines, i, in_section, last = [], _inline(doc).splitlines(), 0, False, None
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.strip() == "Example::":
            out += ["**Example**", "", "```python"]
            while i < len(lines) and not lines[i].strip():
                i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                out.append(lines[i][4:])
                i += 1
            while out[-1] == "":
                out.pop()
            out += ["```", ""]
            in_section = False
            continue
        header = SECTION_LINE.match(line)
        if header:
            out += [f"**{header.group(1)}**", ""]
            in_section, last = True, None
            continue
        if in_section and not line.strip():
            out.append("")
            last = None
            continue
        if in_section and line.startswith("    "):
            item = ITEM_LINE.match(line)
            if item:
                names = ", ".join(f"`{n.strip()}`" for n in item.group(1).split(","))
                out.append(f"- {names}: {item.group(2) or ''}".rstrip())
                last = "item"
            elif line.startswith("        ") and last == "item" or not line.startswith("        ") and last == "text":
                out[-1] += " " + line.strip()
            else:
                out += ["", line.strip()]
                last = "text"
            continue
        in_section = False
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")


def render():
    """docs/api.md's text."""
    import platform

    import torch
    fused_bn = _fused_bn()
    names = list(fused_bn.__all__)
    head = [
        "# API reference",
        "",
        "<!-- Generated by tools/gen_api_docs.py from the docstrings of fused_bn's public names",
        f"(fused_bn.__all__) with torch {torch.__version__.split('+')[0]} and Python "
        f"{'.'.join(platform.python_version_tuple()[:2])}. Do not edit: change the docstring and run",
        "`python tools/gen_api_docs.py`; tests/test_docs.py fails when this file is stale. -->",
        "",
        "Every public name of `fused_bn` (`fused_bn.__all__`), with its arguments, shapes, dtypes,",
        "errors and an example. The examples assume `import torch`, `from torch import nn` and",
        "`import fused_bn`, and run in the test suite (`tests/test_docs.py`). How the pieces behave",
        "next to PyTorch's own batch norm is in the [usage guide](usage.md).",
        "",
    ]
    groups = (("Modules", "module"), ("Functions", "function"), ("Types and constants", None))
    for title, kind in groups:
        members = [n for n in names if (kind_of(getattr(fused_bn, n)) == kind if kind else
                                        kind_of(getattr(fused_bn, n)) in ("class", "data"))]
        head.append(f"- {title}: " + ", ".join(f"[`{n}`](#{n.lower()})" for n in members))
    body = []
    for title, kind in groups:
        body += ["", f"## {title}"]
        for name in names:
            obj = getattr(fused_bn, name)
            if (kind_of(obj) != kind) if kind else kind_of(obj) not in ("class", "data"):
                continue
            body += ["", f"### {name}", ""]
            sig = signature_of(obj)
            prefix = "class " if inspect.isclass(obj) else ""
            if kind_of(obj) == "data":
                body += ["```text", f"fused_bn.{name} = {getattr(fused_bn, name)!r}", "```", ""]
            else:
                body += ["```text", prefix + _signature_text(f"fused_bn.{name}", sig), "```", ""]
            body.append(to_markdown(docstring_of(name, obj) or ""))
            if inspect.isclass(obj):
                for member_name, member in members_of(obj):
                    target = member.fget if isinstance(member, property) else member
                    if isinstance(member, property):
                        line = f"property {name}.{member_name}"
                    else:
                        params = list(inspect.signature(target).parameters.values())
                        if params and params[0].name in ("self", "cls"):
                            params = params[1:]
                        line = _signature_text(f"{name}.{member_name}",
                                               inspect.signature(target).replace(parameters=params))
                    body += ["", f"#### {name}.{member_name}", "", "```text", line, "```", "",
                             to_markdown(inspect.cleandoc(target.__doc__ or ""))]
    return "\n".join(head + body).rstrip("\n") + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/api.md is stale or a public docstring is incomplete")
    args = parser.parse_args(argv)
    found = problems()
    for problem in found:
        print(f"incomplete docstring: {problem}", file=sys.stderr)
    text = render()
    if args.check:
        current = open(API_DOC_PATH).read() if os.path.exists(API_DOC_PATH) else ""
        if current != text:
            print(f"{API_DOC_PATH} is stale: run python tools/gen_api_docs.py", file=sys.stderr)
            return 1
        return 1 if found else 0
    with open(API_DOC_PATH, "w") as f:
        f.write(text)
    print(f"wrote {API_DOC_PATH}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
