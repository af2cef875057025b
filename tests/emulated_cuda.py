"""The emulated GPU for the test suite: builds (once, cached under build/) and
loads a test-only extension in which our CUDA glue and kernels are compiled
by the host compiler against csrc/cuda/emulation/, and switches fused_bn's
ops on CPU tensors over to it.

Variants: ``default`` (-O2, with gcov coverage when FUSED_BN_EMULATION_COVERAGE
is set) and ``asan`` (AddressSanitizer + UndefinedBehaviorSanitizer; Python
must run with the ASan runtime in LD_PRELOAD, see the Makefile).
"""
import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# tools/planted_faults.py points these at a patched copy of csrc/ and a build
# directory of its own.
CSRC = Path(os.environ.get("FUSED_BN_EMULATION_CSRC", ROOT / "csrc"))
BUILD_ROOT = Path(os.environ.get("FUSED_BN_EMULATION_BUILD", ROOT / "build"))
SOURCES = [
    "cuda/emulation/emulation.cpp",
    "cuda/emulation/emulated_ops.cpp",
    "cuda/emulation/emulator_self_test.cpp",
    "cuda/emulation/forward_emulated.cpp",
    "cuda/emulation/backward_emulated.cpp",
    "cuda/batch_norm_cuda.cpp",
]
# The kernel layer, whose line coverage `make test` reports.
KERNEL_LAYER = ["cuda/forward.cu", "cuda/backward.cu", "cuda/batch_norm_kernels.cuh", "cuda/device_primitives.cuh",
                "cuda/reductions.cuh", "cuda/traversals.cuh", "cuda/forward_kernels.cuh", "cuda/backward_kernels.cuh",
                "cuda/launch.cuh", "cuda/epilogues.cuh", "cuda/cuda_platform.h", "common/channel_math.h",
                "common/activation.h", "common/epilogue.h"]
# As torch.utils.cpp_extension builds CUDA extensions: half/bfloat16 only
# through intrinsics, so the emulated build sees what nvcc sees.
DEFINES = [
    "-DFUSED_BN_CUDA_EMULATION", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]

BLOCK_ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}


def load_cuda_toolkit():
    """tools/cuda_toolkit.py, the toolkit finder setup.py uses."""
    spec = importlib.util.spec_from_file_location("cuda_toolkit", ROOT / "tools" / "cuda_toolkit.py")
    cuda_toolkit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_toolkit)
    return cuda_toolkit


def cuda_include_dir():
    """The CUDA toolkit's include directory (cuda_fp16.h and friends), found as
    setup.py finds the toolkit."""
    home = load_cuda_toolkit().find_cuda_home()
    include = Path(home) / "include" if home else None
    if include is None or not (include / "cuda_fp16.h").exists() or not (include / "crt" / "host_defines.h").exists():
        raise RuntimeError("emulated GPU: no CUDA headers found (set CUDA_HOME); cuda_fp16.h is needed")
    return include


def build(variant="default"):
    """Compiles (if sources changed) and loads the emulated extension."""
    from torch.utils.cpp_extension import load

    flags = ["-std=c++20", "-g", *DEFINES, f"-I{CSRC}", f"-I{cuda_include_dir()}"]
    ldflags = []
    if variant == "asan":
        flags += ["-O1", *SANITIZE]
        ldflags += SANITIZE
    else:
        flags += ["-O2"]
        if os.environ.get("FUSED_BN_EMULATION_COVERAGE"):
            flags += ["--coverage"]
            ldflags += ["--coverage"]
    name = "fused_bn_emulated_cuda" + ("_asan" if variant == "asan" else "")
    if os.environ.get("FUSED_BN_EMULATION_COVERAGE") and variant != "asan":
        name += "_coverage"
    directory = BUILD_ROOT / name
    directory.mkdir(parents=True, exist_ok=True)
    load(name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=flags, extra_ldflags=ldflags,
         build_directory=str(directory), is_python_module=False, verbose=False)
    return directory


def enable(on=True):
    torch.ops.fused_bn_emulation.enable(on)


def configure(multiprocessor_count=4, block_order="forward", seed=0, resident_threads=1024):
    """resident_threads: the occupancy query's answer for every kernel, threads
    of resident blocks per multiprocessor (the grids are sized by it)."""
    torch.ops.fused_bn_emulation.configure(multiprocessor_count, BLOCK_ORDERS[block_order], seed,
                                           resident_threads)


def launch_count():
    return torch.ops.fused_bn_emulation.launch_count()


class Traffic:
    """What traffic() yields: after the block, ``launches`` holds one dict per
    kernel launch recorded inside it (emulation.cpp, take_traffic_json):
    kernel, grid, block, and per direction ("load", "store") the warp
    requests, 32-byte sectors, 128-byte lines, bytes asked and the disjoint
    address ranges touched [begin, end, bytes asked inside]."""

    def __init__(self):
        self.launches = []


@contextlib.contextmanager
def traffic(every_kth_block=1):
    """Records every global-memory access of the kernels launched inside the
    block (off otherwise: one branch per access). A warp request is the k-th
    access of one source site by a warp's lanes between the same two
    synchronisation points (tests/_traffic.py: where that differs from hardware).
    every_kth_block > 1 runs only the blocks whose linear index is a multiple
    of k, for traffic on shapes too large to emulate whole: the results are
    then garbage; each record's blocks_run says how many ran."""
    record = Traffic()
    torch.ops.fused_bn_emulation.traffic(True, every_kth_block)
    try:
        yield record
    finally:
        taken = torch.ops.fused_bn_emulation.traffic_take()
        torch.ops.fused_bn_emulation.traffic(False)
        record.launches = json.loads(taken)
