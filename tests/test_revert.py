"""revert_model: convert_model's inverse. A converted model (fx-fused
GraphModule or converted in place) becomes nn modules again, sharing the
converted model's parameters and buffers, with every folded activation and
residual add restored; the round trip is exact (float64, bit for bit: after
revert it is nn's own code), keeps the state_dict, leaves the converted model
as it was, and the reverted model exports with torch.export."""
import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fused_bn
from bench import zoo
from _helpers import timm_batch_norm_act, timm_residual_block

_BATCH_NORM_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_SHAPES = {1: (3, 4, 7), 2: (3, 4, 5, 6), 3: (2, 4, 3, 4, 5)}
# Every activation of fused_bn's table as the nn module a model holds (some
# with parameters other than nn's defaults), and none.
_ACTIVATIONS = {
    "identity": None, "relu": nn.ReLU(), "relu6": nn.ReLU6(), "hardtanh": nn.Hardtanh(-0.5, 2.0),
    "leaky_relu": nn.LeakyReLU(0.2), "elu": nn.ELU(0.7), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
    "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "hardsigmoid": nn.Hardsigmoid(),
}
assert set(_ACTIVATIONS) == set(fused_bn.ACTIVATIONS)


def _fused_modules(model):
    return [name for name, m in model.named_modules()
            if type(m).__module__.startswith("fused_bn") or isinstance(
                m, (fused_bn.modules._FusedBatchNormForward, fused_bn.modules._FusedFrozenBatchNormForward))]


def _randomized(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d":
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5, generator=generator)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                    m.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.double()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _run(model, shape, modes=(True, False), backward=True):
    """Per mode: the output, the input's grad and the parameters' grads; then
    the state_dict."""
    results = []
    for step, training in enumerate(modes):
        model.train(training)
        model.zero_grad(set_to_none=True)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(10 + step), dtype=torch.float64)
        x.requires_grad_(backward)
        torch.manual_seed(30 + step)  # the same dropout masks for both models
        y = model(x)
        result = {"output": y.detach().clone()}
        if backward:
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(20 + step),
                                   dtype=torch.float64))
            result["grad_input"] = x.grad
            result.update((f"grad {k}", None if p.grad is None else p.grad.clone())
                          for k, p in model.named_parameters())
        results.append(result)
    results.append(_state(model))
    return results


def _assert_identical(ours, theirs):
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a.keys() == b.keys(), step
        for key in a:
            if a[key] is None or b[key] is None:
                assert a[key] is None and b[key] is None, (step, key)
            else:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (
                    f"step {step} {key}: max difference {(a[key] - b[key]).abs().max().item()}")


def _fused_bn_ops(program):
    return [n.target for n in program.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("fused_bn")]


def _assert_reverted(reverted, converted, original):
    """No fused_bn module left; the state_dict keys are the original's and
    every value is the converted model's own tensor object."""
    assert _fused_modules(reverted) == []
    assert list(reverted.state_dict()) == list(converted.state_dict())
    assert sorted(reverted.state_dict()) == sorted(original.state_dict())
    ours, theirs = reverted.state_dict(keep_vars=True), converted.state_dict(keep_vars=True)
    values = original.state_dict()
    for key in ours:
        assert ours[key] is theirs[key], key
        assert torch.equal(ours[key], values[key]), key


def _round_trip(original, fuse, shape, modes=(True, False, True), backward=True):
    """original -> convert -> revert; the reverted model computes exactly
    what a copy of the original does. Returns (converted, reverted)."""
    reference = copy.deepcopy(original)
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=fuse)
    assert _fused_modules(converted)
    converted_code = converted.code if isinstance(converted, fx.GraphModule) else None
    converted_types = [(name, type(m)) for name, m in converted.named_modules()]
    reverted = fused_bn.revert_model(converted)
    _assert_reverted(reverted, converted, original)
    # the converted model is left as it was
    assert [(name, type(m)) for name, m in converted.named_modules()] == converted_types
    if converted_code is not None:
        assert converted.code == converted_code
    _assert_identical(_run(reverted, shape, modes, backward), _run(reference, shape, modes, backward))
    return converted, reverted


# ---------------------------------------------------------------- hand-written models

class _BnThen(nn.Module):
    """conv -> bn -> (+ the block's input) -> act, as a model's own forward."""

    def __init__(self, dim, act, residual):
        super().__init__()
        self.conv = _CONV_CLASSES[dim](4, 4, 1)
        self.bn = _BATCH_NORM_CLASSES[dim](4)
        self.act = copy.deepcopy(act)
        self.residual = residual

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.residual:
            y = y + x
        return y if self.act is None else self.act(y)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("act", list(_ACTIVATIONS))
@pytest.mark.parametrize("dim", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_fused_graph_reverts(dim, act, residual):
    """convert_model(fuse=True)'s GraphModule: each fused call becomes the nn
    batch norm, the add of its residual, and the activation's nn module with
    its parameters."""
    activation = _ACTIVATIONS[act]
    original = _randomized(_BnThen(dim, activation, residual))
    converted, reverted = _round_trip(original, True, _SHAPES[dim])
    assert isinstance(converted, fx.GraphModule) and isinstance(reverted, fx.GraphModule)
    # what convert_model folded: the activation, and the residual as the call's second argument
    assert converted.bn.activation == (None if activation is None else fused_bn._activations.resolve(activation))
    [fused_call] = [n for n in converted.graph.nodes if n.op == "call_module" and n.target == "bn"]
    assert len(fused_call.args) == 1 + int(residual)
    assert type(reverted.bn) is _BATCH_NORM_CLASSES[dim]
    [bn_call] = [n for n in reverted.graph.nodes if n.op == "call_module" and n.target == "bn"]
    assert len(bn_call.args) == 1
    adds = [n for n in reverted.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == int(residual)
    if residual:
        assert adds[0].args[0] is bn_call
    acts = [n for n in reverted.graph.nodes if n.op == "call_module" and n.target not in ("conv", "bn")]
    if activation is None:
        assert acts == []
    else:
        [node] = acts
        restored = reverted.get_submodule(node.target)
        assert node.target == "bn_act" and type(restored) is type(activation)
        assert restored.extra_repr() == activation.extra_repr()  # its parameters
        assert node.args == ((adds[0] if residual else bn_call),)
    # the reverted model exports
    reverted.eval()
    x = torch.randn(_SHAPES[dim], dtype=torch.float64)
    program = torch.export.export(reverted, (x,))
    assert torch.equal(program.module()(x), reverted(x))


@pytest.mark.parametrize("act", [a for a in _ACTIVATIONS if a != "identity"])
@pytest.mark.parametrize("dim", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_sequential_fold_in_place_reverts(dim, act):
    """A model fx cannot trace is converted in place, the activation after a
    batch norm in an nn.Sequential folded into it (an nn.Identity left at its
    index): the activation module comes back at its index."""

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(_CONV_CLASSES[dim](4, 4, 1), _BATCH_NORM_CLASSES[dim](4),
                                      copy.deepcopy(_ACTIVATIONS[act]), _CONV_CLASSES[dim](4, 4, 1))

        def forward(self, x):
            if x.shape[0] > 0:  # control flow on the input: fx cannot trace it
                return self.body(x)
            return x

    original = _randomized(Untraceable())
    converted, reverted = _round_trip(original, True, _SHAPES[dim])
    assert not isinstance(converted, fx.GraphModule)
    assert type(converted.body[2]) is nn.Identity and converted.body[1].activation is not None
    assert type(reverted.body[1]) is _BATCH_NORM_CLASSES[dim]
    assert type(reverted.body[2]) is type(_ACTIVATIONS[act])
    assert reverted.body[2].extra_repr() == _ACTIVATIONS[act].extra_repr()
    assert reverted.body[0] is converted.body[0]  # what was not converted is shared


@pytest.mark.parametrize("dim", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_in_place_conversion_reverts(dim):
    """convert_model(fuse=False): a swap back, module by module, in a copy."""
    original = _randomized(nn.Sequential(_CONV_CLASSES[dim](4, 4, 1), _BATCH_NORM_CLASSES[dim](4), nn.ReLU()))
    converted, reverted = _round_trip(original, False, _SHAPES[dim])
    assert converted is not reverted and type(converted[1]).__name__ == f"FusedBatchNorm{dim}d"
    assert [type(m) for m in reverted] == [type(m) for m in original]
    assert reverted[2] is converted[2]


class _EveryFold(nn.Module):
    """What fuse=True folds, in the spellings it knows: functional, method,
    in-place add into the batch norm's output, a residual computed after the
    batch norm, a plain add, a module called twice (unfused)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(6))
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(5))
        self.shared = nn.BatchNorm2d(4)

    def forward(self, x):
        a = F.leaky_relu(self.bns[0](self.convs[0](x)), 0.3)
        b = self.bns[1](self.convs[1](a))
        b += a
        b = b.relu()
        c = self.bns[2](self.convs[2](b))
        d = self.convs[3](b)  # the residual, computed after the batch norm
        c = F.hardtanh(d + c, -2.0, 3.0)
        e = torch.add(self.bns[3](self.convs[4](c)), c)
        f = F.gelu(self.bns[4](self.convs[5](e)), approximate="tanh")
        return self.shared(f) + self.shared(e)


def test_every_fold_reverts():
    original = _randomized(_EveryFold())
    converted, reverted = _round_trip(original, True, (2, 4, 5, 5))
    assert [type(converted.get_submodule(f"bns.{i}")).__name__ for i in range(5)] == [
        "FusedBatchNorm2d", "FusedBatchNormAddReLU2d", "FusedBatchNorm2d", "FusedBatchNorm2d", "FusedBatchNorm2d"]
    assert all(type(reverted.get_submodule(f"bns.{i}")) is nn.BatchNorm2d for i in range(5))
    assert type(reverted.shared) is nn.BatchNorm2d
    acts = {name: type(m) for name, m in reverted.named_modules() if name.endswith("_act")}
    assert acts == {"bns.0_act": nn.LeakyReLU, "bns.1_act": nn.ReLU, "bns.2_act": nn.Hardtanh,
                    "bns.4_act": nn.GELU}
    assert reverted.get_submodule("bns.2_act").min_val == -2.0
    assert reverted.get_submodule("bns.4_act").approximate == "tanh"
    assert sum(n.target is operator.add for n in reverted.graph.nodes) == 4
    program = torch.export.export(reverted.eval(), (torch.randn(2, 4, 5, 5, dtype=torch.float64),))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(program.module()(x), reverted(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated", "ignore:The TorchScript type system")
def test_tools_that_know_nn_modules_take_the_reverted_model():
    """What needs nn's modules: FX quantization's fuse_fx folds the reverted
    model's batch norms into their convolutions (not the converted model's),
    eager fuse_modules takes its conv, bn, relu, torch.jit.script compiles
    it, and its exported program holds no fused_bn op."""
    from torch.ao.quantization import fuse_modules
    from torch.ao.quantization.quantize_fx import fuse_fx

    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    original = _randomized(_EveryFold()).eval()
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    reverted = fused_bn.revert_model(converted)

    def batch_norms(model):
        return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    assert len(batch_norms(fuse_fx(copy.deepcopy(converted)))) == 6
    folded = fuse_fx(copy.deepcopy(reverted))
    assert len(batch_norms(folded)) == 1  # the one called twice, whose output two convs do not own
    torch.testing.assert_close(folded(x), original(x), rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.jit.script(reverted)(x), original(x))
    assert not _fused_bn_ops(torch.export.export(reverted, (x,)))

    sequential = _randomized(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())).eval()
    in_place = fused_bn.revert_model(fused_bn.convert_model(copy.deepcopy(sequential)))
    fused = fuse_modules(in_place, [["0", "1", "2"]])
    assert not batch_norms(fused)
    torch.testing.assert_close(fused(x), sequential(x), rtol=1e-12, atol=1e-12)


def test_module_reading_training_inside_graph_reverts():
    """A module whose code reads self.training is kept whole by the graph and
    converted in place (its Sequential's activation folded): reverted in
    place inside the reverted GraphModule, as a copy."""

    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.SiLU())

        def forward(self, x):
            return self.body(x) * (0.5 if self.training else 1.0)

    original = _randomized(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), Drop()))
    converted, reverted = _round_trip(original, True, (2, 4, 5, 5))
    assert isinstance(converted, fx.GraphModule)
    drop = converted.get_submodule("3")
    assert type(drop.body[2]) is nn.Identity
    assert type(reverted.get_submodule("3").body[2]) is nn.SiLU
    assert type(reverted.get_submodule("3.body.1")) is nn.BatchNorm2d
    assert type(drop.body[1]).__name__ == "FusedBatchNorm2d"  # the converted model's copy untouched


def test_settings_and_flags_preserved():
    """eps, momentum (None too), affine=False, track_running_stats=False,
    bias=False, a module left in eval in a training model: as they were."""

    class Settings(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.BatchNorm2d(4, eps=1e-3, momentum=None)
            self.b = nn.BatchNorm2d(4, affine=False, momentum=0.3)
            self.c = nn.BatchNorm2d(4, track_running_stats=False)
            self.d = nn.BatchNorm2d(4, bias=False)
            self.e = nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(self.e(self.d(self.c(self.b(self.a(x)))) + x))

    original = _randomized(Settings())
    for fuse in (False, True):
        converted = fused_bn.convert_model(copy.deepcopy(original), fuse=fuse)
        converted.train()
        converted.get_submodule("d").eval()
        reverted = fused_bn.revert_model(converted)
        for name in "abcde":
            ours, theirs = reverted.get_submodule(name), original.get_submodule(name)
            assert type(ours) is nn.BatchNorm2d
            for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
                assert getattr(ours, attr) == getattr(theirs, attr), (name, attr)
            assert ours.training == (name != "d")
            assert (ours.bias is None) == (theirs.bias is None)
        assert reverted.training


def test_optimizer_of_converted_model_trains_reverted():
    """The reverted model's parameters are the converted model's objects: an
    optimizer built on either updates both."""
    original = _randomized(_BnThen(2, nn.ReLU(), True))
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    reverted = fused_bn.revert_model(converted)
    reverted(torch.randn(2, 4, 5, 5, dtype=torch.float64)).sum().backward()
    optimizer.step()
    for p, q in zip(converted.parameters(), reverted.parameters()):
        assert p is q and p.grad is not None


def test_lazy_reverts():
    """A FusedLazyBatchNorm not yet run becomes nn's lazy batch norm with its
    settings, and then runs as nn's."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(eps=1e-3, momentum=0.2)).double()

    original = build()  # (a lazy module not yet run cannot be deep-copied)
    converted = fused_bn.convert_model(build())
    assert type(converted[1]) is fused_bn.FusedLazyBatchNorm2d
    reverted = fused_bn.revert_model(converted)
    assert type(reverted[1]) is nn.LazyBatchNorm2d
    assert (reverted[1].eps, reverted[1].momentum) == (1e-3, 0.2)
    assert reverted[1].weight is converted[1].weight
    _assert_identical(_run(reverted, (2, 3, 4, 4)), _run(original, (2, 3, 4, 4)))
    assert type(reverted[1]) is nn.BatchNorm2d


def test_sync_batch_norm_reverts():
    """FusedSyncBatchNorm2d becomes nn.SyncBatchNorm with its process group,
    and the activation it was converted with after it in a graph."""
    original = _randomized(_BnThen(2, nn.SiLU(), True))
    converted = fused_bn.convert_model(copy.deepcopy(original), fuse=True)
    synced = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(converted)
    assert type(synced.bn) is fused_bn.FusedSyncBatchNorm2d
    reverted = fused_bn.revert_model(synced)
    assert type(reverted.bn) is nn.SyncBatchNorm and reverted.bn.process_group is None
    assert type(reverted.bn_act) is nn.SiLU
    _assert_reverted(reverted, synced, original)
    # nn.SyncBatchNorm without torch.distributed initialized is plain batch norm
    _assert_identical(_run(reverted, (2, 4, 5, 5), (False,)), _run(copy.deepcopy(original), (2, 4, 5, 5), (False,)))


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
def test_frozen_batch_norm_reverts(fuse):
    """torchvision's FrozenBatchNorm2d: its fused form (with the add and ReLU
    folded under fuse=True) back to torchvision's module (then the add and
    nn.ReLU)."""
    torchvision = zoo.import_torchvision()
    FrozenBatchNorm2d = torchvision.ops.misc.FrozenBatchNorm2d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = FrozenBatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += x
            return self.relu(out)

    original = _randomized(Block())
    converted, reverted = _round_trip(original, fuse, (2, 4, 5, 5))
    assert type(converted.bn).__name__ == "FusedFrozenBatchNorm2d"
    assert type(reverted.bn) is FrozenBatchNorm2d and reverted.bn.weight is converted.bn.weight
    assert reverted.relu is converted.relu  # the module the graph no longer calls is kept, as in the converted model
    if fuse:
        assert type(reverted.bn_act) is nn.ReLU


@pytest.mark.parametrize("act", ["relu", "silu", "identity", "tanh"])
@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
def test_timm_batch_norm_act_reverts(fuse, act):
    """FusedBatchNormAct2d -> timm's BatchNormAct2d with its own drop and
    act children (the same objects): its activation is its act again."""
    BatchNormAct2d = timm_batch_norm_act()
    act_layer = {"relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity, "tanh": nn.Tanh}[act]
    original = _randomized(nn.Sequential(nn.Conv2d(4, 4, 3), BatchNormAct2d(4, act_layer=act_layer)))
    converted, reverted = _round_trip(original, fuse, (2, 4, 7, 7))
    bn = reverted.get_submodule("1")
    assert type(bn) is BatchNormAct2d and type(bn.act) is act_layer
    assert bn.act is converted.get_submodule("1").act
    assert not any(name.endswith("_act") for name, _ in reverted.named_modules())


def test_timm_batch_norm_act_graph_fold_reverts():
    """A BatchNormAct2d without an activation of its own, whose graph's add
    and activation were folded into it: BatchNormAct2d, add, nn.Hardswish."""
    BatchNormAct2d = timm_batch_norm_act()
    Block = timm_residual_block()

    original = _randomized(Block())
    converted, reverted = _round_trip(original, True, (2, 4, 5, 5))
    assert converted.bn.activation == fused_bn.Activation("hardswish")
    assert type(reverted.bn) is BatchNormAct2d and type(reverted.bn.act) is nn.Identity
    assert type(reverted.bn_act) is nn.Hardswish


def test_nested_graph_module_reverts():
    """A converted GraphModule held by another module is reverted there."""
    inner = fused_bn.convert_model(_randomized(_BnThen(2, nn.ReLU6(), True)), fuse=True)
    outer = nn.Sequential(nn.Conv2d(4, 4, 1).double(), inner)
    reverted = fused_bn.revert_model(outer)
    assert _fused_modules(reverted) == [] and type(reverted[1]) is not type(inner)
    assert type(reverted[1].bn_act) is nn.ReLU6
    assert _fused_modules(outer)  # left as it was


def test_nothing_to_revert_returns_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert fused_bn.revert_model(model) is model


def test_fused_module_itself_reverts():
    bn = fused_bn.FusedBatchNorm3d(5, eps=1e-3).eval()
    reverted = fused_bn.revert_model(bn)
    assert type(reverted) is nn.BatchNorm3d and not reverted.training and reverted.weight is bn.weight


@pytest.mark.parametrize("value", [None, 3, "model", [nn.BatchNorm2d(4)]], ids=["None", "int", "str", "list"])
def test_not_a_module_raises_type_error(value):
    with pytest.raises(TypeError, match="revert_model expects an nn.Module, got"):
        fused_bn.revert_model(value)


def test_activation_without_a_place_raises():
    """A fused module applying an activation called by a model's own code (not
    a GraphModule, not an nn.Sequential's slot) has no nn form revert_model
    can make: ValueError naming it, the model left as it was."""

    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Module()
            self.block.bn = fused_bn.FusedBatchNormReLU2d(4)

        def forward(self, x):
            return self.block.bn(x)

    model = Own()
    with pytest.raises(ValueError, match=r"'block\.bn' \(FusedBatchNormReLU2d\) applies Activation"):
        fused_bn.revert_model(model)
    with pytest.raises(ValueError, match="the model itself"):
        fused_bn.revert_model(fused_bn.FusedBatchNorm2d(4, activation="silu"))
    assert type(model.block.bn) is fused_bn.FusedBatchNormReLU2d


def test_unknown_subclass_raises_type_error():
    class Mine(fused_bn.FusedBatchNorm2d):
        pass

    with pytest.raises(TypeError, match="Mine subclasses a fused_bn batch norm"):
        fused_bn.revert_model(nn.Sequential(Mine(4)))


# ---------------------------------------------------------------- zoo models

_ZOO = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "timm/efficientnet_b0", "timm/cspdarknet53")


@pytest.mark.parametrize("fuse", [False, True], ids=["convert", "fuse"])
@pytest.mark.parametrize("name", _ZOO)
def test_zoo_round_trip(name, fuse):
    """torchvision and timm models: revert_model(convert_model(m)) computes
    exactly what m does in train and eval (outputs and running statistics;
    gradients are the hand-written models' business, to keep this short),
    with its state_dict, no fused_bn module, and its eval form exports."""
    if zoo.available(name) is not None:
        pytest.skip(zoo.available(name))
    model, side = zoo.build(name)
    original = _randomized(model)
    shape = (2, 3, side, side)
    converted, reverted = _round_trip(original, fuse, shape, backward=False)
    assert isinstance(converted, fx.GraphModule) == fuse
    assert isinstance(reverted, fx.GraphModule) == fuse
    reverted.eval()
    x = torch.randn(shape, dtype=torch.float64)
    program = torch.export.export(reverted, (x,))
    assert not _fused_bn_ops(program)
    assert torch.equal(program.module()(x), reverted(x))
