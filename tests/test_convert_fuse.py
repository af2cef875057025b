"""convert_model(fuse=True): every spelling of an activation and of a residual
add after a batch norm folds into one fused call with the activation's
parameters exactly, the rules that keep a fold correct leave the rest alone,
torchvision's FrozenBatchNorm2d gets a fused form, and fusion_report says
what was folded and why not. Values and gradients against the unconverted
model: float64 within 1e-10 relative (the same math, other rounding)."""
import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_bn
from bench import zoo

Act = fused_bn.Activation


def _randomized(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d":
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.5, 0.5, generator=generator)
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.double()


def _steps(model, shape=(3, 4, 5, 6), modes=(True, True, False)):
    """Output, input grad and parameter grads per step (train, train, eval),
    then the buffers."""
    results = []
    for step, training in enumerate(modes):
        model.train(training)
        model.zero_grad(set_to_none=True)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step),
                        dtype=torch.float64).requires_grad_()
        y = model(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(20 + step), dtype=torch.float64))
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append({"output": y.detach(), "grad_input": x.grad,
                        **{f"grad {k}": grads[k] for k in sorted(grads)}})
    results.append({f"buffer {k}": v.clone() for k, v in sorted(model.state_dict().items())})
    return results


def _assert_same(converted, original, **kwargs):
    for step, (ours, theirs) in enumerate(zip(_steps(converted, **kwargs), _steps(original, **kwargs))):
        assert ours.keys() == theirs.keys()
        for key in ours:
            if ours[key] is None or theirs[key] is None:
                assert ours[key] is None and theirs[key] is None, (step, key)
                continue
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"step {step} {key}: {m}")


def _fused_batch_norms(converted):
    return {name: m for name, m in converted.named_modules()
            if isinstance(m, (fused_bn.modules._FusedBatchNormForward, fused_bn.modules._FusedFrozenBatchNormForward))}


class _ConvBnThen(nn.Module):
    """conv -> bn -> `after(bn's output)`."""

    def __init__(self, after, module=None):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = module
        self.after = after

    def forward(self, x):
        return self.after(self, self.bn(self.conv(x)))


# (id, after(model, y), activation module or None, the Activation it folds as)
ACTIVATION_FORMS = [
    ("nn.ReLU", lambda m, y: m.act(y), nn.ReLU(inplace=True), Act("relu")),
    ("F.relu", lambda m, y: F.relu(y), None, Act("relu")),
    ("torch.relu_", lambda m, y: torch.relu_(y), None, Act("relu")),
    ("Tensor.relu", lambda m, y: y.relu(), None, Act("relu")),
    ("nn.ReLU6", lambda m, y: m.act(y), nn.ReLU6(), Act("hardtanh", (0.0, 6.0))),
    ("F.relu6 inplace", lambda m, y: F.relu6(y, inplace=True), None, Act("hardtanh", (0.0, 6.0))),
    ("F.hardtanh positional", lambda m, y: F.hardtanh(y, -2.0, 3.0), None, Act("hardtanh", (-2.0, 3.0))),
    ("F.hardtanh keywords", lambda m, y: F.hardtanh(y, max_val=0.5, min_val=-0.25), None,
     Act("hardtanh", (-0.25, 0.5))),
    ("F.hardtanh_", lambda m, y: F.hardtanh_(y, -1.5, 1.5), None, Act("hardtanh", (-1.5, 1.5))),
    ("nn.LeakyReLU(0.1)", lambda m, y: m.act(y), nn.LeakyReLU(0.1, inplace=True), Act("leaky_relu", (0.1,))),
    ("F.leaky_relu default", lambda m, y: F.leaky_relu(y), None, Act("leaky_relu", (0.01,))),
    ("F.leaky_relu keyword inplace", lambda m, y: F.leaky_relu(y, negative_slope=0.2, inplace=True), None,
     Act("leaky_relu", (0.2,))),
    ("F.leaky_relu_", lambda m, y: F.leaky_relu_(y, 0.3), None, Act("leaky_relu", (0.3,))),
    ("nn.ELU(0.5)", lambda m, y: m.act(y), nn.ELU(0.5), Act("elu", (0.5,))),
    ("F.elu", lambda m, y: F.elu(y, 2.0), None, Act("elu", (2.0,))),
    ("nn.SiLU", lambda m, y: m.act(y), nn.SiLU(inplace=True), Act("silu")),
    ("F.silu", lambda m, y: F.silu(y), None, Act("silu")),
    ("nn.Hardswish", lambda m, y: m.act(y), nn.Hardswish(), Act("hardswish")),
    ("F.hardswish", lambda m, y: F.hardswish(y, inplace=True), None, Act("hardswish")),
    ("F.hardsigmoid", lambda m, y: F.hardsigmoid(y), None, Act("hardsigmoid")),
    ("nn.GELU", lambda m, y: m.act(y), nn.GELU(), Act("gelu")),
    ("F.gelu", lambda m, y: F.gelu(y), None, Act("gelu")),
    ("nn.GELU tanh", lambda m, y: m.act(y), nn.GELU(approximate="tanh"), Act("gelu_tanh")),
    ("F.gelu tanh", lambda m, y: F.gelu(y, approximate="tanh"), None, Act("gelu_tanh")),
]


# nn's float64 hardsigmoid_backward multiplies by (double)(1.0f / 6.0f), 3e-8
# off: the unconverted model computes it exactly, as the kernels do.
_EXACT_AFTER = {"F.hardsigmoid": lambda m, y: torch.clamp(y / 6 + 0.5, 0, 1)}


@pytest.mark.parametrize("name,after,module,expected", ACTIVATION_FORMS, ids=[f[0] for f in ACTIVATION_FORMS])
def test_every_spelling_of_an_activation_folds(name, after, module, expected):
    model = _randomized(_ConvBnThen(after, module))
    converted = fused_bn.convert_model(copy.deepcopy(model), fuse=True)
    original = copy.deepcopy(model)
    original.after = _EXACT_AFTER.get(name, after)
    bn = converted.bn
    assert bn.activation == expected
    assert [n.op for n in converted.graph.nodes] == ["placeholder", "call_module", "call_module", "output"], \
        converted.code
    _assert_same(converted, original)


# Functional calls that must stay as they are (the fold would change them).
UNFUSED_FORMS = [
    ("F.leaky_relu slope from a tensor", lambda m, y: F.leaky_relu(y, float(m.conv.bias.shape[0]) / 8)),
    ("F.gelu unknown keyword", lambda m, y: F.gelu(y, approximate="tanh") * 1.0),
    ("torch.sigmoid (not fused_bn's)", lambda m, y: torch.sigmoid(y)),
    ("F.softplus", lambda m, y: F.softplus(y)),
]


@pytest.mark.parametrize("after", [f[1] for f in UNFUSED_FORMS[2:]], ids=[f[0] for f in UNFUSED_FORMS[2:]])
def test_an_activation_fused_bn_lacks_stays_a_separate_op(after):
    original = _randomized(_ConvBnThen(after))
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    assert converted.bn.activation is None
    assert len([n for n in converted.graph.nodes if n.op == "call_function"]) == 1
    _assert_same(converted, original)
    assert fused_bn.fusion_report(original) == [fused_bn.FusionRecord("bn", None, None, None)]


class _ConvBnShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.shortcut = nn.Conv2d(4, 4, 1)


class _Residual(_ConvBnShortcut):
    """conv -> bn, then `combine(model, bn's output, residual)` with the
    residual computed before the batch norm (`residual_first`) or after."""

    def __init__(self, combine, residual_first=True):
        super().__init__()
        self.combine, self.residual_first = combine, residual_first

    def forward(self, x):
        if self.residual_first:
            r = self.shortcut(x)
            y = self.bn(self.conv(x))
        else:
            y = self.bn(self.conv(x))
            r = self.shortcut(x)
        return self.combine(y, r)


def _iadd_into_output(y, r):
    y += r
    return F.silu(y)


def _iadd_into_fresh_residual(y, r):
    r += y
    return F.relu6(r)


RESIDUAL_FORMS = [
    ("bn + r", lambda y, r: y + r, None),
    ("r + bn", lambda y, r: r + y, None),
    ("torch.add", lambda y, r: torch.add(y, r), None),
    ("Tensor.add then relu", lambda y, r: y.add(r).relu(), Act("relu")),
    ("bn += r then silu", _iadd_into_output, Act("silu")),
    ("fresh r += bn then relu6", _iadd_into_fresh_residual, Act("hardtanh", (0.0, 6.0))),
    ("add then leaky_relu(0.2)", lambda y, r: F.leaky_relu(r + y, 0.2), Act("leaky_relu", (0.2,))),
    ("add then gelu tanh", lambda y, r: F.gelu(y + r, approximate="tanh"), Act("gelu_tanh")),
]


@pytest.mark.parametrize("residual_first", [True, False], ids=["residual-first", "residual-after"])
@pytest.mark.parametrize("combine,expected", [f[1:] for f in RESIDUAL_FORMS], ids=[f[0] for f in RESIDUAL_FORMS])
def test_every_spelling_of_a_residual_add_folds(combine, expected, residual_first):
    """Either operand order, in place into the batch norm's output or into a
    residual nothing else reads, with an activation after or none; a residual
    computed after the batch norm moves the batch norm's call to the add
    (torchvision's Bottleneck)."""
    original = _randomized(_Residual(combine, residual_first))
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    assert converted.bn.activation == expected
    calls = [n for n in converted.graph.nodes if n.op in ("call_function", "call_method")]
    assert not calls, converted.code
    bn_call = next(n for n in converted.graph.nodes if n.target == "bn")
    assert len(bn_call.args) == 2
    _assert_same(converted, original)
    record = next(r for r in fused_bn.fusion_report(original) if r.name == "bn")
    assert record.follows == record.fused and record.reason is None, record


def _read_twice(y, r):
    return F.relu(y + r) + y


def _residual_written_then_read(model, x):
    r = model.shortcut(x)
    y = model.bn(model.conv(x))
    r2 = r * 1.0
    alias = r2
    r2 += y  # writes into the tensor `alias` reads below
    return F.relu(r2) + alias


def _add_with_alpha(y, r):
    return torch.add(y, r, alpha=2.0).relu()


class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) + F.relu(self.bn(x))


class _InputReadElsewhere(_ConvBnShortcut):
    def forward(self, x):
        h = self.conv(x)
        y = self.bn(h)
        r = self.shortcut(h)
        return y + r


class _WrittenResidual(_ConvBnShortcut):
    def forward(self, x):
        return _residual_written_then_read(self, x)


@pytest.mark.parametrize("make,reason", [
    (lambda: _Residual(_read_twice), "its output is read 2 times"),
    (lambda: _Residual(_add_with_alpha), "its add has an alpha or more arguments"),
    (_CalledTwice, "the module is called from 2 places"),
    (_InputReadElsewhere, "its residual is computed after it, and its input is read elsewhere too"),
    (_WrittenResidual, "its add writes into the residual"),
], ids=["output-read-twice", "alpha", "called-twice", "input-read-elsewhere", "residual-written"])
def test_folds_that_would_change_the_model_are_not_made(make, reason):
    original = _randomized(make())
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    assert converted.bn.activation is None
    _assert_same(converted, original)
    record = next(r for r in fused_bn.fusion_report(original) if r.name == "bn")
    assert record.fused is None and record.follows is not None and record.reason == reason, record


def test_fuse_relu_is_fuse():
    original = _randomized(_ConvBnThen(lambda m, y: F.silu(y)))
    assert fused_bn.convert_model(copy.deepcopy(original), fuse_relu=True).bn.activation == Act("silu")


def test_untraceable_model_folds_sequential_activations_in_place():
    """A model fx cannot trace is converted in place: an activation module
    right after a batch norm in an nn.Sequential folds, with its parameters."""

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
                                      nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Hardswish())

        def forward(self, x):
            y = self.body(x)
            return y * 2 if y.sum() > 0 else y

    original = _randomized(Untraceable())
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    assert type(converted) is Untraceable
    assert converted.body[1].activation == Act("leaky_relu", (0.2,))
    assert converted.body[4].activation == Act("hardswish")
    assert type(converted.body[2]) is nn.Identity and type(converted.body[5]) is nn.Identity
    _assert_same(converted, original)
    report = fused_bn.fusion_report(original)
    assert [(r.name, r.fused) for r in report] == [("body.1", "leaky_relu(0.2)"), ("body.4", "hardswish")]


# ---------------------------------------------------------------- torchvision's FrozenBatchNorm2d

def _frozen_class():
    reason = zoo.available("resnet18")
    if reason is not None:
        pytest.skip(reason)
    zoo.import_torchvision()
    from torchvision.ops.misc import FrozenBatchNorm2d
    return FrozenBatchNorm2d


def test_frozen_batch_norm_resnet_folds_relu_and_adds():
    """A detection backbone (torchvision's resnet with FrozenBatchNorm2d):
    every frozen batch norm becomes a FusedFrozenBatchNorm2d (still a
    FrozenBatchNorm2d, the very buffers), ReLUs and add+ReLUs folded; values
    and grads as torchvision's, the state_dict unchanged."""
    frozen = _frozen_class()
    torch.manual_seed(0)
    original = _randomized(zoo.import_torchvision().models.resnet18(weights=None, norm_layer=frozen))
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    fused = _fused_batch_norms(converted)
    assert len(fused) == 20 and all(isinstance(m, frozen) for m in fused.values())
    assert all(type(m).__name__ == "FusedFrozenBatchNorm2d" for m in fused.values())
    folds = sorted(str(m.activation) for m in fused.values())
    assert folds.count(str(Act("relu"))) == 17, folds
    assert sorted(converted.state_dict()) == sorted(original.state_dict())
    _assert_same(converted, original, shape=(2, 3, 32, 32))
    # A checkpoint saved with num_batches_tracked (from an nn.BatchNorm2d
    # model) loads as into torchvision's module.
    state = zoo.import_torchvision().models.resnet18(weights=None).state_dict()
    converted.load_state_dict(state)


def test_frozen_batch_norm_unfused_cases_run_torchvision_forward():
    """convert_model without fuse: the frozen form alone, one pass; input in
    another dtype than its buffers (torchvision promotes) runs torchvision's
    own forward, so the output dtype is torchvision's."""
    frozen = _frozen_class()
    original = frozen(4)
    with torch.no_grad():
        original.weight.uniform_(0.5, 1.5)
        original.running_var.uniform_(0.5, 1.5)
    model = fused_bn.convert_model(nn.Sequential(copy.deepcopy(original)))
    fused = model[0]
    assert type(fused).__name__ == "FusedFrozenBatchNorm2d" and fused.activation is None
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(fused(x), original(x))
    half = x.to(torch.bfloat16)
    assert fused(half).dtype == original(half).dtype == torch.float32
    torch.testing.assert_close(fused(half), original(half), rtol=0, atol=0)


def test_fused_model_pickles_with_frozen_batch_norm(tmp_path):
    frozen = _frozen_class()
    model = fused_bn.convert_model(nn.Sequential(nn.Conv2d(3, 4, 1), frozen(4)))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded[1]).__name__ == "FusedFrozenBatchNorm2d"
    x = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(loaded(x), model(x))


def test_converted_resnet_sync_converts_with_every_fold():
    """convert_model(fuse=True) then FusedSyncBatchNorm2d.convert_sync_batchnorm:
    every fused form has a synchronised one (the add+ReLU forms included),
    and without a process group the model computes what it did."""
    original = _randomized(_Residual(lambda y, r: F.hardswish(y + r)))
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    synced = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(copy.deepcopy(converted))
    assert type(synced.bn) is fused_bn.FusedSyncBatchNorm2d and synced.bn.activation == Act("hardswish")
    _assert_same(synced, original)


@pytest.mark.parametrize("op", [operator.add, torch.add])
def test_fusion_report_counts_what_another_batch_norm_folded(op):
    """Two batch norms added: one folds the add (the one computed second);
    the other is then no longer followed by anything to fold."""

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(op(self.a(x), self.b(x * 2)))

    original = _randomized(TwoBranches())
    report = {r.name: r for r in fused_bn.fusion_report(original)}
    assert report["a"] == fused_bn.FusionRecord("a", None, None, None)
    assert report["b"] == fused_bn.FusionRecord("b", "add+relu", "add+relu", None)
    _assert_same(fused_bn.convert_model(copy.deepcopy(original), fuse=True), original)


class _EveryFold(nn.Module):
    """conv -> bn -> ReLU6, conv -> bn + add -> Hardswish, conv -> bn -> SiLU,
    conv -> bn + plain add, conv -> bn -> GELU: what fuse=True folds."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = F.relu6(self.bn0(self.stem(x)))
        y = F.hardswish(self.bn1(self.conv1(y)) + y)
        y = y + self.bn3(self.conv3(F.silu(self.bn2(self.conv2(y)))))
        return F.gelu(self.bn4(self.conv4(y)))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_compiled_fused_model_matches_the_eager_original(memory_format):
    """torch.compile (Inductor) of a fuse=True model: two training steps and
    an eval forward give the eager original's outputs, grads and buffers
    (float64, 1e-10 relative)."""
    original = _randomized(_EveryFold()).to(memory_format=memory_format)
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    assert len(_fused_batch_norms(converted)) == 5
    assert not [n for n in converted.graph.nodes if n.op in ("call_function", "call_method")], converted.code
    compiled = torch.compile(converted)
    for step, training in enumerate((True, True, False)):
        results = []
        for model, run in ((original, original), (converted, compiled)):
            model.train(training)
            model.zero_grad(set_to_none=True)
            x = torch.randn(4, 3, 12, 10, generator=torch.Generator().manual_seed(step),
                            dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
            y = run(x)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(9 + step), dtype=y.dtype))
            results.append([y.detach(), x.grad] + [p.grad for _, p in sorted(model.named_parameters())]
                           + [b for _, b in sorted(model.named_buffers())])
        for i, (ours, theirs) in enumerate(zip(*results)):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {step} #{i}: {m}")


@pytest.mark.parametrize("function", ["convert_model", "fusion_report"])
@pytest.mark.parametrize("value", [None, 3, [nn.BatchNorm2d(4)]], ids=["None", "int", "list"])
def test_not_a_module_raises_type_error(function, value):
    """As revert_model: a clear TypeError, not an AttributeError from deep inside."""
    with pytest.raises(TypeError, match=f"{function} expects an nn.Module, got {type(value).__name__}"):
        getattr(fused_bn, function)(value)
