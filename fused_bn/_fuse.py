"""convert_model(fuse_relu=True) on a torch.fx trace: BatchNorm2d -> ReLU and
BatchNorm2d -> add -> ReLU chains become one fused module call."""
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .modules import (FusedBatchNorm2d, FusedBatchNormAddReLU2d, FusedBatchNormReLU2d,
                      _fused_from)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


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
    return other if isinstance(other, fx.Node) and other is not bn_node else None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)


def fuse_with_fx(model: nn.Module) -> Optional[fx.GraphModule]:
    """The fused GraphModule, or None when the model does not trace (or the
    trace would change its state_dict keys)."""
    if isinstance(model, nn.BatchNorm2d):
        return None
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001  (any tracing failure means: use the fallback)
        return None
    # A module the forward never calls is left out of the trace; its state
    # would go missing from checkpoints.
    if set(gm.state_dict().keys()) != set(model.state_dict().keys()):
        return None
    modules = dict(gm.named_modules())
    graph = gm.graph
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.BatchNorm2d:
            continue
        bn = modules[node.target]
        user = _only_user(node)
        fused_cls = FusedBatchNorm2d
        # A module called from several places keeps its plain form: fusing one
        # call site would change the others.
        if calls[node.target] == 1 and user is not None and len(node.args) == 1 and not node.kwargs:
            if _is_relu(user, modules):
                fused_cls = FusedBatchNormReLU2d
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
                    fused_cls = FusedBatchNormAddReLU2d
                    node.args = (node.args[0], residual)
                    relu.replace_all_uses_with(node)
                    graph.erase_node(relu)
                    graph.erase_node(user)
        fused = _fused_from(bn, fused_cls)
        _set_submodule(gm, node.target, fused)
        modules[node.target] = fused
    graph.lint()
    gm.recompile()
    return gm
