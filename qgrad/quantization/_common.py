"""Helpers shared by the quantization modules: which layers are quantized, tracing, argument checks."""
from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx
from torch import nn

from qgrad.nn.fake_quant import MAX_BITS, MIN_BITS, FakeQuant
from qgrad.nn.quant_layers import QUANT_TWINS

__all__ = [
    "bn_pairs_in", "check_bits", "first_tensor", "iter_batches", "model_device", "quantizable_layers", "replace_module",
    "trace",
]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def check_bits(bits: Optional[int], name: str) -> Optional[int]:
    """``bits`` as an int in [MIN_BITS, MAX_BITS], or ``None`` (that side stays float)."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}] or None, got {bits!r}")
    return int(bits)


def quantizable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{qualified name: module}`` of the conv/linear layers qgrad quantizes (exact types in ``QUANT_TWINS``).

    A module reachable under several names (weight sharing) appears under each of them.
    """
    return {
        name: m for name, m in model.named_modules(remove_duplicate=False) if type(m) in QUANT_TWINS
    }


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps conv/linear layers (qgrad's twins included), BatchNorm and FakeQuant as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in QUANT_TWINS or isinstance(m, (FakeQuant,) + _BN_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.Graph:
    """The ``torch.fx`` graph of ``model.forward``; ``call_module`` targets are qualified module names.

    Raises whatever ``torch.fx`` raises for an untraceable model (callers turn it into a clear message).
    """
    return _LeafTracer().trace(model)


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter or buffer (CPU for a model without any)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def first_tensor(batch) -> torch.Tensor:
    """The input tensor of a batch: the batch itself, or the first element of an ``(inputs, targets)`` pair."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch tuple; batches must be tensors or (inputs, targets) tuples")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batches must be tensors or (inputs, targets) tuples of tensors, got {type(batch).__name__}")
    return batch


def iter_batches(data) -> List:
    """``data`` as a list of batches: a single tensor is one batch, anything else is iterated once."""
    if isinstance(data, torch.Tensor):
        return [data]
    try:
        return list(data)
    except TypeError:
        raise TypeError(
            f"calibration data must be a tensor or an iterable of batches, got {type(data).__name__}"
        ) from None


def bn_pairs_in(graph: torch.fx.Graph, model: nn.Module) -> List[Tuple[str, str]]:
    """``(layer name, bn name)`` for every conv/linear whose only consumer is a BatchNorm.

    Conditions: the layer is a conv (followed by a BatchNorm of the same channel count) or a linear (followed by a
    ``BatchNorm1d``); each of the two modules is called exactly once in the graph; the layer's output node has
    the BatchNorm as its single user; the BatchNorm has running statistics (``track_running_stats=True``),
    since only those are constants that can be folded.
    """
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), _BN_TYPES):
            continue
        bn = model.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = model.get_submodule(src.target)
        if type(layer) not in QUANT_TWINS or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if bn.running_mean is None or bn.running_var is None:
            continue
        if isinstance(layer, nn.Linear):
            ok = isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features
        else:
            ok = bn.num_features == layer.out_channels
        if ok:
            pairs.append((src.target, node.target))
    return pairs
