"""ResNet-18 (He et al. 2016): the CIFAR variant (3x3 stem, no max-pool, for 32x32 images) and the ImageNet
one (7x7 stride-2 stem and a 3x3 stride-2 max-pool, for 224x224 images)."""

from __future__ import annotations

from typing import List

from torch import Tensor, nn
from torch.nn import functional as F

from qgrad.models._common import check_model_args, init_weights, scaled

__all__ = ["BasicBlock", "ResNet18", "resnet18", "resnet18_imagenet"]

_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels at width 1, stride of the stage's first block)
_BLOCKS_PER_STAGE = 2
STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``conv1`` is 3x3 with ``stride``, ``conv2`` 3x3 with stride 1, both padding 1 and ``bias=False``. The
    shortcut is the identity when the shape is unchanged (``stride == 1`` and ``in_channels ==
    out_channels``), otherwise a 1x1 convolution with ``stride`` (``bias=False``) followed by BatchNorm2d.

    The ReLUs are functional (``F.relu``) and the residual sum is a plain tensor add, as in most published
    ResNet code; tools that rely on ``nn.ReLU`` modules must handle this form too.

    Shape: ``(N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torchvision's BasicBlock calls the shortcut "downsample": its checkpoints load under either name
        old = prefix + "downsample."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "shortcut." + key[len(old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, for small images (``stem="cifar"``) or ImageNet-sized ones (``stem="imagenet"``).

    Layers (``c(n) = max(1, int(round(n * width)))``)::

        stem "cifar":    Conv3x3(in_channels -> c(64), stride 1, padding 1, bias=False) BN2d ReLU
        stem "imagenet": Conv7x7(in_channels -> c(64), stride 2, padding 3, bias=False) BN2d ReLU
                         MaxPool3x3(stride 2, padding 1)
        layer1: BasicBlock(c(64)  -> c(64),  stride 1)  BasicBlock(c(64)  -> c(64))
        layer2: BasicBlock(c(64)  -> c(128), stride 2)  BasicBlock(c(128) -> c(128))
        layer3: BasicBlock(c(128) -> c(256), stride 2)  BasicBlock(c(256) -> c(256))
        layer4: BasicBlock(c(256) -> c(512), stride 2)  BasicBlock(c(512) -> c(512))
        head:   AdaptiveAvgPool2d(1) Flatten Linear(c(512) -> num_classes)

    The first block of layer2..layer4 has a 1x1-conv + BN shortcut (see :class:`BasicBlock`). At width 1 the
    CIFAR variant with 10 classes has **11,173,962** parameters, the ImageNet variant with 1000 classes
    **11,689,512**: the layer list and parameter names of torchvision's ``resnet18``, except that the shortcut
    modules are named ``shortcut`` where torchvision's are ``downsample``. ``load_state_dict`` accepts either
    name, so torchvision's ImageNet weights load into ``resnet18_imagenet`` as they are (the paper fine-tunes
    a pre-trained ResNet-18 on ImageNet).

    Shape: input ``(N, in_channels, H, W)``, any ``H, W >= 1`` (the global average pool absorbs the size; the
    ImageNet stem divides it by 4 before layer1); output logits ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, stem: str = "cifar"):
        super().__init__()
        check_model_args(num_classes, width, in_channels)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        channels = scaled(_STAGES[0][0], width)
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False)
            self.pool1 = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, channels, 7, stride=2, padding=3, bias=False)
            self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        for i, (out, stride) in enumerate(_STAGES, start=1):
            out = scaled(out, width)
            blocks = [BasicBlock(channels, out, stride)]
            blocks += [BasicBlock(out, out, 1) for _ in range(_BLOCKS_PER_STAGE - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            channels = out
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def recompute_segments(self) -> List[List[nn.Module]]:
        """The segments for ``L1GradPenalty(recompute=...)``: the stem's convolution and BatchNorm, then each
        residual block."""
        blocks = [block for i in range(1, 5) for block in getattr(self, f"layer{i}")]
        return [[self.conv1, self.bn1], *[[block] for block in blocks]]

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool1(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.pool(out).flatten(1))


def resnet18(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> ResNet18:
    """Build :class:`ResNet18`; see its docstring for the layer list and parameter count."""
    return ResNet18(num_classes=num_classes, width=width, in_channels=in_channels)


def resnet18_imagenet(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> ResNet18:
    """Build the ImageNet :class:`ResNet18` (7x7 stride-2 stem and max-pool); see its docstring."""
    return ResNet18(num_classes=num_classes, width=width, in_channels=in_channels, stem="imagenet")
