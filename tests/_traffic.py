"""Global-memory traffic of fused_bn's ops on the emulated GPU, read off the
per-launch records of tests/emulated_cuda.py's traffic(): per launch sector
efficiency, and per op the passes over each named tensor. Shared by
tests/test_traffic.py (the regression guard) and bench/traffic.py (the
predicted H100/H200 table).

Definitions:
- a warp request: the k-th access of one source line by the lanes of a warp
  between the same two synchronisation points (the emulator's grouping);
- bytes asked: per request, the distinct bytes its lanes asked for;
- sector efficiency: bytes asked / (32 x sectors touched), over a launch's
  element accesses (load_bundle / store_bundle: the passes over input-sized
  tensors), or over all of them;
- passes over a tensor, read or written: the sum over the op's launches of
  the distinct bytes of the tensor each launch touched, over the tensor's
  bytes (what reaches DRAM when the tensor exceeds L2); asked passes: the
  bytes asked of it (per request), over the tensor's bytes.

Where the grouping differs from hardware: a GPU issues one instruction for
the lanes active at that point of the program; the emulator pairs the k-th
execution of a source line by each lane. They agree where every lane runs
the line equally often between two synchronisation points, and where a lane
skips only its last executions (the passes' tails: a lane whose last steps
are out of range issues fewer, and the warp's last request holds only the
lanes still in range, as on a GPU). They differ where lanes skip an earlier
execution and run a later one (none of our loops does), and where the
compiler merges or splits accesses (a 16-byte bundle is assumed to be one
LDG.E.128/STG.E.128; `make cuda-check` does not check the SASS yet). Sectors
and lines are counted per request, as L1 sees them: a sector two requests
share is counted twice (L2 and DRAM traffic are the unique bytes), and L1/L2
hits are not modelled. Only the kernel layer's accesses through
device_primitives.cuh's helpers are recorded: csrc/common's
merge_ranks_moments reads the gathered [ranks, C, 3] moments directly (a
C-sized tensor).
"""
import re

SECTOR = 32

# The kernels that stream input-sized tensors.
HOT_KERNEL = re.compile(r"(moments|normalize|grad_sums|grad_input)_kernel")


def short_name(kernel):
    """'detail::channels_first_normalize_kernel<float, 4, ...>' -> 'channels_first_normalize_kernel<float, 4>'."""
    name = kernel.split("::")[-1] if "<" not in kernel else kernel[: kernel.index("<")].split("::")[-1]
    args = kernel[kernel.index("<") + 1:].split(",")[:2] if "<" in kernel else []
    args = [a.strip().split("::")[-1].rstrip(">").strip() for a in args]
    return f"{name}<{', '.join(args)}>" if args else name


def is_hot_kernel(name):
    return bool(HOT_KERNEL.search(name)) and "finalize" not in name


def is_hot(launch):
    return is_hot_kernel(launch["kernel"])


def site_totals(launch, element_only):
    asked = sectors = requests = lines = 0
    for s in launch["sites"]:
        if element_only and not s["element"]:
            continue
        asked += s["unique_bytes"]
        sectors += s["sectors"]
        requests += s["requests"]
        lines += s["lines"]
    return asked, sectors, requests, lines


def sector_efficiency(launch, element_only=True):
    """Bytes asked / bytes of the sectors touched (None: no such access)."""
    asked, sectors, _, _ = site_totals(launch, element_only)
    return asked / (SECTOR * sectors) if sectors else None


def spans(tensors):
    out = {}
    for name, t in tensors.items():
        if t is None or t.numel() == 0:
            continue
        begin = t.data_ptr()
        out[name] = (begin, begin + t.numel() * t.element_size())
    return out


def tensor_passes(launches, tensors):
    """Per named tensor (a dense tensor, contiguous or channels_last):
    {"read": passes, "read_asked": passes, "write": ..., "write_asked": ...},
    plus "other" bytes (workspace, statistics) under the key None."""
    where = spans(tensors)
    result = {name: {"read": 0.0, "read_asked": 0.0, "write": 0.0, "write_asked": 0.0} for name in where}
    other = {"read": 0, "write": 0}
    for launch in launches:
        for direction, key in (("load", "read"), ("store", "write")):
            for begin, end, asked in launch[direction]["ranges"]:
                placed = 0
                for name, (tb, te) in where.items():
                    overlap = min(end, te) - max(begin, tb)
                    if overlap <= 0:
                        continue
                    placed += overlap
                    size = te - tb
                    result[name][key] += overlap / size
                    result[name][key + "_asked"] += asked * overlap / (end - begin) / size
                other[key] += (end - begin) - placed
    result[None] = other
    return result
