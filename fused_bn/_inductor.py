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

Importing Inductor costs seconds, so both are registered lazily: by the fake
kernels of these ops (fused_bn/_registration.py), which run while Dynamo traces
a graph (torch.compile's Inductor backend is imported by then) and before
Inductor copies its decomposition table and lowers the graph.
"""
import sys

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


def register_with_inductor():
    """Registers the layout constraints and the eval decomposition with
    Inductor if Inductor is loaded (a no-op otherwise, and after the first
    time)."""
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
    _registered = True
