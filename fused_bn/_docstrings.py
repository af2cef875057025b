"""The module classes' docstrings, assembled from the sections they share.

The 1d/2d/3d, plain/ReLU/add+ReLU/lazy classes of modules.py document the same
arguments, shapes and errors; each is written here once, with what differs by
rank (``RANKS``) filled in. modules.py sets each class's ``__doc__`` from these
functions, so ``help()``, ``inspect.getdoc`` and tools/gen_api_docs.py
(docs/api.md) see each class's complete text.
"""
import textwrap

# What differs between the ranks: the input a class takes (its shapes, then
# its layouts), nn's message for input of another rank, and the input the
# generated examples use.
RANKS = {
    1: dict(shapes="(N, C) or (N, C, L)",
            layouts="(N, C) rows are read as channels-last with one position each; "
                    "a transposed (N, C, L) is copied to contiguous, as nn does.",
            wrong_rank="expected 2D or 3D input (got 4D input)",
            example_size="4, 16"),
    2: dict(shapes="(N, C, H, W)",
            layouts="contiguous, channels_last or any strides.",
            wrong_rank="expected 4D input (got 3D input)",
            example_size="4, 16, 5, 5"),
    3: dict(shapes="(N, C, D, H, W)",
            layouts="contiguous, channels_last_3d or any strides.",
            wrong_rank="expected 5D input (got 4D input)",
            example_size="2, 16, 3, 4, 4"),
}

# nn's constructor arguments, documented in full by FusedBatchNorm2d's docstring.
NN_ARGUMENTS = "num_features, eps, momentum, affine, track_running_stats, device, dtype, bias"

ACTIVATION_ARG = """\
    activation: keyword only. None (plain batch norm), a name of
        ``fused_bn.ACTIVATIONS`` (nn's default parameters) or the nn module
        (``nn.ReLU6()``, ``nn.LeakyReLU(0.1)``, ``nn.GELU(approximate="tanh")``):
        applied after batch norm, and after the residual when ``forward`` gets
        one, in batch norm's own passes. Not part of the state_dict."""

SHAPES = """\
Shapes and dtypes:
    input: {shapes}; float32, float64, float16 or bfloat16; {layouts}
    residual: optional second argument of ``forward``: the input's shape and
        dtype is fused into the passes (it gets a gradient); one that
        broadcasts into the input's shape or promotes its dtype is added
        unfused, as eager PyTorch adds it.
    output: the input's shape, dtype and memory format.
    parameters and buffers: (C,), the module's dtype; float16 or bfloat16
        input with float32 parameters and running statistics (mixed precision)
        returns the input's dtype and keeps float32 statistics."""

RAISES = """\
Raises:
    ValueError: input of another rank, with nn's message (``{wrong_rank}``);
        one value per channel in training; ``eps <= 0`` in training or
        ``eps < 0`` in eval; an activation fused_bn does not fuse (when the
        module is made).
    RuntimeError: a channel count other than ``num_features`` (``running_mean
        should contain 5 elements not 4``); input and parameters of different
        floating dtypes, other than float16/bfloat16 input with float32
        parameters; a residual that cannot be added to the output or would
        broadcast it to a larger shape.
    NotImplementedError: integer input (nn's error).
{extra_raises}    A call that raises leaves ``num_batches_tracked`` and the running
    statistics untouched."""

RELU_DEFAULT = ' ``activation`` defaults to ``"relu"``.'


def nn_arguments(nn_class, names=NN_ARGUMENTS, note=""):
    """The Args entry of the nn constructor arguments a class shares with
    ``nn_class``, referring to FusedBatchNorm2d's descriptions."""
    return f"{names}:\n    ``{nn_class}``'s, as described for ``FusedBatchNorm2d``.{note}"


def module_doc(rank, summary, *, example, args=None, extra_raises=""):
    """A module class's docstring: ``summary``; Args (``args``, by default
    ``nn.BatchNorm{rank}d``'s arguments, then ``activation``); the shapes and
    errors of input of ``rank``, with ``extra_raises`` (whole lines) before the
    last sentence of Raises; ``example`` (code). Each text may come indented
    as a whole, as in a class body."""
    def block(text):
        return textwrap.dedent(text).strip("\n")

    facts = RANKS[rank]
    args = block(args) if args is not None else nn_arguments(f"nn.BatchNorm{rank}d")
    return "\n\n".join([
        block(summary),
        "Args:\n" + textwrap.indent(args, "    ") + "\n" + ACTIVATION_ARG,
        SHAPES.format(**facts),
        RAISES.format(extra_raises=extra_raises, **facts),
        "Example::\n\n" + textwrap.indent(block(example), "    "),
    ])


def _relu_form_doc(rank, summary, alias, **kwargs):
    """The docstring of a ReLU form of ``FusedBatchNorm{rank}d``: ``summary``
    (it may come indented), then what it is: that class with ReLU by default,
    ``alias`` saying how."""
    return module_doc(
        rank,
        f"{textwrap.dedent(summary).strip()}\n\n"
        f'``FusedBatchNorm{rank}d`` with ``activation="relu"`` by default{alias}',
        args=nn_arguments(f"nn.BatchNorm{rank}d", note=RELU_DEFAULT), **kwargs)


def relu_doc(rank, summary=None):
    """``FusedBatchNormReLU{rank}d``'s docstring; ``summary``: its first
    paragraph when it says more than the other ranks'."""
    return _relu_form_doc(
        rank, summary or f"``relu(nn.BatchNorm{rank}d(x))`` in batch norm's passes over memory.",
        " (an alias:\nsame state_dict, same kernels).",
        example=f"bn = fused_bn.FusedBatchNormReLU{rank}d(16)\n"
        f"x = torch.randn({RANKS[rank]['example_size']})\n"
        f"assert (bn(x) >= 0).all()")


def add_relu_doc(rank, summary=None):
    """``FusedBatchNormAddReLU{rank}d``'s docstring; ``summary``: its first
    paragraph when it says more than the other ranks'."""
    size = RANKS[rank]["example_size"]
    return _relu_form_doc(
        rank, summary or f"``relu(nn.BatchNorm{rank}d(x) + residual)`` in one op: ``forward(input, residual)``.",
        ", always called\nwith a residual.",
        example=f"block_end = fused_bn.FusedBatchNormAddReLU{rank}d(16)\n"
        f"x, identity = torch.randn({size}), torch.randn({size})\n"
        f"y = block_end(x, identity)             # relu(bn(x) + identity)",
        extra_raises="    TypeError: ``forward`` without a residual (it is required).\n")


def lazy_doc(rank):
    """``FusedLazyBatchNorm{rank}d``'s docstring."""
    return module_doc(
        rank,
        f"``nn.LazyBatchNorm{rank}d`` computed by fused_bn's kernels; becomes a ``FusedBatchNorm{rank}d``.\n\n"
        f"``num_features`` is the first input's ``size(1)``; until that first call the\n"
        f"module holds no values and, like nn's, is no ``nn.BatchNorm{rank}d``.",
        args=nn_arguments(f"nn.LazyBatchNorm{rank}d", names=NN_ARGUMENTS.split(", ", 1)[1]),
        example=f"bn = fused_bn.FusedLazyBatchNorm{rank}d()\n"
        f"y = bn(torch.randn({RANKS[rank]['example_size']}))\n"
        f"assert type(bn) is fused_bn.FusedBatchNorm{rank}d and bn.num_features == 16")

