"""Modules.

* :class:`FakeQuant` and the quantized layers :class:`QuantConv1d`/``2d``/``3d``, :class:`QuantLinear`;
* twins of torch's BatchNorm and convolution layers with fused double backwards (same state, swapped in place by
  :func:`convert_batchnorm` / :func:`convert_conv`, which ``L1GradPenalty`` does for the model it regularizes).
"""
from qgrad.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm, revert_batchnorm
from qgrad.nn.conv import Conv1d, Conv2d, Conv3d, convert_conv, revert_conv
from qgrad.nn.fake_quant import FakeQuant, quant_range
from qgrad.nn.quant_layers import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "FakeQuant",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "convert_batchnorm",
    "convert_conv",
    "quant_range",
    "revert_batchnorm",
    "revert_conv",
]
