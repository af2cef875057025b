"""PyTorch's transforms and tracers that a model with nn.BatchNorm2d works
under, run on ours and compared with nn (float64, nn its own reference):

* torch.func: grad, vjp, jacrev (reverse mode), jvp, jacfwd, hessian (forward
  mode) and torch.autograd.forward_ad, in train and eval, for batch norm,
  +ReLU and +add+ReLU;
* torch.func.vmap: eval, training on batch statistics alone (per-sample batch
  norm, and per-sample gradients through it), model ensembles
  (stack_module_state: each member's running statistics and counter updated),
  and nn's error, state untouched, for running statistics that are not batched;
* torch.fx.symbolic_trace: our modules are call_module leaves as
  nn.BatchNorm2d is, so the traced graph follows .train()/.eval(); the
  functional forms are call_function nodes;
* torch.jit.trace records the op, and the traced module matches eager;
* torch.autocast: a conv's half-precision activations with float32 parameters
  keep their dtype, under the accuracy rule;
* autograd's own tools: activation checkpointing (reentrant or not: the
  recomputed forward updates the running statistics again, as nn's does),
  save_on_cpu, full backward hooks, anomaly detection.
"""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import fx, nn
from torch.func import (functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state,
                        vjp, vmap)

import fused_bn
from _accuracy import FLOOR, assert_accurate
from _helpers import F64, make_trio, sample, state_of

f64 = torch.float64
OURS = {"bn": fused_bn.FusedBatchNorm2d, "bn_relu": fused_bn.FusedBatchNormReLU2d,
        "bn_add_relu": fused_bn.FusedBatchNormAddReLU2d}
SHAPE = (3, 2, 2, 3)


def assert_matches_nn(ours, theirs, name):
    """float64, nn its own reference: the accuracy rule's float64 floor."""
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs nn {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} vs nn {theirs.dtype}"
    ours, theirs = ours.detach(), theirs.detach()
    bound = FLOOR[f64] * max(1.0, float(theirs.abs().max()))
    err = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    assert err <= bound, f"{name}: max |ours - nn| = {err:.3e} > {bound:.3e}"


class NNComposite(nn.Module):
    """What each of our modules computes, from nn.BatchNorm2d."""

    def __init__(self, kind, bn):
        super().__init__()
        self.kind, self.bn = kind, bn

    def forward(self, x, z=None):
        y = self.bn(x)
        if self.kind == "bn":
            return y
        return torch.relu(y if self.kind == "bn_relu" else y + z)


def make_pair(kind, device, training, track_running_stats=False, num_features=SHAPE[1]):
    """(ours, nn) in float64 with the same non-default parameters and buffers."""
    _, bn, _ = make_trio(num_features, F64, device, track_running_stats=track_running_stats)
    ours = OURS[kind](num_features, track_running_stats=track_running_stats).to(device, f64)
    ours.load_state_dict(bn.state_dict())
    return ours.train(training), NNComposite(kind, bn).train(training)


def call(module, kind, x, z):
    return module(x, z) if kind == "bn_add_relu" else module(x)


TRANSFORMS = ("grad", "grad_params", "vjp", "jacrev", "jvp", "jacfwd", "hessian")


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(OURS))
def test_torch_func_transforms_match_nn(device, kind, training, transform):
    # nn refuses the in-place running-statistics update under torch.func's
    # transforms, so both run on batch statistics alone in training.
    ours, theirs = make_pair(kind, device, training, track_running_stats=not training)
    x = sample(SHAPE, f64, device)
    z = sample(SHAPE, f64, device, mean=1.0)
    g = sample(SHAPE, f64, device)
    tangent = sample(SHAPE, f64, device)

    def results(module):
        f = lambda x: call(module, kind, x, z)  # noqa: E731
        loss = lambda x, z: (call(module, kind, x, z) * g).sum()  # noqa: E731
        if transform == "grad":
            return grad(loss, argnums=(0, 1))(x, z)
        if transform == "grad_params":
            params = {n: p.detach() for n, p in module.named_parameters()}
            return tuple(grad(lambda p: (functional_call(module, p, (x, z) if kind == "bn_add_relu"
                                                         else (x,)) * g).sum())(params).values())
        if transform == "vjp":
            out, pullback = vjp(f, x)
            return (out,) + pullback(g)
        if transform == "jacrev":
            return (jacrev(f)(x),)
        if transform == "jvp":
            return jvp(f, (x,), (tangent,))
        if transform == "jacfwd":
            return (jacfwd(f)(x),)
        return (hessian(lambda x: (call(module, kind, x, z) ** 2 * g).sum())(x),)

    got, expected = results(ours), results(theirs)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_matches_nn(a, b, f"{transform} result {i}")


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad_mode", "no_grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(OURS))
def test_forward_ad_matches_nn(device, kind, training, grad_mode):
    """torch.autograd.forward_ad, which no_grad does not turn off: the tangents
    of the input, residual and parameters all reach the output's."""
    ours, theirs = make_pair(kind, device, training, track_running_stats=True)
    x, z = sample(SHAPE, f64, device), sample(SHAPE, f64, device, mean=1.0)
    x_t, z_t = sample(SHAPE, f64, device), sample(SHAPE, f64, device)
    w_t, b_t = torch.randn(SHAPE[1], dtype=f64, device=device), torch.randn(SHAPE[1], dtype=f64,
                                                                           device=device)
    outputs = []
    for module in (ours, theirs):
        bn = module if module is ours else module.bn
        with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
            params = {"weight": fwAD.make_dual(bn.weight.detach(), w_t),
                      "bias": fwAD.make_dual(bn.bias.detach(), b_t)}
            prefix = "" if module is ours else "bn."
            args = (fwAD.make_dual(x, x_t), fwAD.make_dual(z, z_t))
            out = functional_call(module, {prefix + k: v for k, v in params.items()},
                                  args if kind == "bn_add_relu" else args[:1])
            primal, out_t = fwAD.unpack_dual(out)
            assert out_t is not None, "no tangent reached the output"
            outputs.append((primal.detach(), out_t.detach()))
    assert_matches_nn(outputs[0][0], outputs[1][0], "output")
    assert_matches_nn(outputs[0][1], outputs[1][1], "output tangent")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs.bn, name), rtol=0,
                                   atol=FLOOR[f64], msg=name)


@pytest.mark.parametrize("stats_with_tangent", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(OURS))
def test_forward_ad_running_stats_tangents_like_nn(device, kind, training, stats_with_tangent):
    """Running statistics that carry tangents: in eval (where the output
    depends on them) nn refuses with its message and so do we; in training
    their tangents are ignored by both, and the output's tangent is the input's
    part, as nn's."""
    ours, theirs = make_pair(kind, device, training, track_running_stats=True)
    x, z = sample(SHAPE, f64, device), sample(SHAPE, f64, device, mean=1.0)
    x_t, stat_t = sample(SHAPE, f64, device), torch.randn(SHAPE[1], dtype=f64, device=device)
    outcomes = []
    for module in (ours, theirs):
        prefix = "" if module is ours else "bn."
        bn = module if module is ours else module.bn
        with fwAD.dual_level():
            buffers = {prefix + stats_with_tangent: fwAD.make_dual(
                getattr(bn, stats_with_tangent).clone(), stat_t)}
            args = (fwAD.make_dual(x, x_t), z)
            try:
                out = functional_call(module, buffers, args if kind == "bn_add_relu" else args[:1])
            except RuntimeError as e:
                outcomes.append(("raised", str(e)))
                continue
            primal, out_t = fwAD.unpack_dual(out)
            outcomes.append(("ok", (primal.detach(), out_t.detach())))
    assert outcomes[0][0] == outcomes[1][0], f"ours {outcomes[0]}, nn {outcomes[1]}"
    if outcomes[1][0] == "raised":
        assert outcomes[0][1] == outcomes[1][1]
        assert not training
    else:
        assert training
        assert_matches_nn(outcomes[0][1][0], outcomes[1][1][0], "output")
        assert_matches_nn(outcomes[0][1][1], outcomes[1][1][1], "output tangent")


@pytest.mark.parametrize("kind", list(OURS))
def test_torch_func_grad_updates_running_stats_once(device, kind):
    """Where nn refuses (its in-place update of captured buffers), ours runs
    torch.func.grad in training with running statistics: the grads are those of
    batch statistics, and the buffers take one update, as one eager step's."""
    ours, _ = make_pair(kind, device, True, track_running_stats=True)
    eager_twin = copy.deepcopy(ours)
    no_stats = OURS[kind](SHAPE[1], track_running_stats=False).to(device, f64)
    no_stats.load_state_dict({"weight": ours.weight, "bias": ours.bias})
    x, z, g = (sample(SHAPE, f64, device), sample(SHAPE, f64, device, mean=1.0),
               sample(SHAPE, f64, device))
    got = grad(lambda x: (call(ours, kind, x, z) * g).sum())(x)
    expected = grad(lambda x: (call(no_stats, kind, x, z) * g).sum())(x)
    assert_matches_nn(got, expected, "grad_input")
    call(eager_twin, kind, x, z)
    for name, value in state_of(eager_twin).items():
        torch.testing.assert_close(state_of(ours)[name], value, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- vmap

@pytest.mark.parametrize("training", [True, False], ids=["train_batch_stats", "eval"])
@pytest.mark.parametrize("kind", list(OURS))
def test_vmap_matches_nn(device, kind, training):
    ours, theirs = make_pair(kind, device, training, track_running_stats=not training)
    xs = torch.stack([sample(SHAPE, f64, device) for _ in range(4)])
    zs = torch.stack([sample(SHAPE, f64, device, mean=1.0) for _ in range(4)])
    got = vmap(lambda x, z: call(ours, kind, x, z))(xs, zs)
    expected = vmap(lambda x, z: call(theirs, kind, x, z))(xs, zs)
    assert_matches_nn(got, expected, "output")
    # each entry is its own batch: the same as one call per entry
    for i in range(len(xs)):
        assert_matches_nn(got[i], call(ours, kind, xs[i], zs[i]), f"entry {i}")


@pytest.mark.parametrize("kind", list(OURS))
def test_vmap_of_grad_per_sample_matches_nn(device, kind):
    ours, theirs = make_pair(kind, device, True)
    xs = torch.stack([sample(SHAPE, f64, device) for _ in range(3)])
    z, g = sample(SHAPE, f64, device, mean=1.0), sample(SHAPE, f64, device)
    grads = [vmap(grad(lambda x: (call(m, kind, x, z) * g).sum()))(xs) for m in (ours, theirs)]
    assert_matches_nn(grads[0], grads[1], "per-entry grad_input")


@pytest.mark.parametrize("shared_input", [False, True], ids=["input_per_member", "shared_input"])
@pytest.mark.parametrize("kind", list(OURS))
def test_vmap_model_ensemble_matches_nn(device, kind, shared_input):
    """torch.func's model-ensembling recipe: parameters and buffers stacked
    over members, one vmapped functional_call; every member's running
    statistics and counter are updated as nn's are."""
    members = [make_pair(kind, device, True, track_running_stats=True) for _ in range(3)]
    stacks = []
    for side in (0, 1):
        modules = [pair[side] for pair in members]
        params, buffers = stack_module_state(modules)
        base = copy.deepcopy(modules[0]).to("meta")
        stacks.append((base, params, buffers))
    xs = torch.stack([sample(SHAPE, f64, device) for _ in range(3)])
    z = sample(SHAPE, f64, device, mean=1.0)
    in_dims = (0, 0, None) if shared_input else (0, 0, 0)
    x_arg = xs[0] if shared_input else xs
    outputs = []
    for base, params, buffers in stacks:
        run = lambda p, b, x: functional_call(  # noqa: E731
            base, (p, b), (x, z) if kind == "bn_add_relu" else (x,))
        for _ in range(2):
            out = vmap(run, in_dims=in_dims)(params, buffers, x_arg)
        outputs.append((out, buffers))
    assert_matches_nn(outputs[0][0], outputs[1][0], "output")
    ours_buffers, nn_buffers = outputs[0][1], {k.removeprefix("bn."): v for k, v in outputs[1][1].items()}
    for name in ("running_mean", "running_var"):
        assert_matches_nn(ours_buffers[name], nn_buffers[name], name)
    assert torch.equal(ours_buffers["num_batches_tracked"], nn_buffers["num_batches_tracked"])
    assert ours_buffers["num_batches_tracked"].tolist() == [2, 2, 2]


def test_vmap_unbatched_running_stats_raises_like_nn(device):
    ours, theirs = make_pair("bn", device, True, track_running_stats=True)
    xs = torch.stack([sample(SHAPE, f64, device) for _ in range(2)])
    before = state_of(ours)
    with pytest.raises(RuntimeError) as nn_error:
        vmap(theirs)(xs)
    with pytest.raises(RuntimeError) as our_error:
        vmap(ours)(xs)
    assert str(our_error.value) == str(nn_error.value)
    for name, value in before.items():
        torch.testing.assert_close(state_of(ours)[name], value, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- torch.fx

class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = fused_bn.FusedBatchNorm2d(4)
        self.bn_relu = fused_bn.FusedBatchNormReLU2d(4)
        self.bn_add_relu = fused_bn.FusedBatchNormAddReLU2d(4)
        self.sync_bn = fused_bn.FusedSyncBatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        out = self.bn_add_relu(self.bn_relu(self.bn(y)), y)
        out = self.sync_bn(out)
        return (out + fused_bn.batch_norm(y, None, None, training=True, activation="relu")
                + fused_bn.batch_norm_add_relu(y, out, None, None, training=True))


def test_fx_symbolic_trace_records_modules_as_leaves(device):
    torch.manual_seed(0)
    model = _Block().to(device)
    twin = copy.deepcopy(model)
    gm = fx.symbolic_trace(model)
    called_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"bn", "bn_relu", "bn_add_relu", "sync_bn"} <= called_modules, called_modules
    functions = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {fused_bn.batch_norm, fused_bn.batch_norm_add_relu} <= functions, functions
    for step in range(2):
        x = sample((2, 3, 5, 4), device=device)
        outs = []
        for m in (gm, twin):
            m.zero_grad()
            leaf = x.clone().requires_grad_()
            out = m(leaf)
            out.backward(torch.ones_like(out))
            outs.append((out, leaf.grad, m.bn_add_relu.weight.grad, m.bn.running_var.clone()))
        for name, a, b in zip(("output", "grad_input", "grad_weight", "running_var"), *outs):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {step} {name}")
    # The graph reads the training flag when it runs: .eval() switches it to running stats.
    gm.eval()
    twin.eval()
    x = sample((2, 3, 5, 4), device=device)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), twin(x), rtol=0, atol=0)
    assert int(gm.bn.num_batches_tracked) == 2


# ---------------------------------------------------------------- torch.jit.trace

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(OURS))
def test_jit_trace_records_op_and_matches_eager(device, kind, training):
    ours, _ = make_pair(kind, device, training, track_running_stats=True)
    ours = ours.float()
    twin = copy.deepcopy(ours)
    x, z = sample(SHAPE, device=device), sample(SHAPE, device=device, mean=1.0)
    args = (x, z) if kind == "bn_add_relu" else (x,)
    traced = torch.jit.trace(ours, args, check_trace=True)
    op = "fused_bn::batch_norm_train" if training else "fused_bn::batch_norm_eval"
    assert op in str(traced.graph), str(traced.graph)
    # Tracing ran the module (and the check reran it): reset both to the same state.
    ours.load_state_dict(twin.state_dict())
    for step in range(2):
        x = sample(SHAPE, device=device)
        args = (x, z) if kind == "bn_add_relu" else (x,)
        torch.testing.assert_close(traced(*args), twin(*args), rtol=0, atol=0, msg=f"step {step}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(twin, name), rtol=0, atol=0,
                                       msg=f"step {step} {name}")


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_conv_then_bn_matches_nn(device, dtype, training):
    """Under torch.autocast a conv hands batch norm half-precision activations
    while its parameters stay float32 (autocast casts neither our op's inputs
    nor nn's): the output keeps the activation dtype and meets the accuracy
    rule against float64 batch norm of the same activations."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).to(device)
    x = sample((4, 3, 9, 7), device=device)
    with torch.autocast(device, dtype=dtype):
        h = conv(x).detach()
    assert h.dtype == dtype
    ours, theirs = make_pair("bn", device, training, track_running_stats=True, num_features=8)
    ours, theirs = ours.float(), theirs.float()
    reference = copy.deepcopy(theirs).double()
    outputs = []
    for m in (ours, theirs):
        with torch.autocast(device, dtype=dtype):
            outputs.append(m(h))
    expected = reference(h.double())
    assert outputs[0].dtype == outputs[1].dtype == dtype
    assert_accurate(outputs[0], outputs[1], expected, name="output")
    for name in ("running_mean", "running_var"):
        assert_accurate(getattr(ours, name), getattr(theirs.bn, name), getattr(reference.bn, name),
                        name=name)


# ---------------------------------------------------------------- autograd's own tools

def _checkpointed_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None))


def _step_with(tool, model, x, grad_output):
    """One forward+backward of `model` under `tool`; returns grad_input, the
    parameters' grads, the buffers, and what full backward hooks saw."""
    from torch.utils.checkpoint import checkpoint
    leaf = x.clone().requires_grad_()
    seen = []
    hooks = [m.register_full_backward_hook(lambda m, gi, go: seen.append(gi[0].clone()))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d) and tool == "full_backward_hook"]
    if tool in ("checkpoint", "checkpoint_reentrant"):
        y = checkpoint(model, leaf, use_reentrant=tool == "checkpoint_reentrant")
        y.backward(grad_output)
    elif tool == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu():
            y = model(leaf)
        y.backward(grad_output)
    elif tool == "anomaly":
        with pytest.warns(UserWarning, match="Anomaly Detection"), torch.autograd.detect_anomaly():
            model(leaf).backward(grad_output)
    else:
        model(leaf).backward(grad_output)
    for h in hooks:
        h.remove()
    return leaf.grad, [p.grad for p in model.parameters()], [b.clone() for b in model.buffers()], seen


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("tool", ["checkpoint", "checkpoint_reentrant", "save_on_cpu",
                                  "full_backward_hook", "anomaly"])
def test_autograd_tools_match_nn(device, tool, training):
    """A converted model under torch.utils.checkpoint, save_on_cpu, full
    backward hooks and anomaly detection gives nn's grads, hook arguments and
    buffers (float64: agreement to rounding), the counter included: a
    checkpointed training step counts twice, for nn as for us."""
    torch.manual_seed(0)
    theirs = _checkpointed_net().double().to(device).train(training)
    ours = fused_bn.convert_model(copy.deepcopy(theirs))
    x = sample((4, 3, 9, 7), f64, device)
    grad_output = sample((4, 8, 9, 7), f64, device)
    got, want = _step_with(tool, ours, x, grad_output), _step_with(tool, theirs, x, grad_output)
    close = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got[0], want[0], **close)
    for g_ours, g_nn in zip(got[1], want[1]):
        torch.testing.assert_close(g_ours, g_nn, **close)
    for b_ours, b_nn in zip(got[2], want[2]):
        torch.testing.assert_close(b_ours, b_nn, **close)
    counters = [int(b) for b in want[2] if b.dtype == torch.long]
    assert counters == [int(b) for b in got[2] if b.dtype == torch.long]
    assert counters == [(2 if tool.startswith("checkpoint") else 1) if training else 0] * 2
    assert len(got[3]) == len(want[3]) == (2 if tool == "full_backward_hook" else 0)
    for h_ours, h_nn in zip(got[3], want[3]):
        torch.testing.assert_close(h_ours, h_nn, **close)
