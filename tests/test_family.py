"""The batch-norm family beyond the 2-D one: FusedBatchNorm1d and FusedBatchNorm3d,
their ReLU, add+ReLU and lazy forms, as drop-ins for nn's (type, constructor,
state_dict both ways, errors), and convert_model / convert_sync_batchnorm over
models that mix BatchNorm1d, 2d and 3d. Numerical parity over every input rank
is in test_parity.py, test_fused_relu.py and test_sync.py."""
import copy

import pytest
import torch
from torch import nn

import fused_bn
from _accuracy import assert_accurate
from _helpers import BATCH_NORMS, RELU_BATCH_NORMS, EndToEndErrors, sample
from test_fused_relu import _model_step

# nn's class -> (ours, our ReLU form, our add+ReLU form, an input shape).
FAMILY = {
    nn.BatchNorm1d: (fused_bn.FusedBatchNorm1d, fused_bn.FusedBatchNormReLU1d, fused_bn.FusedBatchNormAddReLU1d,
                     (6, 4, 5)),
    nn.BatchNorm2d: (fused_bn.FusedBatchNorm2d, fused_bn.FusedBatchNormReLU2d, fused_bn.FusedBatchNormAddReLU2d,
                     (3, 4, 5, 5)),
    nn.BatchNorm3d: (fused_bn.FusedBatchNorm3d, fused_bn.FusedBatchNormReLU3d, fused_bn.FusedBatchNormAddReLU3d,
                     (2, 4, 3, 4, 5)),
}
LAZY = {nn.LazyBatchNorm1d: (fused_bn.FusedLazyBatchNorm1d, nn.BatchNorm1d),
        nn.LazyBatchNorm2d: (fused_bn.FusedLazyBatchNorm2d, nn.BatchNorm2d),
        nn.LazyBatchNorm3d: (fused_bn.FusedLazyBatchNorm3d, nn.BatchNorm3d)}
by_name = {"ids": lambda cls: cls.__name__}


@pytest.mark.parametrize("nn_cls", list(FAMILY), **by_name)
def test_every_form_is_an_nn_batch_norm_of_its_rank(nn_cls):
    for cls in FAMILY[nn_cls][:3]:
        m = cls(3)
        assert isinstance(m, nn_cls), cls
        for other in FAMILY:
            assert other is nn_cls or not isinstance(m, other), (cls, other)


@pytest.mark.parametrize("nn_cls", list(FAMILY), **by_name)
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
def test_constructor_and_state_dict_match_nn(nn_cls, affine, track):
    kwargs = dict(eps=1e-3, momentum=None, affine=affine, track_running_stats=track, dtype=torch.float64)
    shape = FAMILY[nn_cls][3]
    for cls in FAMILY[nn_cls][:3]:
        ours, theirs = cls(4, **kwargs), nn_cls(4, **kwargs)
        # nn's repr; the ReLU forms add their activation (fused_bn.Activation) at the end.
        expected = repr(theirs).split("(", 1)[1]
        if ours.activation is not None:
            assert ours.activation == fused_bn.Activation("relu", ()), cls
            expected = expected[:-1] + f", activation={ours.activation})"
        assert repr(ours).split("(", 1)[1] == expected
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        # Checkpoints go both ways, after training steps on either side.
        for src, dst in ((theirs, ours), (ours, theirs)):
            x = sample(shape, torch.float64)
            src(x) if cls is not FAMILY[nn_cls][2] or src is theirs else src(x, x)
            dst.load_state_dict(src.state_dict(), strict=True)
            for key, value in dst.state_dict().items():
                assert torch.equal(value, src.state_dict()[key]), (cls, key)


@pytest.mark.parametrize("nn_cls", list(FAMILY), **by_name)
def test_each_form_refuses_the_other_ranks_as_nn(nn_cls):
    wrong = {nn.BatchNorm1d: (2, 4, 3, 3), nn.BatchNorm2d: (2, 4, 3), nn.BatchNorm3d: (2, 4, 3, 3)}[nn_cls]
    x = torch.randn(wrong)
    with pytest.raises(ValueError) as expected:
        nn_cls(4)(x)
    for cls in FAMILY[nn_cls][:3]:
        m = cls(4)
        before = copy.deepcopy(m.state_dict())
        with pytest.raises(ValueError) as got:
            m(x, x) if cls is FAMILY[nn_cls][2] else m(x)
        assert str(got.value) == str(expected.value), cls
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("lazy_cls", list(LAZY), **by_name)
@pytest.mark.parametrize("settings", [dict(), dict(momentum=None, eps=1e-3), dict(affine=False),
                                      dict(track_running_stats=False)], ids=str)
def test_lazy_forms_infer_become_and_match_nn(lazy_cls, settings):
    """convert_model swaps an unrun nn lazy batch norm for ours with its settings;
    it infers num_features at the first forward and becomes our twin of the class
    nn's becomes; both then agree step for step."""
    ours_lazy, eager_cls = LAZY[lazy_cls]
    fused_cls = FAMILY[eager_cls][0]
    shape = FAMILY[eager_cls][3]
    ours = fused_bn.convert_model(nn.Sequential(lazy_cls(**settings)))
    theirs = nn.Sequential(lazy_cls(**settings))
    assert type(ours[0]) is ours_lazy and not isinstance(ours[0], eager_cls)
    for step, training in enumerate((True, True, False)):
        ours.train(training)
        theirs.train(training)
        x = sample(shape)
        y_ours, y_theirs = ours(x), theirs(x)
        assert type(ours[0]) is fused_cls and type(theirs[0]) is eager_cls
        ref = copy.deepcopy(theirs).double()
        assert_accurate(y_ours, y_theirs, ref(x.double()) if step == 0 else y_theirs.double(),
                        name=f"{lazy_cls.__name__} step {step}")
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("lazy_cls", list(LAZY), **by_name)
def test_lazy_forms_refuse_the_wrong_rank_as_nn(lazy_cls):
    x = torch.randn(2, 3, 4, 4) if lazy_cls is not nn.LazyBatchNorm2d else torch.randn(2, 3, 4)
    with pytest.raises(ValueError) as expected:
        lazy_cls()(x)
    with pytest.raises(ValueError) as got:
        LAZY[lazy_cls][0]()(x)
    assert str(got.value) == str(expected.value)


class MixedNet(nn.Module):
    """A video stem (Conv3d + BatchNorm3d + ReLU, a residual 3-D block), pooled to
    a sequence for a BatchNorm1d on (N, C, L), then an MLP head with BatchNorm1d on
    (N, C) and the lazy forms."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1, bias=False), nn.BatchNorm3d(6), nn.ReLU())
        self.conv = nn.Conv3d(6, 6, 1, bias=False)
        self.bn3d = nn.BatchNorm3d(6)
        self.seq_bn = nn.BatchNorm1d(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 4, 16, bias=False), nn.BatchNorm1d(16),
                                  nn.ReLU(inplace=True), nn.Linear(16, 8, bias=False), nn.LazyBatchNorm1d(),
                                  nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.bn3d(self.conv(x)) + x)
        x = x.mean(dim=(3, 4))        # (N, C, D)
        x = torch.relu(self.seq_bn(x))
        return self.head(x)


def _randomized(model):
    model(torch.randn(3, 2, 4, 5, 5))  # initializes the lazy module
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("fuse_relu", [False, True], ids=["convert", "fuse_relu"])
def test_convert_model_mixed_ranks(fuse_relu):
    """Every batch norm of each rank converted (and with fuse_relu, its ReLU or
    add+ReLU folded in), the state_dict keys kept, and two training steps and an
    eval step end to end under the accuracy rule (errors summed over draws:
    tests/_helpers.py's EndToEndErrors). A batch of 8: with 3 the head's batch
    norms see 3 rows, whose gradients are near-cancellations that magnify any
    rounding difference of the layers before, so end-to-end errors of ours and
    of nn alike are dominated by a draw or two (each side in turn), while
    layer by layer on identical inputs ours matches nn's error (median ratio
    0.7-1.0 over 200 seeds for (3, 16), (3, 6, 100), (3, 6, 4, 5, 5))."""
    draws = 6
    totals = EndToEndErrors()
    for draw in range(draws):
        torch.manual_seed(draw)
        original = _randomized(MixedNet())
        reference = copy.deepcopy(original).double()
        converted = fused_bn.convert_model(copy.deepcopy(original), fuse_relu=fuse_relu)
        kinds = [type(m) for m in converted.modules()]
        assert not {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d} & set(kinds), kinds
        if fuse_relu:
            assert kinds.count(fused_bn.FusedBatchNormReLU3d) == 1, kinds
            assert kinds.count(fused_bn.FusedBatchNormAddReLU3d) == 1, kinds
            assert kinds.count(fused_bn.FusedBatchNormReLU1d) == 3, kinds
        else:
            assert kinds.count(fused_bn.FusedBatchNorm3d) == 2 and kinds.count(fused_bn.FusedBatchNorm1d) == 3, kinds
        assert sorted(converted.state_dict()) == sorted(original.state_dict())
        for step, training in enumerate((True, True, False)):
            for m in (converted, original, reference):
                m.train(training)
            x = sample((8, 2, 4, 5, 5))
            totals.add(step, _model_step(converted, x), _model_step(original, x),
                       _model_step(reference, x.double()), f"[mixed ranks draw {draw} step {step}]")
    totals.check(f"[mixed ranks, fuse_relu={fuse_relu}", draws)


def test_convert_sync_batchnorm_covers_every_rank():
    model = nn.Sequential(nn.BatchNorm1d(3), fused_bn.FusedBatchNormReLU1d(3), nn.BatchNorm3d(3, momentum=None),
                          fused_bn.FusedBatchNormReLU3d(3, affine=False), nn.SyncBatchNorm(3), nn.BatchNorm2d(3))
    params = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    converted = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(model)
    assert all(type(m) is fused_bn.FusedSyncBatchNorm2d for m in converted)
    relu = fused_bn.Activation("relu", ())
    assert [m.activation for m in converted] == [None, relu, None, relu, None, None]
    assert converted[2].momentum is None and converted[3].affine is False
    assert {id(t) for t in list(converted.parameters()) + list(converted.buffers())} == params
    # Without a process group each is the fused batch norm of its input's rank.
    for i, shape in ((0, (5, 3)), (1, (4, 3, 6)), (2, (2, 3, 2, 3, 4)), (3, (2, 3, 2, 3, 4))):
        sync = converted[i]
        local_cls = RELU_BATCH_NORMS[len(shape)] if sync.activation else BATCH_NORMS[len(shape)][1]
        local = local_cls(3, momentum=sync.momentum, affine=sync.affine)
        local.load_state_dict(copy.deepcopy(sync.state_dict()))
        x = sample(shape)
        torch.testing.assert_close(sync(x), local(x), rtol=0, atol=0)
        for key, value in local.state_dict().items():
            assert torch.equal(sync.state_dict()[key], value), (i, key)


@pytest.mark.parametrize("module_cls,shape", [(fused_bn.FusedBatchNormAddReLU1d, (4, 3, 6)),
                                              (fused_bn.FusedBatchNormAddReLU3d, (2, 3, 2, 3, 4))],
                         ids=["FusedBatchNormAddReLU1d", "FusedBatchNormAddReLU3d"])
def test_convert_sync_batchnorm_converts_add_relu_forms(module_cls, shape):
    """The add+ReLU forms become FusedSyncBatchNorm2d with activation relu that take
    the residual as forward's second argument; without a process group the converted
    model computes exactly what the original did (outputs, grads, state)."""
    torch.manual_seed(0)
    original = nn.Sequential(module_cls(3))
    with torch.no_grad():
        original[0].weight.uniform_(0.5, 1.5)
        original[0].bias.uniform_(-1, 1)
    kept = copy.deepcopy(original)
    params = {id(t) for t in list(original.parameters()) + list(original.buffers())}
    converted = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(original)
    sync = converted[0]
    assert type(sync) is fused_bn.FusedSyncBatchNorm2d
    assert sync.activation == fused_bn.Activation("relu", ())
    assert {id(t) for t in list(converted.parameters()) + list(converted.buffers())} == params
    x, z, dy = sample(shape), sample(shape), sample(shape)
    for step, training in enumerate((True, True, False)):
        results = []
        for m in (sync, kept[0]):
            m.train(training)
            m.zero_grad(set_to_none=True)
            leaf, res = x.detach().requires_grad_(), z.detach().requires_grad_()
            y = m(leaf, res)
            y.backward(dy)
            results.append((y.detach(), leaf.grad, res.grad, m.weight.grad, m.bias.grad))
        for i, (a, b) in enumerate(zip(*results)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {step} item {i}")
    for key, value in kept[0].state_dict().items():
        assert torch.equal(sync.state_dict()[key], value), key


@pytest.mark.parametrize("lazy_cls", [nn.LazyBatchNorm1d, fused_bn.FusedLazyBatchNorm3d], **by_name)
def test_convert_sync_batchnorm_refuses_an_uninitialized_lazy_batch_norm(lazy_cls):
    with pytest.raises(ValueError, match="is not initialized yet; run the model on an input once"):
        fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(nn.Sequential(lazy_cls()))
