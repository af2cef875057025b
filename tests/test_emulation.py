"""The emulated GPU itself (tests/emulated_cuda.py, csrc/cuda/emulation/): its
checks catch what a GPU leaves undefined, its warp and block built-ins compute
what a GPU computes, and fused_bn's ops really run our CUDA kernels under it.
Runs in the emulated pass of ``make test`` (FUSED_BN_EMULATED_CUDA=1)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fused_bn
from _helpers import CL, sample
from conftest import EMULATED_CUDA

pytestmark = pytest.mark.skipif(not EMULATED_CUDA, reason="runs in the emulated-GPU pass (FUSED_BN_EMULATED_CUDA=1)")

if EMULATED_CUDA:
    import emulated_cuda


def self_test(case):
    return torch.ops.fused_bn_emulation.self_test(case)


@pytest.fixture
def restore_device():
    yield
    emulated_cuda.configure(4, "forward", 0)


@pytest.mark.parametrize("case,message", [
    ("barrier_in_branch", "barrier_in_branch_kernel.*__syncthreads at .* is not reached by every thread"),
    ("two_barriers", "two_barriers_kernel.*threads wait at different barriers"),
    ("partial_warp_shuffle", "partial_warp_shuffle_kernel.*has only 16 threads \\(a full-mask shuffle in a partial"),
    ("skipped_shuffle", "skipped_shuffle_kernel.*is not reached by lane 5 of warp 0"),
    ("over_launch_bounds", "with_barrier_kernel.*64 threads over the limit of 32 \\(__launch_bounds__\\)"),
    ("over_1024_threads", "with_barrier_kernel.*1088 threads over the limit of 1024"),
    ("grid_y_over_65535", "block_index_kernel.*grid \\(1, 65536, 1\\) over the limits"),
])
def test_checks_fail_the_launch_with_the_kernels_name(case, message):
    with pytest.raises(RuntimeError, match="CUDA error \\(emulated GPU\\): cudaError"):
        self_test(case)
    with pytest.raises(RuntimeError, match=message):
        self_test(case)


def test_missing_barrier_changes_the_result(restore_device):
    """Threads run between two barriers in the configured order: without the
    barrier, a read of another thread's shared entry sees a stale value in
    one order or the other."""
    expected = torch.arange(64, 0, -1, dtype=torch.float32)
    results = []
    for order in ("forward", "reverse", "shuffle"):
        emulated_cuda.configure(4, order, 7)
        torch.testing.assert_close(self_test("with_barrier")[:64], expected, rtol=0, atol=0)
        results.append(self_test("missing_barrier")[:64])
    assert any(not torch.equal(r, expected) for r in results)


def test_block_order_dependence_shows(restore_device):
    """A kernel whose blocks depend on running in index order gives other
    results in reverse or shuffled order."""
    emulated_cuda.configure(4, "forward", 0)
    forward = self_test("block_order_dependent")[:64]
    torch.testing.assert_close(forward, torch.arange(1, 65, dtype=torch.float32), rtol=0, atol=0)
    for order in ("reverse", "shuffle"):
        emulated_cuda.configure(4, order, 3)
        assert not torch.equal(self_test("block_order_dependent")[:64], forward)


def test_shuffles_and_indices_compute_what_a_gpu_does():
    out = self_test("shuffle_sum").view(64, 5)
    lane = torch.arange(64) % 32
    warp_sums = torch.tensor([sum(range(32)), sum(range(32, 64))], dtype=torch.float32)
    torch.testing.assert_close(out[[0, 32], 0], warp_sums, rtol=0, atol=0)
    assert torch.all(out[:, 1] == sum(range(32)))
    torch.testing.assert_close(out[:, 2], torch.where(lane == 0, torch.arange(64), torch.arange(64) - 1).float(),
                               rtol=0, atol=0)
    torch.testing.assert_close(out[:, 3], (torch.arange(64) // 32 * 32 + 3).float(), rtol=0, atol=0)
    # width 8: lanes 6 and 7 of each 8-lane segment keep their own value
    own = torch.arange(64) + 0.5
    wide = torch.where(lane % 8 < 6, own + 2, own).float()
    torch.testing.assert_close(out[:, 4], wide, rtol=0, atol=0)
    grid = self_test("block_index")[:32].view(4, 8)
    torch.testing.assert_close(grid, (torch.arange(8) + 100 * torch.arange(4).view(4, 1)).float(), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ops_run_the_emulated_kernels(training):
    """fused_bn's ops on CPU tensors go through our CUDA kernels here: each
    forward and backward launches emulated kernels."""
    x = sample((4, 6, 5, 7)).requires_grad_()
    m = fused_bn.FusedBatchNorm2d(6).train(training)
    before = emulated_cuda.launch_count()
    y = m(x)
    after_forward = emulated_cuda.launch_count()
    y.backward(torch.randn_like(y))
    # moments, finalize, normalize / the eval coefficients, normalize (the
    # per-channel eval math in its own launch: per thread it made the
    # activations' normalize kernels spill)
    assert after_forward - before == (3 if training else 2)
    assert emulated_cuda.launch_count() - after_forward == 3  # sums, finalize, dx


# (4, 3, 96, 96) splits each channel over blocks at 2 multiprocessors.
SHAPES = [(6, 10, 9, 7), (3, 64, 4, 4), (40, 5, 1, 1), (2, 16, 33, 33), (4, 3, 96, 96)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bitwise_identical_in_any_block_and_thread_order(shape, dtype, layout, restore_device):
    """Our kernels promise determinism for a given multiprocessor count: no
    result may depend on the order in which blocks, or threads between two
    barriers, run."""
    x = sample(shape, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    gy = torch.randn(shape).to(dtype)
    for multiprocessors in (2, 132):
        results = []
        for order, seed in (("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)):
            emulated_cuda.configure(multiprocessors, order, seed)
            m = fused_bn.FusedBatchNorm2d(shape[1], momentum=None).to(dtype)
            xr = x.clone().requires_grad_()
            y = m(xr)
            y.backward(gy)
            results.append((y, xr.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a.detach(), b.detach())


@pytest.mark.slow
def test_offsets_past_two_to_the_31(restore_device):
    """A tensor of more than 2^31 elements (bfloat16, 4.3 GB in and out): every
    element offset is 64-bit. Each image is one constant, so the check is cheap;
    a wrapped 32-bit offset writes elsewhere (or outside the tensor). Planes of
    whole 16-byte vectors, so the channels-first cursor's path runs (a plane
    that is not, 32768x32769 before issue 39, now walks the flattened tensor,
    whose index is 64-bit too)."""
    shape = (2, 1, 32768, 32776)
    assert shape[0] * shape[2] * shape[3] > 2 ** 31
    emulated_cuda.configure(132, "forward", 0)
    x = torch.empty(shape, dtype=torch.bfloat16)
    x[0].fill_(1.0)
    x[1].fill_(-2.0)
    m = fused_bn.FusedBatchNorm2d(1).to(torch.bfloat16).eval()
    m.running_mean.fill_(0.5)
    with torch.no_grad():
        y = m(x)
    del x
    for image, expected in ((0, 0.5), (1, -2.5)):
        assert torch.count_nonzero(y[image] != expected).item() == 0


def test_zero_channels_count_the_batch():
    """C = 0 (where nn itself raises an IndexError): nothing to normalize, the
    counter still counts the batch (one one-thread launch), as our CPU kernels do."""
    x = torch.randn(2, 0, 3, 3)
    ours = fused_bn.FusedBatchNorm2d(0)
    before = emulated_cuda.launch_count()
    y = ours(x)
    assert emulated_cuda.launch_count() - before == 1
    emulated_cuda.enable(False)
    try:
        cpu = fused_bn.FusedBatchNorm2d(0)
        y_cpu = cpu(x)
    finally:
        emulated_cuda.enable(True)
    assert y.shape == y_cpu.shape == x.shape
    assert ours.num_batches_tracked.item() == cpu.num_batches_tracked.item() == 1
    before = emulated_cuda.launch_count()
    fused_bn.FusedBatchNorm2d(0, track_running_stats=False)(x)
    assert emulated_cuda.launch_count() == before


# An empty batch (N = 0) whose planes take the staged moments kernel (at
# most 256 elements, not whole 16-byte vectors: traversals.cuh,
# uses_staged_planes). The training forward and batch_norm_stats still launch
# the moments pass (for the counter snapshot); its input is empty, a null data
# pointer, and the staged kernel read each channel's shift K from it: a
# segfault (issue 39's first attempt, b52946d; hypothesis drew (0, 65, 5, 3)
# bfloat16 in test_properties.py::test_module_matches_nn). It runs in a child
# process, so that a crash fails this test with the shape instead of ending
# the session.
EMPTY_STAGED_CASE = textwrap.dedent("""
    import sys
    import torch
    import fused_bn
    import emulated_cuda

    emulated_cuda.build(sys.argv[1])
    emulated_cuda.enable(True)
    ops = torch.ops.fused_bn
    for shape, dtype in [((0, 65, 5, 3), torch.bfloat16), ((0, 3, 5, 5), torch.float32),
                         ((0, 8, 7, 7), torch.float64), ((0, 5, 1, 3), torch.float16)]:
        print("shape", shape, dtype, flush=True)
        C = shape[1]
        x = torch.empty(shape, dtype=dtype)
        with emulated_cuda.traffic() as t:
            m = fused_bn.FusedBatchNorm2d(C).to(dtype)
            before = {k: v.clone() for k, v in m.state_dict().items()}
            xr = x.clone().requires_grad_()
            y = m(xr)
            y.backward(torch.empty_like(y))
            stats = ops.batch_norm_stats(x, None, None, None, None)
        assert any("staged_moments_kernel" in l["kernel"] for l in t.launches), [l["kernel"] for l in t.launches]
        assert y.shape == xr.grad.shape == shape
        assert torch.equal(m.weight.grad, torch.zeros(C, dtype=dtype))
        assert torch.equal(m.bias.grad, torch.zeros(C, dtype=dtype))
        assert torch.equal(m.running_mean, before["running_mean"])
        assert torch.equal(m.running_var, before["running_var"])
        assert int(m.num_batches_tracked) == 1
        assert torch.equal(stats, torch.zeros(C, 3, dtype=torch.float64)), stats
    print("done", flush=True)
""")


def test_empty_batch_on_staged_planes():
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests),
                                                       os.environ.get("PYTHONPATH", "")]))
    variant = os.environ.get("FUSED_BN_EMULATION_VARIANT", "default")
    result = subprocess.run([sys.executable, "-c", EMPTY_STAGED_CASE, variant], env=env, capture_output=True,
                            text=True, timeout=600)
    shapes = [line for line in result.stdout.splitlines() if line.startswith("shape")]
    assert result.returncode == 0 and "done" in result.stdout, (
        f"exit status {result.returncode} at {shapes[-1] if shapes else 'start'}\n{result.stderr[-3000:]}")


def test_two_values_per_channel_with_nonfinite_grad():
    """Two values per channel take the closed form only where everything is
    finite; an inf or NaN grad_output falls back to the general formula, whose
    NaN/inf pattern is nn's."""
    x = torch.tensor([1.0, 3.0, -2.0, 5.0, 0.5, 0.25]).view(1, 3, 1, 2)
    gy = torch.tensor([float("inf"), 1.0, float("nan"), 2.0, 1.0, -3.0]).view(1, 3, 1, 2)
    grads = []
    for m in (fused_bn.FusedBatchNorm2d(3), torch.nn.BatchNorm2d(3)):
        xr = x.clone().requires_grad_()
        m(xr).backward(gy)
        grads.append((xr.grad, m.weight.grad, m.bias.grad))
    for ours, ref in zip(*grads):
        assert torch.equal(torch.isnan(ours), torch.isnan(ref))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        finite = torch.isfinite(ref)
        torch.testing.assert_close(ours[finite], ref[finite])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_misaligned_storage(layout):
    """Dense tensors starting one element into their storage: no 16-byte
    vector access may be used on them (UBSan, in the sanitized pass, reports
    a misaligned one; a GPU faults)."""
    shape = (3, 8, 4, 8)
    numel = 3 * 8 * 4 * 8
    x = torch.randn(numel + 1)[1:]
    x = x.view(shape) if layout == "contiguous" else x.view(3, 4, 8, 8).permute(0, 3, 1, 2)
    gy = torch.randn(numel + 1)[1:].view(shape)
    assert x.data_ptr() % 16 != 0
    results = []
    for m in (fused_bn.FusedBatchNorm2d(8), torch.nn.BatchNorm2d(8)):
        xr = x.detach().requires_grad_()  # same storage, same offset
        y = m(xr)
        y.backward(gy)
        results.append((y, xr.grad, m.weight.grad, m.running_var))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
