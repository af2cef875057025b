"""Which torch setup.py would compile fused_bn._C against, checked before
torch is imported and before anything is compiled.

The extension is compiled against one torch's headers and libraries and must
be loaded by that same torch. pip's default for `pip install .` is build
isolation: setup.py runs in a throwaway environment that sees only the build
requirements, never the torch installed where the package will go. With torch
listed as a build requirement pip would download the newest torch (a
multi-gigabyte CUDA wheel) into that throwaway environment and compile against
it; without it torch is not importable there. Either way the build cannot be
right, so setup.py stops at once with a message saying to install torch first
and to build with `--no-build-isolation` (as flash-attention and most torch
extensions ask).

What is detectable, without guessing at the user's environment: whether torch
can be found at all, and whether this interpreter, or the torch it finds,
lives in a build front end's throwaway environment. Those are temporary
directories with fixed names: pip's `pip-build-env-XXXXXXXX` (its overlay/ and
normal/ prefixes, on sys.path through its sitecustomize), pypa/build's
`build-env-XXXXXXXX` (a venv: sys.prefix) and uv's cache bucket `builds-vN`.
A torch found inside one is not the torch the target environment imports.

    python tools/build_torch.py     # the torch a build here would use, or the refusal (exit 1)
"""
import importlib.util
import os
import re
import sys

ISOLATED_ENV_DIR = re.compile(r"pip-build-env-[a-z0-9_]{8}|build-env-[a-z0-9_]{8}|builds-v\d+")

HOW = """
fused_bn compiles its C++/CUDA extension against the torch it will run with.
Install torch first (https://pytorch.org/get-started/locally/), then build
without build isolation, so that the build uses that torch:

    pip install --no-build-isolation .        (add -e to develop)
    python -m build --no-isolation            (sdist and wheel)

(pip's default build isolation builds in a throwaway environment that cannot
see the installed torch.)"""


def isolated_env_dir(path):
    """The build front end's throwaway environment that `path` lies in, or None."""
    parts = os.path.abspath(path).split(os.sep)
    for i, part in enumerate(parts):
        if ISOLATED_ENV_DIR.fullmatch(part):
            return os.sep.join(parts[:i + 1])
    return None


def isolation_evidence(prefix=None, path=None):
    """The first of sys.prefix and the sys.path entries that lies in a throwaway
    build environment (this interpreter runs an isolated build), or None."""
    for entry in [sys.prefix if prefix is None else prefix, *(sys.path if path is None else path)]:
        if entry and isolated_env_dir(entry):
            return entry
    return None


def refusal(torch_origin, evidence, executable=sys.executable):
    """Why setup.py must not build, or None. `torch_origin`: the file torch would
    be imported from (None: not importable); `evidence`: isolation_evidence()."""
    if torch_origin is None:
        if evidence:
            return ("fused_bn: torch is not importable in this isolated build environment "
                    f"({isolated_env_dir(evidence)}): build isolation, pip's default for "
                    "`pip install .`, hides the installed torch.\n" + HOW)
        return f"fused_bn: torch is not installed for this Python ({executable}).\n" + HOW
    env = isolated_env_dir(torch_origin)
    if env:
        return ("fused_bn: refusing to compile against the torch of a throwaway build "
                f"environment ({torch_origin}, in {env}): the extension would be built for "
                "that torch, not for the one the target environment imports.\n" + HOW)
    return None


def torch_origin():
    spec = importlib.util.find_spec("torch")
    return spec.origin if spec is not None else None


def require_target_torch():
    """setup.py's first step: exit with the refusal's message (status 1) when the
    build would not compile against the torch the package will run with."""
    message = refusal(torch_origin(), isolation_evidence())
    if message:
        sys.exit(message)


if __name__ == "__main__":
    require_target_torch()
    print(torch_origin())
