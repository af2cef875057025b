"""Plants known faults in a copy of csrc/ and shows that the emulated-GPU suite
catches each one: for every fault, the copy is patched, the emulated extension
is built from it (build/planted/<fault>/), and the named tests must fail.
Usage: python tools/planted_faults.py [fault ...]   (all by default; ~1 min each)
(FUSED_BN_PLANTED_DIR: where the copies are built, build/planted by default.)
The list below is the planted-fault table of docs/testing.md."""
import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Edits marked KERNELS go to whichever file of the CUDA kernel layer holds the text.
KERNELS = "<cuda kernel layer>"
KERNEL_LAYER_FILES = ["cuda/forward.cu", "cuda/backward.cu", "cuda/device_primitives.cuh", "cuda/reductions.cuh",
                      "cuda/traversals.cuh", "cuda/forward_kernels.cuh", "cuda/backward_kernels.cuh", "cuda/launch.cuh"]


@dataclass
class Fault:
    name: str
    what: str
    edits: list  # (file under csrc/, exact text, replacement)
    tests: list  # pytest node ids under tests/ that must fail
    variant: str = "default"  # or "asan": needs AddressSanitizer to be seen
    passes: list = field(default_factory=list)  # pytest node ids that must still pass (a traffic-only fault)


FAULTS = [
    Fault("dropped-tail-vector", "the normalize pass skips each split's last vector",
          [(KERNELS, "      if (position + u * stride < end) {\n        Bundle<scalar_t, kVec> y;",
            "      if (position + u * stride < end - 1) {\n        Bundle<scalar_t, kVec> y;")],
          ["test_parity.py::test_parity_grid"]),
    Fault("split-boundary-off-by-one", "each split of the channels-first passes stops one vector short",
          [(KERNELS, "        end(min_index(g.N * plane_vectors, begin + vectors_per_split)),",
            "        end(min_index(g.N * plane_vectors, begin + vectors_per_split - 1)),")],
          ["test_parity.py::test_parity_grid"]),
    Fault("missing-syncthreads-in-block-merge", "warp 0 reads the other warps' partials without a barrier",
          [(KERNELS, "  if (lane == 0) warp_state[warp] = s;\n  __syncthreads();", "  if (lane == 0) warp_state[warp] = s;")],
          ["test_emulation.py::test_bitwise_identical_in_any_block_and_thread_order", "test_parity.py::test_parity_grid"]),
    Fault("full-mask-shuffle-in-partial-warp", "channels-first blocks shrink to 16 threads for small planes",
          [(KERNELS, "while (threads > kWarpSize && threads >= 2 * total) threads /= 2;",
            "while (threads > kWarpSize / 2 && threads >= 2 * total) threads /= 2;")],
          ["test_parity.py::test_parity_grid"]),
    Fault("out-of-bounds-store", "the finalize pass lets channel C through and writes one past save_mean",
          [(KERNELS, "  if (channel >= args.channels) return;  // whole warps leave together\n\n  // The channel's moments",
            "  if (channel > args.channels) return;  // whole warps leave together\n\n  // The channel's moments")],
          ["test_parity.py::test_parity_grid"], variant="asan"),
    Fault("short-workspace", "the backward's workspace is 16 bytes short",
          [(KERNELS, "  return carve_backward_workspace<acc_t>(nullptr, params.geometry.C, splits).bytes;",
            "  return carve_backward_workspace<acc_t>(nullptr, params.geometry.C, splits).bytes - 16;")],
          ["test_parity.py::test_parity_grid"], variant="asan"),
    Fault("reads-partial-before-finalize", "the last split merges every split's partial itself, as if it ran last",
          [(KERNELS, "    store_global(partial_count + slot, count);\n    if (channel == 0 && split == 0 && counter != nullptr)",
            "    store_global(partial_count + slot, count);\n"
            "    if (split > 0 && split + 1 == gridDim.y) {\n"
            "      double m = 0.0, q = 0.0, n = 0.0;\n"
            "      for (int64_t s = 0; s < split + 1; ++s) {\n"
            "        const int64_t at = s * geometry.C + channel;\n"
            "        merge_moments(m, q, n, partial_mean[at], partial_m2[at], partial_count[at]);\n"
            "      }\n"
            "      partial_mean[channel] = m;\n      partial_m2[channel] = q;\n      partial_count[channel] = n;\n"
            "    }\n"
            "    if (channel == 0 && split == 0 && counter != nullptr)"),
           (KERNELS, "  args.splits = plan.splits;",
            "  args.splits = !g.channels_last ? 1 : plan.splits;")],
          ["test_emulation.py::test_bitwise_identical_in_any_block_and_thread_order"]),
    Fault("misaligned-vector-access", "16-byte vectors are chosen without checking the pointers' alignment",
          [(KERNELS, "    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;", "    (void)p;")],
          ["test_emulation.py::test_misaligned_storage"], variant="asan"),
    Fault("32-bit-offset-overflow", "the channels-first cursor's offset is computed in 32 bits",
          [(KERNELS, "    return image_ * image_stride + vector_ * vec;",
            "    return static_cast<int>(image_ * image_stride + vector_ * vec);")],
          ["test_emulation.py::test_offsets_past_two_to_the_31"]),
    Fault("empty-batch-shift-read", "the staged moments kernel reads each channel's shift K on an empty batch "
          "(issue 39's first attempt: a null input pointer)",
          [(KERNELS, "owns && has_images ? moments_shift<acc_t>(", "owns ? moments_shift<acc_t>(")],
          ["test_emulation.py::test_empty_batch_on_staged_planes"]),
    # The traffic guard (tests/test_traffic.py): correct results, wasted bandwidth. The parity tests
    # named in `passes` must still pass, so only the guard can see these.
    Fault("channels-last-strided-walk", "the channels-last element pass maps a warp's lanes down rows "
          "(addresses C elements apart) instead of across channels",
          [(KERNELS, "  const auto [columns, column, begin, end, row_step] = ChannelsLastShare(geometry, kVec, rows_per_split);\n"
                     "  int64_t row = begin + threadIdx.y;\n  if (column >= columns || row >= end) return;",
            "  const auto [columns, column_across, begin, end, row_step] = ChannelsLastShare(geometry, kVec, rows_per_split);\n"
            "  (void)column_across;\n"
            "  const int64_t linear = threadIdx.y * blockDim.x + threadIdx.x;\n"
            "  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + linear / blockDim.y;\n"
            "  int64_t row = begin + linear % blockDim.y;\n  if (column >= columns || row >= end) return;")],
          ["test_traffic.py::test_sector_efficiency_and_passes"],
          passes=["test_parity.py::test_parity_grid"]),
    Fault("forward-reads-x-again", "the training forward runs its moments pass twice (x read three times)",
          [(KERNELS, "    err = launch_moments(g, plan, p.input, p.num_batches_tracked, ws, stream);",
            "    err = launch_moments(g, plan, p.input, p.num_batches_tracked, ws, stream);\n"
            "    if (err == cudaSuccess) err = launch_moments(g, plan, p.input, p.num_batches_tracked, ws, stream);")],
          ["test_traffic.py::test_sector_efficiency_and_passes"],
          passes=["test_parity.py::test_parity_grid"]),
    Fault("silu-derivative-sign", "SiLU's derivative adds σ where it subtracts it (one activation's backward, shared file)",
          [("common/activation.h", "return g * sigmoid * (one + u * (one - sigmoid));",
            "return g * sigmoid * (one + u * (one + sigmoid));")],
          ["test_activations.py::test_parity_with_nn_composite"]),
]


def asan_preload():
    """The ASan runtime first, and libstdc++ with it (Python is not C++: without
    it ASan cannot intercept __cxa_throw and aborts at the first C++ exception)."""
    def lib(name):
        return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return f"{lib('libasan.so')} {lib('libstdc++.so')}"


def run_fault(fault, keep):
    work = Path(os.environ.get("FUSED_BN_PLANTED_DIR", ROOT / "build" / "planted")) / fault.name
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(ROOT / "csrc", work / "csrc")
    for file, old, new in fault.edits:
        if file == KERNELS:
            holders = [f for f in KERNEL_LAYER_FILES if old in (work / "csrc" / f).read_text()]
            if len(holders) != 1:
                raise SystemExit(f"{fault.name}: the text to patch is in {len(holders)} kernel-layer files")
            file = holders[0]
        path = work / "csrc" / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{fault.name}: the text to patch occurs {text.count(old)} times in {file}")
        path.write_text(text.replace(old, new))
    env = dict(os.environ, FUSED_BN_EMULATED_CUDA="1", FUSED_BN_EMULATION_CSRC=str(work / "csrc"),
               FUSED_BN_EMULATION_BUILD=str(work / "build"), FUSED_BN_EMULATION_VARIANT=fault.variant)
    env.pop("FUSED_BN_EMULATION_COVERAGE", None)
    if fault.variant == "asan":
        env["LD_PRELOAD"] = asan_preload()
        env["ASAN_OPTIONS"] = "detect_leaks=0"
    # --capture=sys: a sanitizer report or a crash goes to the real stderr (fd capture loses it).
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "--capture=sys", "-p", "no:cacheprovider", "-m", "slow or not slow",
           *fault.tests]
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT / "tests", env=env, capture_output=True, text=True)
    elapsed = time.time() - start
    output = result.stdout + result.stderr
    evidence = next((line for line in output.splitlines()
                     if "ERROR: AddressSanitizer" in line or "runtime error:" in line
                     or "CUDA error (emulated GPU)" in line
                     or line.startswith("Fatal Python error") or line.startswith("E ")
                     or line.startswith("FAILED")), "")
    if not evidence and result.returncode < 0:
        evidence = f"the test process died of signal {-result.returncode}"
    still_passing = True
    if fault.passes and result.returncode != 0:
        # A traffic-only fault: the results stay right, so these must pass.
        check = subprocess.run([*cmd[:-len(fault.tests)], *fault.passes], cwd=ROOT / "tests", env=env,
                               capture_output=True, text=True)
        still_passing = check.returncode == 0
        output += check.stdout + check.stderr
        evidence = f"[{' '.join(fault.passes)}: {'pass' if still_passing else 'FAIL'}] {evidence.strip()}"
        elapsed = time.time() - start
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    caught = result.returncode != 0 and "Error building extension" not in output and still_passing
    if fault.variant == "asan":  # only a sanitizer's report counts as caught there
        caught = caught and ("ERROR: AddressSanitizer" in output or "runtime error:" in output)
    return caught, evidence.strip()[:160], elapsed, output


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("faults", nargs="*", help="names (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep build/planted/<fault>/")
    parser.add_argument("--verbose", action="store_true", help="print each run's pytest output")
    args = parser.parse_args()
    chosen = [f for f in FAULTS if not args.faults or f.name in args.faults]
    missed = []
    print(f"{'fault':38} {'caught':6} {'time':>6}  by / evidence")
    for fault in chosen:
        caught, evidence, elapsed, output = run_fault(fault, args.keep)
        if args.verbose:
            print(output)
        print(f"{fault.name:38} {'yes' if caught else 'NO':6} {elapsed:5.0f}s  {' '.join(fault.tests)}\n"
              f"{'':53}{evidence}", flush=True)
        if not caught:
            missed.append(fault.name)
    if missed:
        raise SystemExit(f"not caught: {', '.join(missed)}")


if __name__ == "__main__":
    main()
