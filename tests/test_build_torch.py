"""setup.py's first step (tools/build_torch.py): a build that would compile
against a torch other than the one the package will run with (pip's default
build isolation) stops with a message saying to use --no-build-isolation.
tools/check_install.py runs the real `pip install .` in a fresh venv (CI)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("build_torch", ROOT / "tools" / "build_torch.py")
build_torch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_torch)

PIP_ENV = "/tmp/pip-build-env-k2f8_x0q"
PIP_SITE = f"{PIP_ENV}/overlay/lib/python3.11/site-packages"
BUILD_VENV = "/tmp/build-env-a1b2c3d4"
UV_VENV = "/home/u/.cache/uv/builds-v0/.tmpAbC123"
USER_TORCH = "/home/u/venv/lib/python3.11/site-packages/torch/__init__.py"


def test_throwaway_build_environments_recognised():
    assert build_torch.isolated_env_dir(f"{PIP_SITE}/torch/__init__.py") == PIP_ENV
    assert build_torch.isolated_env_dir(f"{BUILD_VENV}/lib/python3.11/site-packages") == BUILD_VENV
    assert build_torch.isolated_env_dir(f"{UV_VENV}/lib") == "/home/u/.cache/uv/builds-v0"
    for ordinary in (USER_TORCH, "/opt/conda/envs/build-env/lib/python3.11/site-packages",
                     "/home/u/pip-build-env-notes/torch", "/work/build/lib.linux-x86_64-cpython-311"):
        assert build_torch.isolated_env_dir(ordinary) is None, ordinary


def test_isolation_seen_in_prefix_or_path():
    # pip: the interpreter is the user's; its sitecustomize (PYTHONPATH) and prefixes are on sys.path.
    assert build_torch.isolation_evidence("/home/u/venv", ["", f"{PIP_ENV}/site", PIP_SITE]) == f"{PIP_ENV}/site"
    # pypa/build and uv: a venv of their own.
    assert build_torch.isolation_evidence(BUILD_VENV, []) == BUILD_VENV
    assert build_torch.isolation_evidence("/home/u/venv", ["", "/home/u/venv/lib/python3.11/site-packages"]) is None


def test_isolated_build_refused_with_the_command_to_use():
    message = build_torch.refusal(None, f"{PIP_ENV}/site")
    assert f"torch is not importable in this isolated build environment ({PIP_ENV})" in message
    assert "pip install --no-build-isolation ." in message
    # A torch the throwaway environment installed itself is not the user's.
    message = build_torch.refusal(f"{PIP_SITE}/torch/__init__.py", f"{PIP_ENV}/site")
    assert message.startswith("fused_bn: refusing to compile against the torch of a throwaway build environment")
    assert "pip install --no-build-isolation ." in message


def test_missing_torch_refused_and_the_users_torch_accepted():
    message = build_torch.refusal(None, None, executable="/home/u/venv/bin/python")
    assert "torch is not installed for this Python (/home/u/venv/bin/python)" in message
    assert "Install torch first" in message
    assert build_torch.refusal(USER_TORCH, None) is None
    # Isolation that still sees the user's torch (e.g. uv with system site-packages) builds for it.
    assert build_torch.refusal(USER_TORCH, BUILD_VENV) is None


def test_setup_py_stops_before_torch_is_imported_or_anything_written(tmp_path):
    """setup.py run the way pip's isolated build runs it: the system
    site-packages hidden (here: python -S), only the build requirements
    (setuptools) on sys.path, from a pip-build-env-* prefix."""
    import setuptools

    site = tmp_path / "pip-build-env-abcd1234" / "overlay" / "lib" / "site-packages"
    site.mkdir(parents=True)
    real_site = Path(setuptools.__file__).resolve().parent.parent
    for name in ("setuptools", "pkg_resources", "_distutils_hack"):
        if (real_site / name).exists():
            (site / name).symlink_to(real_site / name)
    source = tmp_path / "src"
    (source / "tools").mkdir(parents=True)
    (source / "fused_bn").mkdir()
    for path in ("setup.py", "tools/build_torch.py", "tools/cuda_toolkit.py"):
        (source / path).write_text((ROOT / path).read_text())
    script = ("import sys, runpy; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'setup.py'; "
              "runpy.run_path('setup.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-S", "-c", script, str(site), "egg_info"], cwd=source,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 1, result.stderr
    assert "torch is not importable in this isolated build environment" in result.stderr, result.stderr
    assert "pip install --no-build-isolation ." in result.stderr
    assert "Traceback" not in result.stderr
    # Stopped before setup(): no build record, no egg-info, nothing compiled.
    assert sorted(p.name for p in source.iterdir()) == ["fused_bn", "setup.py", "tools"]
    assert not list((source / "fused_bn").iterdir())


def test_build_requirements_leave_torch_out():
    tomllib = pytest.importorskip("tomllib")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [r for r in requires if r.replace(" ", "").lower().startswith("torch")], requires
