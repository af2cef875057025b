"""Swapping nn's batch norm modules for their fused twins, module by module
(no tracing): which fused class stands for which nn class, a twin made from
a module sharing its parameters, buffers and children, and the in-place
conversion of a tree that convert_model falls back to (and that the fx path,
``_fuse.py``, applies to the modules its graph keeps whole)."""
from typing import NamedTuple

from torch import nn

from .modules import (FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d, FusedBatchNormAddReLU1d,
                      FusedBatchNormAddReLU2d, FusedBatchNormAddReLU3d, FusedBatchNormReLU1d,
                      FusedBatchNormReLU2d, FusedBatchNormReLU3d, FusedLazyBatchNorm1d,
                      FusedLazyBatchNorm2d, FusedLazyBatchNorm3d, _bias_option, _fused_act_class, _fused_from)


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


def _fused_batch_norm_act_from(bn: nn.Module, fuse_relu: bool) -> nn.Module:
    fused = _fused_from(bn, _fused_act_class(type(bn)))
    fused.fuses_relu = fuse_relu
    return fused


def _has_convertible(module: nn.Module) -> bool:
    """Whether convert_model would swap ``module`` or one of its submodules."""
    return any(type(m) in _FUSED_FORMS or type(m) in _FUSED_LAZY or _is_timm_batch_norm_act(m)
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


def _convert_in_place(module: nn.Module, fuse_relu: bool) -> nn.Module:
    if type(module) in _FUSED_FORMS:
        return _fused_from(module, _FUSED_FORMS[type(module)].plain)
    if type(module) in _FUSED_LAZY:
        return _fused_lazy_from(module)
    if _is_timm_batch_norm_act(module):
        return _fused_batch_norm_act_from(module, fuse_relu)
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        if type(child) not in _FUSED_FORMS:
            converted = _convert_in_place(child, fuse_relu)
            if converted is not child:  # a lazy batch norm or a timm BatchNormAct2d
                setattr(module, name, converted)
            continue
        # An nn.Sequential's batch norm right before an nn.ReLU: the pair
        # becomes the fused module and an nn.Identity at the ReLU's index, so
        # the state_dict keys stay as they were.
        following = children[i + 1][1] if i + 1 < len(children) else None
        if fuse_relu and isinstance(module, nn.Sequential) and type(following) is nn.ReLU:
            setattr(module, name, _fused_from(child, _FUSED_FORMS[type(child)].relu))
            setattr(module, children[i + 1][0], nn.Identity())
            children[i + 1] = (children[i + 1][0], nn.Identity())
        else:
            setattr(module, name, _fused_from(child, _FUSED_FORMS[type(child)].plain))
    return module
