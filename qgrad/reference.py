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

__all__ = [
    "compute_dtype",
    "default_grad_scale",
    "fake_quant_backward_ref",
    "fake_quant_ref",
    "grid_terms",
    "reduce_like",
    "view_param",
]


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


def view_param(p: torch.Tensor, x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """Reshape a 0-d or per-channel 1-d parameter so it broadcasts against ``x`` along ``axis``."""
    if p.dim() == 0 or axis is None:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = p.numel()
    return p.reshape(shape)


def reduce_like(t: torch.Tensor, p: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
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
    s = view_param(scale.to(cdt), x, axis)
    zp = view_param(torch.round(zero_point.to(cdt)), x, axis)
    q = torch.clamp(torch.round(x.to(cdt) / s) + zp, quant_min, quant_max)
    return ((q - zp) * s).to(x.dtype)


def grid_terms(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int],
    scale_error: bool = True,
) -> Tuple[torch.Tensor, ...]:
    """The element terms the gradients of fake quantization are made of, in the compute dtype:
    ``(s, zp, xs, v, inside, e_s)`` with ``s`` and ``zp`` (rounded) viewed against ``x``, ``xs = x / s``, the
    unrounded grid position ``v = xs + zp``, ``inside = quant_min <= v <= quant_max`` and the scale's LSQ
    error ``e_s`` (``round(xs) - xs`` inside, ``quant_min - zp`` below, ``quant_max - zp`` above; None
    without ``scale_error``)."""
    cdt = compute_dtype(x.dtype)
    s = view_param(scale.to(cdt), x, axis)
    zp = view_param(torch.round(zero_point.to(cdt)), x, axis)
    xs = x.to(cdt) / s
    v = xs + zp
    inside = (v >= quant_min) & (v <= quant_max)
    if not scale_error:
        return s, zp, xs, v, inside, None
    e_s = torch.where(inside, torch.round(xs) - xs, torch.where(v < quant_min, quant_min - zp, quant_max - zp))
    return s, zp, xs, v, inside, e_s


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
    s, zp, xs, _, inside, e_s = grid_terms(x, scale, zero_point, quant_min, quant_max, axis)
    g = dy.to(cdt)
    dx = torch.where(inside, g, torch.zeros_like(g)).to(x.dtype)
    dscale = (reduce_like(g * e_s, scale, axis) * grad_scale).to(scale.dtype)
    e_z = torch.where(inside, torch.zeros_like(xs), -s.expand_as(xs))
    dzp = (reduce_like(g * e_z, zero_point, axis) * grad_scale).to(zero_point.dtype)
    return dx, dscale, dzp


# =============================================================================================== BatchNorm
# Batch normalization over every dimension but dim 1 (the channel), and its first and second derivatives.
#
# Per channel c, with M = x.numel() / C elements x_i:
#
#     training (batch statistics):  mu = mean(x),  var = mean((x - mu)^2)  (biased),  r = 1 / sqrt(var + eps)
#     eval (running statistics):    mu = running_mean,  r = 1 / sqrt(running_var + eps)   (constants)
#     xhat = (x - mu) * r,   y = w * xhat + b        (w = 1, b = 0 without affine parameters)
#
# First derivatives, for an output gradient dy (sums over the M elements of the channel):
#
#     db = sum(dy),  dw = sum(dy * xhat)
#     training:  dx = w * r * (dy - db / M - xhat * dw / M)
#     eval:      dx = w * r * dy
#
# Second derivatives: the gradients of  S = sum(ggx * dx) + ggw . dw + ggb . db  with respect to (dy, x, w),
# for gradients ggx, ggw, ggb of some scalar with respect to (dx, dw, db). Write g = w * r, means over a
# channel as m(.), and
#
#     m_g = m(ggx),  m_gx = m(ggx * xhat),  m_dy = m(dy),  a = m(dy * xhat),  q = sum(ggx * dy)
#
# eval:
#     d_dy = g * ggx + ggw * xhat + ggb
#     d_x  = ggw * r * dy
#     d_w  = r * q
# training (the projection P(v) = v - m(v) - xhat * m(v * xhat) is symmetric, which gives d_dy; d_x adds
# the dependence of r on x, dr/dx = -r^2 * xhat / M, to the backward of the normalization applied to
# dS/dxhat = u):
#     d_dy = g * (ggx - m_g - xhat * m_gx) + ggw * xhat + ggb
#     Q    = q - M * m_dy * m_g - M * a * m_gx                 (= sum(ggx * P(dy)))
#     d_w  = r * Q
#     u    = -g * a * ggx + (ggw - g * m_gx) * dy
#     d_x  = r * (u - m(u) - xhat * m(u * xhat)) - g * r * Q * xhat / M
#     with m(u) = -g * a * m_g + (ggw - g * m_gx) * m_dy  and  m(u * xhat) = -g * a * m_gx + (ggw - g * m_gx) * a.
#
# The arithmetic runs in float32 for float16 / bfloat16 / float32 inputs (float64 for float64), as PyTorch's
# CPU batch norm does; results are cast back to the dtype of the tensor they are the gradient of.

__all__ += ["batch_norm_ref", "batch_norm_backward_ref", "batch_norm_double_backward_ref"]


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (C,) viewed as (1, C, 1, ...) to broadcast against ``x`` (N, C, ...)."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _channel_dims(x: torch.Tensor) -> Tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _batch_norm_stats_ref(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mu, r)`` per channel, shaped (1, C, 1, ...), in the compute dtype; differentiable in ``x`` (training)."""
    cdt = compute_dtype(x.dtype)
    xc = x.to(cdt)
    if training:
        dims = _channel_dims(x)
        mu = xc.mean(dim=dims, keepdim=True)
        var = (xc - mu).square().mean(dim=dims, keepdim=True)
    else:
        mu = _channel_view(running_mean.to(cdt), x)
        var = _channel_view(running_var.to(cdt), x)
    return mu, torch.rsqrt(var + eps)


def batch_norm_ref(
    x: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``y = w * (x - mu) * r + b`` (see the section header); x is (N, C, ...). Running statistics are read in
    eval mode and never updated here. Returns y in the dtype of ``x``."""
    mu, r = _batch_norm_stats_ref(x, running_mean, running_var, training, eps)
    y = (x.to(mu.dtype) - mu) * r
    if weight is not None:
        y = y * _channel_view(weight.to(mu.dtype), x)
    if bias is not None:
        y = y + _channel_view(bias.to(mu.dtype), x)
    return y.to(x.dtype)


def batch_norm_backward_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first derivatives ``(dx, dw, db)`` of :func:`batch_norm_ref` for the output gradient ``dy``.

    Written with differentiable ops, and in training mode with the statistics recomputed from ``x``, so that
    autograd through this function gives the exact second derivatives. ``dw`` and ``db`` (shape (C,)) are
    returned even without affine parameters (``weight=None`` means w = 1); they are in the dtype of ``weight``
    (of the compute dtype when it is None), ``dx`` in the dtype of ``x``.
    """
    mu, r = _batch_norm_stats_ref(x, running_mean, running_var, training, eps)
    cdt = mu.dtype
    dims = _channel_dims(x)
    g = dy.to(cdt)
    xhat = (x.to(cdt) - mu) * r
    w = r if weight is None else _channel_view(weight.to(cdt), x) * r
    db = g.sum(dim=dims, keepdim=True)
    dw = (g * xhat).sum(dim=dims, keepdim=True)
    if training:
        m = x.numel() // x.shape[1]
        dx = w * (g - db / m - xhat * (dw / m))
    else:
        dx = w * g
    pdt = cdt if weight is None else weight.dtype
    return dx.to(x.dtype), dw.reshape(-1).to(pdt), db.reshape(-1).to(pdt)


def batch_norm_double_backward_ref(
    ggx: torch.Tensor,
    ggw: Optional[torch.Tensor],
    ggb: Optional[torch.Tensor],
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    training: bool,
    eps: float = 1e-5,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second derivatives ``(d_dy, d_x, d_w)`` of BatchNorm by the closed forms of the section header.

    ``ggx`` (shape of x), ``ggw`` and ``ggb`` ((C,) or None for zero) are the gradients with respect to the
    outputs ``(dx, dw, db)`` of :func:`batch_norm_backward_ref`; the results are the gradients of
    ``sum(ggx * dx) + ggw . dw + ggb . db`` with respect to ``dy``, ``x`` and ``weight`` (``d_w`` is (C,) and
    is returned even when ``weight`` is None, as the derivative with respect to a weight of ones).
    """
    mu, r = _batch_norm_stats_ref(x, running_mean, running_var, training, eps)
    cdt = mu.dtype
    dims = _channel_dims(x)
    gx, g_dy = ggx.to(cdt), dy.to(cdt)
    xhat = (x.to(cdt) - mu) * r
    w = torch.ones_like(r) if weight is None else _channel_view(weight.to(cdt), x)
    gw = torch.zeros_like(r) if ggw is None else _channel_view(ggw.to(cdt), x)
    gb = torch.zeros_like(r) if ggb is None else _channel_view(ggb.to(cdt), x)
    g = w * r
    q = (gx * g_dy).sum(dim=dims, keepdim=True)
    if training:
        m = x.numel() // x.shape[1]
        m_g = gx.mean(dim=dims, keepdim=True)
        m_gx = (gx * xhat).mean(dim=dims, keepdim=True)
        m_dy = g_dy.mean(dim=dims, keepdim=True)
        a = (g_dy * xhat).mean(dim=dims, keepdim=True)
        d_dy = g * (gx - m_g - xhat * m_gx) + gw * xhat + gb
        big_q = q - m * m_dy * m_g - m * a * m_gx
        d_w = r * big_q
        u = -g * a * gx + (gw - g * m_gx) * g_dy
        m_u = u.mean(dim=dims, keepdim=True)
        m_ux = (u * xhat).mean(dim=dims, keepdim=True)
        d_x = r * (u - m_u - xhat * m_ux) - g * r * big_q * xhat / m
    else:
        d_dy = g * gx + gw * xhat + gb
        d_x = gw * r * g_dy
        d_w = r * q
    pdt = cdt if weight is None else weight.dtype
    return d_dy.to(dy.dtype), d_x.to(x.dtype), d_w.reshape(-1).to(pdt)
