"""The registered ops: gradcheck (float64), torch.library.opcheck for each op, and
torch.compile(fullgraph=True) keeping the fused ops whole in the graph."""
import copy

import pytest
import torch
from torch import nn

import fused_bn
from _accuracy import assert_accurate
from _helpers import CL, F32, make_trio, sample

ops = torch.ops.fused_bn
f64 = torch.float64


# ---------------------------------------------------------------- gradcheck

def _gradcheck_inputs(device, affine, layout):
    x = torch.randn(3, 2, 3, 2, dtype=f64, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    w = (0.5 + torch.rand(2, dtype=f64, device=device)).requires_grad_() if affine else None
    b = torch.randn(2, dtype=f64, device=device).requires_grad_() if affine else None
    rm = torch.randn(2, dtype=f64, device=device)
    rv = 0.5 + torch.rand(2, dtype=f64, device=device)
    return x, w, b, rm, rv


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(device, training, affine, layout):
    x, w, b, rm, rv = _gradcheck_inputs(device, affine, layout)
    inputs = (x, w, b) if affine else (x,)

    def fn(x, w=None, b=None):
        # fresh copies: a training call updates the running statistics in place
        return fused_bn.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_training_without_running_stats(device):
    x, w, b, _, _ = _gradcheck_inputs(device, True, "contiguous")
    assert torch.autograd.gradcheck(
        lambda x, w, b: fused_bn.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), (x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward(device, training):
    """nn.BatchNorm2d supports double backward (gradient penalties); so must we."""
    x, w, b, rm, rv = _gradcheck_inputs(device, True, "contiguous")
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: fused_bn.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5),
        (x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_matches_nn(device, training):
    """A gradient penalty (double backward through the module), compared with
    nn.BatchNorm2d under the accuracy rule."""
    trio = make_trio(3, F32, device)
    x = sample((4, 3, 5, 5), torch.float32, device)
    # random weights: a plain sum of y (or y**2) has an exactly-zero input gradient
    # through a training-mode BatchNorm
    r1, r2 = sample((4, 3, 5, 5), torch.float32, device), sample((4, 3, 5, 5), torch.float32, device)
    results = []
    for m in trio:
        m.train(training)
        m.zero_grad(set_to_none=True)
        leaf = x.detach().to(m.weight.device, m.weight.dtype).requires_grad_()
        y = m(leaf)
        r1m, r2m = (r.to(leaf.device, leaf.dtype) for r in (r1, r2))
        (g,) = torch.autograd.grad((y * r1m).sum() + (y.square() * r2m).sum(), leaf, create_graph=True)
        assert g.requires_grad, f"{type(m).__name__}: input grad does not require grad under create_graph"
        g.square().sum().backward()
        results.append({"grad_input": leaf.grad, "grad_weight": m.weight.grad, "grad_bias": m.bias.grad})
    for key in results[1]:
        assert results[0][key] is not None, f"{key}: None from the double backward"
        assert_accurate(results[0][key], results[1][key], results[2][key],
                        name=f"gradient penalty {key} (training={training})")


# ---------------------------------------------------------------- opcheck

def _train_args(device, *, affine=True, stats=True, counter=True, momentum=0.1,
                dtype=torch.float32, param_dtype=torch.float32, layout="contiguous", shape=(3, 4, 5, 2)):
    x = sample(shape, dtype, device, layout=layout).requires_grad_()
    w = (0.5 + torch.rand(4)).to(device, param_dtype).requires_grad_() if affine else None
    b = torch.randn(4).to(device, param_dtype).requires_grad_() if affine else None
    rm = torch.randn(4).to(device, param_dtype) if stats else None
    rv = (0.5 + torch.rand(4)).to(device, param_dtype) if stats else None
    nbt = torch.tensor(3, device=device) if counter else None
    return (x, w, b, rm, rv, nbt, momentum, 1e-5)


TRAIN_VARIANTS = {
    "affine-stats-counter": dict(),
    "no-weight-no-stats-no-counter": dict(affine=False, stats=False, counter=False),
    "stats-without-counter": dict(counter=False),
    "momentum-none": dict(momentum=None),
    "float64": dict(dtype=f64, param_dtype=f64),
    "bf16-input-fp32-params": dict(dtype=torch.bfloat16),
    "channels-last": dict(layout="channels_last"),
    # channels_last-contiguous but not "channels_last-like" by suggest_memory_format
    # (pytorch#63224): fake and real kernels must agree on the output strides
    "channels-last-batch-of-one": dict(layout="permuted", shape=(1, 4, 5, 2)),
    "2d-input": dict(shape=(6, 4)),
}


@pytest.mark.parametrize("variant", list(TRAIN_VARIANTS))
def test_opcheck_batch_norm_train(device, variant):
    torch.library.opcheck(ops.batch_norm_train.default, _train_args(device, **TRAIN_VARIANTS[variant]))


EVAL_VARIANTS = {
    "affine": dict(),
    "no-weight": dict(affine=False),
    "channels-last": dict(layout="channels_last"),
    "fp16-input-fp32-params": dict(dtype=torch.float16),
    "channels-last-batch-of-one": dict(layout="permuted", shape=(1, 4, 5, 2)),
}


@pytest.mark.parametrize("variant", list(EVAL_VARIANTS))
def test_opcheck_batch_norm_eval(device, variant):
    x, w, b, rm, rv, _, _, eps = _train_args(device, **EVAL_VARIANTS[variant])
    torch.library.opcheck(ops.batch_norm_eval.default, (x, w, b, rm, rv, eps))


BACKWARD_VARIANTS = {
    "train-all": (True, True, [True, True, True]),
    "train-input-only": (True, True, [True, False, False]),
    "train-params-only": (True, True, [False, True, True]),
    "train-bias-only": (True, True, [False, False, True]),
    "train-input-weight": (True, True, [True, True, False]),
    "train-no-weight": (True, False, [True, False, False]),
    "train-no-weight-bias": (True, False, [True, False, True]),
    "eval-all": (False, True, [True, True, True]),
    "eval-input-only": (False, True, [True, False, False]),
    "eval-no-weight": (False, False, [True, False, False]),
}


@pytest.mark.parametrize("variant", list(BACKWARD_VARIANTS))
def test_opcheck_batch_norm_backward(device, variant):
    training, affine, mask = BACKWARD_VARIANTS[variant]
    x = sample((3, 4, 5, 2), torch.float32, device)
    gy = sample((3, 4, 5, 2), torch.float32, device)
    w = (0.5 + torch.rand(4)).to(device) if affine else None
    if training:
        mean = x.mean(dim=(0, 2, 3))
        invstd = torch.rsqrt(x.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    else:
        mean = torch.randn(4, device=device)
        invstd = torch.rsqrt(0.5 + torch.rand(4, device=device))
    torch.library.opcheck(ops.batch_norm_backward.default, (gy, x, w, mean, invstd, training, 1e-5, mask))


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]],
                         ids=str)
def test_backward_op_matches_aten(device, mask):
    """The backward op against aten's native_batch_norm_backward (float64 reference)
    and its float32 result, under the accuracy rule; unrequested outputs are empty."""
    x = sample((3, 4, 5, 2), torch.float32, device)
    gy = sample((3, 4, 5, 2), torch.float32, device)
    w = (0.5 + torch.rand(4)).to(device)
    mean = x.mean(dim=(0, 2, 3))
    invstd = torch.rsqrt(x.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
    ours = ops.batch_norm_backward(gy, x, w, mean, invstd, True, 1e-5, mask)
    theirs = torch.ops.aten.native_batch_norm_backward(gy, x, w, None, None, mean, invstd, True, 1e-5, mask)
    up = lambda t: t.double().cpu()  # noqa: E731
    ref = torch.ops.aten.native_batch_norm_backward(up(gy), up(x), up(w), None, None, up(mean),
                                                    up(invstd), True, 1e-5, mask)
    assert len(ours) == 4 and ours[3].shape == (0,), "grad_residual: written without a residual or output"
    for name, o, n, r, m in zip(("grad_input", "grad_weight", "grad_bias"), ours, theirs, ref, mask):
        if m:
            assert_accurate(o, n, r, name=f"backward op {name}")
        else:
            assert o.shape == (0,), f"{name} not requested but has shape {tuple(o.shape)}"


# ---------------------------------------------------------------- torch.compile

class _GraphRecorder:
    """A torch.compile backend that records the AOT (aten-level) forward and backward
    graphs and runs them as they are."""

    def __init__(self):
        self.dynamo_graphs, self.forward_graphs, self.backward_graphs = [], [], []

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.dynamo_graphs.append(gm)

        def record(graphs):
            def compiler(g, _):
                graphs.append(g)
                return make_boxed_func(g.forward)
            return compiler

        return aot_autograd(fw_compiler=record(self.forward_graphs),
                            bw_compiler=record(self.backward_graphs))(gm, example_inputs)


def _called_ops(graphs):
    """OpOverloads called by the graphs. A mutating op appears, after AOT
    functionalization, wrapped in auto_functionalized(_v2)(op, ...): still whole,
    so it is unwrapped here."""
    found = set()
    for g in graphs:
        for node in g.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.OpOverloadPacket):
                target = target.default
            if isinstance(target, torch._ops.HigherOrderOperator) and "auto_functionalized" in target.name():
                target = node.args[0]
            found.add(target)
    return found


def _assert_not_decomposed(graphs, op, label):
    called = _called_ops(graphs)
    assert op in called, f"{label}: {op} missing from the captured graph; calls: {sorted(map(str, called))}"
    aten_bn = {str(t) for t in called if "batch_norm" in str(t) and "fused_bn" not in str(t)}
    assert not aten_bn, f"{label}: aten batch norm ops in the graph: {aten_bn}"


def _conv_bn_relu(momentum, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                          fused_bn.FusedBatchNorm2d(4, momentum=momentum),
                          nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.to(device)


def _step(model, x):
    model.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    y = model(leaf)
    y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape))
    return [y.detach(), leaf.grad] + [p.grad for p in model.parameters()] + [
        b.clone() for b in model.buffers()]


@pytest.mark.parametrize("momentum,layout", [(0.1, "contiguous"), (None, "contiguous"),
                                             (0.1, "channels_last")], ids=str)
def test_compile_fullgraph_keeps_fused_ops(device, momentum, layout):
    torch._dynamo.reset()
    eager = _conv_bn_relu(momentum, device)
    compiled_model = copy.deepcopy(eager)
    recorder = _GraphRecorder()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=recorder)
    names = ["output", "grad_input"] + [f"grad {n}" for n, _ in eager.named_parameters()] + [
        n for n, _ in eager.named_buffers()]
    for step, training in enumerate([True, True, True, False, True]):
        eager.train(training)
        compiled.train(training)
        x = sample((2, 3, 6, 5), torch.float32, device, layout=layout)
        for name, a, b in zip(names, _step(compiled, x), _step(eager, x)):
            label = f"[compiled vs eager, step {step}, training={training}] {name}"
            assert a.dtype == b.dtype and a.shape == b.shape, label
            torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-6, msg=label)
        if training:
            assert int(compiled_model[1].num_batches_tracked) == int(eager[1].num_batches_tracked)
    _assert_not_decomposed(recorder.dynamo_graphs, ops.batch_norm_train.default, "dynamo graphs")
    _assert_not_decomposed(recorder.forward_graphs, ops.batch_norm_train.default, "forward graphs")
    _assert_not_decomposed(recorder.forward_graphs, ops.batch_norm_eval.default, "forward graphs")
    _assert_not_decomposed(recorder.backward_graphs, ops.batch_norm_backward.default, "backward graphs")
    # one graph per training mode: no graph breaks, no recompiles on momentum=None
    assert len(recorder.dynamo_graphs) == 2, f"{len(recorder.dynamo_graphs)} dynamo graphs"


def test_compile_inductor_matches_eager():
    """The default backend (Inductor) end to end: running statistics are written
    back into the module's buffers after Inductor re-inplaces the op. Inductor's
    layout optimization runs the convolution, and so our flexible-layout op, in
    channels_last, which rounds differently from the eager NCHW run: both are
    held to the accuracy rule against a float64 run of the same model."""
    torch._dynamo.reset()
    eager = _conv_bn_relu(0.1, "cpu")
    compiled_model = copy.deepcopy(eager)
    reference = copy.deepcopy(eager).double()
    compiled = torch.compile(compiled_model, fullgraph=True)
    names = ["output", "grad_input"] + [f"grad {n}" for n, _ in eager.named_parameters()] + [
        n for n, _ in eager.named_buffers()]
    for step in range(3):
        x = sample((2, 3, 6, 5))
        results = zip(_step(compiled, x), _step(eager, x), _step(reference, x.double()))
        for name, (a, b, r) in zip(names, results):
            if name.endswith("num_batches_tracked"):
                assert int(a) == int(b) == int(r)
                continue
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert_accurate(a, b, r, name=f"inductor step {step} {name}")
    assert int(compiled_model[1].num_batches_tracked) == 3


def test_concurrent_calls_from_python_threads(device):
    """Ops called from several Python threads at once (each with its own OpenMP
    team and per-thread scratch buffers) give bitwise the results of the same
    calls made one after another."""
    import threading

    shapes = [(4, 64, 7, 7), (2, 37, 9, 11), (3, 130, 5, 5), (2, 8, 33, 31)]
    cases = []
    for i, shape in enumerate(shapes):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(shape, generator=g).to(device)
        if i % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        cases.append((x, torch.randn_like(x)))

    def run(x, dy):
        m = fused_bn.FusedBatchNorm2d(x.shape[1]).to(device)
        xx = x.clone().requires_grad_()
        results = []
        for _ in range(10):
            y = m(xx)
            (gx,) = torch.autograd.grad(y, xx, dy)
            results.append((y.detach(), gx, m.running_mean.clone(), m.running_var.clone()))
        return results

    expected = [run(x, dy) for x, dy in cases]
    got = [None] * len(cases)
    errors = []

    def worker(i):
        try:
            got[i] = run(*cases[i])
        except Exception as e:  # surfaced below with the thread's case
            errors.append((i, e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, (want, have) in enumerate(zip(expected, got)):
        assert have is not None, f"thread {i} did not finish"
        for step, (a, b) in enumerate(zip(want, have)):
            for name, u, v in zip(("y", "grad_input", "running_mean", "running_var"), a, b):
                assert torch.equal(u, v), f"case {i} step {step}: {name} differs under concurrency"
