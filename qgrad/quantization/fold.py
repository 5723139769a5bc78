"""Folding BatchNorm into the conv/linear layer that feeds it.

In eval mode a BatchNorm is the per-channel affine map ``y = (x - mu) * g / sqrt(var + eps) + beta``
(``g = gamma``, or 1 and ``beta = 0`` without affine parameters). When ``x = conv(z, w) + b`` and nothing else
reads ``x``, the two collapse into one layer with

    w'[c] = w[c] * g[c] / sqrt(var[c] + eps)              (c = output channel, axis 0 of the weight)
    b'[c] = (b[c] - mu[c]) * g[c] / sqrt(var[c] + eps) + beta[c]     (b = 0 for a layer without bias)

and the BatchNorm becomes ``nn.Identity``. This is what an integer deployment runs, so post-training quantization
quantizes ``w'``, not ``w``. The arithmetic runs in float64 and is cast back to the parameter dtype.
"""
from __future__ import annotations

import copy
import warnings
from typing import List, Optional, Tuple

import torch
import torch.fx
from torch import nn

from qgrad.quantization._common import bn_pairs_in, replace_module, trace

__all__ = ["fold_bn", "fold_bn_pair", "fold_bn_inplace"]


@torch.no_grad()
def fold_bn_pair(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold the running statistics and affine parameters of ``bn`` into ``layer`` (in place).

    ``layer`` is a conv or linear whose output channels (axis 0 of its weight) are ``bn``'s features. The
    layer gets new ``weight`` and ``bias`` Parameters (a layer without bias gets one), so a weight it shared
    with another layer (tied weights, each layer followed by its own BatchNorm) is folded for this layer only.
    ``bn`` itself is left unchanged; the caller removes it from the model.
    """
    w = layer.weight
    dt = torch.float64
    inv_std = torch.rsqrt(bn.running_var.to(dt) + bn.eps)
    gamma = bn.weight.to(dt) if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.to(dt) if bn.bias is not None else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    b = layer.bias.to(dt) if layer.bias is not None else torch.zeros_like(inv_std)
    new_w = w.to(dt) * factor.reshape((-1,) + (1,) * (w.dim() - 1))
    new_b = (b - bn.running_mean.to(dt)) * factor + beta
    layer.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=w.requires_grad)
    bias_dtype = w.dtype if layer.bias is None else layer.bias.dtype
    layer.bias = nn.Parameter(new_b.to(device=w.device, dtype=bias_dtype), requires_grad=w.requires_grad)


def fold_bn_inplace(model: nn.Module, graph: Optional[torch.fx.Graph]) -> List[Tuple[str, str]]:
    """Fold every foldable conv/linear -> BatchNorm pair of ``model`` in place; returns the folded pairs.

    ``graph`` is the fx graph of ``model`` (``None`` when it could not be traced: then nothing is folded).
    """
    if graph is None:
        return []
    pairs = bn_pairs_in(graph, model)
    for layer_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        fold_bn_pair(model.get_submodule(layer_name), bn)
        # fx names a module by its first qualified name; forward may call it through another attribute
        for name in [n for n, m in model.named_modules(remove_duplicate=False) if m is bn]:
            replace_module(model, name, nn.Identity())
    return pairs


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with each BatchNorm folded into the conv/linear feeding it.

    A pair is folded when the BatchNorm is the only consumer of the layer's output, each module is called once,
    and the BatchNorm tracks running statistics (see :func:`qgrad.quantization._common.bn_pairs_in`); other
    BatchNorms stay. Folding needs a ``torch.fx``-traceable model; for one that is not, the copy is returned
    unfolded with a warning. ``model`` itself is not modified.

    In eval mode the copy computes the same function as ``model`` up to rounding of the folded parameters.
    """
    folded = copy.deepcopy(model).eval()
    try:
        graph = trace(folded)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...) for data-dependent code
        warnings.warn(f"BatchNorm not folded: the model is not torch.fx-traceable ({err})", stacklevel=2)
        graph = None
    fold_bn_inplace(folded, graph)
    return folded
