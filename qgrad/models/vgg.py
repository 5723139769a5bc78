"""The "VGG-like" CIFAR-10 network of Alizadeh et al. (ICLR 2020).

2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-FC1024-FC, with BatchNorm and ReLU after every hidden layer.
"""

from __future__ import annotations

from typing import List

from torch import Tensor, nn

from qgrad.models._common import check_model_args, init_weights, scaled

__all__ = ["VGGLike", "vgg_like"]

# (output channels, followed by a 2x2 max-pool) for the six convolutions at width 1
_CONVS = ((128, False), (128, True), (256, False), (256, True), (512, False), (512, True))
_HIDDEN = 1024
_POOLED = (4, 4)


class VGGLike(nn.Module):
    """VGG-like classifier for small images.

    Layers, in order (``c(n) = max(1, int(round(n * width)))``, every convolution 3x3, stride 1, padding 1,
    ``bias=False``)::

        features:   Conv(in_channels -> c(128)) BN2d ReLU   Conv(c(128) -> c(128)) BN2d ReLU   MaxPool 2x2
                    Conv(c(128) -> c(256))      BN2d ReLU   Conv(c(256) -> c(256)) BN2d ReLU   MaxPool 2x2
                    Conv(c(256) -> c(512))      BN2d ReLU   Conv(c(512) -> c(512)) BN2d ReLU   MaxPool 2x2
        pool:       AdaptiveAvgPool2d((4, 4))
        classifier: Flatten   Linear(16 * c(512) -> c(1024)) BN1d ReLU   Linear(c(1024) -> num_classes)

    For 32x32 inputs the three max-pools leave 4x4 maps, so the adaptive pool is the identity and the flatten
    has the classic 4*4*512 features; it lets any input of at least 8x8 (also non-square) reach the same
    classifier.

    Parameters at width 1 with 10 classes (independent of the input size): 4,578,176 in the convolutions and
    their BatchNorms, 8,401,930 in the classifier, **12,980,106** in total.

    Shape: input ``(N, in_channels, H, W)`` with ``H, W >= 8``; output logits ``(N, num_classes)``.

    The ReLUs are out-of-place ``nn.ReLU`` modules, so forward hooks and module swaps can reach every
    activation and a tensor a hook keeps (e.g. a BatchNorm output) is never overwritten later in the forward.
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        check_model_args(num_classes, width, in_channels)
        layers = []
        channels = in_channels
        for out, pool in _CONVS:
            out = scaled(out, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(_POOLED)
        hidden = scaled(_HIDDEN, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * _POOLED[0] * _POOLED[1], hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def recompute_segments(self) -> List[List[nn.Module]]:
        """The segments for ``L1GradPenalty(recompute=...)``: each Conv-BN-ReLU unit (with its max-pool), and
        the hidden Linear-BN-ReLU of the classifier."""
        units, unit = [], []
        for m in self.features:
            if isinstance(m, nn.Conv2d) and unit:
                units.append(unit)
                unit = []
            unit.append(m)
        return [*units, unit, list(self.classifier[1:4])]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


def vgg_like(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> VGGLike:
    """Build :class:`VGGLike`; see its docstring for the layer list and parameter count."""
    return VGGLike(num_classes=num_classes, width=width, in_channels=in_channels)
