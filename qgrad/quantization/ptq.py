"""Post-training quantization: :func:`quantize_model`."""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from qgrad.nn.fake_quant import FakeQuant
from qgrad.nn.quant_layers import QUANT_TWINS
from qgrad.quantization._common import check_bits, quantizable_layers, replace_module, trace
from qgrad.quantization.fold import fold_bn_inplace
from qgrad.quantization.ranges import bn_input_ranges, calibration_ranges

__all__ = ["quantize_model", "ACT_RANGES", "check_act_range", "weight_quantizer", "activation_quantizer"]

#: Accepted values of ``act_range``.
ACT_RANGES = ("bn", "minmax", "percentile")


def weight_quantizer(weight: torch.Tensor, bits: int, per_channel: bool = False) -> FakeQuant:
    """A fixed symmetric signed grid for ``weight``: ``scale = max|w| / quant_max`` over the whole tensor, or per
    output channel (axis 0) with ``per_channel=True``; restricted grid ``[-(2^(b-1) - 1), 2^(b-1) - 1]``.
    Not learnable (the gradient w.r.t. the weight is the straight-through estimator)."""
    fq = FakeQuant(bits, symmetric=True, axis=0 if per_channel else None, learnable=False, signed=True)
    fq = fq.to(weight.device)
    w = weight.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1) if per_channel else w.abs().amax()
    fq.set_range(-amax, amax)
    return fq


def activation_quantizer(bits: int, lo: torch.Tensor, hi: torch.Tensor, device: torch.device) -> FakeQuant:
    """A fixed per-tensor symmetric grid for an activation in ``[lo, hi]``: unsigned ``[0, 2^b - 1]`` with
    ``scale = hi / quant_max`` when ``lo >= 0`` (e.g. after a ReLU), else signed restricted with
    ``scale = max(|lo|, |hi|) / quant_max``."""
    fq = FakeQuant(bits, symmetric=True, axis=None, learnable=False, signed=None).to(device)
    fq.set_range(lo.float(), hi.float())
    return fq


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _warn_float_inputs(model, graph, layers, act, act_bits, input_stays_float) -> None:
    """Warn once about the layers whose input stays float at ``act_bits`` (range unknown, see
    :func:`quantize_model`), except those reading the network input when that stays float by design."""
    readers = set()
    if input_stays_float and graph is not None:
        for node in graph.nodes:
            src = node.args[0] if node.args else None
            if node.op == "call_module" and isinstance(src, torch.fx.Node) and src.op == "placeholder":
                readers.add(id(model.get_submodule(node.target)))
    floats = [name for name, layer in layers.items() if name not in act and id(layer) not in readers]
    if floats:
        shown = ", ".join(floats[:6]) + (", ..." if len(floats) > 6 else "")
        warnings.warn(
            f"{len(floats)} of {len(layers)} quantized layers keep a float input at act_bits={act_bits}, as "
            f"their input range is unknown ({shown}): no BatchNorm range reaches them (a layer without "
            "BatchNorm before it, an activation without a range rule such as GELU or SiLU), or calibration "
            "data did not. Pass calib=<batches> to measure them",
            stacklevel=3,
        )


def check_act_range(act_range: str, act_bits: Optional[int], calib) -> None:
    """Raise ``ValueError`` for an unknown ``act_range``, or one that measures data without ``calib``."""
    if act_range not in ACT_RANGES:
        choices = ", ".join(repr(a) for a in ACT_RANGES)
        raise ValueError(f"act_range must be one of {choices}, got {act_range!r}")
    if act_bits is not None and act_range != "bn" and calib is None:
        raise ValueError(
            f"act_range={act_range!r} measures activations on data: pass calib=<batch or batches>, "
            "or use act_range='bn'"
        )


def quantize_model(
    model: nn.Module,
    weight_bits: Optional[int] = 8,
    act_bits: Optional[int] = 8,
    act_range: str = "bn",
    calib=None,
    per_channel_weights: bool = False,
    bn_n: float = 6.0,
    percentile: float = 99.99,
) -> nn.Module:
    """A fake-quantized copy of ``model`` in eval mode (``model`` itself is not modified).

    Steps, on a deep copy:

    1. **BatchNorm folding.** Each BatchNorm that is the only consumer of a conv/linear output is folded into it
       (:mod:`qgrad.quantization.fold`) and replaced by ``nn.Identity``. Needs a ``torch.fx``-traceable model;
       an untraceable one is quantized unfolded, with a warning (``act_range="bn"`` then raises, see below).
    2. **Weights.** Every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (exact types) becomes its ``Quant*`` twin with
       a fixed symmetric signed grid, ``scale = max|w| / quant_max`` of the folded weight, per tensor or per output
       channel (``per_channel_weights=True``). Biases stay float.
    3. **Activations.** The *input* of every such layer is fake-quantized per tensor (``input_quant``): unsigned
       ``[0, 2^b - 1]`` when its range is non-negative (e.g. after a ReLU), signed restricted otherwise. The range:

       * ``"bn"`` (data-free, Nagel et al. 2019): intervals ``beta +- bn_n*|gamma|`` of the BatchNorms of the
         unfolded model pushed through the fx graph (:func:`qgrad.quantization.ranges.propagate_intervals`;
         residual adds add the intervals). A layer whose input interval is unknown -- the first layer, which reads
         the network input, or a layer after a conv without BatchNorm -- takes the min/max of its input on
         ``calib`` when ``calib`` is given, and otherwise **keeps a float input**.
       * ``"minmax"``: min and max of the layer input over ``calib`` run through the folded float model.
       * ``"percentile"``: the ``100 - percentile`` and ``percentile`` percentiles of those inputs (on a random
         subsample of at most 2**20 values per layer, deterministic).

       Layers that the calibration data never reaches keep a float input. A warning names the layers left with
       a float input, except, without ``calib``, those that read the network input.

    Args:
        model: a float model with conv/linear layers (may contain BatchNorm and already-quantized layers).
        weight_bits, act_bits: bit-widths in [2, 16]; ``None`` keeps that side float.
        act_range: ``"bn"``, ``"minmax"`` or ``"percentile"``.
        calib: a batch tensor, or an iterable of batches (tensors or ``(inputs, targets)`` tuples). Required by
            ``"minmax"``/``"percentile"`` (when ``act_bits`` is set); optional for ``"bn"``.
        per_channel_weights: one weight scale per output channel instead of one per layer.
        bn_n: the ``n`` of the BatchNorm interval ``beta +- n*|gamma|``.
        percentile: in (50, 100], for ``act_range="percentile"``.

    Returns:
        The quantized copy, in eval mode, on the device of ``model``.

    Raises:
        ValueError: bad bits/act_range/bn_n/percentile, missing ``calib``, a model without conv/linear layers, or
        ``act_range="bn"`` on a model that ``torch.fx`` cannot trace.
    """
    weight_bits = check_bits(weight_bits, "weight_bits")
    act_bits = check_bits(act_bits, "act_bits")
    check_act_range(act_range, act_bits, calib)
    if not isinstance(per_channel_weights, bool):
        raise TypeError(f"per_channel_weights must be a bool, got {per_channel_weights!r}")
    bn_n = _check_positive(bn_n, "bn_n")
    percentile = _check_positive(percentile, "percentile")
    if not 50 < percentile <= 100:
        raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not quantizable_layers(model):
        raise ValueError("model has no nn.Conv1d/Conv2d/Conv3d or nn.Linear layer to quantize")

    qmodel = copy.deepcopy(model)
    try:
        graph = trace(qmodel)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...) for data-dependent code
        if act_bits is not None and act_range == "bn":
            raise ValueError(
                f"act_range='bn' propagates BatchNorm ranges through the torch.fx graph, but the model cannot be "
                f"traced ({type(err).__name__}: {err}); use act_range='minmax' (or 'percentile') with calib=..."
            ) from err
        warnings.warn(f"BatchNorm not folded: the model is not torch.fx-traceable ({err})", stacklevel=2)
        graph = None

    act: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    if act_bits is not None and act_range == "bn":
        act = bn_input_ranges(qmodel, graph, bn_n)  # before folding: reads the BatchNorms
    fold_bn_inplace(qmodel, graph)
    qmodel.eval()

    layers = quantizable_layers(qmodel)
    if act_bits is not None and calib is not None:
        missing = [name for name in layers if name not in act]
        if missing:
            method = "percentile" if act_range == "percentile" else "minmax"
            act.update(calibration_ranges(qmodel, calib, missing, method=method, percentile=percentile))

    if act_bits is not None:
        _warn_float_inputs(qmodel, graph, layers, act, act_bits, calib is None)

    twins: Dict[int, nn.Module] = {}
    for name, layer in layers.items():
        if id(layer) not in twins:  # a layer shared under several names gets one twin (first name's range)
            wq = iq = None
            try:
                if weight_bits is not None:
                    wq = weight_quantizer(layer.weight, weight_bits, per_channel_weights)
            except ValueError as err:
                message = f"layer {name!r}: cannot quantize its weight ({err}): NaN or inf in it?"
                raise ValueError(message) from err
            if act_bits is not None and name in act:
                try:
                    iq = activation_quantizer(act_bits, *act[name], device=layer.weight.device)
                except ValueError as err:
                    raise ValueError(
                        f"layer {name!r}: cannot quantize its input ({err}): NaN or inf in the calibration "
                        "data, or in the BatchNorm parameters its range comes from?"
                    ) from err
            twins[id(layer)] = QUANT_TWINS[type(layer)].from_float(layer, weight_quant=wq, input_quant=iq)
        replace_module(qmodel, name, twins[id(layer)])
    return qmodel.eval()
