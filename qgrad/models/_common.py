"""Argument checks, channel scaling and weight initialization shared by the qgrad model builders."""

from __future__ import annotations

import math
import numbers

from torch import nn

__all__ = ["check_model_args", "scaled", "init_weights"]


def check_model_args(num_classes: int, width: float, in_channels: int) -> None:
    """Raise ``ValueError`` unless ``num_classes`` and ``in_channels`` are ints >= 1 and ``width`` is a finite
    number > 0."""
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if (
        isinstance(width, bool)
        or not isinstance(width, numbers.Real)
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width``: ``max(1, int(round(channels * width)))``."""
    return max(1, int(round(channels * width)))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolution weights (fan-out, ReLU gain), zero conv biases; BatchNorm (weight 1, bias 0)
    and ``nn.Linear`` keep PyTorch's defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
