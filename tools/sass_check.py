#!/usr/bin/env python3
"""Read the SASS nvcc emitted for the kernel layer (cuobjdump -sass of the
sm_90 build, no GPU needed) and check that every hot pass meant to move
16-byte vectors issues 128-bit global loads and stores on its vector path.

Prints, per kernel, the global loads (LDG) and stores (STG) it issues, counted
by width: 128, 64, 32 bits (LDG.E with no width suffix), 16 and 8 bits (.U16,
.S16, .U8, .S8); generic LD/ST (the compiler could not prove the pointer
global) are counted beside them. Counts are static instructions, not executed
ones: a loop body counts once, an unrolled one once per copy.

The rule, derived from the kernels' code (csrc/cuda/forward_kernels.cuh,
backward_kernels.cuh, traversals.cuh):
  * The hot kernels are templated <scalar_t, kVec, ...>; their element
    accesses go through load_bundle/store_bundle (device_primitives.cuh), one
    Bundle<scalar_t, kVec> per access. An instantiation has a vector path when
    kVec * sizeof(scalar_t) == 16 (kVectorWidth: float 4, half/bfloat16 8,
    double 2; double's 16-byte bundle is a vector path too). kVec == 1
    instantiations are the scalar fallback and are not checked.
  * Every vector instantiation of a hot kernel must contain at least one
    LDG.E.128 (any cache suffix: .CONSTANT etc.): moments (channels-first and
    channels-last) and grad_sums read x (and dy, aux) in bundles; normalize and
    grad_input read x (dy) in bundles.
  * Those that write a tensor must contain at least one STG.E.128: normalize
    and grad_input (the output); grad_sums only when its GradSource writes the
    residual's gradient (kInputAndResidual = 2, kOutput = 3, csrc/common/
    epilogue.h kWritesResidualGrad). moments and the other grad_sums are
    reductions whose only stores are per-block partial sums (scalar).
  * Narrower accesses beside the 128-bit ones are expected (scalar tails,
    the first element of a channel, per-channel statistics), so the rule is
    "the vector path exists as 128-bit instructions", not "all are 128".
  * The per-channel kernels (finalize_*, two_values_backward, the counters)
    have no bundles and are listed, not checked.

Usage: sass_check.py [--cuobjdump PATH] [--arch sm_90] OBJ...
Exit status: 0 clean, 1 a vector path without 128-bit accesses, 3 no
cuobjdump/nvdisasm found (the SASS check is skipped; the caller decides).
"""
import argparse
import collections
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

# The ptxas check's kernel naming (demangle, kernel_signature), shared rather than copied.
_cuda_check_spec = importlib.util.spec_from_file_location(
    "cuda_check", os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_check.py"))
cuda_check = importlib.util.module_from_spec(_cuda_check_spec)
_cuda_check_spec.loader.exec_module(cuda_check)

FUNCTION_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
# "@!P0 LDG.E.128.CONSTANT R4, desc[UR6][R2.64] ;" -> ("LDG", ".E.128.CONSTANT")
MEMORY_RE = re.compile(r"(?<![A-Z0-9_.])(LDG|STG|LD|ST)((?:\.[A-Z0-9_]+)+)?\s")
WIDTH_TOKENS = {"128": "128", "64": "64", "U16": "16", "S16": "16", "16": "16", "U8": "8", "S8": "8", "8": "8",
                "256": "256"}
WIDTHS = ["128", "64", "32", "16", "8"]
HOT_RE = re.compile(r"(channels_(?:first|last)_(moments|normalize|grad_sums|grad_input))_kernel<(.*)>$")
SCALAR_SIZES = {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2, "c10::Half": 2, "c10::BFloat16": 2}
WRITING_SOURCES = {"2", "3"}  # GradSource::kInputAndResidual, GradSource::kOutput


def parse_sass(text):
    """{mangled kernel name: Counter{('LDG'|'STG'|'LD'|'ST', width): count}} from cuobjdump -sass output."""
    kernels = {}
    current = None
    for line in text.splitlines():
        m = FUNCTION_RE.match(line)
        if m:
            current = kernels.setdefault(m.group(1), collections.Counter())
            continue
        if current is None or ("LD" not in line and "ST" not in line):
            continue
        # Instructions sit in /*addr*/ ... ; lines; strip the address and encoding comments.
        body = re.sub(r"/\*[^*]*\*/", " ", line)
        for op, mods in MEMORY_RE.findall(body + " "):
            tokens = mods.split(".")[1:] if mods else []
            if op in ("LD", "ST") and "E" not in tokens:
                continue  # not a memory access we count (e.g. a label)
            width = next((WIDTH_TOKENS[t] for t in tokens if t in WIDTH_TOKENS), "32")
            current[(op, width)] += 1
    return kernels


def split_template_args(args):
    out, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(args[start:i].strip())
            start = i + 1
    out.append(args[start:].strip())
    return out


def expectation(short):
    """For a kernel's short demangled name ('channels_last_normalize_kernel<float, 4, ...>'):
    None when it is not checked, else (family, needs_ldg128, needs_stg128)."""
    m = HOT_RE.search(short)
    if not m:
        return None
    family, kind, args = m.group(1), m.group(2), split_template_args(m.group(3))
    if len(args) < 2 or not args[1].isdigit():
        return None
    size = SCALAR_SIZES.get(args[0])
    vec = int(args[1])
    if size is None or vec == 1 or vec * size != 16:
        return None
    if kind in ("normalize", "grad_input"):
        return family, True, True
    if kind == "grad_sums":
        source = re.search(r"\(fused_bn::common::GradSource\)(\d+)|GradSource::k(\w+)", short)
        writes = bool(source) and (source.group(1) in WRITING_SOURCES or
                                   source.group(2) in ("InputAndResidual", "Output"))
        return family, True, writes
    return family, True, False  # moments: a reduction


def display_name(short):
    return (short.replace("fused_bn::common::", "").replace("__nv_bfloat16", "bf16").replace("__half", "half")
            .replace("(GradSource)", "src"))


def widths(counter, op):
    parts = [f"{w}:{counter[(op, w)]}" for w in WIDTHS + ["256"] if counter[(op, w)]]
    return " ".join(parts) if parts else "-"


def check(kernels, names=None):
    """rows [(name, expectation, counter)] and failure messages for parsed SASS."""
    names = names or {n: n for n in kernels}
    rows, failures = [], []
    for mangled, counter in kernels.items():
        short = cuda_check.kernel_signature(names.get(mangled, mangled))
        exp = expectation(short)
        rows.append((short, exp, counter))
        if exp is None:
            continue
        _, need_ld, need_st = exp
        missing = []
        if need_ld and not counter[("LDG", "128")]:
            missing.append(f"no LDG.E.128 (loads {widths(counter, 'LDG')})")
        if need_st and not counter[("STG", "128")]:
            missing.append(f"no STG.E.128 (stores {widths(counter, 'STG')})")
        if missing:
            failures.append(f"{display_name(short)}: 16-byte vector path but " + "; ".join(missing))
    rows.sort(key=lambda r: r[0])
    return rows, failures


def find_tool(name, nvcc=None, explicit=None):
    """explicit, then the CUDA toolkit's bin (beside nvcc, CUDA_HOME), PATH, the pip packages
    (nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm: site-packages/nvidia/cu*/bin or nvidia/cuda_*/bin)."""
    candidates = [explicit] if explicit else []
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), name))
        candidates.append(os.path.join(os.path.dirname(nvcc), name))
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "bin", name))
    candidates.append(shutil.which(name))
    candidates.append(os.path.join("/usr/local/cuda/bin", name))
    try:
        import nvidia  # namespace package of the pip wheels
        for root in list(nvidia.__path__):
            candidates += sorted(glob.glob(os.path.join(root, "*", "bin", name)))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def run_cuobjdump(cuobjdump, nvdisasm, obj, arch):
    env = dict(os.environ)
    if nvdisasm:
        env["NVDISASM_PATH"] = os.path.dirname(nvdisasm)
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([cuobjdump, "-sass", "-arch", arch, obj], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cuobjdump} -sass -arch {arch} {obj} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    return proc.stdout


def print_table(rows, arch):
    width = max(len(display_name(r[0])) for r in rows)
    header = f"{'kernel':{width}}  {'LDG widths (bits:count)':30} {'STG widths':24} {'expects':14} status"
    print(header)
    print("-" * len(header))
    summary = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for short, exp, counter in rows:
        if exp is None:
            expects, status = "-", "not checked"
        else:
            _, need_ld, need_st = exp
            expects = "+".join(x for x, need in (("LDG128", need_ld), ("STG128", need_st)) if need)
            ok = (not need_ld or counter[("LDG", "128")]) and (not need_st or counter[("STG", "128")])
            status = "ok" if ok else "FAIL"
        extra = ""
        if any(op in ("LD", "ST") for op, _ in counter):
            extra = f"  generic LD {widths(counter, 'LD')} ST {widths(counter, 'ST')}"
        print(f"{display_name(short):{width}}  {widths(counter, 'LDG'):30} {widths(counter, 'STG'):24} "
              f"{expects:14} {status}{extra}")
        family = re.sub(r"<.*", "", short)
        args = split_template_args(re.search(r"<(.*)>$", short).group(1)) if "<" in short else ["", ""]
        key = (family, display_name(args[0]), args[1] if len(args) > 1 and args[1].isdigit() else "-")
        s = summary[key]
        s[0] += 1
        s[1] += status == "FAIL"
        s[2] += counter
    print(f"\n{arch} summary per kernel family, scalar type and kVec (instantiations, failures, "
          "static LDG / STG instruction counts by width, summed):")
    for (family, scalar, vec), (n, bad, total) in sorted(summary.items()):
        print(f"  {family:36} {scalar:8} kVec={vec:2} n={n:3} fail={bad:3}  LDG {widths(total, 'LDG'):36} "
              f"STG {widths(total, 'STG')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuobjdump")
    parser.add_argument("--nvcc")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("objects", nargs="+")
    args = parser.parse_args()

    cuobjdump = find_tool("cuobjdump", args.nvcc, args.cuobjdump)
    nvdisasm = find_tool("nvdisasm", args.nvcc)
    if not cuobjdump or not nvdisasm:
        missing = " and ".join(n for n, p in (("cuobjdump", cuobjdump), ("nvdisasm", nvdisasm)) if not p)
        print(f"sass-check: {missing} not found (CUDA toolkit bin, PATH, or pip install nvidia-cuda-cuobjdump "
              "nvidia-cuda-nvdisasm)", file=sys.stderr)
        return 3
    print(f"sass-check: {cuobjdump} -sass -arch {args.arch} (nvdisasm {nvdisasm})", flush=True)
    kernels = {}
    for obj in args.objects:
        try:
            parsed = parse_sass(run_cuobjdump(cuobjdump, nvdisasm, obj, args.arch))
        except RuntimeError as e:
            print(f"sass-check FAILED: {e}", file=sys.stderr)
            return 1
        if not parsed:
            print(f"sass-check FAILED: no {args.arch} SASS functions in {obj}", file=sys.stderr)
            return 1
        kernels.update(parsed)
    rows, failures = check(kernels, cuda_check.demangle(sorted(kernels)))
    print_table(rows, args.arch)
    checked = sum(1 for r in rows if r[1] is not None)
    if failures:
        print(f"sass-check FAILED: {len(failures)} of {checked} vector instantiations of hot kernels lack "
              f"128-bit global accesses in {args.arch} SASS:", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    print(f"sass-check: all {checked} vector (16-byte) instantiations of the hot kernels issue LDG.E.128 "
          f"(and STG.E.128 where they write a tensor) in {args.arch} SASS; {len(rows)} kernels read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
