"""Models nobody here wrote, from torchvision and timm, for the zoo tests
(tests/test_zoo.py) and the end-to-end benchmark (bench/models.py).

torchvision 0.28.0 is built for exactly torch 2.13.0 (``make test-deps``
installs it with ``--no-deps`` so torch is never replaced; timm likewise). The
package index's torchvision wheel is a CUDA build whose C ops do not load
beside the CPU torch; its models are pure Python and work once the
``torchvision::nms``/``qnms`` schemas its fake registrations refer to exist,
which ``import_torchvision`` defines when they are missing.
"""
import importlib
import sys

import torch

# name: (constructor, input side). Small inputs keep CPU runs short; every
# model still ends with spatial size >= 1 (inception_v3 without its auxiliary
# head, which needs 299x299 input; googlenet keeps its own).
TORCHVISION_MODELS = {
    "resnet18": ("resnet18", 64), "resnet50": ("resnet50", 64),
    "resnext50_32x4d": ("resnext50_32x4d", 64), "wide_resnet50_2": ("wide_resnet50_2", 64),
    "densenet121": ("densenet121", 64), "mobilenet_v2": ("mobilenet_v2", 64),
    "mobilenet_v3_small": ("mobilenet_v3_small", 64), "mobilenet_v3_large": ("mobilenet_v3_large", 64),
    "efficientnet_b0": ("efficientnet_b0", 64),
    "regnet_y_400mf": ("regnet_y_400mf", 64), "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", 64),
    "mnasnet1_0": ("mnasnet1_0", 64), "googlenet": ("googlenet", 64),
    "inception_v3": ("inception_v3", 96),
}
TIMM_MODELS = {
    "timm/resnet26d": ("resnet26d", 64), "timm/seresnext26d_32x4d": ("seresnext26d_32x4d", 64),
    "timm/efficientnet_b0": ("efficientnet_b0", 64), "timm/mixnet_s": ("mixnet_s", 64),
    "timm/rexnet_100": ("rexnet_100", 64), "timm/dla34": ("dla34", 64),
    "timm/cspresnet50": ("cspresnet50", 64), "timm/regnetx_002": ("regnetx_002", 64),
    "timm/hrnet_w18_small": ("hrnet_w18_small", 64),
    "timm/mobilenetv3_large_100": ("mobilenetv3_large_100", 64), "timm/cspdarknet53": ("cspdarknet53", 64),
    "timm/fastvit_t8": ("fastvit_t8", 64), "timm/repvit_m1": ("repvit_m1", 64),
    "timm/ghostnet_100": ("ghostnet_100", 64),
}
# torch the index's torchvision 0.28.0 and the tested timm models are built for
ZOO_TORCH = "2.13.0"


def import_torchvision():
    """torchvision, defining the schemas of its C ops first when they do not
    load (see the module docstring). Raises ImportError when it is missing."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _torchvision_schemas  # kept alive: dropping the Library removes the schemas
    _torchvision_schemas = torch.library.Library("torchvision", "DEF")
    _torchvision_schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_schemas.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return importlib.import_module("torchvision")


def import_timm():
    import_torchvision()  # timm imports torchvision's feature extraction
    return importlib.import_module("timm")


def available(name):
    """Why ``name`` cannot be built here, or None when it can."""
    if not torch.__version__.startswith(ZOO_TORCH):
        return f"the zoo's torchvision 0.28.0 needs torch {ZOO_TORCH}, not {torch.__version__}"
    try:
        import_timm() if name.startswith("timm/") else import_torchvision()
    except ImportError as e:
        return f"not installed: {e}"
    return None


def build(name, seed=0):
    """(model, input side) with random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    if name in TIMM_MODELS:
        constructor, side = TIMM_MODELS[name]
        return import_timm().create_model(constructor, pretrained=False), side
    constructor, side = TORCHVISION_MODELS[name]
    models = import_torchvision().models
    kwargs = {}
    if name == "googlenet":
        kwargs["init_weights"] = True
    if name == "inception_v3":
        # PyTorch's default initialization: torchvision's own (truncated
        # normal, std 0.1) makes the stem's activations ~1e3 and the model so
        # ill-conditioned that nn's float64 gradients move by 1e-8 relative
        # under a one-ulp change of the input.
        kwargs.update(init_weights=False, aux_logits=False)
    return getattr(models, constructor)(weights=None, **kwargs), side


ALL_MODELS = list(TORCHVISION_MODELS) + list(TIMM_MODELS)
