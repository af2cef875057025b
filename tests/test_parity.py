"""Numerical parity of FusedBatchNorm1d/2d/3d / fused_bn.batch_norm with nn.BatchNorm1d/2d/3d /
F.batch_norm under the accuracy rule (tests/_accuracy.py): forward output, grad
input, grad weight, grad bias, running statistics and num_batches_tracked."""
import math

import pytest
import torch
import torch.nn.functional as F

import fused_bn
from conftest import EMULATED_CUDA
from _accuracy import assert_accurate
from _helpers import (BF16, BF16_AMP, CL, F16_AMP, F32, F64, LAYOUTS, PRECISIONS,
                      assert_bitwise_equal, check_step, compare_accurate, forward_backward, make_trio, run_parity,
                      sample, state_of)

SHAPES = [
    (4, 1, 6, 5),     # C = 1
    (1, 3, 5, 4),     # N = 1, H*W > 1
    (8, 3, 1, 1),     # H*W = 1, N > 1
    (3, 5, 7, 11),    # odd primes
    (2, 13, 1, 17),   # odd primes, H = 1
    (4, 8, 16, 16),   # vector-friendly
    (2, 40, 7, 9),    # many channels, not a multiple of the vector width
    (2, 3, 67, 71),   # H*W = 4757: planes larger than one reduction block
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("precision", PRECISIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_grid(device, shape, precision, layout):
    """3 training steps then an eval step: every quantity within the accuracy rule,
    dtypes and layouts as nn's, num_batches_tracked exact, input untouched."""
    run_parity(shape, precision, layout, device, train_steps=3, eval_steps=1)


# BatchNorm1d's (N, C) and (N, C, L) and BatchNorm3d's (N, C, D, H, W).
OTHER_RANK_SHAPES = [
    (8, 5),             # rows of channels
    (2, 7),             # two values per channel
    (1, 4, 6),          # N = 1
    (6, 3, 1),          # L = 1
    (5, 7, 11),         # odd primes
    (9, 1),             # C = 1
    (3, 1, 13),         # C = 1, a sequence
    (2, 3, 1, 4, 5),    # D = 1
    (1, 2, 3, 5, 7),    # N = 1, odd primes
    (3, 5, 2, 3, 7),    # odd primes
    (2, 1, 3, 4, 5),    # C = 1
    (4, 3, 1, 1, 1),    # D = H = W = 1
]


def _two_values_per_channel(shape):
    return math.prod(shape) // shape[1] == 2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,precision", [
    # In float64 the reference is nn itself, whose two-values grad_input is a
    # cancellation ~1e5 ulps off; ours is the closed form, checked against a
    # 50-digit evaluation for every rank in
    # test_properties.py::test_two_values_per_channel_float64_exact.
    (shape, precision) for shape in OTHER_RANK_SHAPES for precision in PRECISIONS
    if not (_two_values_per_channel(shape) and precision == F64)], ids=str)
def test_parity_grid_other_ranks(device, shape, precision, layout):
    """As test_parity_grid, for FusedBatchNorm1d and FusedBatchNorm3d against
    nn.BatchNorm1d and nn.BatchNorm3d (channels_last: channels_last_3d, or for
    (N, C, L) the memory of a transposed (N, L, C) tensor)."""
    run_parity(shape, precision, layout, device, train_steps=3, eval_steps=1)


# Larger inputs of the other ranks: MLP heads' (N, C) rows, few and wide or many
# and narrow, and a video clip's (N, C, D, H, W) in channels_last_3d.
LARGE_OTHER_RANKS = [
    pytest.param((256, 4096), F32, "contiguous", id="256x4096-f32"),
    pytest.param((4, 8192), F32, "contiguous", id="4x8192-f32"),
    pytest.param((30000, 3), F32, "contiguous", id="30000x3-f32"),
    pytest.param((512, 1000), BF16_AMP, "contiguous", id="512x1000-bf16"),
    pytest.param((64, 96, 50), F32, "channels_last", id="64x96x50-f32-transposed"),
    pytest.param((2, 16, 4, 28, 28), BF16_AMP, "channels_last", id="2x16x4x28x28-bf16-cl3d"),
    pytest.param((2, 16, 4, 28, 28), F32, "contiguous", id="2x16x4x28x28-f32"),
]


@pytest.mark.parametrize("shape,precision,layout", LARGE_OTHER_RANKS)
def test_parity_large_other_ranks(device, shape, precision, layout):
    run_parity(shape, precision, layout, device, train_steps=2, eval_steps=1)


@pytest.mark.parametrize("precision", [F32, BF16, F16_AMP], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_3d_preserved(device, precision, training):
    """channels_last_3d in -> channels_last_3d out (output and grad input)."""
    m = fused_bn.FusedBatchNorm3d(6).to(device, precision.param_dtype).train(training)
    x = sample((2, 6, 3, 5, 7), precision.input_dtype, device, layout="channels_last").requires_grad_()
    assert not x.is_contiguous()
    y = m(x)
    y.backward(sample((2, 6, 3, 5, 7), precision.input_dtype, device, layout="channels_last"))
    for t in (y, x.grad):
        assert t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()


@pytest.mark.parametrize("precision,layout", [
    (F32, "contiguous"), (F32, "channels_last"), (BF16_AMP, "channels_last")], ids=str)
def test_parity_large(device, precision, layout):
    run_parity((16, 64, 56, 56), precision, layout, device, train_steps=2, eval_steps=1)


# Over the CPU kernels' 16 MB cache-resident limit (kCacheResidentBytes): eval's
# streaming stores and the NCHW software prefetch. C = 37 and H*W = 151*151 leave
# rows and planes unaligned for streaming (the fallback path); 7x7 planes take the
# whole-plane prefetch; 56x56 planes the in-plane one.
DRAM_SIZED = [
    pytest.param((24, 64, 56, 56), F32, id="24x64x56x56-f32"),
    pytest.param((5, 37, 151, 151), F32, id="5x37x151x151-f32-unaligned"),
    pytest.param((180, 512, 7, 7), F32, id="180x512x7x7-f32"),
    pytest.param((48, 64, 56, 56), BF16_AMP, id="48x64x56x56-bf16"),
]

# Over the 4 MB limit (about 4.4-4.7 MB) above which training's forward and
# backward stream their outputs (kTrainingStreamBytes), in every dtype; C = 37 and
# 61x61 planes are unaligned for streaming, 64 channels and 32x32 planes aligned.
TRAINING_STREAMED = [
    pytest.param((8, 37, 61, 61), F32, id="8x37x61x61-f32-unaligned"),
    pytest.param((18, 64, 32, 32), F32, id="18x64x32x32-f32"),
    pytest.param((9, 64, 32, 32), F64, id="9x64x32x32-f64"),
    pytest.param((16, 37, 61, 61), BF16_AMP, id="16x37x61x61-bf16-unaligned"),
    pytest.param((36, 64, 32, 32), F16_AMP, id="36x64x32x32-f16"),
]


# NCHW planes of at most 1 KB over enough channels go by channel blocks
# (ChannelBlocking in the CPU kernels): several blocks with a shorter last one,
# plane tails read whole or (at the tensor's end) masked, one-element planes.
CHANNEL_BLOCKED = [
    pytest.param((64, 100, 7, 7), F32, id="64x100x7x7-f32"),
    pytest.param((16, 67, 1, 1), F32, id="16x67x1x1-f32"),
    pytest.param((9, 41, 14, 14), F16_AMP, id="9x41x14x14-f16"),
    pytest.param((5, 37, 3, 5), BF16_AMP, id="5x37x3x5-bf16"),
    pytest.param((4, 24, 7, 7), F64, id="4x24x7x7-f64"),
    # Over the streaming limit: float32/float64 runs go out through StagedRun,
    # starting anywhere within a cache line (37 channels of 7x7, 233 of 14x14).
    pytest.param((600, 37, 7, 7), F32, id="600x37x7x7-f32-staged"),
    pytest.param((24, 233, 14, 14), F32, id="24x233x14x14-f32-staged"),
    pytest.param((300, 37, 7, 7), F64, id="300x37x7x7-f64-staged"),
]


@pytest.mark.parametrize("shape,precision", CHANNEL_BLOCKED)
def test_parity_channel_blocked(device, shape, precision):
    run_parity(shape, precision, "contiguous", device, train_steps=2, eval_steps=1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,precision", TRAINING_STREAMED)
def test_parity_training_streamed(device, shape, precision, layout):
    run_parity(shape, precision, layout, device, train_steps=2, eval_steps=1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,precision", DRAM_SIZED)
def test_parity_dram_sized(device, shape, precision, layout):
    run_parity(shape, precision, layout, device, train_steps=1, eval_steps=1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("precision", [F32, BF16_AMP], ids=str)
@pytest.mark.parametrize("track_running_stats", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", [0.1, 0.9, None], ids=["m0.1", "m0.9", "mNone"])
def test_module_options(device, momentum, affine, track_running_stats, precision, layout):
    """Every momentum x affine x track_running_stats combination over 4 training
    steps, 2 eval steps (batch statistics when not tracking) and 2 more training
    steps (cumulative average continues across the eval phase)."""
    run_parity((4, 3, 5, 7), precision, layout, device, train_steps=4, eval_steps=2,
               train_after_eval=2, momentum=momentum, affine=affine,
               track_running_stats=track_running_stats)


def test_eps_is_honoured(device):
    run_parity((4, 3, 5, 7), F32, "contiguous", device, train_steps=2, eval_steps=1, eps=0.5,
               std=0.3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_amp_dtype_contract(device, dtype, training):
    """Low-precision input with an fp32 module: output and grad input in the input
    dtype, parameters, their grads and the running statistics stay fp32."""
    m = fused_bn.FusedBatchNorm2d(3).to(device).train(training)
    x = sample((2, 3, 4, 4), dtype, device).requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y))
    assert y.dtype == dtype and x.grad.dtype == dtype
    for t in (m.weight, m.bias, m.running_mean, m.running_var, m.weight.grad, m.bias.grad):
        assert t.dtype == torch.float32
    assert m.num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize("precision", [F32, BF16, F16_AMP], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_preserved(device, precision, training):
    """channels_last in -> channels_last out (output and grad input)."""
    m = fused_bn.FusedBatchNorm2d(6).to(device, precision.param_dtype).train(training)
    x = sample((2, 6, 5, 7), precision.input_dtype, device, layout="channels_last").requires_grad_()
    assert not x.is_contiguous()
    y = m(x)
    y.backward(sample((2, 6, 5, 7), precision.input_dtype, device, layout="channels_last"))
    assert y.is_contiguous(memory_format=CL), f"output strides {y.stride()}"
    assert x.grad.is_contiguous(memory_format=CL), f"grad input strides {x.grad.stride()}"
    # and contiguous in -> contiguous out
    x2 = sample((2, 6, 5, 7), precision.input_dtype, device).requires_grad_()
    y2 = m(x2)
    y2.backward(torch.ones_like(y2))
    assert y2.is_contiguous() and x2.grad.is_contiguous()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(device, training, layout):
    """N = 0: empty output, running statistics unchanged, counter incremented in
    training (as nn), zero parameter grads (as nn)."""
    ours, nn_bn, _ = make_trio(3, F32, device)
    before = state_of(ours)
    for m in (ours, nn_bn):
        m.train(training)
    x = sample((0, 3, 5, 4), torch.float32, device, layout=layout)
    gy = sample((0, 3, 5, 4), torch.float32, device, layout=layout)
    r_ours = forward_backward(ours, x, gy)
    r_nn = forward_backward(nn_bn, x, gy)
    for key in ("output", "grad_input"):
        assert r_ours[key].shape == r_nn[key].shape == (0, 3, 5, 4)
        assert r_ours[key].dtype == r_nn[key].dtype
    for key in ("grad_weight", "grad_bias"):
        assert_bitwise_equal(r_ours[key], r_nn[key], key)
        assert torch.equal(r_ours[key], torch.zeros_like(r_ours[key]))
    for key in ("running_mean", "running_var"):
        assert_bitwise_equal(getattr(ours, key), getattr(nn_bn, key), key)
        assert_bitwise_equal(getattr(ours, key), before[key], key + " changed")
    assert int(ours.num_batches_tracked) == int(nn_bn.num_batches_tracked) == int(before["num_batches_tracked"]) + int(training)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_propagation(device, training, layout):
    """A NaN in channel 1: in training that channel's outputs (and running stats)
    become NaN exactly where nn's do; other channels stay finite and accurate."""
    trio = make_trio(3, F32, device)
    for m in trio:
        m.train(training)
    x = sample((4, 3, 5, 6), torch.float32, device)
    x[2, 1, 3, 4] = float("nan")
    x = x.contiguous(memory_format=CL) if layout == "channels_last" else x
    gy = sample((4, 3, 5, 6), torch.float32, device, layout=layout)
    r_ours, _, _ = check_step(trio, x, gy, f"[NaN {layout} training={training}]")
    y = r_ours["output"]
    if training:
        assert bool(y[:, 1].isnan().all())
        assert bool(trio[0].running_mean[1].isnan()) and bool(trio[0].running_var[1].isnan())
    else:
        assert int(y[:, 1].isnan().sum()) == 1
    assert bool(y[:, [0, 2]].isfinite().all())
    assert bool(trio[0].running_mean[[0, 2]].isfinite().all())


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_eval_without_running_stats_uses_batch_stats(device, affine):
    trio = make_trio(3, F32, device, affine=affine, track_running_stats=False)
    for m in trio:
        m.eval()
    x = sample((4, 3, 5, 6), torch.float32, device)
    gy = sample((4, 3, 5, 6), torch.float32, device)
    r_ours, r_nn, _ = check_step(trio, x, gy, "[eval, track_running_stats=False]")
    # explicit float64 formula with the biased batch variance
    xd = x.double().cpu()
    mean = xd.mean(dim=(0, 2, 3), keepdim=True)
    var = xd.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (xd - mean) / torch.sqrt(var + trio[0].eps)
    if affine:
        expected = expected * trio[2].weight.detach().view(1, 3, 1, 1) + trio[2].bias.detach().view(1, 3, 1, 1)
    assert_accurate(r_ours["output"], r_nn["output"], expected, name="eval-with-batch-stats output")
    assert trio[0].running_mean is None and trio[0].num_batches_tracked is None


def test_eval_single_value_per_channel(device):
    """N*H*W == 1 is fine in eval (running statistics are used)."""
    trio = make_trio(3, F32, device)
    for m in trio:
        m.eval()
    check_step(trio, sample((1, 3, 1, 1), device=device), sample((1, 3, 1, 1), device=device),
               "[eval 1x3x1x1]")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_constant_channels(device, layout):
    """Zero-variance channels (an all-zero channel, as after a dead ReLU, and a
    constant one) next to a normal channel."""
    trio = make_trio(3, F32, device)
    for step, training in enumerate([True, True, False]):
        for m in trio:
            m.train(training)
        x = sample((4, 3, 5, 6), torch.float32, device)
        x[:, 0] = 0.0
        x[:, 1] = 3.0
        x = x.contiguous(memory_format=CL) if layout == "channels_last" else x
        gy = sample((4, 3, 5, 6), torch.float32, device, layout=layout)
        check_step(trio, x, gy, f"[constant channels, {layout}, step {step} training={training}]")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_numerical_stability_large_mean(device, layout):
    """float32 input with mean 1e4 and std 1 (naive E[x^2]-E[x]^2 fails here)."""
    trio = make_trio(4, F32, device)
    for step, training in enumerate([True, True, False]):
        for m in trio:
            m.train(training)
        x = (1e4 + torch.randn(8, 4, 16, 16)).to(device)
        x = x.contiguous(memory_format=CL) if layout == "channels_last" else x
        gy = sample((8, 4, 16, 16), torch.float32, device, layout=layout)
        check_step(trio, x, gy, f"[mean 1e4 std 1, {layout}, step {step} training={training}]")


DETERMINISM_CASES = [
    ((32, 1, 128, 128), F32, "contiguous"),     # one channel, work split across threads
    ((32, 1, 128, 128), F32, "channels_last"),
    ((8, 3, 64, 64), F32, "contiguous"),
    ((8, 3, 64, 64), F32, "channels_last"),
    ((8, 3, 64, 64), BF16_AMP, "channels_last"),
    ((8, 3, 64, 64), F64, "contiguous"),
]


@pytest.mark.parametrize("shape,precision,layout", DETERMINISM_CASES, ids=str)
def test_determinism(device, shape, precision, layout):
    """Two runs on the same input: bitwise identical outputs, grads, running stats.
    On the CPU the default thread pool (2 threads on CI) splits the work; C = 1
    with a large N*H*W forces a split within one channel."""
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        ours, _, _ = make_trio(shape[1], precision, device)
        results = []
        for training in (True, True, False):
            ours.train(training)
            x = sample(shape, precision.input_dtype, device, layout=layout)
            gy = sample(shape, precision.input_dtype, device, layout=layout)
            results.append((forward_backward(ours, x, gy), state_of(ours)))
        runs.append(results)
    for step, ((r1, s1), (r2, s2)) in enumerate(zip(*runs)):
        for key in r1:
            assert_bitwise_equal(r1[key], r2[key], f"step {step} {key}")
        for key in s1:
            assert_bitwise_equal(s1[key], s2[key], f"step {step} {key}")


@pytest.mark.parametrize("shape,layout", [((2, 3, 37, 41), "contiguous"), ((4, 5, 7, 7), "contiguous"),
                                          ((3, 2, 1, 19), "contiguous"), ((2, 19, 5, 7), "channels_last"),
                                          ((3, 64, 9, 9), "channels_last"), ((2, 7, 33, 1), "channels_last"),
                                          ((300, 37), "contiguous")],
                         ids=str)
def test_bfloat16_output_rounds_as_aten(shape, layout):
    """The CPU kernels narrow float results to bfloat16 with their own
    conversion (csrc/cpu/vec.h, VecPair): it must round as ATen does, bit for
    bit, NaN and infinities included (on the emulated GPU: the CUDA kernels'
    conversion, to nearest even as well). An eval batch norm with zero mean, unit
    variance, eps=0 and no bias computes x · w, one float product, as
    ``x.float() * w`` does before ATen's rounding; x is every kind of bfloat16
    bit pattern (normal, subnormal, inf, NaN), w per channel."""
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randint(-32768, 32768, shape, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    # Planted where a short sample might miss them: NaN, ±inf, a subnormal,
    # and a finite value whose product overflows.
    x.view(-1)[:5] = torch.tensor([math.nan, math.inf, -math.inf, 1e-39, 3e38], dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    module = {2: fused_bn.FusedBatchNorm1d, 4: fused_bn.FusedBatchNorm2d}[len(shape)](C, eps=0.0).eval()
    with torch.no_grad():
        module.weight.copy_(torch.randn(C) * 3)
        module.bias.zero_()
        module.running_mean.zero_()
        module.running_var.fill_(1.0)
    weight = module.weight.view(1, C, *([1] * (len(shape) - 2)))
    expected = (x.float() * weight).to(torch.bfloat16)
    y = module(x)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
    if not EMULATED_CUDA:
        # ATen's NaN, 0xffff; the CUDA kernels' conversion gives CUDA's
        # canonical 0x7fff, as __float2bfloat16 (and so nn on a GPU) does.
        assert (y.view(torch.int16)[nan] == -1).all()


@pytest.mark.parametrize("shape,layout", [((32, 1, 128, 128), "contiguous"), ((8, 3, 64, 64), "contiguous"),
                                          ((8, 3, 64, 64), "channels_last"), ((4, 16, 20, 20), "contiguous"),
                                          # few wide rows: one row block in column strips
                                          ((6, 5000), "contiguous"), ((300, 2100), "contiguous"),
                                          ((2, 3000, 1, 2, 2), "channels_last")],
                         ids=str)
def test_cpu_results_independent_of_thread_count(shape, layout):
    """The CPU kernels promise results bitwise independent of the thread count
    (reduction blocks fixed by the shape): 1 thread vs the default pool."""
    runs = []
    default_threads = torch.get_num_threads()
    for threads in (1, max(2, default_threads)):
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(1)
            ours, _, _ = make_trio(shape[1], F32, "cpu", rank=len(shape))
            results = []
            for training in (True, False):
                ours.train(training)
                x = sample(shape, layout=layout)
                gy = sample(shape, layout=layout)
                results.append((forward_backward(ours, x, gy), state_of(ours)))
            runs.append(results)
        finally:
            torch.set_num_threads(default_threads)
    for step, ((r1, s1), (r2, s2)) in enumerate(zip(*runs)):
        for key in r1:
            assert_bitwise_equal(r1[key], r2[key], f"1 vs {max(2, default_threads)} threads, step {step} {key}")
        for key in s1:
            assert_bitwise_equal(s1[key], s2[key], f"1 vs {max(2, default_threads)} threads, step {step} {key}")


# ---------------------------------------------------------------- functional API

FUNCTIONAL_SHAPES = [(8, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 3, 4)]
FUNCTIONAL_MODES = ["train", "train-no-stats", "eval"]
FUNCTIONAL_PARAMS = ["weight+bias", "none", "weight", "bias"]


def _functional_run(fn, x, gy, running, weight, bias, training, momentum):
    leaf = x.detach().requires_grad_()
    w = None if weight is None else weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    rm, rv = (None, None) if running is None else (running[0].clone(), running[1].clone())
    y = fn(leaf, rm, rv, w, b, training, momentum, 1e-5)
    y.backward(gy)
    results = {"output": y.detach(), "grad_input": leaf.grad,
               "grad_weight": None if w is None else w.grad, "grad_bias": None if b is None else b.grad}
    return results, (rm, rv)


@pytest.mark.parametrize("precision", [F32, BF16_AMP], ids=str)
@pytest.mark.parametrize("params", FUNCTIONAL_PARAMS)
@pytest.mark.parametrize("mode", FUNCTIONAL_MODES)
@pytest.mark.parametrize("shape", FUNCTIONAL_SHAPES, ids=lambda s: f"{len(s)}D")
def test_functional_matches_F(device, shape, mode, params, precision):
    c = shape[1]
    x = sample(shape, precision.input_dtype, device)
    gy = sample(shape, precision.input_dtype, device, mean=0.5, std=1.0)
    weight = (0.5 + torch.rand(c)).to(device, precision.param_dtype) if "weight" in params else None
    bias = (torch.rand(c) - 0.5).to(device, precision.param_dtype) if "bias" in params else None
    running = None
    if mode != "train-no-stats":
        running = ((torch.rand(c) - 0.5).to(device, precision.param_dtype),
                   (0.5 + torch.rand(c)).to(device, precision.param_dtype))
    training = mode != "eval"
    r_ours, s_ours = _functional_run(fused_bn.batch_norm, x, gy, running, weight, bias, training, 0.1)
    r_nn, s_nn = _functional_run(F.batch_norm, x, gy, running, weight, bias, training, 0.1)
    up = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    r_ref, s_ref = _functional_run(F.batch_norm, up(x), up(gy),
                                   None if running is None else tuple(map(up, running)),
                                   up(weight), up(bias), training, 0.1)
    label = f"[F.batch_norm {shape} {mode} {params} {precision}]"
    compare_accurate(r_ours, r_nn, r_ref, label)
    if running is not None:
        for name, o, n, r in zip(("running_mean", "running_var"), s_ours, s_nn, s_ref):
            assert_accurate(o, n, r, name=f"{label} {name}")


@pytest.mark.parametrize("shape", [(8, 3), (2, 3, 4, 4), (2, 3, 2, 3, 4)], ids=lambda s: f"{len(s)}D")
def test_functional_cumulative_average(device, shape):
    """momentum=None with a num_batches_tracked counter is nn's cumulative average
    (nn.BatchNorm2d only takes 4D input: it sees the same values as N x C x L x 1)."""
    nn_bn = torch.nn.BatchNorm2d(3, momentum=None, affine=False).to(device)
    ref_bn = torch.nn.BatchNorm2d(3, momentum=None, affine=False).double()
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    counter = torch.tensor(0, device=device)
    for step in range(4):
        x = sample(shape, torch.float32, device)
        y = fused_bn.batch_norm(x, rm, rv, None, None, True, None, 1e-5, num_batches_tracked=counter)
        as4d = lambda t: t.reshape(shape[0], 3, -1, 1)  # noqa: E731
        y_nn = nn_bn(as4d(x)).reshape(shape)
        y_ref = ref_bn(as4d(x.double().cpu())).reshape(shape)
        label = f"[cumulative average {shape} step {step}]"
        assert_accurate(y, y_nn.detach(), y_ref.detach(), name=f"{label} output")
        assert_accurate(rm, nn_bn.running_mean, ref_bn.running_mean, name=f"{label} running_mean")
        assert_accurate(rv, nn_bn.running_var, ref_bn.running_var, name=f"{label} running_var")
        assert int(counter) == int(nn_bn.num_batches_tracked) == step + 1


@pytest.mark.parametrize("input_dtype, module_dtype", [
    (torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.float64),
    (torch.bfloat16, torch.float32)], ids=["f64-into-f32", "f32-into-f64", "f16-into-f64", "bf16-amp"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_of_another_dtype(device, training, input_dtype, module_dtype):
    """nn returns an empty batch before it checks dtypes: an empty float64
    batch into a float32 module gives an empty float64 output (and counts the
    batch in training); the parameters get zero grads in their own dtype."""
    ours, theirs = (cls(3).to(device=device, dtype=module_dtype).train(training)
                    for cls in (fused_bn.FusedBatchNorm2d, torch.nn.BatchNorm2d))
    before = state_of(ours)
    results = []
    for m in (ours, theirs):
        x = torch.randn(0, 3, 4, 4, dtype=input_dtype, device=device, requires_grad=True)
        y = m(x)
        y.sum().backward()
        results.append((y, x.grad, m.weight.grad, m.bias.grad))
    for name, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias"), *results):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), name
        assert torch.equal(a, b), name
    for key in ("running_mean", "running_var"):
        assert_bitwise_equal(getattr(ours, key), before[key], key + " changed")
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == int(training)
