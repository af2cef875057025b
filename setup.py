"""Builds fused_bn._C: always the CPU kernels; the CUDA kernels too when CUDA_HOME
is found and a GPU is visible (or FUSED_BN_FORCE_CUDA=1). TORCH_CUDA_ARCH_LIST is
honoured by torch.utils.cpp_extension."""
import glob
import importlib.util
import os

from setuptools import setup


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Before torch is imported: a build that cannot see the torch the package will
# run with (pip's default build isolation hides it) stops here with a message
# saying to install torch first and build with --no-build-isolation
# (tools/build_torch.py). pyproject.toml's build requirements leave torch out,
# so an isolated build fails in seconds instead of downloading a torch.
_load_tool("build_torch").require_target_torch()

import torch  # noqa: E402


# torch.utils.cpp_extension fixes CUDA_HOME when it is imported, from the first
# nvcc on PATH: a wrapper script outside the toolkit makes that /usr/local and
# cuda_runtime.h is then not found. Tell it where the toolkit really is.
_cuda_toolkit = _load_tool("cuda_toolkit")
if not _cuda_toolkit.is_toolkit(os.environ.get("CUDA_HOME")):
    _found = _cuda_toolkit.find_cuda_home()
    if _found:
        os.environ["CUDA_HOME"] = _found

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# The CPython stable ABI (3.9+): the ops register through TORCH_LIBRARY and the
# module init is plain C API, so one build loads in every Python from 3.9 on,
# and a build made elsewhere (e.g. a CUDA build made on a CPU machine against
# the GPU machine's torch) is carried and loaded without compiling.
PY_LIMITED_API = "0x03090000"

# The flags PyTorch builds its own AVX2 / AVX-512 kernels with; at::vec::Vectorized
# picks its implementation from CPU_CAPABILITY. We build for the best ISA PyTorch
# itself uses on this machine (override with FUSED_BN_CPU_CAPABILITY).
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


def cpu_capability():
    return (os.environ.get("FUSED_BN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()).upper()


def cpu_isa_flags():
    return ISA_FLAGS.get(cpu_capability(), [])


def record_build_config():
    """fused_bn/_build_config.py: what this build needs of the CPU it runs on,
    checked at import (fused_bn/_cpu_features.py) so that a build carried to
    an older CPU fails with a message instead of an illegal instruction."""
    capability = cpu_capability()
    capability = capability if capability in ISA_FLAGS else "DEFAULT"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_bn", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n"
                f"CPU_CAPABILITY = {capability!r}\n")


def want_cuda():
    if CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FUSED_BN_FORCE_CUDA", "0") == "1"


def extension():
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", f"-DPy_LIMITED_API={PY_LIMITED_API}"] + cpu_isa_flags()
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        return CUDAExtension(
            "fused_bn._C", sources,
            extra_compile_args={"cxx": cxx_flags + ["-DFUSED_BN_WITH_CUDA"],
                                "nvcc": ["-O3", "-lineinfo", "-DFUSED_BN_WITH_CUDA",
                                         f"-DPy_LIMITED_API={PY_LIMITED_API}"]},
            extra_link_args=["-fopenmp"], py_limited_api=True)
    return CppExtension("fused_bn._C", sources, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=["-fopenmp"], py_limited_api=True)


def remove_stale_extensions():
    """An earlier build's fused_bn/_C.cpython-*.so would shadow the abi3 one
    (Python tries the version-tagged suffix first)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_bn")
    for path in glob.glob(os.path.join(here, "_C.cpython-*.so")):
        os.remove(path)


record_build_config()
remove_stale_extensions()
setup(
    packages=["fused_bn"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    # build_ext always runs ninja, which rebuilds exactly what changed (headers
    # and flags included); setuptools' own up-to-date check compares only the
    # .cpp files' times with the built library's and would put a stale
    # extension in a wheel built from a tree with an earlier build in build/.
    options={"bdist_wheel": {"py_limited_api": "cp39"}, "build_ext": {"force": True}},
)
