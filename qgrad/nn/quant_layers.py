"""Convolution and linear layers with optional fake-quantization of their weight and their input.

Each ``Quant*`` class subclasses its torch layer (``isinstance(QuantConv2d(...), nn.Conv2d)`` holds, so code
that walks a model by layer type keeps working) and adds two submodules:

* ``input_quant``: a :class:`~qgrad.nn.fake_quant.FakeQuant` applied to the layer's input, or ``None``;
* ``weight_quant``: a :class:`~qgrad.nn.fake_quant.FakeQuant` applied to ``self.weight`` on every forward, or
  ``None``.

``forward(x)`` computes ``layer(input_quant(x), weight_quant(weight), bias)``; the bias stays float (in integer
inference it is stored at the much finer accumulator precision, so its rounding is negligible). With both
quantizers ``None`` the layer is exactly its torch parent. Gradients reach ``weight`` and ``x`` through the
quantizers' straight-through estimator.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from qgrad.nn import conv as _penalty_conv
from qgrad.nn.fake_quant import FakeQuant

__all__ = ["QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "QUANT_TWINS"]


class _QuantMixin:
    """Shared quantizer plumbing; the concrete classes supply ``forward``."""

    weight_quant: Optional[FakeQuant]
    input_quant: Optional[FakeQuant]

    def _init_quant(self, weight_quant: Optional[FakeQuant], input_quant: Optional[FakeQuant]) -> None:
        for name, q in (("weight_quant", weight_quant), ("input_quant", input_quant)):
            if q is not None and not isinstance(q, nn.Module):
                raise TypeError(f"{name} must be an nn.Module (e.g. FakeQuant) or None, got {type(q).__name__}")
            self.register_module(name, q)

    def _quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def _quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight_quant: Optional[FakeQuant] = None,
        input_quant: Optional[FakeQuant] = None,
    ):
        """A quantized twin of ``module`` (an instance of this class's torch parent).

        The twin has the same hyper-parameters, device, dtype and training flag and its own copies of
        ``weight`` and ``bias`` (no storage is shared with ``module``). The given quantizers are attached as
        they are (not copied).
        """
        parent = cls._float_type
        if not isinstance(module, parent):
            raise TypeError(f"{cls.__name__}.from_float needs an nn.{parent.__name__}, got {type(module).__name__}")
        w = module.weight
        new = cls(
            **cls._float_kwargs(module),
            bias=module.bias is not None,
            device=w.device,
            dtype=w.dtype,
            weight_quant=weight_quant,
            input_quant=input_quant,
        )
        with torch.no_grad():
            new.weight.copy_(w)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        new.weight.requires_grad_(w.requires_grad)
        if module.bias is not None:
            new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        return new


class _QuantConvNd(_QuantMixin):
    @staticmethod
    def _float_kwargs(module: nn.Module) -> dict:
        return dict(
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quantized_input(x), self._quantized_weight(), self.bias)


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with optional ``weight_quant`` / ``input_quant`` (see the module docstring)."""

    _float_type = nn.Conv1d

    def __init__(self, *args, weight_quant: Optional[FakeQuant] = None, input_quant: Optional[FakeQuant] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant, input_quant)


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with optional ``weight_quant`` / ``input_quant`` (see the module docstring)."""

    _float_type = nn.Conv2d

    def __init__(self, *args, weight_quant: Optional[FakeQuant] = None, input_quant: Optional[FakeQuant] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant, input_quant)


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with optional ``weight_quant`` / ``input_quant`` (see the module docstring)."""

    _float_type = nn.Conv3d

    def __init__(self, *args, weight_quant: Optional[FakeQuant] = None, input_quant: Optional[FakeQuant] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant, input_quant)


class QuantLinear(_QuantMixin, nn.Linear):
    """:class:`torch.nn.Linear` with optional ``weight_quant`` / ``input_quant`` (see the module docstring)."""

    _float_type = nn.Linear

    def __init__(self, *args, weight_quant: Optional[FakeQuant] = None, input_quant: Optional[FakeQuant] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant, input_quant)

    @staticmethod
    def _float_kwargs(module: nn.Module) -> dict:
        return dict(in_features=module.in_features, out_features=module.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantized_input(x), self._quantized_weight(), self.bias)


#: The float layer types qgrad quantizes, mapped to their quantized twins. Matching is by exact type: a
#: user subclass may use its weight differently in ``forward``, so it is left alone. The convolutions that
#: ``L1GradPenalty`` swaps in (:mod:`qgrad.nn.conv`) compute torch's forward, so a model quantized while a
#: penalty is attached (or a copy of it) is quantized like the torch model.
QUANT_TWINS = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    _penalty_conv.Conv1d: QuantConv1d,
    _penalty_conv.Conv2d: QuantConv2d,
    _penalty_conv.Conv3d: QuantConv3d,
    nn.Linear: QuantLinear,
    QuantConv1d: QuantConv1d,
    QuantConv2d: QuantConv2d,
    QuantConv3d: QuantConv3d,
    QuantLinear: QuantLinear,
}
