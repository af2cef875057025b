"""`pip install` as users type it, checked in fresh virtual environments (CI
runs this after `make test`; issue 40):

1. Build isolation (pip's default): `pip install .` into a fresh venv that
   sees the installed torch fails at once, before downloading anything or
   compiling, with setup.py's message to use `--no-build-isolation`
   (tools/build_torch.py). pip's own build requirements (setuptools) come
   from the wheels bundled with this Python's ensurepip where it has them,
   with --no-index, so the check needs no network.
2. The sdist (`python -m build --sdist --no-isolation`) carries every tracked
   file a build reads: csrc/ whole, setup.py, pyproject.toml, MANIFEST.in,
   README.md, the tools setup.py loads, the package's modules.
3. A wheel built with `python -m build --wheel --no-isolation` from the source
   tree holds the extension (stable ABI) and every module, the build
   configuration fused_bn/_build_config.py (read at import) included; it is
   built in the tree's build/ as any rebuild is: ninja recompiles what changed
   since an earlier build there (all of it on a fresh checkout, ~6 min on 2
   cores), setup.py has build_ext always ask ninja rather than trust an
   earlier library.
4. The wheel installs into a fresh venv (--system-site-packages, so the
   installed torch serves; torch is never installed) with --no-index, its
   declared dependencies are met there, and the installed package passes
   tests/test_module.py, tests/test_parity.py (less its big-tensor cases)
   and test_build.py's checks of an installed build, run from a copy of
   tests/ outside the source tree; a conftest asserts that fused_bn and
   fused_bn._C are the venv's.

    python tools/check_install.py [--keep] [--tests PATH ...] [-k EXPRESSION]

Timings (2026-12-07, 2-core VM, while other builds ran: load ~8): a fresh
build/ 1238 s for the wheel, tests 250 s, all 1527 s wall, 924 s of CPU (the
tests ~200 of it, before the big cases were left out); on 2 idle cores that is
~6 min of compile and ~1.5 min of tests.

Installs the PyPA `build` package only if it is missing. Work happens in a
temporary directory (removed unless --keep); nothing is written to the source
tree but what any build writes (build/, fused_bn.egg-info, fused_bn/_build_config.py).
"""
import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TESTS = ["tests/test_module.py", "tests/test_parity.py",
                 "tests/test_build.py::test_extension_uses_only_the_stable_abi",
                 "tests/test_build.py::test_installed_build_records_what_it_needs"]
# The big-tensor parity cases (tens of MB each, half of these files' time) stay
# with make test: same kernels, and CI's budget for this check is ~8 minutes.
DEFAULT_DESELECT = "not dram_sized and not parity_large and not training_streamed"
ISOLATION_MESSAGE = "torch is not importable in this isolated build environment"
ISOLATED_FAILS_WITHIN_S = 120

# Asserted in the pytest process itself, before any test imports fused_bn's helpers.
CONFTEST = '''\
import os

import fused_bn
import fused_bn._C

_VENV = os.path.realpath(os.environ["FUSED_BN_CHECK_VENV"]) + os.sep
for _module in (fused_bn, fused_bn._C):
    assert os.path.realpath(_module.__file__).startswith(_VENV), (
        f"{_module.__name__} imported from {_module.__file__}, not from the venv {_VENV}")


def pytest_report_header(config):
    return [f"fused_bn installed at {os.path.dirname(fused_bn.__file__)}"]
'''

REQUIREMENTS_MET = '''\
from importlib.metadata import requires, version
from packaging.requirements import Requirement

for text in requires("fused_bn") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    have = version(req.name)
    assert req.specifier.contains(have, prereleases=True), f"{req}: {have} installed"
    print(f"  {req} (have {have})")
'''


def log(message):
    print(f"check_install: {message}", flush=True)


def run(cmd, cwd, env=None, timeout=None, check=True, capture=False):
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, text=True,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None)
    if check and result.returncode != 0:
        if capture:
            print(result.stdout)
        sys.exit(f"check_install: FAILED (exit {result.returncode}): {' '.join(cmd)}")
    return result


def clean_env(**extra):
    """The environment without pip configuration that would change what is
    checked (a CI-wide PIP_NO_BUILD_ISOLATION, an index, a config file)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHONPATH", "VIRTUAL_ENV", "FUSED_BN_EMULAT"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def make_venv(venv, system_site_packages):
    cmd = [sys.executable, "-m", "venv", venv]
    if system_site_packages:
        cmd.insert(3, "--system-site-packages")
    run(cmd, cwd=os.path.dirname(venv))


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        sys.exit("check_install: needs a git checkout (git ls-files) to know the source tree's files")
    return [p for p in listed.stdout.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


def copy_tree(files, dest):
    for path in files:
        os.makedirs(os.path.join(dest, os.path.dirname(path)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), os.path.join(dest, path))


def ensure_build_package():
    if importlib.util.find_spec("build") is None:
        run([sys.executable, "-m", "pip", "install", "build"], cwd=tempfile.gettempdir())


def check_isolated_install_fails_early(work, files):
    """Step 1: `pip install .` with build isolation, in a fresh venv that sees the torch."""
    src = os.path.join(work, "isolated-src")
    copy_tree(files, src)
    venv = os.path.join(work, "venv-isolated")
    make_venv(venv, system_site_packages=True)
    cmd = [venv_python(venv), "-m", "pip", "install"]
    bundled = os.path.join(os.path.dirname(shutil.__file__), "ensurepip", "_bundled")
    if glob.glob(os.path.join(bundled, "setuptools-*.whl")):
        cmd += ["--no-index", "--find-links", bundled]
    else:
        log("no setuptools wheel bundled with ensurepip: pip fetches setuptools for its build env from the index")
    cmd.append(".")
    start = time.monotonic()
    try:
        result = run(cmd, cwd=src, env=clean_env(), timeout=ISOLATED_FAILS_WITHIN_S, check=False, capture=True)
    except subprocess.TimeoutExpired:
        sys.exit(f"check_install: FAILED: isolated `pip install .` still running after {ISOLATED_FAILS_WITHIN_S} s")
    elapsed = time.monotonic() - start
    output = result.stdout
    problems = []
    if result.returncode == 0:
        problems.append("pip install . with build isolation succeeded")
    for expected in (ISOLATION_MESSAGE, "pip install --no-build-isolation ."):
        if expected not in output:
            problems.append(f"pip's output lacks {expected!r}")
    if any(w in output for w in ("Downloading torch", "Collecting torch")):
        problems.append("pip fetched torch")
    # setup.py stops before it writes anything or compiles: no build/, no build record.
    for left in ("build", os.path.join("fused_bn", "_build_config.py")):
        if os.path.exists(os.path.join(src, left)):
            problems.append(f"the refused build left {left}")
    if problems:
        print(output)
        sys.exit("check_install: FAILED: " + "; ".join(problems))
    log(f"isolated `pip install .` refused in {elapsed:.1f} s, as it should:")
    for line in output.splitlines():
        if "fused_bn:" in line or "--no-build-isolation" in line:
            print("    " + line.strip())


def check_sdist(work, files, dist):
    """Step 2: the sdist holds every tracked file a build reads."""
    src = os.path.join(work, "sdist-src")
    copy_tree(files, src)
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", dist, src], cwd=work)
    (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = [p for p in files
              if p.startswith("csrc/") or (p.startswith("fused_bn/") and p.endswith(".py"))
              or p in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md",
                       "tools/build_torch.py", "tools/cuda_toolkit.py")]
    missing = sorted(set(needed) - names)
    binaries = sorted(n for n in names if n.endswith((".so", ".o")))
    if missing or binaries:
        sys.exit(f"check_install: FAILED: sdist {os.path.basename(sdist)} misses {missing}, carries {binaries}")
    log(f"sdist {os.path.basename(sdist)}: all {len(needed)} tracked build inputs present")


def build_wheel(work, dist):
    """Step 3: the wheel, from the source tree, without isolation."""
    start = time.monotonic()
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, ROOT]
    log("$ " + " ".join(cmd))
    compiled = 0
    with subprocess.Popen(cmd, cwd=work, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as build:
        for line in build.stdout:  # shown as it comes (a full compile takes minutes)
            print(line, end="", flush=True)
            compiled += line.startswith("[") and " -c " in line  # ninja's "[i/n] c++ ... -c x.cpp"
    elapsed = time.monotonic() - start
    if build.returncode != 0:
        sys.exit(f"check_install: FAILED: the wheel build (exit {build.returncode})")
    log(f"wheel built in {elapsed:.0f} s (ninja compiled {compiled} translation units; "
        "those not compiled were up to date in build/)")
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    return wheel


def check_wheel_contents(wheel, files):
    name = os.path.basename(wheel)
    if "-abi3-" not in name:
        sys.exit(f"check_install: FAILED: {name} is not a stable-ABI (abi3) wheel")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        config = whl.read("fused_bn/_build_config.py").decode() if "fused_bn/_build_config.py" in names else ""
    needed = {p for p in files if p.startswith("fused_bn/") and p.endswith(".py")}
    needed |= {"fused_bn/_C.abi3.so", "fused_bn/_build_config.py"}
    missing = sorted(needed - names)
    if missing or "CPU_CAPABILITY" not in config:
        sys.exit(f"check_install: FAILED: {name} misses {missing or 'CPU_CAPABILITY in _build_config.py'}")
    strays = sorted(n for n in names if n.startswith(("csrc/", "tests/", "tools/", "bench/")))
    if strays:
        sys.exit(f"check_install: FAILED: {name} carries {strays}")
    log(f"{name}: extension, {len(needed) - 1} modules, build configuration ({config.splitlines()[-1]})")


def check_installed_package(work, wheel, tests, deselect):
    """Step 4: install into a fresh venv, then the tests, from outside the tree."""
    venv = os.path.join(work, "venv")
    make_venv(venv, system_site_packages=True)
    python = venv_python(venv)
    env = clean_env(FUSED_BN_CHECK_VENV=venv)
    # --ignore-installed: an editable fused_bn of the system site-packages (make
    # build's) is not "already satisfied" for the venv; --no-deps with --no-index:
    # torch is the system's, checked below, never installed.
    run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--ignore-installed", wheel], cwd=work, env=env)
    log("declared dependencies met in the venv:")
    run([python, "-c", REQUIREMENTS_MET], cwd=work, env=env)
    runner = os.path.join(work, "run")
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(runner, "tests"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(os.path.join(ROOT, "pyproject.toml"), runner)  # pytest's configuration (markers)
    with open(os.path.join(runner, "conftest.py"), "w") as f:
        f.write(CONFTEST)
    start = time.monotonic()
    run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", deselect, *tests], cwd=runner, env=env)
    log(f"tests passed from the installed package in {time.monotonic() - start:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="pytest paths (relative to the repo)")
    parser.add_argument("-k", default=DEFAULT_DESELECT, help="pytest -k expression (default: %(default)r)")
    args = parser.parse_args()
    start = time.monotonic()
    work = tempfile.mkdtemp(prefix="fused_bn-check-install-")
    dist = os.path.join(work, "dist")
    log(f"work directory {work}")
    try:
        ensure_build_package()
        files = tracked_files()
        check_isolated_install_fails_early(work, files)
        check_sdist(work, files, os.path.join(work, "sdist"))
        wheel = build_wheel(work, dist)
        check_wheel_contents(wheel, files)
        check_installed_package(work, wheel, args.tests, args.k)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"all checks passed in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
