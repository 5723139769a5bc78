"""qgrad: quantization-robust training with the gradient-l1 penalty (Alizadeh et al., ICLR 2020).

A network trained with ``L1GradPenalty`` can be post-training-quantized to several bit-widths from one set
of float weights (``quantize_model``, ``sweep``). ``fake_quant`` / ``FakeQuant`` are the twice-differentiable
fake-quantization op and module (straight-through and LSQ gradients) used by PTQ and QAT. ``GraphedStep``
replays a training step's forward and backward as a CUDA graph.
"""
from qgrad import data, malloc, models
from qgrad.cuda_graph import GraphedStep
from qgrad.nn import FakeQuant, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, quant_range
from qgrad.ops import backends, fake_quant, use_backend
from qgrad.penalties import L1GradPenalty, L2GradPenalty, OrthogonalityPenalty
from qgrad.quantization import fold_bn, format_table, prepare_qat, quantize_model, sweep

__version__ = "0.1.0"

__all__ = [
    "backends",
    "use_backend",
    "FakeQuant",
    "GraphedStep",
    "L1GradPenalty",
    "L2GradPenalty",
    "OrthogonalityPenalty",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "data",
    "fake_quant",
    "malloc",
    "fold_bn",
    "format_table",
    "models",
    "prepare_qat",
    "quant_range",
    "quantize_model",
    "sweep",
]
