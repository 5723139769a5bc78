"""CIFAR ResNet-18 (He et al. 2016, the 3x3-stem variant without max-pool used for 32x32 images)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from qgrad.models._common import check_model_args, init_weights, scaled

__all__ = ["BasicBlock", "ResNet18", "resnet18"]

_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels at width 1, stride of the stage's first block)
_BLOCKS_PER_STAGE = 2


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

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images.

    Layers (``c(n) = max(1, int(round(n * width)))``)::

        stem:   Conv3x3(in_channels -> c(64), stride 1, padding 1, bias=False) BN2d ReLU      (no max-pool)
        layer1: BasicBlock(c(64)  -> c(64),  stride 1)  BasicBlock(c(64)  -> c(64))
        layer2: BasicBlock(c(64)  -> c(128), stride 2)  BasicBlock(c(128) -> c(128))
        layer3: BasicBlock(c(128) -> c(256), stride 2)  BasicBlock(c(256) -> c(256))
        layer4: BasicBlock(c(256) -> c(512), stride 2)  BasicBlock(c(512) -> c(512))
        head:   AdaptiveAvgPool2d(1) Flatten Linear(c(512) -> num_classes)

    The first block of layer2..layer4 has a 1x1-conv + BN shortcut (see :class:`BasicBlock`). At width 1 with
    10 classes the network has **11,173,962** parameters.

    Shape: input ``(N, in_channels, H, W)``, any ``H, W >= 1`` (the global average pool absorbs the size);
    output logits ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        check_model_args(num_classes, width, in_channels)
        stem = scaled(_STAGES[0][0], width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        channels = stem
        for i, (out, stride) in enumerate(_STAGES, start=1):
            out = scaled(out, width)
            blocks = [BasicBlock(channels, out, stride)]
            blocks += [BasicBlock(out, out, 1) for _ in range(_BLOCKS_PER_STAGE - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            channels = out
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.pool(out).flatten(1))


def resnet18(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> ResNet18:
    """Build :class:`ResNet18`; see its docstring for the layer list and parameter count."""
    return ResNet18(num_classes=num_classes, width=width, in_channels=in_channels)
