"""Model zoo: the networks of the paper's CIFAR-10 and ImageNet experiments, built by name.

>>> model = get("resnet18", num_classes=10, width=0.5, in_channels=3)

Every model uses plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` / ``nn.Linear`` layers (so
quantization and penalty tools can find them by type), is ``torch.fx.symbolic_trace``-able, takes inputs
``(N, in_channels, H, W)`` with ``H, W >= 8`` and returns logits ``(N, num_classes)``. ``width`` scales every
channel count ``c`` to ``max(1, int(round(c * width)))``; convolutions followed by BatchNorm have no bias.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from qgrad.models._common import check_model_args
from qgrad.models.resnet import BasicBlock, ResNet18, resnet18, resnet18_imagenet
from qgrad.models.vgg import VGGLike, vgg_like

__all__ = ["get", "names", "vgg_like", "resnet18", "resnet18_imagenet", "VGGLike", "ResNet18", "BasicBlock"]

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "vgg_like": vgg_like,
    "resnet18": resnet18,
    "resnet18_imagenet": resnet18_imagenet,
}


def names() -> List[str]:
    """The model names :func:`get` accepts, sorted."""
    return sorted(_REGISTRY)


def get(name: str, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> nn.Module:
    """Build the model ``name`` (one of :func:`names`) with freshly initialized weights.

    Args:
        name: ``"vgg_like"``, ``"resnet18"`` (CIFAR variant) or ``"resnet18_imagenet"`` (7x7 stem and
            max-pool, for ImageNet-sized images).
        num_classes: number of output logits, int >= 1.
        width: channel multiplier, finite number > 0 (1.0 is the paper's size).
        in_channels: channels of the input images, int >= 1 (3 for CIFAR-10 and ImageNet, 1 for digits).
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    check_model_args(num_classes, width, in_channels)
    return _REGISTRY[name](num_classes=num_classes, width=width, in_channels=in_channels)
