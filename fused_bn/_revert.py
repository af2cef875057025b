"""revert_model, the inverse of convert_model: every fused_bn batch norm back
to the module it was made from (nn's batch norms, nn's lazy ones,
nn.SyncBatchNorm, timm's BatchNormAct2d, torchvision's FrozenBatchNorm2d),
sharing its parameters and buffers, with what conversion folded into it (an
activation, a residual add) restored as nn modules and an add:

* in a GraphModule (``convert_model(fuse=True)``), each call of a fused module
  becomes the batch norm's call, then ``operator.add`` of the residual it was
  passed, then a call of the activation's nn module (a new submodule
  ``<batch norm>_act`` beside the batch norm, no state);
* elsewhere (the in-place conversion, and the modules a GraphModule calls
  whole), the module is swapped in its slot, and an activation folded from an
  ``nn.Sequential`` goes back into the ``nn.Identity`` conversion left at the
  next index.

The model passed in is left as it was: the reverted model is a new tree of
modules along the paths to the fused ones (the rest, and every parameter and
buffer, shared with it).
"""
import copy
import operator
from typing import Dict, Optional, Tuple

from torch import fx, nn

from ._activations import Activation, resolve
from .modules import (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedBatchNormAddReLU1d,
                      FusedBatchNormAddReLU2d, FusedBatchNormAddReLU3d, FusedBatchNormReLU1d,
                      FusedBatchNormReLU2d, FusedBatchNormReLU3d, FusedLazyBatchNorm1d,
                      FusedLazyBatchNorm2d, FusedLazyBatchNorm3d, FusedSyncBatchNorm2d,
                      _bias_option, _FusedBatchNormActForward, _FusedBatchNormForward,
                      _FusedFrozenBatchNormForward, _fused_from, _fused_subclasses)

# fused class (exact type) -> the nn class it stands for.
_NN_CLASSES = {
    FusedBatchNorm1d: nn.BatchNorm1d, FusedBatchNormReLU1d: nn.BatchNorm1d, FusedBatchNormAddReLU1d: nn.BatchNorm1d,
    FusedBatchNorm2d: nn.BatchNorm2d, FusedBatchNormReLU2d: nn.BatchNorm2d, FusedBatchNormAddReLU2d: nn.BatchNorm2d,
    FusedBatchNorm3d: nn.BatchNorm3d, FusedBatchNormReLU3d: nn.BatchNorm3d, FusedBatchNormAddReLU3d: nn.BatchNorm3d,
}
_NN_LAZY_CLASSES = {
    FusedLazyBatchNorm1d: nn.LazyBatchNorm1d,
    FusedLazyBatchNorm2d: nn.LazyBatchNorm2d,
    FusedLazyBatchNorm3d: nn.LazyBatchNorm3d,
}
_RELU6 = resolve("relu6")


def _is_fused(module: nn.Module) -> bool:
    """A fused_bn batch norm (any class of ours, a subclass of one included)."""
    return isinstance(module, (_FusedBatchNormForward, _FusedFrozenBatchNormForward))


def _holds_fused(module: nn.Module) -> bool:
    return any(_is_fused(m) for m in module.modules())


def _activation_module(activation: Activation, training: bool) -> nn.Module:
    """The nn module computing ``activation``: ``nn.ReLU6`` for hardtanh(0, 6)
    (what conversion folds an ``nn.ReLU6`` to; it computes what
    ``nn.Hardtanh(0, 6)`` does), else the table's (``Activation.module``)."""
    module = nn.ReLU6() if activation == _RELU6 else activation.module()
    module.train(training)
    return module


def _other_library_base(cls: type) -> Optional[type]:
    """timm's BatchNormAct2d or torchvision's FrozenBatchNorm2d, for our
    subclass of it (``FusedBatchNormAct2d``, ``FusedFrozenBatchNorm2d``)."""
    return next((base for base, fused in _fused_subclasses.items() if fused is cls), None)


def _nn_twin(module: nn.Module) -> Tuple[nn.Module, Optional[Activation]]:
    """(the module ``module`` was made from, holding its settings,
    parameters, buffers and children; the activation ``module`` applies in
    its own passes that the twin does not, or None)."""
    cls = type(module)
    activation = getattr(module, "_activation", None)
    if cls in _NN_CLASSES:
        twin = _fused_from(module, _NN_CLASSES[cls])
    elif cls is FusedSyncBatchNorm2d:
        process_group = module.process_group
        twin = _fused_from(module, lambda *args, **kwargs: nn.SyncBatchNorm(
            *args, process_group=process_group, **kwargs))
    elif cls in _NN_LAZY_CLASSES:
        # Not run yet (one that has run is a FusedBatchNorm1d/2d/3d): its
        # uninitialized placeholders are shared as the other classes' tensors are.
        placeholder = module.weight if module.weight is not None else module.running_mean
        twin = _NN_LAZY_CLASSES[cls](eps=module.eps, momentum=module.momentum, affine=module.affine,
                                     track_running_stats=module.track_running_stats,
                                     device=None if placeholder is None else placeholder.device,
                                     dtype=None if placeholder is None else placeholder.dtype,
                                     **_bias_option(module))
        for name, param in module.named_parameters(recurse=False):
            setattr(twin, name, param)
        for name, buf in module.named_buffers(recurse=False):
            setattr(twin, name, buf)
        twin.train(module.training)
    elif isinstance(module, _FusedBatchNormActForward) and _other_library_base(cls) is not None:
        # timm's BatchNormAct2d, with its own drop and act children. What its
        # kernels applied in their place is its act (nothing to restore), or,
        # for an act that is an nn.Identity, an activation the graph had
        # after it (restored after it).
        twin = _fused_from(module, _other_library_base(cls))
        if not (module.fuses_activation and type(module.act) is nn.Identity and type(module.drop) is nn.Identity):
            activation = None
    elif isinstance(module, _FusedFrozenBatchNormForward) and _other_library_base(cls) is not None:
        twin = _other_library_base(cls)(module.weight.shape[0], eps=module.eps)
        for name, buf in module.named_buffers(recurse=False):
            setattr(twin, name, buf)
        twin.train(module.training)
    else:
        raise TypeError(
            f"fused_bn.revert_model: {cls.__module__}.{cls.__qualname__} subclasses a fused_bn batch norm "
            "revert_model does not know (its own code would be lost); revert it to nn modules yourself")
    if activation is not None and activation.is_identity:
        activation = None
    return twin, activation


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose registries are new dicts holding the same
    parameters, buffers and children (a child set in the copy leaves
    ``module`` as it was)."""
    copied = copy.copy(module)
    copied._parameters = dict(module._parameters)
    copied._buffers = dict(module._buffers)
    copied._modules = dict(module._modules)
    return copied


def _no_slot_error(path: str, module: nn.Module, activation: Activation) -> ValueError:
    where = f"'{path}'" if path else "the model itself"
    return ValueError(
        f"fused_bn.revert_model: {where} ({type(module).__name__}) applies {activation} in its own passes, and "
        "nothing in the model has a place for its nn module (convert_model leaves an nn.Identity after a batch "
        "norm whose activation it folds in an nn.Sequential, and a GraphModule calls the activation after it); "
        "a model whose own code calls a fused module with an activation or a residual has no nn form "
        "revert_model can make without rewriting that code")


def _reverted(module: nn.Module, path: str = "") -> nn.Module:
    """``module`` with every fused_bn batch norm in it reverted: ``module``
    itself when it holds none, else a new tree along the paths to them."""
    if not _holds_fused(module):
        return module
    if isinstance(module, fx.GraphModule):
        return _reverted_graph_module(module)
    if _is_fused(module):
        twin, activation = _nn_twin(module)
        if activation is not None:
            raise _no_slot_error(path, module, activation)
        return twin
    copied = _shallow_copy(module)
    names = list(copied._modules)
    for i, name in enumerate(names):
        child = copied._modules[name]
        if child is None:
            continue
        child_path = f"{path}.{name}" if path else name
        if not _is_fused(child):
            copied._modules[name] = _reverted(child, child_path)
            continue
        twin, activation = _nn_twin(child)
        copied._modules[name] = twin
        if activation is not None:
            # convert_model(fuse=True) without a graph: the activation that
            # followed the batch norm in an nn.Sequential became the
            # nn.Identity at the next index.
            following = names[i + 1] if i + 1 < len(names) else None
            if not (isinstance(copied, nn.Sequential) and following is not None
                    and type(copied._modules[following]) is nn.Identity):
                raise _no_slot_error(child_path, child, activation)
            copied._modules[following] = _activation_module(activation, child.training)
    return copied


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)


def _free_name(parent: nn.Module, base: str) -> str:
    name, n = base, 1
    while hasattr(parent, name):
        name, n = f"{base}{n}", n + 1
    return name


def _reverted_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule computing what ``gm`` does with nn modules: each call
    of a fused module becomes the nn batch norm's call, the add of the
    residual it was passed, and the activation's nn module; the modules the
    graph calls whole are reverted in place (copies); the state_dict keys are
    ``gm``'s."""
    graph = copy.deepcopy(gm.graph)
    reverted = fx.GraphModule(gm, graph, type(gm).__name__)
    # GraphModule copies only the modules the graph refers to (and makes new
    # containers for their paths): modules nothing calls any more (an
    # activation module whose calls were folded) come along too, so that the
    # reverted model holds every module the converted one does.
    present = dict(reverted.named_modules())
    for name, module in gm.named_modules():
        if name in present:
            continue
        parent_name = name.rpartition(".")[0]
        if parent_name in present:
            module = _reverted(module, name)
            _set_submodule(reverted, name, module)
            present.update((f"{name}.{sub}" if sub else name, m) for sub, m in module.named_modules())
    originals = dict(gm.named_modules())
    for name, module in present.items():
        if name in originals and module is not originals[name] and not _is_fused(originals[name]):
            module.training = originals[name].training  # the containers GraphModule made

    twins: Dict[str, Tuple[nn.Module, Optional[str]]] = {}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        original = gm.get_submodule(node.target)
        if not _is_fused(original):
            # a module the graph calls whole (its code reads self.training):
            # converted in place, reverted so, in a copy
            if _holds_fused(original) and reverted.get_submodule(node.target) is original:
                _set_submodule(reverted, node.target, _reverted(original, node.target))
            continue
        if node.target not in twins:
            twin, activation = _nn_twin(original)
            _set_submodule(reverted, node.target, twin)
            act_target = None
            if activation is not None:
                parent_name, _, leaf = node.target.rpartition(".")
                parent = reverted.get_submodule(parent_name)
                act_name = _free_name(parent, f"{leaf}_act")
                parent.add_module(act_name, _activation_module(activation, original.training))
                act_target = f"{parent_name}.{act_name}" if parent_name else act_name
            twins[node.target] = (twin, act_target)
        _, act_target = twins[node.target]
        args, kwargs = list(node.args), dict(node.kwargs)
        residual = args.pop(1) if len(args) > 1 else kwargs.pop("residual", None)
        if residual is None and act_target is None:
            continue
        node.args, node.kwargs = tuple(args), kwargs
        last = node
        with graph.inserting_after(node):
            if residual is not None:
                last = graph.call_function(operator.add, (last, residual))
        if act_target is not None:
            with graph.inserting_after(last):
                last = graph.call_module(act_target, (last,))
        first_new = node.next
        node.replace_all_uses_with(last, delete_user_cb=lambda user: user is not first_new)
    graph.lint()
    reverted.recompile()
    _order_like(reverted, gm)
    left = [name for name, m in reverted.named_modules() if _is_fused(m)]
    if left:  # referred to by the graph other than by a call (get_attr)
        raise ValueError(f"fused_bn.revert_model: the graph refers to {', '.join(left)} other than by calling it; "
                         "revert_model rewrites calls of fused modules only")
    return reverted


def _order_like(module: nn.Module, like: nn.Module) -> None:
    """Registers ``module``'s children, parameters and buffers in ``like``'s
    order (GraphModule registers them in the graph's order, which the fusion
    changed where it moved a batch norm's call), each ``<name>_act`` right
    after ``<name>``; so the state_dict's order is ``like``'s as well."""
    if module is like:
        return
    for registry in ("_parameters", "_buffers", "_modules"):
        ours, theirs = getattr(module, registry), getattr(like, registry)
        order = []
        for name in theirs:
            if name in ours:
                order.append(name)
                order.extend(n for n in ours if n not in theirs and n.startswith(f"{name}_act"))
        order.extend(n for n in ours if n not in order)
        setattr(module, registry, {name: ours[name] for name in order})
    for name, child in module._modules.items():
        if child is not None and isinstance(like._modules.get(name), nn.Module):
            _order_like(child, like._modules[name])


def revert_model(model: nn.Module) -> nn.Module:
    """The inverse of :func:`fused_bn.convert_model`: ``model`` with every
    fused_bn batch norm back to the module it stands for, sharing its
    ``Parameter`` and buffer objects and keeping its settings (eps, momentum,
    affine, track_running_stats, process group) and training flag:

    * ``FusedBatchNorm1d``/``2d``/``3d`` and their ReLU and add+ReLU forms ->
      ``nn.BatchNorm1d``/``2d``/``3d``; ``FusedLazyBatchNorm1d``/``2d``/``3d``
      (not yet run) -> ``nn.LazyBatchNorm1d``/``2d``/``3d``;
      ``FusedSyncBatchNorm2d`` -> ``nn.SyncBatchNorm``;
      ``FusedBatchNormAct2d`` -> timm's ``BatchNormAct2d`` (its ``drop`` and
      ``act`` children as they were); ``FusedFrozenBatchNorm2d`` ->
      torchvision's ``FrozenBatchNorm2d``.
    * What conversion folded into a batch norm comes back as nn computes it:
      the activation as its nn module after the batch norm (``nn.ReLU``,
      ``ReLU6``, ``Hardtanh(min_val, max_val)``, ``LeakyReLU(negative_slope)``,
      ``ELU(alpha)``, ``SiLU``, ``Hardswish``, ``Hardsigmoid``,
      ``GELU(approximate)``; not in place), a residual as ``bn(x) + residual``
      before it. In a ``torch.fx.GraphModule`` (what ``convert_model(fuse=True)``
      returns) the graph is rewritten so, the activation module added beside
      the batch norm as ``<name>_act``; in a model converted in place, an
      activation folded from an ``nn.Sequential`` goes back into the
      ``nn.Identity`` that took its index.

    The state_dict keys and values are the converted model's (so the original
    model's), and the outputs are the original model's (nn's own modules
    compute them). ``model`` is left as it was: the reverted model is new
    modules along the paths to the fused ones, the rest shared with ``model``
    (so an optimizer of ``model`` keeps training both). A model with no fused
    module is returned as it is.

    Raises TypeError for anything but an ``nn.Module`` (or a subclass of a
    fused_bn class this does not know), and ValueError for a fused module
    applying an activation that has no place in the model (one a model's own
    code calls with ``activation=`` set, outside a GraphModule).

    Args:
        model: a model converted by :func:`fused_bn.convert_model` (in place or
            the GraphModule it returned), or any model holding fused_bn modules.

    Returns:
        The model with nn's modules (a GraphModule for a GraphModule).

    Shapes and dtypes:
        Unchanged: the reverted modules hold the same tensors and take what
        the fused ones took.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or holds a subclass of a
            fused_bn class that revert_model does not know.
        ValueError: a fused module whose activation has no place in the model
            (see above).

    Example::

        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        plain = fused_bn.revert_model(fused_bn.convert_model(model, fuse=True))
        assert not any(isinstance(m, fused_bn.FusedBatchNorm2d) for m in plain.modules())
        x = torch.randn(2, 3, 12, 12)
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fused_bn.revert_model expects an nn.Module, got {type(model).__name__}")
    return _reverted(model)
