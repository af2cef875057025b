"""convert_model(fuse_relu=True) on a torch.fx trace: batch norm -> ReLU and
batch norm -> add -> ReLU chains (BatchNorm1d, 2d, 3d) become one fused module call."""
import copy
import difflib
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._swap import _FUSED_FORMS, _convert_in_place, _has_convertible
from .modules import _fused_from

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_IN_PLACE_ADDS = {operator.iadd, "add_"}


def _is_relu(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _residual_of_add(node: fx.Node, bn_node: fx.Node) -> Optional[fx.Node]:
    """The other operand of `bn_node + other` (no alpha), or None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ADD_METHODS))
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    other = b if a is bn_node else a if b is bn_node else None
    if not isinstance(other, fx.Node) or other is bn_node:
        return None
    # `residual += bn(x)` writes into the residual, which the fused call would
    # leave as it was: anything reading it (or an alias of it) afterwards would
    # see another value. `bn(x) += residual` writes into the batch norm's
    # output, which has no other reader.
    if node.target in _IN_PLACE_ADDS and a is not bn_node:
        return None
    return other


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
    and freeze its training flag) and with the given modules as leaves."""

    def __init__(self, leaves):
        super().__init__()
        self.leaves = leaves

    def proxy(self, node):
        return _InPlaceProxy(node, self)

    def is_leaf_module(self, module, qualified_name):
        return (isinstance(module, nn.modules.batchnorm._BatchNorm) or qualified_name in self.leaves
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


def fuse_with_fx(model: nn.Module) -> Optional[fx.GraphModule]:
    """The fused GraphModule, or None when the model does not trace (or the
    trace would change its state_dict keys, or the root's own forward depends
    on its training flag)."""
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
    _fuse_graph(gm)
    # Batch norms the graph does not see (inside modules kept whole, and batch
    # norm subclasses such as timm's BatchNormAct2d) are converted as
    # convert_model without fx converts them, in copies of those modules.
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if _has_convertible(module):
                _set_submodule(gm, node.target,
                               _convert_in_place(_structural_copy(module), fuse_relu=True))
    # The containers GraphModule made for the module paths take the flags of
    # the model's modules at those paths.
    originals = dict(model.named_modules())
    for name, module in gm.named_modules():
        if name in originals:
            module.training = originals[name].training
    gm.training = model.training
    return gm


def _fuse_graph(gm: fx.GraphModule) -> None:
    """Batch norm -> ReLU and batch norm -> add -> ReLU chains in ``gm``'s
    graph become one call of a fused module."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in _FUSED_FORMS:
            continue
        bn = modules[node.target]
        forms = _FUSED_FORMS[type(bn)]
        user = _only_user(node)
        fused_cls = forms.plain
        # A module called from several places keeps its plain form: fusing one
        # call site would change the others.
        if calls[node.target] == 1 and user is not None and len(node.args) == 1 and not node.kwargs:
            if _is_relu(user, modules):
                fused_cls = forms.relu
                user.replace_all_uses_with(node)
                graph.erase_node(user)
            else:
                residual = _residual_of_add(user, node)
                # The fused call takes the batch norm's place in the graph, so
                # the residual must exist by then: in a ResNet block with a
                # downsample branch computed first, the block's last batch norm
                # fuses, the downsample's does not.
                if residual is not None and order[residual] > order[node]:
                    residual = None
                relu = _only_user(user) if residual is not None else None
                if relu is not None and _is_relu(relu, modules):
                    fused_cls = forms.add_relu
                    node.args = (node.args[0], residual)
                    relu.replace_all_uses_with(node)
                    graph.erase_node(relu)
                    graph.erase_node(user)
        fused = _fused_from(bn, fused_cls)
        _set_submodule(gm, node.target, fused)
        modules[node.target] = fused
    graph.lint()
    gm.recompile()
