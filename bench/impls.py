"""The three implementations under comparison and the step each mode times.

Every implementation runs the same module call on the same input with the same
autograd state, so they do identical work: training modes update the running
statistics and, with x.requires_grad (as a BN input fed by a conv is), save what
backward needs; eval runs under no_grad, as inference does.
"""
import contextlib

import torch

from .cases import batch_norm_classes, channels_last_format

IMPLS = ("fused", "eager", "compiled")
IMPL_LABELS = {"fused": "fused_bn", "eager": "nn eager", "compiled": "torch.compile(nn)"}


def configure_dynamo():
    """One compiled module per shape sees every dtype x layout x {train, eval} as a
    separate graph (dynamic=False), and Dynamo's per-code-object cache is shared by
    all BatchNorm2d instances: raise its limits, and fail loudly instead of silently
    running eager when a limit is still hit."""
    import torch._dynamo.config as dynamo_config

    for name, value in (("recompile_limit", 4096), ("cache_size_limit", 4096),
                        ("accumulated_recompile_limit", 8192),
                        ("accumulated_cache_size_limit", 8192),
                        ("fail_on_recompile_limit_hit", True), ("fail_on_cache_limit_hit", True)):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, value)


def _init_parameters(module, generator):
    # Non-trivial affine parameters, so a kernel that ignores them cannot pass parity.
    with torch.no_grad():
        c = module.num_features
        module.weight.copy_(1 + 0.1 * torch.randn(c, generator=generator))
        module.bias.copy_(0.1 * torch.randn(c, generator=generator))


class ShapeModules:
    """fused_bn, eager and compiled modules (BatchNorm1d, 2d or 3d by the input's
    rank) for one channel count, fp32 parameters (as under mixed precision:
    fp16/bf16 activations, fp32 BN parameters)."""

    def __init__(self, rank, channels, device):
        nn_cls, fused_cls = batch_norm_classes(rank)
        generator = torch.Generator().manual_seed(channels)
        self.eager = nn_cls(channels)
        _init_parameters(self.eager, generator)
        self.fused = fused_cls(channels)
        self.fused.load_state_dict(self.eager.state_dict())
        # Its own module, so the compiled graph's guards never see eager's state changes.
        compiled_source = nn_cls(channels)
        compiled_source.load_state_dict(self.eager.state_dict())
        self.eager.to(device)
        self.fused.to(device)
        self.compiled_source = compiled_source.to(device)
        self.compiled = torch.compile(self.compiled_source, dynamic=False, fullgraph=True)

    def module(self, impl):
        return getattr(self, impl)

    def set_training(self, training):
        for m in (self.eager, self.fused, self.compiled_source):
            m.train(training)


def make_inputs(case, device, generator_seed=0):
    """Input x (requires grad in training modes) and a preallocated output gradient,
    both in the case's dtype and layout."""
    generator = torch.Generator(device=device).manual_seed(generator_seed)
    x = torch.randn(case.shape, dtype=torch.float32, device=device, generator=generator)
    x = (x * 2 + 0.5).to(case.torch_dtype)
    grad = torch.randn(case.shape, dtype=case.torch_dtype, device=device, generator=generator)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=channels_last_format(len(case.shape)))
        grad = grad.contiguous(memory_format=channels_last_format(len(case.shape)))
    x.requires_grad_(case.mode != "eval_fwd")
    return x, grad


def make_step(module, mode, x, grad):
    """A zero-argument callable doing one timed unit of work for `mode`."""
    params = [p for p in module.parameters()]

    if mode == "train_fwd":
        def step():
            module(x)
    elif mode == "train_fwd_bwd":
        def step():
            # None (not zeroed) grads: backward then writes fresh gradients instead of
            # accumulating, the same for every implementation.
            x.grad = None
            for p in params:
                p.grad = None
            module(x).backward(grad)
    elif mode == "eval_fwd":
        def step():
            with torch.no_grad():
                module(x)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return step


@contextlib.contextmanager
def no_recompiles():
    """Inside timing loops a recompile would be timed as a kernel: make it an error."""
    import torch._dynamo.config as dynamo_config

    previous = dynamo_config.error_on_recompile
    dynamo_config.error_on_recompile = True
    try:
        yield
    finally:
        dynamo_config.error_on_recompile = previous
