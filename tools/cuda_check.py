#!/usr/bin/env python3
"""Compile the CUDA kernel layer with nvcc (no GPU needed) and check ptxas's
resource report: prints registers, shared memory, stack frame and spills per
kernel and architecture, and exits non-zero on any local-memory spill, or on a
stack frame in a hot kernel (everything except the per-channel finalize and
counter kernels, which touch C values, not N*C*H*W).

Usage: cuda_check.py --nvcc NVCC --source FILE --output OBJ -- NVCC_FLAGS...
(the flags must include -Xptxas -v).
"""
import argparse
import os
import re
import subprocess
import sys

ENTRY_RE = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
PROPERTIES_RE = re.compile(r"Function properties for (\w+)")
STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED_RE = re.compile(r"Used (\d+) registers(.*)")
# Static __shared__ arrays beyond 48 KB are refused at launch (larger needs
# dynamic shared memory and an opt-in); the emulated GPU cannot measure them.
STATIC_SHARED_LIMIT = 48 * 1024
SMEM_RE = re.compile(r"(\d+) bytes smem")
# Kernels that run once per channel, not per element: a stack frame there costs nothing.
# Occupancy at the kernels' 256-thread blocks on sm_80/sm_90: 64K registers and
# 2048 threads per multiprocessor, registers allocated per warp in units of 256
# (8 per thread). The grids aim for 1024 resident threads per multiprocessor;
# a kernel holding fewer gets its grid sized from its real occupancy
# (cudaOccupancyMaxActiveBlocksPerMultiprocessor, csrc/cuda/launch.cuh).
BLOCK_THREADS = 256
TARGET_RESIDENT_THREADS = 1024


def resident_threads(regs, smem):
    warps = BLOCK_THREADS // 32
    by_regs = 65536 // (max(-(-regs // 8) * 8, 8) * 32 * warps)
    by_smem = (228 * 1024) // smem if smem else 32
    return min(2048 // BLOCK_THREADS, by_regs, by_smem) * BLOCK_THREADS


COLD_KERNEL_RE = re.compile(r"finalize_|increment_counter|snapshot_counter")


def demangle(names):
    """{mangled: demangled} by c++filt (names unchanged where it is missing or
    answers with another number of lines). tools/sass_check.py uses it too."""
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def kernel_signature(pretty):
    """'void fused_bn::cuda::kernel<T, 4>(args)' -> 'kernel<T, 4>' (types as
    c++filt spells them; tools/sass_check.py classifies kernels by these)."""
    pretty = re.sub(r"^void ", "", pretty)
    pretty = re.sub(r"fused_bn::cuda::(detail::)?(\(anonymous namespace\)::)?", "", pretty)
    depth = 0
    for i, ch in enumerate(pretty):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return pretty[:i]
    return pretty


def short_name(pretty):
    """kernel_signature with the half types' short names, for the report."""
    return kernel_signature(pretty).replace("__nv_bfloat16", "bf16").replace("__half", "half")


def parse(log):
    """Returns {(mangled, arch): {regs, smem, stack, spill_stores, spill_loads}}."""
    kernels = {}
    arch_of = {}
    current = None
    for line in log.splitlines():
        m = ENTRY_RE.search(line)
        if m:
            current = (m.group(1), m.group(2))
            arch_of[m.group(1)] = m.group(2)
            kernels.setdefault(current, {})
            continue
        m = PROPERTIES_RE.search(line)
        if m:
            name = m.group(1)
            # Properties follow the entry they describe; a device function that
            # was not inlined gets its own row under the current architecture.
            arch = current[1] if current else arch_of.get(name, "?")
            current = (name, arch)
            kernels.setdefault(current, {})
            continue
        if current is None:
            continue
        m = STACK_RE.search(line)
        if m:
            info = kernels[current]
            info["stack"], info["spill_stores"], info["spill_loads"] = map(int, m.groups())
            continue
        m = USED_RE.search(line)
        if m:
            info = kernels[current]
            info["regs"] = int(m.group(1))
            smem = SMEM_RE.search(m.group(2))
            info["smem"] = int(smem.group(1)) if smem else 0
    return kernels


ACTIVATION_LIST_RE = re.compile(r'X\((\w+), k\w+, "(\w+)", \d+\)')


def activation_structs():
    """struct name -> op name, from FUSED_BN_ACTIVATIONS (csrc/common/activation.h)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc", "common", "activation.h")
    with open(path) as f:
        return dict(ACTIVATION_LIST_RE.findall(f.read()))


def print_by_activation(rows):
    """The hot kernels' registers and occupancy per activation (the kernels
    instantiated with that activation's struct), so that a heavy activation's
    cost shows at a glance."""
    structs = activation_structs()
    pattern = re.compile(r"common::(" + "|".join(sorted(structs, key=len, reverse=True)) + r")\b")
    groups = {}
    for arch, pretty, regs, smem, _, _, _, hot in rows:
        if not hot:
            continue
        found = pattern.search(pretty)
        name = structs[found.group(1)] if found else "(none)"
        groups.setdefault((arch, name), []).append((regs, resident_threads(regs, smem)))
    order = ["(none)"] + list(structs.values())
    print("per activation (hot kernels): count, max registers, min resident threads")
    for arch in sorted({a for a, _ in groups}):
        for name in order:
            entries = groups.get((arch, name))
            if entries:
                print(f"  {arch:6} {name:12} {len(entries):4d} {max(r for r, _ in entries):5d} "
                      f"{min(t for _, t in entries):6d}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvcc", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("flags", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    flags = [f for f in args.flags if f != "--"]

    cmd = [args.nvcc, "-c", args.source, "-o", args.output] + flags
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.stderr.write(log)
        print(f"cuda-check: nvcc failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    for line in log.splitlines():
        if "warning" in line.lower():
            print(line)

    kernels = parse(log)
    if not kernels:
        print("cuda-check: no ptxas report found (is -Xptxas -v among the flags?)", file=sys.stderr)
        return 1
    names = demangle(sorted({name for name, _ in kernels}))
    rows = []
    failures = []
    for (name, arch), info in kernels.items():
        pretty = short_name(names.get(name, name))
        hot = not COLD_KERNEL_RE.search(pretty)
        row = (arch, pretty, info.get("regs", 0), info.get("smem", 0), info.get("stack", 0),
               info.get("spill_stores", 0), info.get("spill_loads", 0), hot)
        rows.append(row)
        if row[5] or row[6]:
            failures.append(f"{arch} {pretty}: {row[5]} bytes spill stores, {row[6]} bytes spill loads")
        if hot and row[4]:
            failures.append(f"{arch} {pretty}: {row[4]} bytes stack frame in a hot kernel")
        if row[3] > STATIC_SHARED_LIMIT:
            failures.append(f"{arch} {pretty}: {row[3]} bytes of static shared memory (limit {STATIC_SHARED_LIMIT})")
    rows.sort(key=lambda r: (r[0], r[1]))

    width = max(len(r[1]) for r in rows)
    header = (f"{'arch':6} {'kernel':{width}} {'regs':>5} {'smem':>6} {'stack':>6} {'spill st':>8} {'spill ld':>8} "
              f"{'resident':>8}")
    print(header)
    print("-" * len(header))
    below = []
    for arch, pretty, regs, smem, stack, stores, loads, hot in rows:
        mark = "" if hot else "  (cold)"
        resident = resident_threads(regs, smem)
        if hot and resident < TARGET_RESIDENT_THREADS:
            below.append((arch, pretty, regs, resident))
        print(f"{arch:6} {pretty:{width}} {regs:5d} {smem:6d} {stack:6d} {stores:8d} {loads:8d} {resident:8d}{mark}")
    print(f"{len(rows)} kernels; max registers {max(r[2] for r in rows)}")
    print_by_activation(rows)
    print(f"resident = threads per multiprocessor at {BLOCK_THREADS}-thread blocks; {len(below)} hot kernels hold "
          f"fewer than the {TARGET_RESIDENT_THREADS} the grids aim for, and get grids sized from their occupancy:")
    for arch, pretty, regs, resident in below:
        print(f"  {arch} {pretty}: {regs} registers, {resident} threads")
    if failures:
        print("cuda-check FAILED:", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    print("cuda-check: no spills, no stack frames in hot kernels, static shared memory within 48 KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
