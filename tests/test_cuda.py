"""CUDA-only checks (marked ``cuda``; skipped cleanly without a GPU).

The parity, module, error, gradcheck, opcheck and compile tests elsewhere already
run on CUDA through the ``device`` fixture. Here: CUDA kernels against our CPU
kernels, autocast with a convolution before the BatchNorm, and (``slow``) a
tensor of more than 2**31 elements."""
import copy
import math

import pytest
import torch
from torch import nn

import fused_bn
from _accuracy import assert_accurate, assert_consistent, assert_same_nonfinite, check_bound
from _helpers import BF16, BF16_AMP, CL, F16, F16_AMP, F32, F64, check_step, forward_backward, make_trio, sample

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("precision", [F32, F64, BF16, F16, BF16_AMP, F16_AMP], ids=str)
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 13, 1, 17), (4, 1, 33, 31), (8, 64, 14, 14)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_cpu_kernels(shape, precision, layout):
    """Our CUDA and CPU results on identical inputs and state disagree by at most
    twice what nn's CUDA and CPU results disagree by (plus the floor), for every
    quantity, over two training steps and an eval step."""
    ours_cpu, nn_cpu, _ = make_trio(shape[1], precision, "cpu")
    ours_cuda, nn_cuda = copy.deepcopy(ours_cpu).cuda(), copy.deepcopy(nn_cpu).cuda()
    for step, training in enumerate([True, True, False]):
        for m in (ours_cpu, nn_cpu, ours_cuda, nn_cuda):
            m.train(training)
        x = sample(shape, precision.input_dtype, "cpu", layout=layout)
        gy = sample(shape, precision.input_dtype, "cpu", layout=layout)
        xc = x.cuda().contiguous(memory_format=CL) if layout == "channels_last" else x.cuda()
        gyc = gy.cuda().contiguous(memory_format=CL) if layout == "channels_last" else gy.cuda()
        r = [forward_backward(m, xx, gg) for m, xx, gg in
             ((ours_cuda, xc, gyc), (ours_cpu, x, gy), (nn_cuda, xc, gyc), (nn_cpu, x, gy))]
        label = f"[cuda vs cpu, {tuple(shape)} {precision} {layout} step {step} training={training}]"
        for key in r[0]:
            if r[2][key] is None:
                continue
            assert_consistent(r[0][key], r[1][key], r[2][key], r[3][key], name=f"{label} {key}")
        for key in ("running_mean", "running_var"):
            assert_consistent(getattr(ours_cuda, key), getattr(ours_cpu, key), getattr(nn_cuda, key),
                              getattr(nn_cpu, key), name=f"{label} {key}")
        assert int(ours_cuda.num_batches_tracked) == int(ours_cpu.num_batches_tracked) == int(nn_cpu.num_batches_tracked)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_conv_then_batchnorm(dtype, layout):
    """Under torch.autocast("cuda") a convolution hands the BatchNorm a low-precision
    tensor with fp32 parameters: same output dtype as nn, every quantity within
    the accuracy rule, for two training steps and an eval step."""
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).cuda()
    if layout == "channels_last":
        conv = conv.to(memory_format=CL)
    trio = make_trio(8, F32, "cuda")
    for step, training in enumerate([True, True, False]):
        for m in trio:
            m.train(training)
        x = sample((4, 3, 16, 16), torch.float32, "cuda", layout=layout)
        with torch.autocast("cuda", dtype=dtype):
            h = conv(x)
            assert h.dtype == dtype
            gy = sample((4, 8, 16, 16), dtype, "cuda", layout=layout)
            r_ours, r_nn, _ = check_step(trio, h.detach(), gy, f"[autocast {dtype} {layout} step {step}]")
        assert r_ours["output"].dtype == r_nn["output"].dtype
        assert trio[0].running_mean.dtype == torch.float32 and trio[0].weight.grad.dtype == torch.float32


def test_autocast_whole_model_runs_like_nn():
    """A whole Conv -> BN -> ReLU model under autocast: output dtype and the
    parameters' grad dtypes as with nn.BatchNorm2d."""
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).cuda()
    ours = fused_bn.convert_model(copy.deepcopy(base))
    x = sample((4, 3, 16, 16), torch.float32, "cuda")
    outs = []
    for model in (ours, base):
        with torch.autocast("cuda", dtype=torch.float16):
            y = model(x)
        y.float().sum().backward()
        outs.append((y.dtype, [p.grad.dtype for p in model.parameters()]))
    assert outs[0] == outs[1]


# ------------------------------------------------- no host syncs, CUDA graphs

GRAPH_SHAPE = (6, 16, 10, 10)


def _graph_module(variant):
    if variant == "relu":
        return fused_bn.FusedBatchNormReLU2d(GRAPH_SHAPE[1]).cuda()
    if variant == "add_relu":
        return fused_bn.FusedBatchNormAddReLU2d(GRAPH_SHAPE[1]).cuda()
    return fused_bn.FusedBatchNorm2d(GRAPH_SHAPE[1], momentum=None if variant == "cumulative" else 0.1).cuda()


def _module_step(m, variant, x, z, dy):
    """One training step's forward and backward; its outputs."""
    y = m(x, z) if variant == "add_relu" else m(x)
    y.backward(dy)
    return y


def _sync_ops_step(state, x, dy, relu):
    """FusedSyncBatchNorm2d's four ops as one rank runs them (the collectives,
    NCCL's, left out): statistics, merge, the sums, dx from the summed sums and
    the gathered count, which never leaves the device."""
    ops = torch.ops.fused_bn
    w, b, rm, rv, nbt = state
    all_stats = ops.batch_norm_stats(x, w, b, rm, rv)[None]
    count = all_stats[:, :1, 0].sum()
    act = "relu" if relu else "identity"
    y, mean, invstd = ops.batch_norm_train_with_stats(x, w, b, rm, rv, nbt, 0.1, 1e-5, all_stats, act)
    sums, gw, gb, _ = ops.batch_norm_backward_sums(dy, x, w, mean, invstd, [True, True], b, act)
    dx = ops.batch_norm_backward_with_sums(dy, x, w, mean, invstd, sums, count, b, act)
    return y, dx, gw, gb


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("variant", ["plain", "cumulative", "relu", "add_relu", "sync_ops", "sync_ops_relu"])
def test_training_step_syncs_nothing_and_replays_in_a_cuda_graph(variant, layout):
    """A training step of each module (and of the synchronised path's ops) runs
    with torch.cuda.set_sync_debug_mode("error") (any device-to-host sync
    raises), is captured in a CUDA graph, and a replay on new data gives exactly
    what the same step gives eagerly: outputs, grads, running statistics and
    num_batches_tracked."""
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    fresh = lambda: torch.randn(GRAPH_SHAPE, device="cuda").contiguous(memory_format=fmt)  # noqa: E731
    x, z, dy = fresh().requires_grad_(), fresh().requires_grad_(), fresh()
    sync_ops = variant.startswith("sync_ops")
    if sync_ops:
        C = GRAPH_SHAPE[1]
        state = [torch.rand(C, device="cuda") + 0.5, torch.rand(C, device="cuda"), torch.zeros(C, device="cuda"),
                 torch.ones(C, device="cuda"), torch.zeros((), dtype=torch.long, device="cuda")]
        relu = variant == "sync_ops_relu"
        run = lambda st: _sync_ops_step(st, x.detach(), dy, relu)  # noqa: E731
    else:
        m = _graph_module(variant)

        def run(module):
            module.zero_grad(set_to_none=False)
            x.grad, z.grad = None, None
            y = _module_step(module, variant, x, z, dy)
            return (y, x.grad, z.grad if variant == "add_relu" else None, module.weight.grad, module.bias.grad)

    subject = state if sync_ops else m
    # Warm-up on a side stream (as torch.cuda.graphs' docs do), then one eager
    # step with syncs forbidden.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(subject)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(subject)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(subject)
    twin = copy.deepcopy(state if sync_ops else m)  # the state the replay starts from
    if sync_ops:
        twin_x, twin_dy = x.detach().clone(), dy.detach().clone()
    with torch.no_grad():
        x.copy_(fresh())
        z.copy_(fresh())
        dy.copy_(fresh())
    graph.replay()
    torch.cuda.synchronize()
    replayed = [None if t is None else t.detach().clone() for t in captured]
    replayed_state = [t.clone() for t in (state if sync_ops else state_tensors(m))]

    # The same step, eagerly, from the same state on the same data.
    if sync_ops:
        twin_x.copy_(x)
        twin_dy.copy_(dy)
        eager = _sync_ops_step(twin, twin_x, twin_dy, relu)
        eager_state = twin
    else:
        eager = run(twin)
        eager_state = state_tensors(twin)
    for i, (a, e) in enumerate(zip(replayed, eager)):
        assert (a is None) == (e is None), f"{variant}: output {i}"
        if a is not None:
            assert torch.equal(a, e.detach()), f"{variant}: output {i} differs between graph replay and eager"
    for a, e in zip(replayed_state, eager_state):
        assert torch.equal(a, e), f"{variant}: state differs between graph replay and eager"


def state_tensors(m):
    return [m.running_mean, m.running_var, m.num_batches_tracked]


# ---------------------------------------------------------------- > 2**31 elements

def _chunks(t, rows):
    for h0 in range(0, t.shape[2], rows):
        yield t[:, :, h0:h0 + rows]


@pytest.mark.slow
@pytest.mark.parametrize("shape,layout", [((2, 1, 32768, 32769), "contiguous"),
                                          ((1, 3, 32768, 21846), "channels_last")], ids=str)
def test_more_than_2_pow_31_elements(shape, layout):
    """fp16 input with an fp32 module, numel > 2**31 (and, for C = 1, more than
    2**31 values in one channel): training forward + backward and an eval forward
    within the accuracy rule against a chunked float64 reference."""
    numel = math.prod(shape)
    assert numel > 2 ** 31
    n, c = shape[0], shape[1]
    count = numel // c
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    x = torch.empty(shape, dtype=torch.float16, device="cuda", memory_format=fmt).normal_()
    x.add_(torch.linspace(-2, 2, c, device="cuda", dtype=torch.float16).view(1, c, 1, 1))
    gy = torch.empty_like(x).normal_()

    theirs = nn.BatchNorm2d(c).cuda()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours = fused_bn.FusedBatchNorm2d(c).cuda()
    ours.load_state_dict(theirs.state_dict())
    w, b = theirs.weight.detach().double(), theirs.bias.detach().double()
    rows = max(1, (1 << 27) // (n * shape[3]))  # about 1 GiB of float64 per chunk

    # float64 statistics, two passes
    s = torch.zeros(c, dtype=torch.float64, device="cuda")
    for xs in _chunks(x, rows):
        s += xs.double().sum(dim=(0, 2, 3))
    mean = s / count
    m2 = torch.zeros_like(s)
    for xs in _chunks(x, rows):
        m2 += (xs.double() - mean.view(1, c, 1, 1)).square().sum(dim=(0, 2, 3))
    var = m2 / count
    invstd = torch.rsqrt(var + ours.eps)
    view = lambda t: t.view(1, c, 1, 1)  # noqa: E731

    def xhat(xs):
        return (xs.double() - view(mean)) * view(invstd)

    sum_dy = torch.zeros_like(s)
    sum_dy_xhat = torch.zeros_like(s)
    for xs, gs in zip(_chunks(x, rows), _chunks(gy, rows)):
        sum_dy += gs.double().sum(dim=(0, 2, 3))
        sum_dy_xhat += (gs.double() * xhat(xs)).sum(dim=(0, 2, 3))

    def chunked_errors(name, ours_t, nn_t, ref_fn, dtype):
        err_o = err_n = scale = 0.0
        for h0 in range(0, shape[2], rows):
            sl = (slice(None), slice(None), slice(h0, h0 + rows))
            o, nn_ = ours_t[sl].double(), nn_t[sl].double()
            assert_same_nonfinite(o, nn_, f"{name} rows {h0}+")
            ref = ref_fn(sl)
            err_o = max(err_o, float((o - ref).abs().max()))
            err_n = max(err_n, float((nn_ - ref).abs().max()))
            scale = max(scale, float(ref.abs().max()))
        check_bound(err_o, err_n, scale, dtype, name, f"; shape {shape} {layout}")

    results = {}
    for name, m in (("ours", ours), ("nn", theirs)):
        leaf = x.detach().requires_grad_()
        y = m(leaf)
        y.backward(gy)
        results[name] = (y.detach(), leaf.grad)
        del y, leaf
    chunked_errors("train output", results["ours"][0], results["nn"][0],
                   lambda sl: xhat(x[sl]) * view(w) + view(b), torch.float16)
    chunked_errors("grad_input", results["ours"][1], results["nn"][1],
                   lambda sl: view(w * invstd) * (gy[sl].double() - view(sum_dy / count)
                                                 - xhat(x[sl]) * view(sum_dy_xhat / count)),
                   torch.float16)
    del results
    assert_accurate(ours.weight.grad, theirs.weight.grad, sum_dy_xhat, name="grad_weight")
    assert_accurate(ours.bias.grad, theirs.bias.grad, sum_dy, name="grad_bias")
    assert_accurate(ours.running_mean, theirs.running_mean, 0.1 * mean, name="running_mean")
    assert_accurate(ours.running_var, theirs.running_var, 0.9 + 0.1 * var * count / (count - 1),
                    name="running_var")
    assert int(ours.num_batches_tracked) == 1

    ours.eval(), theirs.eval()
    with torch.no_grad():
        y_ours, y_nn = ours(x), theirs(x)
    rm, rv = theirs.running_mean.double(), theirs.running_var.double()
    chunked_errors("eval output", y_ours, y_nn,
                   lambda sl: (x[sl].double() - view(rm)) * view(torch.rsqrt(rv + ours.eps) * w) + view(b),
                   torch.float16)
