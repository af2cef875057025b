"""Line coverage of the CUDA kernel layer under the emulated-GPU suite, from
the gcov data the coverage build (FUSED_BN_EMULATION_COVERAGE=1) leaves in
build/fused_bn_emulated_cuda_coverage/. Prints each file's covered/total
lines and the uncovered ones, and fails below --min percent overall.

A line that only a real GPU can run may end in `// host fallback` to leave
the count (none needs it today: the `asm` lines are never compiled by g++,
so gcov does not see them), and one no input can reach (the abort after an
exhaustive switch) in `// unreachable`.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import emulated_cuda  # noqa: E402

EXCLUDE_MARKERS = ("// host fallback", "// unreachable")


def gcov_json(build_dir):
    objects = sorted(str(p) for p in Path(build_dir).glob("*.o"))
    if not any(Path(o).with_suffix(".gcda").exists() for o in objects):
        raise SystemExit(f"emulation coverage: no .gcda files under {build_dir} (run the coverage build first)")
    out = subprocess.run(["gcov", "--json-format", "--stdout", "--object-directory", str(build_dir), *objects],
                         capture_output=True, cwd=build_dir)
    if out.returncode != 0:
        raise SystemExit(f"gcov failed: {out.stderr.decode()[:2000]}")
    for line in out.stdout.decode().splitlines():
        if line.strip():
            yield json.loads(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--min", type=float, default=95.0)
    parser.add_argument("--build", default=str(emulated_cuda.BUILD_ROOT / "fused_bn_emulated_cuda_coverage"))
    args = parser.parse_args()
    wanted = {str((emulated_cuda.CSRC / f).resolve()): f for f in emulated_cuda.KERNEL_LAYER}
    hits = {}  # file -> {line: count}
    for report in gcov_json(args.build):
        for f in report["files"]:
            path = str(Path(f["file"]) if Path(f["file"]).is_absolute() else (Path(args.build) / f["file"]).resolve())
            path = str(Path(path).resolve())
            if path not in wanted:
                continue
            lines = hits.setdefault(path, {})
            for line in f["lines"]:
                lines[line["line_number"]] = lines.get(line["line_number"], 0) + line["count"]
    total = covered = 0
    print(f"CUDA kernel layer line coverage under the emulated GPU ({args.build}):")
    for path, name in wanted.items():
        lines = hits.get(path, {})
        source = Path(path).read_text().splitlines()
        counted = {n: c for n, c in lines.items() if not source[n - 1].rstrip().endswith(EXCLUDE_MARKERS)}
        file_covered = sum(1 for c in counted.values() if c > 0)
        total += len(counted)
        covered += file_covered
        missed = sorted(n for n, c in counted.items() if c == 0)
        pct = 100.0 * file_covered / len(counted) if counted else 100.0
        print(f"  {name:32} {file_covered:5}/{len(counted):<5} {pct:6.1f}%")
        for n in missed:
            print(f"      not run: {name}:{n}: {source[n - 1].strip()}")
    pct = 100.0 * covered / total if total else 0.0
    print(f"  {'total':32} {covered:5}/{total:<5} {pct:6.1f}% (required: {args.min}%)")
    if pct < args.min:
        raise SystemExit(f"emulation coverage {pct:.1f}% is below {args.min}%")


if __name__ == "__main__":
    main()
