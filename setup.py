"""Builds fused_bn._C: always the CPU kernels; the CUDA kernels too when CUDA_HOME
is found and a GPU is visible (or FUSED_BN_FORCE_CUDA=1). TORCH_CUDA_ARCH_LIST is
honoured by torch.utils.cpp_extension."""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# The flags PyTorch builds its own AVX2 / AVX-512 kernels with; at::vec::Vectorized
# picks its implementation from CPU_CAPABILITY. We build for the best ISA PyTorch
# itself uses on this machine (override with FUSED_BN_CPU_CAPABILITY).
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


def cpu_isa_flags():
    capability = os.environ.get("FUSED_BN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    return ISA_FLAGS.get(capability.upper(), [])


def want_cuda():
    if CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("FUSED_BN_FORCE_CUDA", "0") == "1"


def extension():
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"] + cpu_isa_flags()
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        return CUDAExtension(
            "fused_bn._C", sources,
            extra_compile_args={"cxx": cxx_flags + ["-DFUSED_BN_WITH_CUDA"],
                                "nvcc": ["-O3", "-lineinfo", "-DFUSED_BN_WITH_CUDA"]},
            extra_link_args=["-fopenmp"])
    return CppExtension("fused_bn._C", sources, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=["-fopenmp"])


setup(
    packages=["fused_bn"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
