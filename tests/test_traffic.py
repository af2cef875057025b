"""Regression guard for the CUDA kernels' global-memory traffic, measured on
the emulated GPU (tests/emulated_cuda.py's traffic(), tests/_traffic.py):
every hot kernel coalesces its element accesses into full 32-byte sectors
(>= 90% of the sector bytes asked for) on shapes whose rows are whole 16-byte
vectors, and every op moves the passes over each tensor that bench/NOTES.md
says it does ("Figures": training forward reads x twice and writes y;
backward reads x and dy twice each and writes dx; eval reads x and writes y;
the epilogue and data-parallel tables of issue 26), on a small grid and on
an H100/H200-sized one (132 multiprocessors). Runs in the emulated pass of
``make test`` (FUSED_BN_EMULATED_CUDA=1); tools/planted_faults.py plants a
strided channels-last pass and an extra read of x, which it must catch."""
import pytest
import torch

from _traffic import is_hot, sector_efficiency, short_name, tensor_passes
from conftest import EMULATED_CUDA

pytestmark = pytest.mark.skipif(not EMULATED_CUDA, reason="runs in the emulated-GPU pass (FUSED_BN_EMULATED_CUDA=1)")

if EMULATED_CUDA:
    import emulated_cuda

ops = torch.ops.fused_bn

# Rows of whole 16-byte vectors in both layouts for float32 and bfloat16
# (NCHW: H*W a multiple of 8; channels_last: C a multiple of 8); planes and
# rows of 64 bytes and more, so full sectors are possible.
SHAPES = [(4, 16, 8, 8), (2, 24, 12, 12), (3, 64, 4, 4)]
LAYOUTS = ["nchw", "channels_last"]
DTYPES = [torch.float32, torch.bfloat16]
GRIDS = [4, 132]
MIN_SECTOR_EFFICIENCY = 0.9
# Passes (distinct bytes per launch): per-channel values add a little on
# these small shapes (the finalize kernel reads each channel's first x, the
# moments' shift: 1/(N*H*W) of a pass, 0.02 at 3x64x4x4).
PASS_TOLERANCE = 0.05
# Bytes asked add what is re-read inside a launch: every warp of the
# channels-last moments kernel loads row 0 again for its channels' shift (one
# request per warp: 0.19 of a pass at 3x64x4x4's 48 rows, under 0.04 from 128
# rows). One pass more, or a pass re-read inside a kernel, is what the guard
# must see.
ASKED_TOLERANCE = 0.25


def make(shape, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def params(C, dtype):
    pdtype = torch.float32 if dtype == torch.bfloat16 else dtype
    return torch.rand(C, dtype=pdtype) + 0.5, torch.randn(C, dtype=pdtype)


def record(fn):
    with emulated_cuda.traffic() as t:
        out = fn()
    assert t.launches, "no kernel ran on the emulated GPU"
    assert not any(launch["failed"] for launch in t.launches)
    return t.launches, out


# Expected passes per op, read and written, over each input-sized tensor
# (bench/NOTES.md). A tensor not named is neither read nor written.
def run_op(op, x, layout, dtype):
    C = x.shape[1]
    w, b = params(C, dtype)
    dy = make(x.shape, layout, dtype, seed=1)
    z = make(x.shape, layout, dtype, seed=2)
    rm, rv = torch.zeros(C, dtype=w.dtype), torch.ones(C, dtype=w.dtype)
    y, mean, invstd = ops.batch_norm_train(x, w, b, rm.clone(), rv.clone(), None, 0.1, 1e-5)
    if op == "train_forward":
        launches, (y, _, _) = record(lambda: ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, 1e-5))
        return launches, {"x": x, "y": y}, {"x": (2, 0), "y": (0, 1)}
    if op == "train_forward_add_relu":
        launches, (y, _, _) = record(lambda: ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, 1e-5, "relu", [], z))
        return launches, {"x": x, "z": z, "y": y}, {"x": (2, 0), "z": (1, 0), "y": (0, 1)}
    if op == "eval_forward":
        launches, y = record(lambda: ops.batch_norm_eval(x, w, b, rm, rv, 1e-5))
        return launches, {"x": x, "y": y}, {"x": (1, 0), "y": (0, 1)}
    if op == "backward":
        launches, (dx, _, _, _) = record(lambda: ops.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5,
                                                                           [True, True, True]))
        return launches, {"x": x, "dy": dy, "dx": dx}, {"x": (2, 0), "dy": (2, 0), "dx": (0, 1)}
    if op == "backward_params_only":
        launches, _ = record(lambda: ops.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5,
                                                               [False, True, True]))
        return launches, {"x": x, "dy": dy}, {"x": (1, 0), "dy": (1, 0)}
    if op == "backward_relu":
        launches, (dx, _, _, _) = record(lambda: ops.batch_norm_backward(dy, x, w, mean, invstd, True, 1e-5,
                                                                           [True, True, True], b, "relu"))
        return launches, {"x": x, "dy": dy, "dx": dx}, {"x": (2, 0), "dy": (2, 0), "dx": (0, 1)}
    if op == "backward_add_relu":
        # g = relu'(u)·dy, u recomputed from x and z: the reduction pass reads
        # dy, x, z and writes dz = g; the dx pass reads dz and x.
        launches, (dx, _, _, dz) = record(lambda: ops.batch_norm_backward(
            dy, x, w, mean, invstd, True, 1e-5, [True, True, True], b, "relu", [], z))
        return launches, {"x": x, "dy": dy, "z": z, "dx": dx, "dz": dz}, {
            "x": (2, 0), "dy": (1, 0), "z": (1, 0), "dx": (0, 1), "dz": (1, 1)}
    if op in ("backward_relu_output", "backward_add_relu_output"):
        # g = relu'(y)·dy read off the forward's output (kOutput, what autograd
        # saves for relu with or without the add): the reduction pass reads dy,
        # x, y and writes g (grad_residual); the dx pass reads g and x.
        residual = z if op == "backward_add_relu_output" else None
        y, _, _ = ops.batch_norm_train(x, w, b, rm.clone(), rv.clone(), None, 0.1, 1e-5, "relu", [], residual)
        launches, (dx, _, _, g) = record(lambda: ops.batch_norm_backward(
            dy, x, w, mean, invstd, True, 1e-5, [True, True, True], b, "relu", [], None, y))
        return launches, {"x": x, "dy": dy, "y": y, "dx": dx, "g": g}, {
            "x": (2, 0), "dy": (1, 0), "y": (1, 0), "dx": (0, 1), "g": (1, 1)}
    if op == "eval_backward":
        launches, (dx, _, _, _) = record(lambda: ops.batch_norm_backward(dy, x, w, rm, invstd, False, 1e-5,
                                                                           [True, False, False]))
        return launches, {"x": x, "dy": dy, "dx": dx}, {"dy": (1, 0), "dx": (0, 1)}
    if op == "eval_backward_relu":
        launches, (dx, _, _, _) = record(lambda: ops.batch_norm_backward(
            dy, x, w, rm, invstd, False, 1e-5, [True, False, False], b, "relu"))
        return launches, {"x": x, "dy": dy, "dx": dx}, {"x": (1, 0), "dy": (1, 0), "dx": (0, 1)}
    if op == "stats":
        launches, _ = record(lambda: ops.batch_norm_stats(x, w, b, rm, rv))
        return launches, {"x": x}, {"x": (1, 0)}
    if op == "train_with_stats":
        stats = ops.batch_norm_stats(x, w, b, rm, rv).unsqueeze(0)
        launches, (y, _, _) = record(lambda: ops.batch_norm_train_with_stats(x, w, b, rm, rv, None, 0.1, 1e-5, stats))
        return launches, {"x": x, "y": y}, {"x": (1, 0), "y": (0, 1)}
    if op == "backward_sums":
        launches, _ = record(lambda: ops.batch_norm_backward_sums(dy, x, w, mean, invstd, [True, True]))
        return launches, {"x": x, "dy": dy}, {"x": (1, 0), "dy": (1, 0)}
    if op == "backward_with_sums":
        sums = ops.batch_norm_backward_sums(dy, x, w, mean, invstd, [True, True])[0]
        count = torch.tensor([float(x.numel() // C)], dtype=torch.float64)
        launches, dx = record(lambda: ops.batch_norm_backward_with_sums(dy, x, w, mean, invstd, sums, count))
        return launches, {"x": x, "dy": dy, "dx": dx}, {"x": (1, 0), "dy": (1, 0), "dx": (0, 1)}
    raise AssertionError(op)


OPS = ["train_forward", "train_forward_add_relu", "eval_forward", "backward", "backward_params_only",
       "backward_relu", "backward_add_relu", "eval_backward", "eval_backward_relu", "stats", "train_with_stats",
       "backward_sums", "backward_with_sums"]


@pytest.fixture
def grid(request):
    yield
    emulated_cuda.configure(4, "forward", 0)


def check_op(op, shape, layout, dtype, multiprocessors):
    emulated_cuda.configure(multiprocessors, "forward", 0)
    x = make(shape, layout, dtype)
    launches, tensors, expected = run_op(op, x, layout, dtype)
    problems = []
    for launch in launches:
        if not is_hot(launch):
            continue
        eff = sector_efficiency(launch)
        if eff is not None and eff < MIN_SECTOR_EFFICIENCY:
            problems.append(f"{short_name(launch['kernel'])}: sector efficiency {eff:.1%} "
                            f"(grid {launch['grid']}, block {launch['block']})")
    passes = tensor_passes(launches, tensors)
    for name in tensors:
        reads, writes = expected.get(name, (0, 0))
        got = passes[name]
        for key, want in (("read", reads), ("read_asked", reads), ("write", writes), ("write_asked", writes)):
            if abs(got[key] - want) > (ASKED_TOLERANCE if key.endswith("asked") else PASS_TOLERANCE):
                problems.append(f"{name}: {got[key]:.3f} {key.replace('_', ' ')} passes, NOTES says {want}")
    return problems, launches


@pytest.mark.parametrize("multiprocessors", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_sector_efficiency_and_passes(op, layout, dtype, multiprocessors, grid):
    problems = []
    for shape in SHAPES:
        found, _ = check_op(op, shape, layout, dtype, multiprocessors)
        problems += [f"{shape}: {p}" for p in found]
    assert not problems, "\n".join(problems)


def test_recording_is_off_by_default_and_counts_one_copy_exactly(grid):
    """Outside traffic() nothing is recorded; inside, an eval forward of a
    float32 NCHW tensor whose planes are whole 128-byte lines reads x once
    and writes y once, each warp request 32 lanes x 16 bytes: 16 sectors,
    4 lines."""
    emulated_cuda.configure(4, "forward", 0)
    x = make((2, 4, 16, 16), "nchw", torch.float32)
    w, b = params(4, torch.float32)
    rm, rv = torch.zeros(4), torch.ones(4)
    ops.batch_norm_eval(x, w, b, rm, rv, 1e-5)
    with emulated_cuda.traffic() as t:
        pass
    assert t.launches == []
    with emulated_cuda.traffic() as t:
        y = ops.batch_norm_eval(x, w, b, rm, rv, 1e-5)
    normalize = [launch for launch in t.launches if "normalize" in launch["kernel"]]
    assert len(normalize) == 1
    sites = [s for s in normalize[0]["sites"] if s["element"]]
    assert {s["store"] for s in sites} == {False, True}
    for s in sites:
        assert s["unique_bytes"] == x.numel() * 4
        assert s["requests"] == x.numel() * 4 // 512
        assert s["sectors"] == s["requests"] * 16
        if (x.data_ptr() if not s["store"] else y.data_ptr()) % 128 == 0:
            assert s["lines"] == s["requests"] * 4
    passes = tensor_passes(t.launches, {"x": x, "y": y})
    assert passes["x"]["read"] == pytest.approx(1.0) and passes["x"]["write"] == 0
    assert passes["y"]["write"] == pytest.approx(1.0) and passes["y"]["read"] == 0


# Issue 39's fixes, each with the guard as its regression test.
#
# NCHW planes that are not whole 16-byte vectors (7x7 float32 and bfloat16,
# 14x14 bfloat16, primes) run on scalar accesses; a block per channel had
# each warp straddle the end of one image's plane and the start of the
# next's, C*H*W elements away (at batch 64, 7x7 float32: 74% of the sector
# bytes used, bfloat16 57%). The element passes now walk the flattened
# tensor (traversals.cuh, flat_element_pass), the reductions (moments, grad
# sums of dy and x) stage 8 channels' planes through shared memory
# (staged_planes_pass): whole sectors. Small runs leave some partial sectors
# (3x4x1x31 bfloat16: 86%), so the shapes here have 8 channels or more per
# block, as ResNet's do.
UNALIGNED_SHAPES = [(4, 8, 7, 7), (2, 8, 14, 14), (3, 8, 1, 31)]


@pytest.mark.parametrize("multiprocessors", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["train_forward", "eval_forward", "backward", "eval_backward_relu", "stats",
                                "backward_sums"])
def test_unaligned_nchw_planes_read_whole_sectors(op, dtype, multiprocessors, grid):
    emulated_cuda.configure(multiprocessors, "forward", 0)
    problems = []
    for shape in UNALIGNED_SHAPES:
        x = make(shape, "nchw", dtype)
        launches, _, _ = run_op(op, x, "nchw", dtype)
        hot = [launch for launch in launches if is_hot(launch)]
        assert hot, f"{shape}: no hot kernel ran"
        for launch in hot:
            eff = sector_efficiency(launch)
            if eff < MIN_SECTOR_EFFICIENCY:
                problems.append(f"{shape}: {short_name(launch['kernel'])}: sector efficiency {eff:.1%} "
                                f"(grid {launch['grid']}, block {launch['block']})")
    assert not problems, "\n".join(problems)


# The grad sums of the sources that read a third tensor and write g (the
# add+ReLU epilogue's kInputAndResidual: dy, x, z; kOutput: dy, x, y, what
# autograd saves for relu with or without the add) took the per-channel
# kernel on these planes (7x7 float32 73.7%, bfloat16 55-60%); they now stage
# the third tensor too and store g from the shared tile through the loads'
# 32-element windows: whole sectors, and the passes of the epilogue table.
@pytest.mark.parametrize("multiprocessors", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["backward_add_relu", "backward_relu_output", "backward_add_relu_output"])
def test_unaligned_nchw_planes_epilogue_backward(op, dtype, multiprocessors, grid):
    problems = []
    for shape in UNALIGNED_SHAPES:
        found, launches = check_op(op, shape, "nchw", dtype, multiprocessors)
        staged = shape[2] * shape[3] % (16 // torch.empty(0, dtype=dtype).element_size()) != 0
        if staged and not any("staged_grad_sums" in launch["kernel"] for launch in launches):
            problems.append(f"{shape}: the grad sums did not take staged_grad_sums_kernel")
        problems += [f"{shape}: {p}" for p in found]
    assert not problems, "\n".join(problems)


# Grids fill whole waves (launch.cuh, wave_filling_split): on ResNet-50's
# NCHW shapes at batch 64 on 132 multiprocessors the grid of (C, splits)
# blocks took 1.09 (C = 64 at 56x56), 1.21 (C = 128 at 56x56) and 1.45
# (C = 256 at 28x28) waves, the last wave mostly idle; every hot launch's
# blocks now fill at least 90% of the waves they take. Block sampling (the
# addresses, not the results, are what is looked at) keeps this to seconds.
WAVE_SHAPES = [(64, 64, 56, 56), (64, 128, 56, 56), (64, 256, 28, 28)]
MIN_WAVE_FILL = 0.9


def wave_fill(launch, multiprocessors=132, resident_threads=1024):
    blocks = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
    threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
    wave = multiprocessors * max(1, resident_threads // threads)
    return blocks / (-(-blocks // wave) * wave), blocks / wave


def sampled_launches(op, x):
    """The launches of a training forward or a backward of x (zeros: the
    addresses, not the results, are what is looked at), every 256th block
    sampled to keep the big grids to seconds."""
    C = x.shape[1]
    w, b = params(C, x.dtype)
    # The running statistics of the forward; the saved mean and invstd of the backward.
    zeros, ones = torch.zeros(C, dtype=w.dtype), torch.ones(C, dtype=w.dtype)
    with emulated_cuda.traffic(every_kth_block=256) as t:
        if op == "train_forward":
            ops.batch_norm_train(x, w, b, zeros, ones, None, 0.1, 1e-5)
        else:
            ops.batch_norm_backward(torch.zeros_like(x), x, w, zeros, ones, True, 1e-5, [True, True, True])
    return t.launches


@pytest.mark.parametrize("op", ["train_forward", "backward"])
def test_resnet_nchw_grids_fill_whole_waves(op, grid):
    emulated_cuda.configure(132, "forward", 0)
    problems = []
    for shape in WAVE_SHAPES:
        hot = [launch for launch in sampled_launches(op, torch.zeros(shape)) if is_hot(launch)]
        assert len(hot) == 2
        for launch in hot:
            fill, waves = wave_fill(launch)
            if fill < MIN_WAVE_FILL:
                problems.append(f"{shape}: {short_name(launch['kernel'])}: {waves:.2f} waves, the last "
                                f"{fill:.0%} full (grid {launch['grid']}, block {launch['block']})")
    assert not problems, "\n".join(problems)


# Issue 39: the channels-last reductions (moments, grad sums) on ResNet-50's
# shapes at batch 64 on 132 multiprocessors took as little as 0.19 of a wave
# (float32 512x7x7: 100 blocks; bfloat16 256x14x14: 98), each thread held to
# kUnroll * kMinIterationsPerThread rows; launch.cuh's
# channels_last_reduction_plan lets a thread go down to two rows and blocks
# narrow to 8 vector columns where the grid would fill less than a wave. Every
# such launch now fills at least 90% of its waves, but bfloat16 512x7x7: 64
# vector columns x 3136 rows are 1.5 rows a thread for one wave of 256-thread
# blocks, so 2 rows (0.74 of a wave) is what whole rows allow (it took 0.09).
CHANNELS_LAST_WAVE_SHAPES = [(64, 64, 56, 56), (64, 128, 28, 28), (64, 512, 28, 28), (64, 256, 28, 28),
                             (64, 256, 14, 14), (64, 1024, 14, 14), (64, 512, 14, 14), (64, 512, 7, 7),
                             (64, 2048, 7, 7)]
GEOMETRY_BOUND_FILL = {(torch.bfloat16, (64, 512, 7, 7)): 0.7}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["train_forward", "backward"])
def test_resnet_channels_last_reductions_fill_a_wave(op, dtype, grid):
    emulated_cuda.configure(132, "forward", 0)
    problems = []
    for shape in CHANNELS_LAST_WAVE_SHAPES:
        x = torch.zeros(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        launches = sampled_launches(op, x)
        reductions = [launch for launch in launches if is_hot(launch) and
                      ("channels_last_moments" in launch["kernel"] or "channels_last_grad_sums" in launch["kernel"])]
        assert len(reductions) == 1, [launch["kernel"] for launch in launches]
        fill, waves = wave_fill(reductions[0])
        want = GEOMETRY_BOUND_FILL.get((dtype, shape), MIN_WAVE_FILL)
        if fill < want:
            problems.append(f"{shape}: {short_name(reductions[0]['kernel'])}: {waves:.2f} waves, the last "
                            f"{fill:.0%} full (grid {reductions[0]['grid']}, block {reductions[0]['block']})")
    assert not problems, "\n".join(problems)
