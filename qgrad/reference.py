"""Pure-PyTorch reference implementations: the ground truth every fused kernel is tested against.

Conventions shared by every fake-quantization path in qgrad
-----------------------------------------------------------
* ``q = clamp(round(x / scale) + zero_point, quant_min, quant_max)`` and
  ``y = (q - zero_point) * scale``. ``round`` is round-half-to-even (``torch.round``) and ``x / scale`` is a
  true division (not a multiplication by ``1 / scale``; the two differ in the last bit for some inputs).
* The arithmetic runs in float32 for float16, bfloat16 and float32 inputs (float64 for float64 inputs, which
  exists for ``gradcheck``); ``y`` is cast back to the dtype of ``x``.
* ``scale`` and ``zero_point`` are already-validated tensors: 0-d (per-tensor) or 1-d of length
  ``x.shape[axis]`` (per-channel); ``zero_point`` may also be 0-d with a 1-d ``scale``. ``zero_point`` holds
  integers; a fractional value is rounded (half-to-even) before use.
* The range test of the gradients uses the *unrounded* value ``v = x / scale + zero_point``: an element is
  inside when ``quant_min <= v <= quant_max`` (both ends included), below when ``v < quant_min`` and above when
  ``v > quant_max``.

Gradients (straight-through estimator for ``x``, LSQ of Esser et al. 2020 for ``scale`` and ``zero_point``)::

    dx        = dy                               inside, else 0
    dscale    = grad_scale * sum(dy * e_s)       e_s = round(x/s) - x/s  inside
                                                     = quant_min - zp    below
                                                     = quant_max - zp    above
    dzp       = grad_scale * sum(dy * e_z)       e_z = 0 inside, -s outside

with the sums taken over the elements that share one scale (zero_point) value. The functions below are written
with differentiable PyTorch ops, so autograd through :func:`fake_quant_backward_ref` gives the exact second
derivatives of these piecewise-smooth formulas (``round`` and the range test have zero derivative almost
everywhere).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["compute_dtype", "default_grad_scale", "fake_quant_ref", "fake_quant_backward_ref"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fake-quantization arithmetic runs in for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_grad_scale(numel: int, num_groups: int, quant_max: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * quant_max)``, N = elements sharing one scale value.

    ``N = numel / num_groups`` (``num_groups`` = 1 per-tensor, the channel count per-channel). A
    ``quant_max <= 0`` (a grid that lies entirely below zero) uses ``1 / sqrt(N)``; an empty tensor uses 1
    (its gradient sums are zero anyway).
    """
    per_group = numel // max(num_groups, 1)
    if per_group == 0:
        return 1.0
    return 1.0 / math.sqrt(per_group * max(quant_max, 1))


def _view_param(p: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """Reshape a 0-d or per-channel 1-d parameter so it broadcasts against ``x`` along ``axis``."""
    if p.dim() == 0 or axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = p.numel()
    return p.reshape(shape)


def _reduce_like(t: torch.Tensor, p: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """Sum ``t`` (shaped like x) down to the shape of parameter ``p``."""
    if p.dim() == 0 or axis is None:
        return t.sum().reshape(p.shape)
    dims = [d for d in range(t.dim()) if d != axis]
    return t.sum(dim=dims) if dims else t


def fake_quant_ref(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
) -> torch.Tensor:
    """Forward fake-quantization ``y = (clamp(round(x/s) + zp, qmin, qmax) - zp) * s``, same shape and dtype as x."""
    cdt = compute_dtype(x.dtype)
    s = _view_param(scale.to(cdt), x, axis)
    zp = _view_param(torch.round(zero_point.to(cdt)), x, axis)
    q = torch.clamp(torch.round(x.to(cdt) / s) + zp, quant_min, quant_max)
    return ((q - zp) * s).to(x.dtype)


def fake_quant_backward_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    grad_scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`fake_quant_ref` under the STE/LSQ convention of this module.

    Args:
        dy: gradient w.r.t. the output, shape of ``x``.
        grad_scale: multiplier of the scale and zero-point gradients; ``None`` means
            :func:`default_grad_scale`.

    Returns:
        ``(dx, dscale, dzero_point)`` with the shapes and dtypes of ``x``, ``scale`` and ``zero_point``.
    """
    cdt = compute_dtype(x.dtype)
    num_groups = scale.numel() if (axis is not None and scale.dim() == 1) else 1
    if grad_scale is None:
        grad_scale = default_grad_scale(x.numel(), num_groups, quant_max)
    s = _view_param(scale.to(cdt), x, axis)
    zp = _view_param(torch.round(zero_point.to(cdt)), x, axis)
    g = dy.to(cdt)
    xs = x.to(cdt) / s
    v = xs + zp
    inside = (v >= quant_min) & (v <= quant_max)
    below = v < quant_min

    dx = torch.where(inside, g, torch.zeros_like(g)).to(x.dtype)
    e_s = torch.where(inside, torch.round(xs) - xs, torch.where(below, quant_min - zp, quant_max - zp))
    dscale = (_reduce_like(g * e_s, scale, axis) * grad_scale).to(scale.dtype)
    e_z = torch.where(inside, torch.zeros_like(xs), -s.expand_as(xs))
    dzp = (_reduce_like(g * e_z, zero_point, axis) * grad_scale).to(zero_point.dtype)
    return dx, dscale, dzp
