"""Quantization-aware fine-tuning with the straight-through estimator: :func:`prepare_qat`."""
from __future__ import annotations

import copy
from typing import Dict, Optional

from torch import nn

from qgrad.nn.fake_quant import FakeQuant
from qgrad.nn.quant_layers import QUANT_TWINS
from qgrad.quantization._common import check_bits, quantizable_layers, replace_module
from qgrad.quantization.ptq import weight_quantizer

__all__ = ["prepare_qat"]


def prepare_qat(model: nn.Module, weight_bits: Optional[int], act_bits: Optional[int]) -> nn.Module:
    """A copy of ``model`` for STE fine-tuning at ``(weight_bits, act_bits)``; ``model`` itself is not modified.

    Every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (exact types) is replaced by its ``Quant*`` twin with

    * ``weight_quant``: symmetric signed restricted grid, per tensor, **fixed at preparation** to
      ``scale = max|w| / quant_max`` of the weight as it is now. The grid does not follow the weight during
      training (STE fine-tuning on a fixed grid, as in Alizadeh et al. 2020, section 4.1): weights that grow past
      ``max|w|`` are clipped to the outermost code and, by the straight-through rule, get zero gradient there.
    * ``input_quant``: per-tensor grid fitted to the min/max of the first batch the layer sees (then fixed),
      unsigned when that batch is non-negative (e.g. after a ReLU), signed restricted otherwise.

    Both quantizers use the straight-through estimator (``learnable=False``). BatchNorm is *not* folded: it keeps
    training with batch statistics; fold and re-quantize afterwards with :func:`quantize_model` for deployment.
    ``None`` bits keep that side float. The copy keeps ``model``'s training flag, device and dtype.
    """
    weight_bits = check_bits(weight_bits, "weight_bits")
    act_bits = check_bits(act_bits, "act_bits")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not quantizable_layers(model):
        raise ValueError("model has no nn.Conv1d/Conv2d/Conv3d or nn.Linear layer to quantize")
    qat = copy.deepcopy(model)
    twins: Dict[int, nn.Module] = {}
    for name, layer in quantizable_layers(qat).items():
        if id(layer) not in twins:
            wq = None if weight_bits is None else weight_quantizer(layer.weight, weight_bits, per_channel=False)
            iq = None
            if act_bits is not None:
                iq = FakeQuant(act_bits, symmetric=True, learnable=False, signed=None).to(layer.weight.device)
            twins[id(layer)] = QUANT_TWINS[type(layer)].from_float(layer, weight_quant=wq, input_quant=iq)
        replace_module(qat, name, twins[id(layer)])
    return qat
