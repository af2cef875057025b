"""What fused_bn's ops ask of Inductor: layouts, and the eval op's decomposition.

Every op takes its `input` in whatever layout Inductor chose (NCHW, or
channels_last where layout optimization runs the convolutions that way), but
the kernels read the other activation-shaped tensors of a call (grad_output,
residual, output) in the input's layout and copy any that differ
(csrc/torch/prepare.h, `contiguous(in.format)`). Inductor's tags cannot say
"these follow that one": `flexible_layout` leaves each argument as its producer
made it, and a converted model with its activation left outside our op then
gets an NCHW grad_output (the activation's backward, an Inductor kernel free to
pick its layout) beside a channels_last input: one copy per batch norm per
step. `needs_fixed_stride_order` would pin every argument to the eager
trace's NCHW and copy the input instead.

So the ops with such companions carry no layout tag (csrc/ops.cpp) and this
module gives Inductor a constraint of their own: the input keeps its layout,
the companions are asked for the input's stride order, which costs nothing
when their producer is an Inductor kernel (it writes that order) and one copy
(the one our kernel would make) otherwise.

The eval op, besides, is decomposed for Inductor (only: torch.export and other
backends keep it) into ATen's inference batch norm, the residual add and the
activation's ATen ops: what nn's eval composite becomes under torch.compile,
which Inductor fuses with its neighbours and, with `freezing`, folds into the
preceding convolution's weights, where our opaque kernel costs a pass over
memory of its own.

A training op followed by an activation, a residual add, or an add and then
an activation, in the graph Dynamo hands Inductor, is folded into one call of
that op with the activation and residual as arguments (an Inductor pre-grad
pass, `fold_into_training_ops`): what `convert_model(fuse=True)` does to the
module tree, done under torch.compile for a model converted without it. Left
outside, the activation is an Inductor kernel whose mask the partitioner saves
for the backward in the eager trace's NCHW (Inductor's channels_last
preference stops at the last convolution in graph order), transposed from our
channels_last output: a compiled plain-converted MobileNet-v2 trained at half
the compiled original's speed (bench/NOTES.md, "Issue 37/38: compiled plain conversion").

Importing Inductor costs seconds, so all three are registered lazily: by the fake
kernels of these ops (fused_bn/_registration.py), which run while Dynamo traces
a graph (torch.compile's Inductor backend is imported by then) and before
Inductor copies its decomposition table and lowers the graph.
"""
import hashlib
import operator
import sys
from pathlib import Path

import torch

from ._activations import Activation

# op -> the arguments that must share the input's layout.
COMPANIONS = {
    "batch_norm_train": ("residual",),
    "batch_norm_eval": ("residual",),
    "batch_norm_train_with_stats": ("residual",),
    "batch_norm_backward": ("grad_output", "residual", "output"),
    "batch_norm_backward_sums": ("grad_output", "residual", "output"),
    "batch_norm_backward_with_sums": ("grad_output",),
}

_registered = False


def _companions_take_input_layout(companions):
    def constraint(fx_node, *args, **kwargs):
        from torch._inductor import ir
        from torch._inductor.virtualized import V

        names = [a.name for a in fx_node.target._schema.arguments]
        args = list(args)

        def get(name):
            i = names.index(name)
            return args[i] if i < len(args) else kwargs.get(name)

        def put(name, value):
            i = names.index(name)
            if i < len(args):
                args[i] = value
            else:
                kwargs[name] = value

        x = ir.ExternKernel.realize_input(get("input"))
        try:
            # A layout Inductor has not fixed yet is fixed now (the fallback
            # kernel would fix it as it is: contiguous) so the companions can
            # follow it.
            x.freeze_layout()
            order = ir.get_stride_order(x.get_stride(), V.graph.sizevars.shape_env)
        except NotImplementedError:  # an IR node without a layout of its own: ask nothing
            return tuple(args), kwargs
        put("input", x)
        for name in companions:
            value = get(name)
            if value is not None and isinstance(value, ir.IRNode):
                put(name, ir.ExternKernel.require_stride_order(value, order))
        return tuple(args), kwargs

    return constraint


def _batch_norm_eval_decomposition(input, weight, bias, running_mean, running_var, eps,
                                   activation="identity", activation_params=(), residual=None):
    normalized = torch.ops.aten._native_batch_norm_legit_no_training.default(
        input, weight, bias, running_mean, running_var, 0.0, eps)[0]
    u = normalized if residual is None else normalized + residual
    return Activation(activation, tuple(activation_params)).reference(u)


# The ops a following activation or add folds into, with the same argument
# names (activation, activation_params, residual); the eval op needs no fold
# (it is decomposed into nn's composite, which Inductor fuses itself).
_FOLDING_OPS = ("batch_norm_train", "batch_norm_train_with_stats")


def _schema(node):
    # Dynamo's graphs call the overload packet (torch.ops.fused_bn.batch_norm_train).
    target = node.target
    return (target.default if isinstance(target, torch._ops.OpOverloadPacket) else target)._schema


def _argument(node, name):
    """Argument ``name`` of a call of one of our ops, by its schema."""
    schema = _schema(node)
    for i, argument in enumerate(schema.arguments):
        if argument.name == name:
            if i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, argument.default_value if argument.has_default_value() else None)
    raise KeyError(name)


def _set_argument(node, name, value):
    names = [a.name for a in _schema(node).arguments]
    i = names.index(name)
    if i < len(node.args):
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _example(node):
    return node.meta.get("example_value", node.meta.get("val")) if hasattr(node, "meta") else None


def _same_tensor_type(a, b) -> bool:
    """Whether fx nodes ``a`` and ``b`` are tensors of one shape and dtype (a
    residual our op takes: no broadcasting, no type promotion)."""
    ta, tb = _example(a), _example(b)
    return (isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor)
            and ta.shape == tb.shape and ta.dtype == tb.dtype and ta.device == tb.device)


def _fold_activation(op, output, follower) -> bool:
    from ._fuse import _activation_of

    activation = _activation_of(follower, {}) if follower is not None else None
    if activation is None:
        return False
    _set_argument(op, "activation", activation.name)
    _set_argument(op, "activation_params", [float(p) for p in activation.params])
    follower.replace_all_uses_with(output)
    follower.graph.erase_node(follower)
    return True


def _fold_residual(op, output, add) -> bool:
    """Folds ``add`` (output + residual, either order; ``output += residual``)
    into ``op``, moving ``op`` down to the add when the residual is computed
    after it and nothing between reads the op's arguments."""
    from ._fuse import _IN_PLACE_ADDS, _is_add

    if add is None or not _is_add(add) or add.kwargs or len(add.args) != 2:
        return False
    a, b = add.args
    residual = b if a is output else a
    # `residual += output` writes into the residual: the folded call would not.
    if not isinstance(residual, torch.fx.Node) or residual is output or (add.target in _IN_PLACE_ADDS and a is not output):
        return False
    if not _same_tensor_type(output, residual):
        return False
    nodes = list(op.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    if position[residual] > position[op]:
        inputs = set(op.all_input_nodes)
        between = nodes[position[op] + 1:position[add]]
        if any(node is not output and inputs & set(node.all_input_nodes) for node in between):
            return False
        add.prepend(op)
        add.prepend(output)
    _set_argument(op, "residual", residual)
    add.replace_all_uses_with(output)
    add.graph.erase_node(add)
    return True


def fold_into_training_ops(graph: torch.fx.Graph) -> None:
    """In a Dynamo graph (Inductor's pre-grad IR), a training op of ours whose
    output is read once, by an activation fused_bn fuses, by a residual add of
    a tensor of its shape and dtype, or by such an add and then an activation,
    takes them as its arguments (fused_bn/_fuse.py's rules for what folds:
    parameters carried exactly, no write into the residual, no alpha)."""
    from ._fuse import _only_user  # here, not at the top: _fuse imports modules, whose registration imports this file

    targets = {getattr(torch.ops.fused_bn, name) for name in _FOLDING_OPS}
    targets |= {t.default for t in targets}
    for op in list(graph.nodes):
        if op.op != "call_function" or op.target not in targets:
            continue
        output = _only_user(op)
        if output is None or output.target is not operator.getitem or output.args[1] != 0:
            continue
        if _argument(op, "activation") != "identity":
            continue
        if _fold_activation(op, output, _only_user(output)):
            continue
        if _argument(op, "residual") is None and _fold_residual(op, output, _only_user(output)):
            _fold_activation(op, output, _only_user(output))


def _fold_pass():
    """fold_into_training_ops as an Inductor CustomGraphPass (its uuid, this
    file's hash, keys Inductor's FX graph cache)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class FoldIntoTrainingOps(CustomGraphPass):
        def __call__(self, graph):
            fold_into_training_ops(graph)

        def uuid(self):
            return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    return FoldIntoTrainingOps()


def _add_pre_grad_pass(config, fold_pass) -> None:
    """Adds ``fold_pass`` to Inductor's pre-grad custom passes, keeping any the
    user set (as a list where this torch takes one; otherwise a user's single
    pass is left alone and nothing is folded)."""
    current = config.pre_grad_custom_pass
    if current is None:
        config.pre_grad_custom_pass = fold_pass
        return
    from torch._inductor import custom_graph_pass

    if hasattr(custom_graph_pass, "get_custom_graph_passes"):
        passes = list(current) if isinstance(current, (list, tuple)) else [current]
        config.pre_grad_custom_pass = passes + [fold_pass]


def register_with_inductor():
    """Registers the layout constraints, the eval decomposition and the
    pre-grad fold with Inductor if Inductor is loaded (a no-op otherwise, and
    after the first time)."""
    global _registered
    if _registered:
        return
    lowering = sys.modules.get("torch._inductor.lowering")
    decomposition = sys.modules.get("torch._inductor.decomposition")
    if lowering is None or decomposition is None:
        return
    for name, companions in COMPANIONS.items():
        op = getattr(torch.ops.fused_bn, name).default
        lowering.make_fallback(op, layout_constraint=_companions_take_input_layout(companions),
                               warn=False)
    # Inductor reads its table through fast_random_decomps(), a cached copy
    # made at its first compile: both get the entry, whichever exists first.
    eval_op = torch.ops.fused_bn.batch_norm_eval.default
    decomposition.decompositions[eval_op] = _batch_norm_eval_decomposition
    decomposition.fast_random_decomps()[eval_op] = _batch_norm_eval_decomposition
    _add_pre_grad_pass(sys.modules["torch._inductor.config"], _fold_pass())
    _registered = True
