"""Swapping nn's batch norm modules for their fused twins, module by module
(no tracing): which fused class stands for which nn class, a twin made from
a module sharing its parameters, buffers and children, and the in-place
conversion of a tree that convert_model falls back to (and that the fx path,
``_fuse.py``, applies to the modules its graph keeps whole)."""
from typing import NamedTuple, Optional

from torch import nn

from ._activations import IDENTITY, Activation, resolve
from .modules import (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedBatchNormAddReLU1d,
                      FusedBatchNormAddReLU2d, FusedBatchNormAddReLU3d, FusedBatchNormReLU1d,
                      FusedBatchNormReLU2d, FusedBatchNormReLU3d, FusedLazyBatchNorm1d,
                      FusedLazyBatchNorm2d, FusedLazyBatchNorm3d, _bias_option, _fused_act_class,
                      _fused_from, _fused_frozen_class)


class _FusedForms(NamedTuple):
    """The fused modules standing for one nn batch norm class."""
    plain: type
    relu: type
    add_relu: type


# What convert_model swaps, by the exact type of nn's module.
_FUSED_FORMS = {
    nn.BatchNorm1d: _FusedForms(FusedBatchNorm1d, FusedBatchNormReLU1d, FusedBatchNormAddReLU1d),
    nn.BatchNorm2d: _FusedForms(FusedBatchNorm2d, FusedBatchNormReLU2d, FusedBatchNormAddReLU2d),
    nn.BatchNorm3d: _FusedForms(FusedBatchNorm3d, FusedBatchNormReLU3d, FusedBatchNormAddReLU3d),
}
_FUSED_LAZY = {
    nn.LazyBatchNorm1d: FusedLazyBatchNorm1d,
    nn.LazyBatchNorm2d: FusedLazyBatchNorm2d,
    nn.LazyBatchNorm3d: FusedLazyBatchNorm3d,
}


def _is_timm_batch_norm_act(module: nn.Module) -> bool:
    """Exactly timm's BatchNormAct2d (batch norm, then its ``drop`` and ``act``
    children; most timm models since efficientnet use it)."""
    cls = type(module)
    return cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.")


def _fused_with_activation(bn: nn.Module, activation: Activation, residual: bool) -> nn.Module:
    """``bn``'s fused twin applying ``activation`` (after a residual add where
    ``residual``): ReLU as the ReLU classes (the names users know), the rest
    as the plain class with ``activation=``; a torchvision FrozenBatchNorm2d
    as our frozen form."""
    if _is_torchvision_frozen_batch_norm(bn):
        return _fused_frozen_from(bn, activation)
    forms = _FUSED_FORMS[type(bn)]
    if activation == _RELU:
        return _fused_from(bn, forms.add_relu if residual else forms.relu)
    if activation.is_identity:
        return _fused_from(bn, forms.plain)
    return _fused_from(bn, lambda *args, **kwargs: forms.plain(*args, activation=activation, **kwargs))


def _folded_activation(bn: nn.Module) -> Optional[Activation]:
    """The activation that a timm BatchNormAct2d's kernels can apply in place
    of its ``drop`` and ``act`` (the identity for an ``nn.Identity`` act), or
    None: a dropout before the activation, or an activation fused_bn lacks."""
    if type(bn.drop) is not nn.Identity:
        return None
    try:
        return resolve(bn.act)
    except ValueError:
        return None


def _fused_batch_norm_act_from(bn: nn.Module, fuse: bool, activation: Optional[Activation] = None) -> nn.Module:
    """timm BatchNormAct2d ``bn`` as our ``FusedBatchNormAct2d``: with ``fuse``,
    its act in the kernels' passes where it folds (``_folded_activation``);
    ``activation`` in its place for one whose act is an nn.Identity (a graph's
    activation after it, folded by _fuse.py)."""
    fused = _fused_from(bn, _fused_act_class(type(bn)))
    folded = _folded_activation(bn) if fuse else None
    if folded is not None:
        fused.fuses_activation = True
        fused._activation = activation if activation is not None and folded.is_identity else folded
    return fused


_RELU = resolve("relu")


def _activation_module(module: Optional[nn.Module]) -> Optional[Activation]:
    """The activation an nn activation module computes, when fused_bn fuses it
    (nn.Identity and anything else: None)."""
    if module is None:
        return None
    try:
        activation = resolve(module)
    except ValueError:
        return None
    return None if activation.is_identity else activation


def _is_torchvision_frozen_batch_norm(module: nn.Module) -> bool:
    """Exactly torchvision's FrozenBatchNorm2d (detection backbones)."""
    cls = type(module)
    return cls.__name__ == "FrozenBatchNorm2d" and cls.__module__.startswith("torchvision.")


def _fused_frozen_from(bn: nn.Module, activation: Activation) -> nn.Module:
    """torchvision FrozenBatchNorm2d ``bn`` as our ``FusedFrozenBatchNorm2d``
    holding its very buffers, applying ``activation``."""
    fused = _fused_frozen_class(type(bn))(bn.weight.shape[0], eps=bn.eps)
    for name, buf in bn.named_buffers(recurse=False):
        setattr(fused, name, buf)
    fused._activation = activation
    fused.train(bn.training)
    return fused


def _is_batch_norm_of_another_library(module: nn.Module) -> bool:
    """timm's BatchNormAct2d or torchvision's FrozenBatchNorm2d, exactly."""
    return _is_timm_batch_norm_act(module) or _is_torchvision_frozen_batch_norm(module)


def _has_convertible(module: nn.Module) -> bool:
    """Whether convert_model would swap ``module`` or one of its submodules."""
    return any(type(m) in _FUSED_FORMS or type(m) in _FUSED_LAZY or _is_batch_norm_of_another_library(m)
               for m in module.modules())


def _fused_lazy_from(bn: nn.modules.batchnorm._LazyNormBase) -> nn.Module:
    """An uninitialized nn lazy batch norm's twin (it holds no values yet);
    the dtype and device its placeholders were made with carry over (it has
    none with affine=False and track_running_stats=False)."""
    placeholder = bn.weight if bn.weight is not None else bn.running_mean
    fused = _FUSED_LAZY[type(bn)](eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                  track_running_stats=bn.track_running_stats,
                                  device=None if placeholder is None else placeholder.device,
                                  dtype=None if placeholder is None else placeholder.dtype,
                                  **_bias_option(bn))
    fused.train(bn.training)
    return fused


def _convert_in_place(module: nn.Module, fuse: bool) -> nn.Module:
    if type(module) in _FUSED_FORMS:
        return _fused_from(module, _FUSED_FORMS[type(module)].plain)
    if type(module) in _FUSED_LAZY:
        return _fused_lazy_from(module)
    if _is_timm_batch_norm_act(module):
        return _fused_batch_norm_act_from(module, fuse)
    if _is_torchvision_frozen_batch_norm(module):
        return _fused_frozen_from(module, IDENTITY)
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        if type(child) not in _FUSED_FORMS and not _is_torchvision_frozen_batch_norm(child):
            converted = _convert_in_place(child, fuse)
            if converted is not child:  # a lazy batch norm or a timm BatchNormAct2d
                setattr(module, name, converted)
            continue
        # An nn.Sequential's batch norm right before an activation fused_bn
        # fuses: the pair becomes the fused module and an nn.Identity at the
        # activation's index, so the state_dict keys stay as they were.
        following = children[i + 1][1] if i + 1 < len(children) else None
        activation = _activation_module(following) if fuse and isinstance(module, nn.Sequential) else None
        if activation is not None:
            setattr(module, name, _fused_with_activation(child, activation, residual=False))
            setattr(module, children[i + 1][0], nn.Identity())
            children[i + 1] = (children[i + 1][0], nn.Identity())
        else:
            setattr(module, name, _fused_with_activation(child, IDENTITY, residual=False))
    return module
