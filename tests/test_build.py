"""The build as a new user meets it: the CUDA toolkit found behind an nvcc
wrapper, the stable-ABI extension, and a build refused (with a message, not
SIGILL) on a CPU that lacks the instruction set it was compiled for."""
import os
import shutil
import stat
import subprocess

import pytest

import fused_bn
from emulated_cuda import load_cuda_toolkit
from fused_bn import _cpu_features

def real_nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("no nvcc installed")


def test_toolkit_found_behind_an_nvcc_wrapper(tmp_path):
    cuda_toolkit = load_cuda_toolkit()
    nvcc = real_nvcc()
    toolkit = cuda_toolkit.toolkit_of_nvcc(nvcc)
    assert toolkit and os.path.isfile(os.path.join(toolkit, "include", "cuda_runtime.h"))
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{os.path.realpath(nvcc)}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    # torch's guess, the directory above the wrapper's bin/, holds no toolkit.
    assert not cuda_toolkit.is_toolkit(str(tmp_path))
    found = cuda_toolkit.find_cuda_home({"PATH": str(wrapper.parent)})
    assert os.path.realpath(found) == os.path.realpath(toolkit)
    # A CUDA_HOME that holds no toolkit (the wrong guess, set by hand) is passed over.
    found = cuda_toolkit.find_cuda_home({"PATH": str(wrapper.parent), "CUDA_HOME": str(tmp_path)})
    assert os.path.realpath(found) == os.path.realpath(toolkit)


def test_extension_uses_only_the_stable_abi():
    path = fused_bn._C.__file__
    assert path.endswith(".abi3.so"), path
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm")
    undefined = subprocess.run([nm, "-D", "--undefined-only", path], capture_output=True, text=True,
                               check=True).stdout.split()
    python_symbols = {s for s in undefined if s.startswith(("Py", "_Py"))}
    # The module init is all we ask of Python; the ops go through TORCH_LIBRARY.
    assert python_symbols == {"PyModule_Create2"}, python_symbols


AVX2_ONLY = {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


def test_avx512_build_refused_on_an_avx2_cpu():
    with pytest.raises(ImportError, match=r"built for AVX512, which this CPU lacks \(no avx512f, avx512bw, "
                                          r"avx512vl, avx512dq\).*FUSED_BN_CPU_CAPABILITY=AVX2"):
        _cpu_features.check_build_runs_here("AVX512", AVX2_ONLY)
    _cpu_features.check_build_runs_here("AVX512", AVX512)
    _cpu_features.check_build_runs_here("AVX2", AVX2_ONLY)
    with pytest.raises(ImportError, match=r"built for AVX2.*\(no avx2, fma, f16c\)"):
        _cpu_features.check_build_runs_here("AVX2", {"fpu", "sse2"})
    # A portable build, or a CPU whose flags cannot be read, is not refused.
    _cpu_features.check_build_runs_here("DEFAULT", {"fpu"})
    _cpu_features.check_build_runs_here("AVX512", None)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma f16c\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert _cpu_features.cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx2", "fma", "f16c"}
    assert _cpu_features.cpu_flags(str(tmp_path / "absent")) is None


def test_installed_build_records_what_it_needs():
    from fused_bn import _build_config

    assert _build_config.CPU_CAPABILITY in ("AVX512", "AVX2", "DEFAULT")
    # It imported, so this CPU has what the record says the build needs.
    _cpu_features.check_build_runs_here(_build_config.CPU_CAPABILITY, _cpu_features.cpu_flags())
