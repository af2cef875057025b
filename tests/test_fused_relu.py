"""The ReLU and add+ReLU epilogues: FusedBatchNormReLU2d, FusedBatchNormAddReLU2d,
batch_norm(activation="relu"), batch_norm_add_relu and convert_model(fuse_relu=True),
against nn.BatchNorm2d + ReLU (+ the add) and a float64 reference."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_bn
from _accuracy import assert_accurate
from _helpers import ADD_RELU_BATCH_NORMS, BF16, BF16_AMP, F16, F32, F64, RELU_BATCH_NORMS, make_trio, \
    memory_formats, sample, state_of, assert_state_unchanged, assert_bitwise_equal, compare_accurate
from test_ops import _GraphRecorder, _assert_not_decomposed

ops = torch.ops.fused_bn


class EagerBlock(nn.Module):
    """What the fused modules replace: relu(bn(x)) or relu(bn(x) + residual)."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return self.relu(y)


def _fused_like(bn_module, cls):
    fused = cls(bn_module.num_features, eps=bn_module.eps, momentum=bn_module.momentum,
                affine=bn_module.affine, track_running_stats=bn_module.track_running_stats)
    fused = fused.to(device=bn_module.running_mean.device if bn_module.running_mean is not None else "cpu",
                     dtype=next(iter(bn_module.state_dict().values())).dtype)
    fused.load_state_dict(bn_module.state_dict())
    return fused


def _run(module, bn, x, residual, grad_output):
    module.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    res_leaf = None if residual is None else residual.detach().requires_grad_()
    y = module(leaf) if res_leaf is None else module(leaf, res_leaf)
    y.backward(grad_output)
    out = {"output": y.detach(), "grad_input": leaf.grad}
    if bn.affine:
        out["grad_weight"], out["grad_bias"] = bn.weight.grad, bn.bias.grad
    if res_leaf is not None:
        out["grad_residual"] = res_leaf.grad
    return out


def _parity(shape, precision, layout, device, *, add, steps=(True, True, False, True), **kwargs):
    ours_bn, nn_bn, ref_bn = make_trio(shape[1], precision, device, rank=len(shape), **kwargs)
    ours = _fused_like(nn_bn, (ADD_RELU_BATCH_NORMS if add else RELU_BATCH_NORMS)[len(shape)])
    eager, ref = EagerBlock(nn_bn), EagerBlock(ref_bn)
    for step, training in enumerate(steps):
        for m in (ours, eager, ref):
            m.train(training)
        if not training and nn_bn.running_mean is not None:
            # Each implementation's running statistics are checked after every
            # training step; eval then starts from the same ones. Otherwise
            # their last-bit differences (fp16 buffers: 5e-4) move the ReLU's
            # kink, and an element whose z lies within that distance of zero
            # flips for one implementation and not another: an O(1) gradient
            # difference that says nothing about the kernels.
            with torch.no_grad():
                for key in ("running_mean", "running_var"):
                    getattr(nn_bn, key).copy_(getattr(ours, key))
                    getattr(ref_bn, key).copy_(getattr(ours, key).double())
        x = sample(shape, precision.input_dtype, device, layout=layout)
        z = sample(shape, precision.input_dtype, device, mean=1.0, std=1.0, layout=layout) if add else None
        gy = sample(shape, precision.input_dtype, device, mean=0.5, std=1.0, layout=layout)
        label = f"[{'add+relu' if add else 'relu'} step {step} training={training} {shape} {precision} {layout}]"
        r_ours = _run(ours, ours, x, z, gy)
        r_nn = _run(eager, nn_bn, x, z, gy)
        r_ref = _run(ref, ref_bn, x.cpu().double(), None if z is None else z.cpu().double(),
                     gy.cpu().double())
        compare_accurate(r_ours, r_nn, r_ref, label)
        for key in ("output", "grad_input"):
            assert memory_formats(r_ours[key]) == memory_formats(r_nn[key]), f"{label} {key} layout"
        for key in ("running_mean", "running_var"):
            if getattr(nn_bn, key) is not None:
                assert_accurate(getattr(ours, key), getattr(nn_bn, key), getattr(ref_bn, key),
                                name=f"{label} {key}")
        if nn_bn.num_batches_tracked is not None:
            assert int(ours.num_batches_tracked) == int(nn_bn.num_batches_tracked), label


SHAPES = [
    (4, 8, 5, 5),        # short planes, channel blocks
    (8, 64, 7, 7),       # 7x7 planes as in ResNet's last stage
    (2, 3, 40, 40),      # long planes, channels split across threads
    (2, 16, 72, 72),     # long planes, a channel per thread
    (2, 16, 184, 184),   # long planes, streamed outputs (over 4 MB)
    (600, 37, 7, 7),     # short planes, streamed through staged runs (over 4 MB)
    (1, 5, 7, 7),        # N = 1
    (3, 1, 11, 13),      # C = 1, primes
    (16, 4, 1, 1),       # H*W = 1
    (2, 6, 1, 1),        # two values per channel (cpu::two_values_backward)
    (1, 6, 1, 2),
]


@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_float32(device, shape, layout, add):
    _parity(shape, F32, layout, device, add=add)


# FusedBatchNormReLU1d/3d and FusedBatchNormAddReLU1d/3d: (N, C) rows (few and
# wide, many and narrow, two values per channel), (N, C, L), (N, C, D, H, W).
OTHER_RANK_SHAPES = [(16, 5), (3, 700), (2000, 3), (2, 6), (1, 5, 9), (4, 3, 1), (5, 7, 11),
                     (2, 3, 1, 4, 5), (1, 2, 3, 5, 7), (2, 16, 3, 10, 10)]


@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("precision", [F32, BF16_AMP], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", OTHER_RANK_SHAPES, ids=str)
def test_parity_other_ranks(device, shape, layout, precision, add):
    _parity(shape, precision, layout, device, add=add)


@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("precision", [F64, BF16, F16, BF16_AMP], ids=str)
@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (8, 64, 7, 7), (2, 16, 72, 72)], ids=str)
def test_parity_precisions(device, shape, precision, layout, add):
    _parity(shape, precision, layout, device, add=add)


@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(affine=False),
                                    dict(track_running_stats=False)], ids=str)
def test_parity_module_options(device, kwargs, add):
    _parity((4, 6, 9, 9), F32, "contiguous", device, add=add, **kwargs)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(6, 32, 7, 7), (2, 8, 50, 50), (2, 3, 40, 40)], ids=str)
@pytest.mark.parametrize("precision", [F32, BF16_AMP], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_relu_mask_is_the_forwards(device, training, precision, shape, layout):
    """The backward's recomputed mask is bitwise the forward's, even where z sits
    within rounding of zero: the fused dx, dweight and dbias equal the plain
    backward op fed dy * (y > 0), bit for bit."""
    c = shape[1]
    x = torch.randint(-3, 4, shape).to(device, precision.input_dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    weight = (0.5 + torch.rand(c)).to(device, precision.param_dtype)
    mean = torch.randn(c).to(device, precision.param_dtype)
    var = (0.5 + torch.rand(c)).to(device, precision.param_dtype)
    if training:
        _, save_mean, save_invstd = ops.batch_norm_train(x, weight, None, None, None, None, 0.1, 1e-5)
    else:
        save_mean = mean.float() if precision.input_dtype != torch.float64 else mean.double()
        save_invstd = (1.0 / torch.sqrt(var.double() + 1e-5)).to(save_mean.dtype)
    # Biases that put z = (x - mean) * scale + bias within rounding of zero at
    # the integer-valued inputs.
    bias = (-(torch.tensor(1.0) - save_mean.double().cpu()) * save_invstd.double().cpu()
            * weight.double().cpu()).to(device, precision.param_dtype)
    if training:
        y, save_mean, save_invstd = ops.batch_norm_train(x, weight, bias, None, None, None, 0.1, 1e-5, "relu")
    else:
        y = ops.batch_norm_eval(x, weight, bias, mean, var, 1e-5, "relu")
    gy = torch.randn(shape).to(device, precision.input_dtype)
    mask = [True, True, True]
    fused = ops.batch_norm_backward(gy, x, weight, save_mean, save_invstd, training, 1e-5, mask, bias, "relu")
    plain = ops.batch_norm_backward(torch.where(y > 0, gy, 0.0), x, weight, save_mean, save_invstd, training,
                                    1e-5, mask)
    for name, a, b in zip(("grad_input", "grad_weight", "grad_bias"), fused, plain):
        assert_bitwise_equal(a, b, f"{name} (training={training})")


@pytest.mark.parametrize("training", [True, False])
def test_add_relu_residual_grad_is_masked_grad_output(device, training):
    shape = (4, 8, 9, 9)
    x, z = sample(shape, device=device), sample(shape, device=device)
    w, b = (0.5 + torch.rand(8)).to(device), torch.randn(8).to(device)
    rm, rv = torch.randn(8).to(device), (0.5 + torch.rand(8)).to(device)
    if training:
        y, m, istd = ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, 1e-5, "relu", [], z)
    else:
        y = ops.batch_norm_eval(x, w, b, rm, rv, 1e-5, "relu", [], z)
        m, istd = rm.clone(), 1.0 / torch.sqrt(rv.double() + 1e-5).float()
    gy = torch.randn(shape, device=device)
    dx, dw, db, dz = ops.batch_norm_backward(gy, x, w, m, istd, training, 1e-5, [True, True, True], None, "relu",
                                             [], None, y)
    assert_bitwise_equal(dz, torch.where(y > 0, gy, 0.0), "grad_residual")
    plain = ops.batch_norm_backward(torch.where(y > 0, gy, 0.0), x, w, m, istd, training, 1e-5, [True, True, True])
    for name, a, b_ in zip(("grad_input", "grad_weight", "grad_bias"), (dx, dw, db), plain):
        assert_bitwise_equal(a, b_, name)


@pytest.mark.parametrize("residual_shape,dtype", [((1, 4, 1, 1), torch.float32), ((2, 4, 5, 5), torch.float64)])
def test_add_relu_module_broadcasts_and_promotes_like_eager(device, residual_shape, dtype):
    """A residual the op cannot take (broadcast, another dtype) is added as eager
    PyTorch would, so a model convert_model fused still runs as before."""
    ours, nn_bn, _ = make_trio(4, F32, device)
    fused = _fused_like(nn_bn, fused_bn.FusedBatchNormAddReLU2d)
    x = sample((2, 4, 5, 5), device=device)
    z = torch.randn(residual_shape, dtype=dtype, device=device)
    gy = torch.randn(2, 4, 5, 5, dtype=torch.promote_types(dtype, torch.float32), device=device)
    r_ours = _run(fused, fused, x, z, gy)
    r_nn = _run(EagerBlock(nn_bn), nn_bn, x, z, gy)
    for key in r_nn:
        # float32 batch norm in both, so float32 tolerances even for a float64 sum.
        torch.testing.assert_close(r_ours[key], r_nn[key], rtol=1.3e-6, atol=1e-5, msg=key)


def test_nan_propagates_like_relu(device):
    """relu keeps a NaN (nn: relu(NaN) = NaN) and its backward gives 0 there."""
    shape = (2, 3, 5, 5)
    x = sample(shape, device=device)
    x[0, 1, 2, 2] = float("nan")
    ours, nn_bn, _ = make_trio(3, F32, device)
    fused = _fused_like(nn_bn, fused_bn.FusedBatchNormReLU2d)
    gy = torch.ones(shape, device=device)
    r_ours = _run(fused, fused, x, None, gy)
    r_nn = _run(EagerBlock(nn_bn), nn_bn, x, None, gy)
    for key in r_nn:
        assert torch.equal(torch.isnan(r_ours[key]), torch.isnan(r_nn[key])), key


# ---------------------------------------------------------------- gradcheck, opcheck, compile

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
def test_gradcheck(device, training, add):
    shape = (3, 4, 5, 3)
    x = sample(shape, torch.float64, device).requires_grad_()
    z = sample(shape, torch.float64, device, mean=1.0).requires_grad_()
    w = (0.5 + torch.rand(4, dtype=torch.float64, device=device)).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, device=device).requires_grad_()
    rm = torch.randn(4, dtype=torch.float64, device=device)
    rv = 0.5 + torch.rand(4, dtype=torch.float64, device=device)
    stats = (None, None) if training else (rm, rv)

    def f(x, z, w, b):
        if add:
            return fused_bn.batch_norm_add_relu(x, z, *stats, w, b, training)
        return fused_bn.batch_norm(x, *stats, w, b, training, activation="relu")

    assert torch.autograd.gradcheck(f, (x, z, w, b))
    assert torch.autograd.gradgradcheck(f, (x, z, w, b))


def _epilogue_args(device, layout="contiguous", dtype=torch.float32):
    shape = (3, 4, 5, 2)
    x = sample(shape, dtype, device, layout=layout).requires_grad_()
    z = sample(shape, dtype, device, layout=layout).requires_grad_()
    w = (0.5 + torch.rand(4)).to(device).requires_grad_()
    b = torch.randn(4).to(device).requires_grad_()
    rm, rv = torch.randn(4).to(device), (0.5 + torch.rand(4)).to(device)
    return x, z, w, b, rm, rv


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
def test_opcheck(device, add, layout):
    x, z, w, b, rm, rv = _epilogue_args(device, layout)
    residual = z if add else None
    nbt = torch.tensor(3, device=device)
    torch.library.opcheck(ops.batch_norm_train.default, (x, w, b, rm, rv, nbt, 0.1, 1e-5, "relu", [], residual))
    torch.library.opcheck(ops.batch_norm_eval.default, (x, w, b, rm, rv, 1e-5, "relu", [], residual))
    with torch.no_grad():
        y, m, istd = ops.batch_norm_train(x, w, b, None, None, None, 0.1, 1e-5, "relu", [], residual)
    gy = torch.randn_like(y)
    if add:
        torch.library.opcheck(ops.batch_norm_backward.default,
                              (gy, x.detach(), w.detach(), m, istd, True, 1e-5, [True, True, True], None,
                               "relu", [], None, y))
    else:
        torch.library.opcheck(ops.batch_norm_backward.default,
                              (gy, x.detach(), w.detach(), m, istd, True, 1e-5, [True, True, True], b.detach(), "relu"))


class _ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_relu = fused_bn.FusedBatchNormReLU2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_add_relu = fused_bn.FusedBatchNormAddReLU2d(4)

    def forward(self, x):
        return self.bn_add_relu(self.conv2(self.bn_relu(self.conv(x))), x)


def test_compile_fullgraph_keeps_fused_ops(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _ResidualBlock().to(device)
    compiled_model = copy.deepcopy(eager)
    recorder = _GraphRecorder()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=recorder)
    for step, training in enumerate([True, True, False]):
        eager.train(training)
        compiled.train(training)
        x = sample((2, 4, 6, 5), device=device)
        results = []
        for model in (compiled, eager):
            model.zero_grad(set_to_none=True)
            leaf = x.detach().requires_grad_()
            y = model(leaf)
            y.backward(torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape))
            results.append([y.detach(), leaf.grad] + [p.grad for p in model.parameters()])
        for i, (a, b) in enumerate(zip(*results)):
            torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-6, msg=f"step {step} result {i}")
    _assert_not_decomposed(recorder.forward_graphs, ops.batch_norm_train.default, "forward graphs")
    _assert_not_decomposed(recorder.backward_graphs, ops.batch_norm_backward.default, "backward graphs")
    # The add+ReLU's backward (once batch_norm_add_relu_backward): batch_norm_backward with
    # "relu" and the forward's output or the residual.
    add_relu_backward = [
        node for g in recorder.backward_graphs for node in g.graph.nodes
        if node.op == "call_function" and node.target == ops.batch_norm_backward.default
        and "relu" in node.args[9:10] + tuple(v for k, v in node.kwargs.items() if k == "activation")
        and any(a is not None for a in node.args[11:13] + tuple(
            v for k, v in node.kwargs.items() if k in ("residual", "output")))]
    assert add_relu_backward, "backward graphs: no add+ReLU batch_norm_backward"
    assert len(recorder.dynamo_graphs) == 2, f"{len(recorder.dynamo_graphs)} dynamo graphs"


# ---------------------------------------------------------------- errors

def test_errors_leave_state_untouched(device):
    m = fused_bn.FusedBatchNormAddReLU2d(4).to(device).train()
    before = state_of(m)
    x = sample((2, 4, 3, 3), device=device)
    with pytest.raises(RuntimeError, match="Attempting to broadcast a dimension of length 2"):
        m(x, x[..., :2].contiguous())
    with pytest.raises(RuntimeError, match=r"residual of shape \[3, 1, 1, 1, 1\] broadcasts the output"):
        m(x, torch.zeros(3, 1, 1, 1, 1, device=device))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        m(x[0], x[0])
    assert_state_unchanged(m, before, "after errors")
    with pytest.raises(RuntimeError, match=r"residual of shape \[2, 4, 3, 2\] does not match input"):
        ops.batch_norm_train(x, None, None, None, None, None, 0.1, 1e-5, "relu", [], x[..., :2])
    with pytest.raises(RuntimeError, match="residual dtype Double does not match input dtype Float"):
        ops.batch_norm_eval(x, None, None, m.running_mean, m.running_var, 1e-5, "relu", [], x.double())
    # A residual without an activation is bn(x) + residual now (no longer refused).
    y, _, _ = ops.batch_norm_train(x, None, None, None, None, None, 0.1, 1e-5, "identity", [], x)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True) + x, rtol=1.3e-6, atol=1e-5)
    with pytest.raises(ValueError, match="unsupported activation 'tanh'"):
        fused_bn.batch_norm(x, None, None, training=True, activation="tanh")


# ---------------------------------------------------------------- convert_model(fuse_relu=True)

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return (out + identity).relu()


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.layer2 = nn.Sequential(Bottleneck(16, 4), Bottleneck(16, 8, stride=2))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                      nn.Conv2d(6, 6, 3, bias=False), nn.BatchNorm2d(6))
        self.bn_alone = nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return F.relu(self.bn_alone(x))


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)


def _model_step(model, x):
    model.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    y = model(leaf)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
    # By name: a traced model registers its submodules in call order.
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"output": y.detach(), "grad_input": leaf.grad, **{f"grad {k}": grads[k] for k in sorted(grads)}}


def _check_converted(original, converted, shape, steps=(True, True, False)):
    reference = copy.deepcopy(original).double()
    for step, training in enumerate(steps):
        for m in (original, converted, reference):
            m.train(training)
        x = sample(shape)
        ours, theirs = _model_step(converted, x), _model_step(original, x)
        ref = _model_step(reference, x.double())
        assert list(ours) == list(theirs)
        for key in ours:
            assert_accurate(ours[key], theirs[key], ref[key], name=f"step {step} training={training} {key}")


def test_convert_model_resnet_style():
    torch.manual_seed(0)
    model = TinyResNet()
    _randomize_bn(model)
    original = copy.deepcopy(model)
    converted = fused_bn.convert_model(model, fuse_relu=True)
    kinds = [type(m) for m in converted.modules()]
    # stem 1 + BasicBlocks 2 + Bottlenecks 4 relu folds; 4 block ends; 2 downsample BNs stay plain.
    assert kinds.count(fused_bn.FusedBatchNormReLU2d) == 7, kinds
    assert kinds.count(fused_bn.FusedBatchNormAddReLU2d) == 4, kinds
    assert kinds.count(fused_bn.FusedBatchNorm2d) == 2, kinds
    assert nn.BatchNorm2d not in kinds
    assert sorted(converted.state_dict()) == sorted(original.state_dict())
    # The converted model shares the original module's parameters.
    assert {id(p) for p in converted.parameters()} <= {id(p) for p in model.parameters()}
    _check_converted(original, converted, (4, 3, 16, 16))
    # Checkpoints go both ways.
    fresh = TinyResNet()
    fresh.load_state_dict(converted.state_dict())
    converted.load_state_dict(original.state_dict())


def test_convert_model_untraceable_falls_back_to_sequential_pairs():
    torch.manual_seed(0)
    model = Untraceable()
    _randomize_bn(model)
    original = copy.deepcopy(model)
    converted = fused_bn.convert_model(model, fuse_relu=True)
    assert converted is model
    assert type(model.features[1]) is fused_bn.FusedBatchNormReLU2d
    assert type(model.features[2]) is nn.Identity
    assert type(model.features[4]) is fused_bn.FusedBatchNorm2d
    assert type(model.bn_alone) is fused_bn.FusedBatchNorm2d  # F.relu after it is code, not a module
    assert sorted(converted.state_dict()) == sorted(original.state_dict())
    _check_converted(original, converted, (2, 3, 10, 10))


def test_convert_model_keeps_a_batch_norm_whose_output_is_reused():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(y) + y

    model = Reused()
    converted = fused_bn.convert_model(copy.deepcopy(model), fuse_relu=True)
    assert type(converted.bn) is fused_bn.FusedBatchNorm2d
    _check_converted(model, converted, (2, 3, 5, 5))


class _DropPath(nn.Module):
    """Stochastic depth as timm's DropPath and torchvision's StochasticDepth
    write it: the code run depends on self.training."""

    def forward(self, x):
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(0.5)
        return x * keep * 2.0


class _DropPathBlock(nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop_path = _DropPath()

    def forward(self, x):
        return torch.relu(x + self.drop_path(torch.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("converted_in", ["train", "eval"])
def test_convert_model_keeps_training_dependent_modules_whole(converted_in):
    """A module whose code reads self.training (stochastic depth) stays a call
    of the graph, so the converted model follows .train()/.eval(): eval is
    deterministic and equal to the original's, training drops paths as the
    original does with the same random numbers, whichever mode it was
    converted in."""
    torch.manual_seed(0)
    model = nn.Sequential(_DropPathBlock(), _DropPathBlock())
    _randomize_bn(model)
    model.train(converted_in == "train")
    original = copy.deepcopy(model)
    converted = fused_bn.convert_model(model, fuse_relu=True)
    assert isinstance(converted, torch.fx.GraphModule)
    assert [type(m) for m in converted.modules()].count(fused_bn.FusedBatchNormReLU2d) == 2
    assert converted.training == (converted_in == "train")
    x = sample((4, 3, 6, 6))
    for mode in (False, True, False):
        converted.train(mode)
        original.train(mode)
        # A training call updates the running statistics: each model runs
        # once per mode, and again only in eval.
        outputs = []
        for m in (converted, original) + (() if mode else (converted,)):
            torch.manual_seed(1)
            outputs.append(m(x))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        if not mode:
            torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)
        else:
            assert (outputs[0] == torch.relu(x)).any() and (outputs[0] != torch.relu(x)).any()


def test_convert_model_falls_back_when_the_root_reads_training():
    class RootDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = torch.relu(self.bn(x))
            return y * 0.5 if self.training else y

    model = RootDrop()
    converted = fused_bn.convert_model(model, fuse_relu=True)
    assert converted is model and type(model.bn) is fused_bn.FusedBatchNorm2d
    for mode in (True, False):
        model.train(mode)
        reference = copy.deepcopy(RootDrop()).train(mode)
        reference.load_state_dict(model.state_dict())
        x = sample((2, 3, 4, 4))
        torch.testing.assert_close(model(x), reference(x))


def test_convert_model_trace_leaves_state_and_flags_as_found():
    """Tracing runs the forward's Python: an in-place update of a real buffer
    (a batch norm subclass counting its batches, code touching a buffer)
    would run on the model's own tensors. Conversion leaves every parameter,
    buffer and training flag as it found them."""
    class CountingBatchNorm(nn.BatchNorm2d):
        def forward(self, x):
            self.num_batches_tracked.add_(1)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.training, 0.1, self.eps)

    class Touches(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.counting = CountingBatchNorm(3)
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            self.steps.add_(1)
            return self.counting(torch.relu(self.bn(x)))

    model = Touches()
    model.counting.eval()  # a mixed-mode model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    converted = fused_bn.convert_model(model, fuse_relu=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by the conversion"
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert {name: m.training for name, m in converted.named_modules() if name in flags} == flags


def test_convert_model_refuses_add_relu_fusion_into_an_aliased_residual():
    """`a += bn2(conv(x))` writes into a's tensor, which `alias` still reads;
    the fused call would leave it unchanged."""
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            a = self.bn1(x)
            alias = a
            a += self.bn2(self.conv(x))
            return torch.relu(a) + alias

    torch.manual_seed(0)
    model = Aliased()
    _randomize_bn(model)
    converted = fused_bn.convert_model(copy.deepcopy(model), fuse_relu=True)
    assert fused_bn.FusedBatchNormAddReLU2d not in [type(m) for m in converted.modules()]
    _check_converted(model, converted, (2, 4, 5, 5))


def test_convert_model_fuses_add_relu_that_writes_into_the_batch_norms_output():
    """torchvision's ResNet block: `out = bn2(out); out += identity; relu(out)`."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += x
            return torch.relu(out)

    torch.manual_seed(0)
    model = Block()
    _randomize_bn(model)
    converted = fused_bn.convert_model(copy.deepcopy(model), fuse_relu=True)
    assert type(converted.bn) is fused_bn.FusedBatchNormAddReLU2d
    _check_converted(model, converted, (2, 4, 5, 5))
