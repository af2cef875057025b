"""convert_model(fuse=True) on a torch.fx trace: a batch norm (BatchNorm1d, 2d,
3d, and timm's BatchNormAct2d without an activation of its own) followed by
an activation, by a residual add, or by an add and then an activation,
becomes one fused module call."""
import copy
import difflib
import operator
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._activations import IDENTITY, Activation, resolve
from .modules import _FusedFrozenBatchNormForward
from ._swap import (_FUSED_FORMS, _activation_module, _convert_in_place, _fused_batch_norm_act_from,
                    _fused_with_activation, _has_convertible, _is_batch_norm_of_another_library,
                    _is_timm_batch_norm_act, _is_torchvision_frozen_batch_norm)

# The functional forms of the activations convert_model folds: the nn module
# a call stands for, and that module's constructor arguments in the
# function's own order after the input (name, default). An `inplace` flag may
# follow them (the fused call writes a new tensor: the batch norm's output it
# would overwrite has no other reader); any other argument, or one that is a
# tensor, leaves the call unfused.
_ACTIVATION_FUNCTIONS = {
    F.relu: (nn.ReLU, ()), torch.relu: (nn.ReLU, ()), F.relu_: (nn.ReLU, ()), torch.relu_: (nn.ReLU, ()),
    F.relu6: (nn.ReLU6, ()),
    F.hardtanh: (nn.Hardtanh, (("min_val", -1.0), ("max_val", 1.0))),
    F.hardtanh_: (nn.Hardtanh, (("min_val", -1.0), ("max_val", 1.0))),
    F.leaky_relu: (nn.LeakyReLU, (("negative_slope", 0.01),)),
    F.leaky_relu_: (nn.LeakyReLU, (("negative_slope", 0.01),)),
    F.elu: (nn.ELU, (("alpha", 1.0),)), F.elu_: (nn.ELU, (("alpha", 1.0),)),
    F.silu: (nn.SiLU, ()), F.hardswish: (nn.Hardswish, ()), F.hardsigmoid: (nn.Hardsigmoid, ()),
    F.gelu: (nn.GELU, (("approximate", "none"),)),
}
_ACTIVATION_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_IN_PLACE_ADDS = {operator.iadd, "add_"}


def _constructor_arguments(node: fx.Node, spec) -> Optional[dict]:
    """The nn module's constructor arguments a functional call passes (its
    args after the input and its kwargs bound to ``spec``), or None when the
    call passes anything else or a traced value."""
    names = [name for name, _ in spec]
    arguments = dict(spec)
    positional = list(node.args[1:])
    if len(positional) > len(names) + 1:
        return None
    keywords = dict(node.kwargs)
    if len(positional) == len(names) + 1:
        keywords["inplace"] = positional.pop()
    for name, value in zip(names, positional):
        arguments[name] = value
    for name, value in keywords.items():
        if name == "inplace" and isinstance(value, bool):
            continue
        if name not in arguments or name in names[:len(positional)]:
            return None
        arguments[name] = value
    if any(isinstance(v, (fx.Node, torch.Tensor)) for v in arguments.values()):
        return None
    return arguments


def _activation_of(node: fx.Node, modules) -> Optional[Activation]:
    """The activation fused_bn fuses that ``node`` applies to its one tensor
    argument, with its parameters exactly, or None (nn.Identity included)."""
    if node.op == "call_module":
        return _activation_module(modules[node.target])
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS and len(node.args) == 1 and not node.kwargs:
        return _activation_module(_ACTIVATION_METHODS[node.target]())
    if node.op != "call_function" or node.target not in _ACTIVATION_FUNCTIONS or not node.args:
        return None
    cls, spec = _ACTIVATION_FUNCTIONS[node.target]
    arguments = _constructor_arguments(node, spec)
    if arguments is None:
        return None
    try:
        return _activation_module(cls(**arguments))
    except (TypeError, ValueError):  # arguments nn's module refuses
        return None


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


# What makes a new tensor no other name refers to: a residual written into
# in place (`r += bn(x)`) or an input read later than the graph reads it
# changes nothing another reader sees when it is one of these and has no other
# reader.
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
_FRESH_FUNCTIONS = {operator.add, operator.mul, torch.add, torch.mul, torch.cat, torch.conv2d, F.conv2d}


def _is_fresh(node, modules) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        module = modules[node.target]
        return (isinstance(module, (*_FRESH_MODULES, _FusedFrozenBatchNormForward))
                or _is_batch_norm_of_another_library(module))
    return node.op == "call_function" and node.target in _FRESH_FUNCTIONS and not node.kwargs.get("out")


def _residual_of_add(node: fx.Node, bn_node: fx.Node, modules) -> Tuple[Optional[fx.Node], Optional[str]]:
    """(the other operand of `bn_node + other`, None), or (None, why the add
    does not fold) when it is an add that does not."""
    if node.kwargs or len(node.args) != 2:
        return None, "its add has an alpha or more arguments"
    a, b = node.args
    other = b if a is bn_node else a
    # `residual += bn(x)` writes into the residual, which the fused call would
    # leave as it was: anything reading it (or an alias of it) afterwards would
    # see another value, unless it is a new tensor read by this add alone.
    # `bn(x) += residual` writes into the batch norm's output, which has no
    # other reader.
    if node.target in _IN_PLACE_ADDS and a is not bn_node and not (_is_fresh(a, modules) and len(a.users) == 1):
        return None, "its add writes into the residual"
    return other, None


def _adds_a_tensor(node: fx.Node, bn_node: fx.Node) -> bool:
    """Whether add ``node`` adds another tensor to the batch norm's output (not
    a number, not the output to itself)."""
    return any(isinstance(a, fx.Node) and a is not bn_node for a in node.args)


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)


_IN_PLACE_OPERATORS = {
    "__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
    "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv,
    "__imod__": operator.imod, "__ipow__": operator.ipow, "__imatmul__": operator.imatmul,
    "__iand__": operator.iand, "__ior__": operator.ior, "__ixor__": operator.ixor,
    "__ilshift__": operator.ilshift, "__irshift__": operator.irshift,
}


class _InPlaceProxy(fx.Proxy):
    """A Proxy that records ``a += b`` as ``operator.iadd`` (torch.fx's records
    it as ``a + b``, and its graph then computes another value than the model
    wherever ``a``'s tensor is read again through another name)."""


for _name, _op in _IN_PLACE_OPERATORS.items():
    setattr(_InPlaceProxy, _name,
            lambda self, other, op=_op: self.tracer.create_proxy("call_function", op, (self, other), {}))


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every batch norm a leaf (a subclass's forward,
    traced through, would run its in-place counter update on the real buffer
    and freeze its training flag; torchvision's FrozenBatchNorm2d would become
    its arithmetic) and with the given modules as leaves."""

    def __init__(self, leaves):
        super().__init__()
        self.leaves = leaves

    def proxy(self, node):
        return _InPlaceProxy(node, self)

    def is_leaf_module(self, module, qualified_name):
        return (isinstance(module, nn.modules.batchnorm._BatchNorm) or qualified_name in self.leaves
                or _is_batch_norm_of_another_library(module)
                or super().is_leaf_module(module, qualified_name))


def _trace(model: nn.Module, leaves, training: bool) -> fx.Graph:
    """The graph of ``model`` traced in train or eval mode. Every module's
    training flag and every parameter's and buffer's value are restored after:
    a forward traced through can write to real tensors (an in-place op on a
    buffer runs on the buffer itself)."""
    flags = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        saved = [(t, t.detach().clone()) for t in _state_tensors(model)]
    try:
        model.train(training)
        return _Tracer(leaves).trace(model)
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for t, value in saved:
                if not torch.equal(t, value):
                    t.copy_(value)


def _state_tensors(model: nn.Module):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def _node_signature(node: fx.Node):
    """What a node does, with its tensor operands left out (their names shift
    once two graphs differ)."""
    hide = lambda _: "%"  # noqa: E731
    return (node.op, str(node.target), repr(fx.node.map_arg(node.args, hide)),
            repr(fx.node.map_arg(node.kwargs, hide)))


def _modules_reading_training(train_graph: fx.Graph, eval_graph: fx.Graph):
    """The innermost modules whose traced code differs between the train and
    eval graphs (they read ``self.training`` and must stay modules the graph
    calls); None when the graphs agree, or the root's own code differs."""
    train_nodes, eval_nodes = list(train_graph.nodes), list(eval_graph.nodes)
    matcher = difflib.SequenceMatcher(None, [_node_signature(n) for n in train_nodes],
                                      [_node_signature(n) for n in eval_nodes], autojunk=False)
    modules = set()
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        for node in train_nodes[i1:i2] + eval_nodes[j1:j2]:
            stack = node.meta.get("nn_module_stack")
            if not stack:
                return None  # the root's own forward reads its training flag
            modules.add(next(reversed(stack)))
    return modules


def _structural_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree of modules whose parameters and buffers are
    the original's objects: a child swapped in the copy leaves the original as
    it was."""
    copied = copy.copy(module)
    copied._parameters = dict(module._parameters)
    copied._buffers = dict(module._buffers)
    copied._modules = {name: None if child is None else _structural_copy(child)
                       for name, child in module._modules.items()}
    return copied


_MAX_TRACES = 8


def fuse_with_fx(model: nn.Module, report: Optional[list] = None) -> Optional[fx.GraphModule]:
    """The fused GraphModule, or None when the model does not trace (or the
    trace would change its state_dict keys, or the root's own forward depends
    on its training flag). ``report``, when given, gets a FusionRecord per
    batch norm."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return None
    # A GraphModule runs the code traced in one mode: a module whose code
    # depends on its training flag (dropout paths, stochastic depth) is kept
    # whole, called by the graph, so that it follows .train()/.eval().
    leaves = set()
    for _ in range(_MAX_TRACES):
        try:
            graph = _trace(model, leaves, True)
            diverging = _modules_reading_training(graph, _trace(model, leaves, False))
        except Exception:  # noqa: BLE001  (any tracing failure means: use the fallback)
            return None
        if diverging is None:
            return None
        if not diverging:
            break
        leaves |= diverging
    else:
        return None
    gm = fx.GraphModule(model, graph, model.__class__.__name__)
    # A module the forward never calls is left out of the trace; its state
    # would go missing from checkpoints.
    if set(gm.state_dict().keys()) != set(model.state_dict().keys()):
        return None
    _fuse_graph(gm, report)
    # Batch norms the graph does not see (inside modules kept whole, and batch
    # norm subclasses such as timm's BatchNormAct2d) are converted as
    # convert_model without fx converts them, in copies of those modules.
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if _has_convertible(module):
                converted = _convert_in_place(_structural_copy(module), fuse=True)
                _set_submodule(gm, node.target, converted)
                if report is not None:
                    report.extend(_in_place_records(node.target, module, converted))
    # The containers GraphModule made for the module paths take the flags of
    # the model's modules at those paths.
    originals = dict(model.named_modules())
    for name, module in gm.named_modules():
        if name in originals:
            module.training = originals[name].training
    gm.training = model.training
    return gm


def _fusable_batch_norm(module) -> bool:
    """A batch norm whose output a graph's activation or add can fold into: nn's
    (exact types), torchvision's FrozenBatchNorm2d, or timm's BatchNormAct2d
    with no dropout and no activation of its own."""
    if type(module) in _FUSED_FORMS or _is_torchvision_frozen_batch_norm(module):
        return True
    return (_is_timm_batch_norm_act(module) and type(module.act) is nn.Identity
            and type(module.drop) is nn.Identity)


class FusionRecord(NamedTuple):
    """What ``convert_model(fuse=True)`` did with one batch norm (``fused_bn.fusion_report``).

    ``name``: its module path. ``follows``: what follows its output that
    fused_bn could fold (an activation's name, ``"add"``, ``"add+<activation>"``;
    for timm's BatchNormAct2d, its own activation), or None. ``fused``: what
    was folded into it (same spelling), or None. ``reason``: why what follows
    was not folded, or None.

    Attributes:
        name: the batch norm's module path (``"layer1.0.bn1"``).
        follows: what follows its output that could fold, or None.
        fused: what was folded, or None.
        reason: why nothing was folded where something could be, or None.

    Example::

        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        for record in fused_bn.fusion_report(model):
            print(record.name, record.follows, record.fused, record.reason)
    """
    name: str
    follows: Optional[str]
    fused: Optional[str]
    reason: Optional[str]


_RELU6 = resolve("relu6")  # hardtanh(0, 6), as _activations.py's table spells it


def _spelled(activation: Optional[Activation], residual: bool) -> Optional[str]:
    """The report's spelling of a fold: "silu", "add", "add+relu", "leaky_relu(0.1)"."""
    act = None
    if activation == _RELU6:
        act = "relu6"
    elif activation is not None and not activation.is_identity:
        act = activation.name + (f"({', '.join(f'{p:g}' for p in activation.params)})" if activation.params else "")
    if residual:
        return "add" if act is None else f"add+{act}"
    return act


def _what_follows(node: fx.Node, modules) -> Tuple[Optional[str], Optional[fx.Node]]:
    """The first of the batch norm's readers fused_bn could fold, spelled, and
    that reader."""
    for user in node.users:
        activation = _activation_of(user, modules)
        if activation is not None:
            return _spelled(activation, False), user
        if _is_add(user) and _adds_a_tensor(user, node):
            after = _only_user(user)
            return _spelled(_activation_of(after, modules) if after is not None else None, True), user
    return None, None


def _fuse_graph(gm: fx.GraphModule, report: Optional[list] = None) -> None:
    """In ``gm``'s graph, a batch norm followed by an activation, by a residual
    add, or by an add and then an activation, becomes one call of a fused
    module; every other batch norm its plain fused twin."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    # nn.Identity returns its input: a call of one (timm's drop_path without
    # stochastic depth) between a batch norm and its add changes nothing.
    for node in list(graph.nodes):
        if (node.op == "call_module" and type(modules[node.target]) is nn.Identity
                and len(node.args) == 1 and not node.kwargs):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    order = {node: i for i, node in enumerate(graph.nodes)}
    records = []
    for node in list(graph.nodes):
        if node.op != "call_module" or not _fusable_batch_norm(modules.get(node.target)):
            continue
        bn = modules[node.target]
        follows, reader = _what_follows(node, modules)
        activation, residual, reason = _fold_followers(node, modules, calls, order)
        if _is_timm_batch_norm_act(bn):
            fused = _fused_batch_norm_act_from(bn, fuse=True, activation=activation)
        else:
            fused = _fused_with_activation(bn, activation, residual)
        _set_submodule(gm, node.target, fused)
        modules[node.target] = fused
        records.append((node.target, follows, reader, _spelled(activation, residual), reason))
    graph.lint()
    gm.recompile()
    if report is not None:
        # An add this batch norm's output was an operand of, folded into the
        # other operand's batch norm, no longer follows this one.
        live = set(graph.nodes)
        for name, follows, reader, fused, reason in records:
            if fused is None and reader is not None and reader not in live:
                follows = None
            report.append(FusionRecord(name, follows, fused, reason if follows is not None else None))


def _fold_followers(node: fx.Node, modules, calls, order) -> Tuple[Activation, bool, Optional[str]]:
    """Folds what follows batch norm ``node`` into it (the graph rewritten:
    the residual becomes the call's second argument, the add and activation
    nodes are gone): (the activation, whether a residual was folded, why
    nothing was folded)."""
    # A module called from several places keeps its plain form: fusing one
    # call site would change the others.
    if calls[node.target] != 1:
        return IDENTITY, False, f"the module is called from {calls[node.target]} places"
    if len(node.args) != 1 or node.kwargs:
        return IDENTITY, False, "the module is called with more than its input"
    user = _only_user(node)
    if user is None:
        return IDENTITY, False, f"its output is read {len(node.users)} times"
    activation = _activation_of(user, modules)
    if activation is not None:
        user.replace_all_uses_with(node)
        node.graph.erase_node(user)
        return activation, False, None
    if not _is_add(user) or not _adds_a_tensor(user, node):
        return IDENTITY, False, None
    residual, reason = _residual_of_add(user, node, modules)
    if residual is None:
        return IDENTITY, False, reason
    # The fused call needs the residual: one computed after the batch norm
    # (torchvision's Bottleneck computes its downsample branch after bn3) moves
    # the batch norm's call to the add's place, when its input is a new
    # tensor nothing else reads (nothing between can change it).
    if order[residual] > order[node]:
        source = node.args[0]
        if not (_is_fresh(source, modules) and len(source.users) == 1):
            return IDENTITY, False, "its residual is computed after it, and its input is read elsewhere too"
        user.prepend(node)
        order[node] = order[user] - 0.5
    node.args = (node.args[0], residual)
    following = _only_user(user)
    activation = _activation_of(following, modules) if following is not None else None
    if activation is not None:
        following.replace_all_uses_with(node)
        node.graph.erase_node(following)
    user.replace_all_uses_with(node)
    node.graph.erase_node(user)
    return activation if activation is not None else IDENTITY, True, None


def _in_place_records(path: str, original: nn.Module, converted: nn.Module):
    """FusionRecords of the batch norms inside a module the graph calls whole."""
    converted_modules = dict(converted.named_modules())
    for name, module in original.named_modules():
        if not (type(module) in _FUSED_FORMS or _is_batch_norm_of_another_library(module)):
            continue
        fused = converted_modules.get(name)
        full = ".".join(part for part in (path, name) if part)
        follows = None
        if _is_timm_batch_norm_act(module):
            follows = _spelled(_activation_module(module.act), False)
            if follows is not None and type(module.drop) is not nn.Identity:
                yield FusionRecord(full, follows, None, "a dropout comes before its activation")
                continue
        done = _spelled(getattr(fused, "_activation", None), False)
        # Outside an nn.Sequential's next module, what follows a batch norm
        # here is not seen (no graph): the report counts what was folded.
        yield FusionRecord(full, follows or done, done,
                           "the model does not trace, or the module reads self.training (no graph of it)"
                           if follows is not None and done is None else None)
