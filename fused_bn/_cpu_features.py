"""The CPU kernels are compiled for one instruction set (setup.py picks the best
one PyTorch uses on the building machine, or FUSED_BN_CPU_CAPABILITY). Loading
an AVX-512 build on an AVX2-only CPU would die of SIGILL somewhere in a kernel;
instead, importing fused_bn checks the build's required CPU features against
the running CPU first and raises ImportError saying how to rebuild."""
import os

# What the compiler flags of each capability (setup.py, ISA_FLAGS) let it emit.
REQUIRED_FLAGS = {
    "AVX512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
    "AVX2": ("avx2", "fma", "f16c"),
}


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The running CPU's feature flags, or None where /proc/cpuinfo is not there."""
    if not os.path.exists(cpuinfo):
        return None
    with open(cpuinfo) as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return None


def check_build_runs_here(capability, flags):
    """Raises ImportError when the CPU (flags) lacks what `capability` needs."""
    if flags is None or capability not in REQUIRED_FLAGS:
        return
    missing = [f for f in REQUIRED_FLAGS[capability] if f not in flags]
    if missing:
        raise ImportError(
            f"fused_bn's CPU kernels were built for {capability}, which this CPU lacks "
            f"(no {', '.join(missing)}); rebuild here with `pip install --no-build-isolation --no-deps -e .` "
            f"(or build for every machine with FUSED_BN_CPU_CAPABILITY=AVX2, or DEFAULT)")


def check_installed_build():
    try:
        from ._build_config import CPU_CAPABILITY
    except ImportError:  # a build from before the record was written
        return
    check_build_runs_here(CPU_CAPABILITY, cpu_flags())
