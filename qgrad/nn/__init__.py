"""Modules: :class:`FakeQuant` and the quantized layers :class:`QuantConv1d`, :class:`QuantConv2d`,
:class:`QuantConv3d`, :class:`QuantLinear`."""
from qgrad.nn.fake_quant import FakeQuant, quant_range
from qgrad.nn.quant_layers import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear

__all__ = ["FakeQuant", "quant_range", "QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear"]
