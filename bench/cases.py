"""What gets benchmarked: the case lists, the byte-traffic model and the cuDNN rule."""
from dataclasses import dataclass

import torch

MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
LAYOUTS = ("nchw", "channels_last")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Passes over an input-sized tensor that our kernels must make, per mode. This is the
# streaming minimum the kernels are designed around (not PyTorch's own traffic):
#   train_fwd:     read x twice (statistics, then normalize) + write y            = 3
#   train_fwd_bwd: the forward's 3 + read x and dy twice each + write dx          = 8
#   eval_fwd:      read x + write y                                               = 2
# Per-channel parameters and statistics are C-sized and left out.
TENSOR_PASSES = {"train_fwd": 3, "train_fwd_bwd": 8, "eval_fwd": 2}
BYTES_MODEL = ("bytes = numel * itemsize * passes; passes: train_fwd 3 (read x twice, write y), "
               "train_fwd_bwd 8 (forward's 3 + read x and dy twice each + write dx), "
               "eval_fwd 2 (read x, write y); C-sized parameters and statistics ignored")

CPU_SHAPES = ((32, 64, 56, 56), (32, 256, 14, 14), (64, 512, 7, 7), (8, 32, 112, 112))
CPU_QUICK_SHAPES = ((8, 32, 28, 28),)
# BatchNorm1d on an MLP head's (N, C) rows and BatchNorm3d on a video clip's
# (N, C, D, H, W): one case each (the GPU's clip is the 8x64x16x56x56; the
# CPU's a quarter of its frames' area, the size of the CPU's 2-D cases).
CPU_OTHER_RANK_SHAPES = ((256, 4096), (2, 64, 16, 28, 28))
GPU_OTHER_RANK_SHAPES = ((256, 4096), (8, 64, 16, 56, 56))

# (C, H=W) of every distinct BatchNorm input in ResNet-50 (torchvision layout).
RESNET50_BN_SHAPES = ((64, 112), (64, 56), (128, 56), (128, 28), (256, 56), (256, 28), (256, 14),
                      (512, 28), (512, 14), (512, 7), (1024, 14), (1024, 7), (2048, 7))
# Edge cases: a single channel (one huge reduction), RGB-like input, very many channels.
GPU_EDGE_SHAPES = ((1, 112), (3, 224), (4096, 7))
GPU_BATCHES = (64, 256)
GPU_QUICK_SHAPES = ((64, 64, 56, 56), (64, 4096, 7, 7))


@dataclass(frozen=True)
class Case:
    mode: str
    dtype: str
    layout: str
    shape: tuple

    @property
    def key(self):
        return f"{self.mode}/{self.dtype}/{self.layout}/{'x'.join(map(str, self.shape))}"

    @property
    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def bytes_moved(self):
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.numel * itemsize * TENSOR_PASSES[self.mode]


def batch_norm_classes(rank):
    """(nn's batch norm, ours) for input of ``rank`` dimensions."""
    import fused_bn
    from torch import nn

    if rank in (2, 3):
        return nn.BatchNorm1d, fused_bn.FusedBatchNorm1d
    if rank == 5:
        return nn.BatchNorm3d, fused_bn.FusedBatchNorm3d
    return nn.BatchNorm2d, fused_bn.FusedBatchNorm2d


def channels_last_format(rank):
    """The channels-last memory format of input of ``rank`` dimensions: (N, C)
    rows already are channels-last and have no other."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(rank)


def layouts_of(shape, layouts=LAYOUTS):
    """The layouts a shape is measured in: (N, C) has only the one."""
    return tuple(l for l in layouts if l == "nchw" or channels_last_format(len(shape)) is not None)


def gpu_shapes(batches=GPU_BATCHES):
    return [(n, c, hw, hw) for n in batches for c, hw in RESNET50_BN_SHAPES + GPU_EDGE_SHAPES]


def build_suite(device_type, quick=False, modes=MODES, dtypes=None, layouts=LAYOUTS, batches=None):
    """Cases ordered so that all cases of one shape are adjacent: each shape gets one
    set of modules and one compiled module, reused across its dtypes, layouts and modes."""
    if device_type == "cuda":
        default_dtypes = ("float32", "float16", "bfloat16")
        shapes = GPU_QUICK_SHAPES if quick else gpu_shapes(batches or GPU_BATCHES) + list(GPU_OTHER_RANK_SHAPES)
    else:
        default_dtypes = ("float32", "bfloat16")
        shapes = CPU_QUICK_SHAPES if quick else CPU_SHAPES + CPU_OTHER_RANK_SHAPES
    dtypes = dtypes or default_dtypes
    if quick:
        dtypes = dtypes[:1]
    return [Case(mode, dtype, layout, tuple(shape))
            for shape in shapes for dtype in dtypes for layout in layouts_of(shape, layouts) for mode in modes]


def cudnn_rule(case, device_type, weight_dtype=torch.float32, numel_limit=2**31):
    """Whether nn.BatchNorm2d would pick cuDNN, per the rule in PyTorch's backend
    selection (CUDA, not bf16, half only with fp32 weights, weight and bias defined,
    numel < 2^31). Our modules always have fp32 weight and bias."""
    if device_type != "cuda" or not torch.backends.cudnn.enabled:
        return False
    if case.dtype == "bfloat16":
        return False
    if case.dtype == "float16" and weight_dtype != torch.float32:
        return False
    return case.numel < numel_limit
