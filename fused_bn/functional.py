"""Functional batch norm backed by the fused_bn ops."""
from typing import Optional

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _activations
from ._activations import Activation
from ._autograd import batch_norm_eval_autograd, batch_norm_train_autograd, check_stats_not_requiring_grad
from ._extension import ops


def _verify_batch_size(size):
    # Same check and message as torch.nn.functional.batch_norm.
    values_per_channel = size[0]
    for s in size[2:]:
        values_per_channel *= s
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}")


def _check_eps(eps, training):
    # F.batch_norm's checks and messages, which it runs before any other check
    # on the arguments (after the batch size's).
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _kernel_dtype(input, params):
    """The dtype the kernels take per-channel tensors in: float32 for float16
    or bfloat16 input whose first parameter is float32 (AMP), else the input's."""
    first = next((p for p in params if p is not None), None)
    if (first is not None and first.dtype == torch.float32
            and input.dtype in (torch.float16, torch.bfloat16)):
        return torch.float32
    return input.dtype


def _empty_batch_params(input, params):
    """An empty batch's per-channel tensors in the kernels' dtype. nn returns an
    empty batch before checking dtypes (a float64 batch into a float32 module
    works); the kernels read no value of an empty batch and update no running
    statistic, so copies of the running statistics lose nothing."""
    dtype = _kernel_dtype(input, params)
    return tuple(p if p is None or p.dtype == dtype or not p.is_floating_point() else p.to(dtype)
                 for p in params)


def _batch_norm_epilogue(input, running_mean, running_var, weight, bias, training, momentum, eps,
                         num_batches_tracked, activation: Activation, residual):
    if input.numel() == 0 and input.is_floating_point():
        running_mean, running_var, weight, bias = _empty_batch_params(
            input, (running_mean, running_var, weight, bias))
    if torch.is_grad_enabled():
        # nn's message (its native_batch_norm refuses these), before any state changes.
        check_stats_not_requiring_grad("native_batch_norm", running_mean, running_var)
    # Eager calls go straight to the ops' autograd kernels: that skips the
    # dispatcher's round trip back into Python (a few µs of a small layer's
    # step), and torch.func's transforms need the autograd.Function applied
    # from Python. Compiled graphs, torch.jit.trace (which records the op),
    # tensor subclasses and modes go through the dispatcher.
    direct = (type(input) is Tensor and not torch.compiler.is_compiling()
              and not torch.jit.is_tracing())
    if training:
        if (running_mean is None) != (running_var is None):
            raise ValueError(
                "running_mean and running_var must either both be None or neither be None")
        if input.dim() >= 2:
            _verify_batch_size(input.size())
        _check_eps(eps, True)
        train = batch_norm_train_autograd if direct else ops.batch_norm_train
        output, _, _ = train(input, weight, bias, running_mean, running_var, num_batches_tracked,
                             momentum, eps, activation.name, list(activation.params), residual)
        return output
    _check_eps(eps, False)
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is None:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    evaluate = batch_norm_eval_autograd if direct else ops.batch_norm_eval
    return evaluate(input, weight, bias, running_mean, running_var, eps, activation.name,
                    list(activation.params), residual)


def _check_residual(input, residual):
    # Its shape, dtype and device are the kernels' checks (csrc/torch/checks.h).
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor, got {type(residual).__name__}")


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
    activation=None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Mirrors ``torch.nn.functional.batch_norm``, with what follows batch norm
    in a network fused into its passes over memory.

    In training the batch statistics normalize the input and, when given, the
    running statistics are updated in place. ``num_batches_tracked`` (an int64
    scalar tensor, keyword only) is incremented in place by each training call;
    with ``momentum=None`` the update is then the cumulative average
    ``1 / num_batches_tracked``, as in ``nn.BatchNorm2d``.

    ``activation`` (keyword only): None, a name of ``fused_bn.ACTIVATIONS``
    (``"relu"``, ``"relu6"``, ``"silu"``, ..., with nn's default parameters) or
    the nn activation module (``nn.LeakyReLU(0.1)``,
    ``nn.GELU(approximate="tanh")``, ...). ``residual`` (keyword only; the input's shape and dtype): added
    before the activation. Returns ``activation(batch_norm(input) + residual)``
    from batch norm's own passes; its backward saves no more than batch norm
    does (plus the residual, or the output where the activation's derivative
    can be read from it).

    Args:
        input: the batch, (N, C, ...).
        running_mean, running_var: (C,) running statistics, updated in place in
            training; used in eval. None: no running statistics, and then
            ``training`` must be True (as in ``F.batch_norm``).
        weight, bias: (C,) affine parameters, or None.
        training: normalize with the batch's statistics (and update the
            running ones) rather than with the running statistics.
        momentum: the batch statistics' weight in the running update (default
            0.1); None: the cumulative average over ``num_batches_tracked``.
        eps: added to the variance before its square root (default 1e-5).
        num_batches_tracked: keyword only; int64 scalar tensor incremented in
            place by each training call.
        activation: keyword only; None, a name of ``fused_bn.ACTIVATIONS`` or
            the nn activation module.
        residual: keyword only; a tensor of the input's shape and dtype added
            before the activation (it gets a gradient).

    Returns:
        ``activation(batch_norm(input) + residual)``, the input's shape, dtype
        and memory format.

    Shapes and dtypes:
        input: (N, C) to (N, C, D, H, W), float32, float64, float16 or
            bfloat16, any strides (channels_last and channels_last_3d output
            follow the input's layout).
        running statistics, weight, bias: (C,), the input's dtype, or float32
            with float16/bfloat16 input (mixed precision).
        residual: the input's shape, dtype and device.

    Raises:
        ValueError: one value per channel in training; ``eps <= 0`` in
            training or ``eps < 0`` in eval; an activation fused_bn does not
            fuse.
        TypeError: a residual that is not a tensor.
        RuntimeError: input of fewer than 2 dimensions; per-channel tensors of
            another length than C (``running_mean should contain 4 elements
            not 3``); no running statistics in eval (``running_mean must be
            defined in evaluation mode``); a residual of another shape, dtype
            or device; dtypes other than those above.
        NotImplementedError: integer input.

    Example::

        x, shortcut = torch.randn(8, 16, 5, 5), torch.randn(8, 16, 5, 5)
        rm, rv, w, b = torch.zeros(16), torch.ones(16), torch.ones(16), torch.zeros(16)
        y = fused_bn.batch_norm(x, rm, rv, w, b, training=True,
                                activation=nn.LeakyReLU(0.1), residual=shortcut)
        assert y.shape == x.shape and rm.abs().sum() > 0   # running mean updated
    """
    # As torch.nn.functional does: tensor subclasses and modes with
    # __torch_function__ (torch.fx's Proxy among them) see this call whole.
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias, residual):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias, residual), input,
            running_mean, running_var, weight, bias, training=training, momentum=momentum, eps=eps,
            num_batches_tracked=num_batches_tracked, activation=activation, residual=residual)
    spec = _activations.resolve(activation)
    if residual is not None:
        _check_residual(input, residual)
    return _batch_norm_epilogue(input, running_mean, running_var, weight, bias, training, momentum,
                                eps, num_batches_tracked, spec, residual)


def batch_norm_add_relu(
    input: Tensor,
    residual: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """``relu(batch_norm(input, ...) + residual)``, a ResNet block's ending:
    :func:`batch_norm` with ``activation="relu", residual=residual``.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked:
            as for :func:`batch_norm`.
        residual: the tensor added before the ReLU (second positional
            argument): the input's shape, dtype and device.

    Returns:
        ``relu(batch_norm(input) + residual)``, the input's shape, dtype and
        memory format.

    Shapes and dtypes:
        As for :func:`batch_norm`; the residual is required.

    Raises:
        As :func:`batch_norm` (``TypeError`` for a residual that is not a
        tensor, ``RuntimeError`` for one of another shape: ``batch_norm:
        residual of shape [2, 4, 3] does not match input of shape [2, 4, 3,
        3]``).

    Example::

        x, identity = torch.randn(8, 16, 5, 5), torch.randn(8, 16, 5, 5)
        rm, rv = torch.zeros(16), torch.ones(16)
        y = fused_bn.batch_norm_add_relu(x, identity, rm, rv, training=True)
        assert (y >= 0).all()
    """
    if has_torch_function_variadic(input, residual, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm_add_relu, (input, residual, running_mean, running_var, weight, bias), input,
            residual, running_mean, running_var, weight, bias, training=training,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked)
    _check_residual(input, residual)
    return _batch_norm_epilogue(input, running_mean, running_var, weight, bias, training, momentum,
                                eps, num_batches_tracked, Activation("relu"), residual)
