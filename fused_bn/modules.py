"""The drop-in module classes (conversion: _convert.py, _swap.py, _fuse.py)."""
import torch
import torch.distributed as dist
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.compiler import is_compiling

from ._activations import IDENTITY, resolve
from ._docstrings import add_relu_doc, lazy_doc, module_doc, relu_doc
from ._sync import sync_batch_norm
from .functional import _batch_norm_epilogue


def _traced_proxy(args):
    """The first ``torch.fx.Proxy`` among a forward's arguments, or None."""
    return next((a for a in args if isinstance(a, fx.Proxy)), None)


def _record_leaf_call(module, proxy, args):
    """Under torch.fx symbolic tracing, one ``call_module`` node for the whole
    module, as the tracer records ``nn.BatchNorm2d`` and every other torch.nn
    module: it steps into modules defined elsewhere, and our forward's checks
    branch on the input's shape, which a Proxy cannot do. The node reads the
    module's training flag when the traced graph runs, not when it was traced."""
    tracer = proxy.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


class _FusedBatchNormForward:
    """The forward of a batch-norm module run by fused_bn's kernels; mixed into
    subclasses of nn's batch norms, whose constructor, parameters, buffers and
    input check (``_check_input_dim``) it uses as they are.

    ``activation=`` (keyword only; None, a name or an nn activation module, see
    :func:`fused_bn.batch_norm`) is applied in the batch norm's own passes, and
    ``forward(input, residual)`` adds a residual before it:
    ``activation(bn(input) + residual)``. Neither changes the state_dict."""

    # The activation a class applies when none is given (its aliases': relu).
    _default_activation = None

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._activation = resolve(activation if activation is not None else self._default_activation)

    @property
    def activation(self):
        """The fused activation as a :class:`fused_bn.Activation` (name and
        parameters), or None."""
        return None if self._activation.is_identity else self._activation

    def extra_repr(self):
        extra = super().extra_repr()
        return extra + (f", activation={self.activation}" if self.activation is not None else "")

    def _batch_norm_args(self, input: torch.Tensor) -> tuple:
        """(running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked) for this call, in _batch_norm_epilogue's order: a
        tuple, not keywords, since a BN layer's Python time counts against
        small layers' step time."""
        self._check_input_dim(input)
        training = self.training
        buffers_in_use = not training or self.track_running_stats
        parameters, buffers = self._parameters, self._buffers
        # Module.__getattr__ costs a small layer's forward a good share of its
        # host time (bench/NOTES.md): read the registries directly when they
        # hold the name, as __getattr__ would. A name they do not hold (a
        # parametrization's property, weight_norm's attribute) and dynamo's
        # tracing take the ordinary attribute.
        direct = ("weight" in parameters and "bias" in parameters and "running_mean" in buffers
                  and "running_var" in buffers and "num_batches_tracked" in buffers
                  and not is_compiling())
        counts = training and self.track_running_stats
        if direct:
            running_mean = buffers["running_mean"] if buffers_in_use else None
            running_var = buffers["running_var"] if buffers_in_use else None
            weight, bias = parameters["weight"], parameters["bias"]
            num_batches_tracked = buffers["num_batches_tracked"] if counts else None
        else:
            running_mean = self.running_mean if buffers_in_use else None
            running_var = self.running_var if buffers_in_use else None
            weight, bias = self.weight, self.bias
            num_batches_tracked = self.num_batches_tracked if counts else None
        use_batch_stats = training or (running_mean is None and running_var is None)
        return (running_mean, running_var, weight, bias, use_batch_stats, self.momentum,
                self.eps, num_batches_tracked)

    def forward(self, input: torch.Tensor, residual=None) -> torch.Tensor:
        if residual is None:
            if isinstance(input, fx.Proxy):
                return _record_leaf_call(self, input, (input,))
            return _batch_norm_epilogue(input, *self._batch_norm_args(input), self._activation, None)
        proxy = _traced_proxy((input, residual))
        if proxy is not None:
            return _record_leaf_call(self, proxy, (input, residual))
        return self._forward_with_residual(input, residual, self._batch_norm_args(input))

    def _forward_with_residual(self, input, residual, args):
        if (isinstance(residual, torch.Tensor) and residual.shape == input.shape
                and residual.dtype == input.dtype and residual.device == input.device):
            return _batch_norm_epilogue(input, *args, self._activation, residual)
        # What `act(bn(x) + residual)` does in eager PyTorch for a residual
        # that broadcasts or promotes (convert_model cannot see shapes):
        # unfused. A residual that cannot be added raises before any state
        # changes.
        if isinstance(residual, torch.Tensor):
            shape = torch.broadcast_shapes(input.shape, residual.shape)
            if shape != input.shape:
                raise RuntimeError(
                    f"residual of shape {list(residual.shape)} broadcasts the output of shape "
                    f"{list(input.shape)} to {list(shape)}")
        # Any other error of the add or the activation (a residual on another
        # device, a complex one, one that is no tensor or number), exactly as
        # eager raises it, from a dry run on empty tensors of the same ranks.
        probe = residual.new_empty([0] * residual.dim()) if isinstance(residual, torch.Tensor) else residual
        self._activation.reference(input.new_empty([0] * input.dim()) + probe)
        return self._activation.reference(_batch_norm_epilogue(input, *args, IDENTITY, None) + residual)


class _FusedBatchNormReLUForward(_FusedBatchNormForward):
    """``relu(batch_norm(x))`` in the passes over memory batch norm alone takes;
    the backward recomputes the ReLU's mask from the input. (An alias: the
    module with ``activation="relu"``.)"""

    _default_activation = "relu"


class _FusedBatchNormAddReLUForward(_FusedBatchNormForward):
    """``relu(batch_norm(x) + residual)``, the end of a ResNet block, in one op;
    ``forward(input, residual)``, where ``residual`` has the input's shape and
    dtype and gets a gradient. (An alias: the module with
    ``activation="relu"``, always called with a residual.)"""

    _default_activation = "relu"

    def forward(self, input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if residual is None:
            # What eager relu(bn(x) + None) raises, before any state changes.
            return self._forward_with_residual(input, residual, self._batch_norm_args(input))
        return super().forward(input, residual)


class FusedBatchNorm1d(_FusedBatchNormForward, nn.BatchNorm1d):
    __doc__ = module_doc(1, """
        ``nn.BatchNorm1d`` computed by fused_bn's kernels, on (N, C) or (N, C, L)
        input; a subclass, as ``FusedBatchNorm2d`` is of ``nn.BatchNorm2d``. (N, C)
        is a batch of rows of C channels: the kernels read it as channels-last with
        one position per image.""", example="""
        head = fused_bn.FusedBatchNorm1d(256, activation="silu")
        y = head(torch.randn(32, 256))          # (N, C) rows
        y = head(torch.randn(4, 256, 10))       # (N, C, L)""")


class FusedBatchNorm2d(_FusedBatchNormForward, nn.BatchNorm2d):
    __doc__ = module_doc(2, """
        ``nn.BatchNorm2d`` computed by fused_bn's kernels.

        A subclass with the same constructor, parameters, buffers and state_dict keys,
        so checkpoints, optimizers and ``isinstance(m, nn.BatchNorm2d)`` keep working;
        channels_last input gives channels_last output. Unlike ``nn.BatchNorm2d``, an
        input that raises leaves ``num_batches_tracked`` untouched: every check runs
        before the op mutates any state. ``forward(input, residual=None)`` returns
        ``activation(bn(input) + residual)``; the ``activation`` property gives the
        fused activation as an ``Activation`` (or None).""", args="""
        num_features: C, the number of channels.
        eps: added to the variance before its square root (default 1e-5).
        momentum: the batch statistics' weight in the running statistics'
            update (default 0.1); None: the cumulative average over
            ``num_batches_tracked`` training calls.
        affine: learnable ``weight`` and ``bias`` (default True).
        track_running_stats: keep ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` and use them in eval (default True); without
            them eval normalizes with the batch's statistics.
        device, dtype: where and in which dtype parameters and buffers are made.
        bias: keyword only (default True); False: an affine module with a
            ``weight`` and no ``bias``, as nn's takes it.""", example="""
        bn = fused_bn.FusedBatchNorm2d(16, activation="relu")
        x = torch.randn(8, 16, 7, 7).to(memory_format=torch.channels_last)
        y = bn(x)                          # relu(bn(x)), channels_last like x
        y = bn(x, torch.randn_like(x))     # relu(bn(x) + residual)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert bn.activation == fused_bn.Activation("relu")""")


class FusedBatchNorm3d(_FusedBatchNormForward, nn.BatchNorm3d):
    __doc__ = module_doc(3, """
        ``nn.BatchNorm3d`` computed by fused_bn's kernels, on (N, C, D, H, W) input;
        a subclass, as ``FusedBatchNorm2d`` is of ``nn.BatchNorm2d``. channels_last_3d
        input gives channels_last_3d output.""", example="""
        bn = fused_bn.FusedBatchNorm3d(8)
        x = torch.randn(2, 8, 4, 6, 6).to(memory_format=torch.channels_last_3d)
        assert bn(x).is_contiguous(memory_format=torch.channels_last_3d)""")


class FusedBatchNormReLU1d(_FusedBatchNormReLUForward, FusedBatchNorm1d):
    __doc__ = relu_doc(1)


class FusedBatchNormReLU2d(_FusedBatchNormReLUForward, FusedBatchNorm2d):
    __doc__ = relu_doc(2, summary="""
        ``relu(nn.BatchNorm2d(x))`` in the passes over memory batch norm alone
        takes; the backward recomputes the ReLU's mask from the input.""")


class FusedBatchNormReLU3d(_FusedBatchNormReLUForward, FusedBatchNorm3d):
    __doc__ = relu_doc(3)


class FusedBatchNormAddReLU1d(_FusedBatchNormAddReLUForward, FusedBatchNorm1d):
    __doc__ = add_relu_doc(1)


class FusedBatchNormAddReLU2d(_FusedBatchNormAddReLUForward, FusedBatchNorm2d):
    __doc__ = add_relu_doc(2, summary="""
        ``relu(nn.BatchNorm2d(x) + residual)``, the end of a ResNet block, in one
        op; ``forward(input, residual)``, where ``residual`` has the input's shape
        and dtype and gets a gradient.""")


class FusedBatchNormAddReLU3d(_FusedBatchNormAddReLUForward, FusedBatchNorm3d):
    __doc__ = add_relu_doc(3)


# nn's lazy batch norms infer ``num_features`` from the first input's
# ``size(1)`` and then become their eager class; ours become our twin of it.
# Like nn's, a lazy one is no ``nn.BatchNorm2d`` (1d, 3d) until then: init
# loops over batch norms would meet uninitialized parameters.

class FusedLazyBatchNorm1d(_FusedBatchNormForward, nn.LazyBatchNorm1d):
    __doc__ = lazy_doc(1)

    cls_to_become = FusedBatchNorm1d


class FusedLazyBatchNorm2d(_FusedBatchNormForward, nn.LazyBatchNorm2d):
    __doc__ = lazy_doc(2)

    cls_to_become = FusedBatchNorm2d


class FusedLazyBatchNorm3d(_FusedBatchNormForward, nn.LazyBatchNorm3d):
    __doc__ = lazy_doc(3)

    cls_to_become = FusedBatchNorm3d


def _bias_option(bn) -> dict:
    """bias=False for an affine batch norm made without a bias (a keyword-only
    constructor argument of newer torch); nothing otherwise, so older torch,
    which lacks it, is never passed it."""
    return {"bias": False} if bn.affine and bn.bias is None else {}


def _fused_from(bn: _BatchNorm, cls) -> _BatchNorm:
    """A ``cls`` holding ``bn``'s settings, parameters, buffers and children."""
    fused = cls(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, device="meta", **_bias_option(bn))
    # The very same Parameter, buffer and child module objects (a timm
    # BatchNormAct2d's activation): optimizers holding them and any other
    # reference stay valid.
    for name, param in bn.named_parameters(recurse=False):
        setattr(fused, name, param)
    for name, buf in bn.named_buffers(recurse=False):
        setattr(fused, name, buf)
    for name, child in bn.named_children():
        setattr(fused, name, child)
    fused.train(bn.training)
    return fused


class FusedSyncBatchNorm2d(FusedBatchNorm2d):
    """Batch norm whose training statistics cover the batches of every rank of a
    ``torch.distributed`` process group, as ``nn.SyncBatchNorm`` does: CUDA tensors
    over NCCL, and CPU tensors over gloo (which nn.SyncBatchNorm refuses).

    Same constructor as ``nn.SyncBatchNorm`` (plus ``activation=``, and a
    residual as ``forward``'s second argument, as every fused_bn batch norm
    takes them), and like it takes input of any rank from
    2-D to 5-D (``convert_sync_batchnorm`` converts BatchNorm1d, 2d and 3d alike);
    the same parameters, buffers and state_dict keys as ``nn.BatchNorm2d``/
    ``nn.SyncBatchNorm``. A training step exchanges per-channel statistics only:
    one all_gather in the forward, one all_reduce in the backward. Every rank gets
    the same statistics and the same running-statistics update, whatever its own
    batch size (0 included); grad_weight and grad_bias are each rank's own share
    (data-parallel training sums them). In eval, or when ``torch.distributed`` is
    not initialized or the group has one rank, it is exactly ``FusedBatchNorm2d``
    (no collective) on input of any of those ranks.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias:
            ``nn.SyncBatchNorm``'s, as described for ``FusedBatchNorm2d``.
        process_group: the ``torch.distributed`` group whose ranks share
            statistics (default None: the default group).
        activation: keyword only; as for ``FusedBatchNorm2d``.

    Shapes and dtypes:
        input: (N, C, ...) of 2 to 5 dimensions, N may differ between ranks (0
            included); float32, float64, float16 or bfloat16; CPU tensors (gloo)
            or CUDA tensors (NCCL), contiguous or channels_last.
        residual: optional second argument of ``forward``, the input's shape
            and dtype.
        output: the input's shape, dtype and memory format.

    Raises:
        ValueError: input of fewer than 2 dimensions (``expected at least 2D
            input (got 1D input)``); a global batch of one value per channel in
            training; as ``FusedBatchNorm2d`` for eps and the activation.
        RuntimeError: as ``FusedBatchNorm2d`` (channel count, dtypes, residual),
            and what the collective raises.

    Example::

        # Without an initialized process group (or with one rank) it is a
        # FusedBatchNorm2d; under torch.distributed each rank runs the same code.
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        model = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(model)
        assert type(model[1]) is fused_bn.FusedSyncBatchNorm2d
        y = model(torch.randn(4, 3, 10, 10))
    """

    def _check_input_dim(self, input):
        # nn.SyncBatchNorm's checks and messages: input of 2 dimensions or more,
        # with at least one channel.
        nn.SyncBatchNorm._check_input_dim(self, input)
        nn.SyncBatchNorm._check_non_zero_input_channels(self, input)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 activation=None, **kwargs):
        # kwargs: nn.BatchNorm2d's other keyword-only arguments (bias, in newer torch)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, activation=activation, **kwargs)
        self.process_group = process_group

    def _sync_world_size(self) -> int:
        """The group's size when this call synchronises, else 1."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor, residual=None) -> torch.Tensor:
        world_size = self._sync_world_size()
        if world_size == 1 or _traced_proxy((input, residual)) is not None:
            return super().forward(input, residual)
        args = self._batch_norm_args(input)
        if residual is not None and not (
                isinstance(residual, torch.Tensor) and residual.shape == input.shape
                and residual.dtype == input.dtype and residual.device == input.device):
            return self._forward_with_residual(input, residual, args)
        running_mean, running_var, weight, bias, _, momentum, eps, num_batches_tracked = args
        return sync_batch_norm(
            input, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked,
            self._activation, residual, self.process_group, world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch norm of ``module`` (``nn.BatchNorm1d``, ``2d`` and ``3d``,
        ours among them keeping their activation, and ``nn.SyncBatchNorm``) with a
        ``FusedSyncBatchNorm2d`` sharing its parameters and buffers, as
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` does, and return the module (the
        new one when ``module`` itself is converted). Our residual forms become
        synchronised modules that take the residual as ``forward``'s second
        argument, as they did. A lazy batch norm not yet run raises (it has no
        parameters to share).

        Args:
            module: the model (or a single batch norm) to convert.
            process_group: the group of the new modules (default None: the
                default group).

        Returns:
            ``module``, converted in place, or the new module when ``module``
            is itself a batch norm.

        Raises:
            ValueError: a lazy batch norm that has not run yet.
            NotImplementedError: timm's ``BatchNormAct2d`` whose activation
                fused_bn does not fuse, or with a dropout before it.

        Example::

            model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
            model = fused_bn.FusedSyncBatchNorm2d.convert_sync_batchnorm(model)
            assert isinstance(model[1], fused_bn.FusedSyncBatchNorm2d)
        """
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"FusedSyncBatchNorm2d.convert_sync_batchnorm: {type(module).__name__} is not "
                "initialized yet; run the model on an input once before converting it")
        converted = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            activation = module._activation if isinstance(module, _FusedBatchNormForward) else None
            act = module._modules.get("act")
            if (act is not None or "drop" in module._modules) and not getattr(module, "fuses_activation", False):
                # timm's BatchNormAct2d (ours unfused, or theirs): the activation goes
                # into the synchronised module when fused_bn fuses it and no dropout
                # comes before it. (Ours fused carries its activation already.)
                try:
                    activation = resolve(act)
                except ValueError:
                    activation = None
                if activation is None or type(module._modules.get("drop")) not in (nn.Identity, type(None)):
                    raise NotImplementedError(
                        f"FusedSyncBatchNorm2d.convert_sync_batchnorm: {type(module).__name__} with "
                        f"{type(act).__name__} activation has no synchronised form")
            converted = _fused_from(module, lambda *args, **kwargs: cls(
                *args, process_group=process_group, activation=activation, **kwargs))
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


class _FusedBatchNormActForward(_FusedBatchNormForward):
    """The forward of timm's BatchNormAct2d on fused_bn's kernels. With
    ``fuses_activation`` set (by ``convert_model(fuse=True)``, where the
    module's ``drop`` is an ``nn.Identity`` and its ``act`` one fused_bn
    fuses, or an ``nn.Identity``), the module's ``activation`` runs in the
    kernels' passes in place of ``drop`` and ``act``, and ``forward`` takes a
    residual, added before it, as every fused_bn batch norm does (conversion
    folds a graph's add and activation after a BatchNormAct2d without one of
    its own that way). Otherwise ``drop`` and ``act`` are applied to the
    batch norm's output as timm does."""

    fuses_activation = False

    def forward(self, input: torch.Tensor, residual=None) -> torch.Tensor:
        if self.fuses_activation:
            return super().forward(input, residual)
        if residual is not None:
            raise TypeError(f"{type(self).__name__}.forward takes a residual only when its activation is fused "
                            "(convert_model(fuse=True))")
        if isinstance(input, fx.Proxy):
            return _record_leaf_call(self, input, (input,))
        args = self._batch_norm_args(input)
        return self.act(self.drop(_batch_norm_epilogue(input, *args, IDENTITY, None)))


class _FusedFrozenBatchNormForward:
    """The forward of torchvision's FrozenBatchNorm2d (detection backbones:
    statistics and affine transform frozen, all four held as buffers) on
    fused_bn's eval kernel: one pass over memory, with the activation and
    residual that ``convert_model(fuse=True)`` folds into it
    (``forward(input, residual)``). What torchvision's own forward does
    otherwise (input that is not 4-D, or whose dtype differs from the
    buffers': torchvision promotes it) runs unfused, exactly as torchvision
    computes it."""

    _activation = IDENTITY

    @property
    def activation(self):
        """The fused activation as a :class:`fused_bn.Activation`, or None."""
        return None if self._activation.is_identity else self._activation

    def forward(self, input: torch.Tensor, residual=None) -> torch.Tensor:
        proxy = _traced_proxy((input, residual))
        if proxy is not None:
            return _record_leaf_call(self, proxy, (input,) if residual is None else (input, residual))
        if (isinstance(input, torch.Tensor) and input.dim() == 4 and input.dtype == self.weight.dtype
                and (residual is None or (isinstance(residual, torch.Tensor) and residual.shape == input.shape
                                          and residual.dtype == input.dtype))):
            return _batch_norm_epilogue(input, self.running_mean, self.running_var, self.weight, self.bias,
                                        False, 0.0, self.eps, None, self._activation, residual)
        output = super().forward(input)
        return self._activation.reference(output if residual is None else output + residual)


_fused_subclasses = {}


def _fused_subclass(base: type, forward: type, name: str, doc: str) -> type:
    """``name``: a subclass of a batch norm class of another library
    (``base``) with fused_bn's ``forward`` mixed in, so that that library's
    isinstance checks keep working; made on first use, so that fused_bn does
    not import the library."""
    cls = _fused_subclasses.get(base)
    if cls is None:
        cls = type(name, (forward, base), {"__module__": __name__, "__doc__": doc})
        _fused_subclasses[base] = cls
    return cls


def _fused_act_class(base: type) -> type:
    """``FusedBatchNormAct2d``, made from timm's BatchNormAct2d (``base``)."""
    return _fused_subclass(base, _FusedBatchNormActForward, "FusedBatchNormAct2d",
                           "timm's BatchNormAct2d computed by fused_bn's kernels (same state_dict).")


def _fused_frozen_class(base: type) -> type:
    """``FusedFrozenBatchNorm2d``, made from torchvision's FrozenBatchNorm2d (``base``)."""
    return _fused_subclass(base, _FusedFrozenBatchNormForward, "FusedFrozenBatchNorm2d",
                           "torchvision's FrozenBatchNorm2d computed by fused_bn's eval kernel, with the "
                           "activation and residual add after it folded in (same state_dict).")


def __getattr__(name):
    # Unpickling a model holding one of these classes looks it up here.
    if name == "FusedBatchNormAct2d":
        from timm.layers.norm_act import BatchNormAct2d
        return _fused_act_class(BatchNormAct2d)
    if name == "FusedFrozenBatchNorm2d":
        from torchvision.ops.misc import FrozenBatchNorm2d
        return _fused_frozen_class(FrozenBatchNorm2d)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
