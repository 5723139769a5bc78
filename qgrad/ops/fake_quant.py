"""``fake_quant``: the public fake-quantization op, its argument checks and its autograd wiring.

The anatomy follows one op top to bottom: argument validation -> ``FakeQuantFn`` (autograd.Function) ->
``fake_quant`` (public function). The math lives in :mod:`qgrad.reference`, which is the ground truth that
fused kernels must reproduce.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from qgrad.ops.dispatch import select_backend
from qgrad.reference import (
    compute_dtype,
    default_grad_scale,
    fake_quant_backward_ref,
    fake_quant_ref,
    grid_terms,
    reduce_like,
    view_param,
)

__all__ = ["fake_quant", "FakeQuantFn", "FakeQuantBackwardFn", "check_fake_quant_args"]

# Integers up to 2**24 are exact in float32, so q = round(x/s) + zp is exact for every grid inside it.
_QUANT_LIMIT = 2**24
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

TensorOrNumber = Union[torch.Tensor, float, int]


def _as_param_tensor(p: TensorOrNumber, name: str, x: torch.Tensor) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}; put both on one device")
        return p
    if isinstance(p, numbers.Real):
        return torch.tensor(float(p), dtype=torch.float32, device=x.device)
    raise TypeError(f"{name} must be a tensor or a real number, got {type(p).__name__}")


def _check_values(ok: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless every entry of ``ok`` is true.

    On CUDA this is an asynchronous device assertion, so the op never synchronizes with the host; the error
    then surfaces at the next synchronization as a device-side assert carrying the same condition.
    """
    if ok.device.type == "cuda":
        torch._assert_async(ok.all(), message)
    elif not bool(ok.all()):
        raise ValueError(message)


def check_fake_quant_args(
    x: torch.Tensor,
    scale: TensorOrNumber,
    zero_point: TensorOrNumber,
    quant_min: int,
    quant_max: int,
    axis: Optional[int],
) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
    """Validate the arguments of :func:`fake_quant`; return ``(scale, zero_point, axis)`` normalized.

    ``axis`` comes back non-negative, or ``None`` for per-tensor quantization. Raises ``TypeError`` or
    ``ValueError`` with a message naming the bad argument; nothing is modified.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    for name, v in (("quant_min", quant_min), ("quant_max", quant_max)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {v!r}")
        if abs(int(v)) > _QUANT_LIMIT:
            raise ValueError(f"{name} must lie in [-2**24, 2**24], got {v}")
    if quant_min >= quant_max:
        raise ValueError(f"quant_min must be < quant_max, got quant_min={quant_min}, quant_max={quant_max}")

    scale = _as_param_tensor(scale, "scale", x)
    zero_point = _as_param_tensor(zero_point, "zero_point", x)
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        if not p.is_floating_point():
            # integer zero points are common; scales must be floating
            if name == "scale":
                raise TypeError(f"scale must be a floating-point tensor, got {p.dtype}")
        if p.dim() > 1:
            raise ValueError(f"{name} must be 0-d (per-tensor) or 1-d (per-channel), got shape {tuple(p.shape)}")

    if axis is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(
                "per-tensor quantization (axis=None) needs one scale and one zero_point, got "
                f"{scale.numel()} and {zero_point.numel()} values; pass axis= for per-channel quantization"
            )
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    else:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} is out of range for x with {x.dim()} dimensions")
        axis = int(axis) % x.dim()
        channels = x.shape[axis]
        if scale.dim() != 1 or scale.numel() != channels:
            raise ValueError(
                f"per-channel scale along axis {axis} must be 1-d of length {channels}, got shape {tuple(scale.shape)}"
            )
        if zero_point.numel() == 1 and zero_point.dim() <= 1:
            zero_point = zero_point.reshape(())
        elif zero_point.dim() != 1 or zero_point.numel() != channels:
            raise ValueError(
                f"per-channel zero_point along axis {axis} must be 0-d or 1-d of length {channels}, "
                f"got shape {tuple(zero_point.shape)}"
            )

    with torch.no_grad():
        s = scale.detach()
        _check_values(torch.isfinite(s) & (s > 0), "scale must be finite and > 0")
        zp = torch.round(zero_point.detach().double())
        _check_values(
            (zp >= quant_min) & (zp <= quant_max),
            f"zero_point must lie in [quant_min, quant_max] = [{quant_min}, {quant_max}]",
        )
    return scale, zero_point, axis


def check_grad_scale(grad_scale: Optional[float]) -> Optional[float]:
    """``grad_scale`` as a float, or None; raises ``TypeError`` / ``ValueError`` unless it is a finite real > 0
    (a negative one would push the scale the wrong way, and 0 or a non-finite one silently stop it or make
    its gradient NaN; a scale that should not train is simply not a tensor that requires grad)."""
    if grad_scale is None:
        return None
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real):
        raise TypeError(f"grad_scale must be a float or None, got {grad_scale!r}")
    grad_scale = float(grad_scale)
    if not (math.isfinite(grad_scale) and grad_scale > 0):
        raise ValueError(f"grad_scale must be finite and > 0, got {grad_scale}")
    return grad_scale


class FakeQuantFn(torch.autograd.Function):
    """Autograd node of :func:`fake_quant` (arguments already validated).

    The forward runs the selected backend (:mod:`qgrad.ops.dispatch`) and saves only ``x`` and the (tiny)
    ``scale`` / ``zero_point``: the range mask is recomputed in the backward. The backward is
    :class:`FakeQuantBackwardFn`, itself differentiable, so gradients of gradients (``create_graph=True``) work.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, grad_scale):
        backend = select_backend(x)
        ctx.save_for_backward(x, scale, zero_point)
        if grad_scale is None:
            groups = scale.numel() if axis is not None else 1
            grad_scale = default_grad_scale(x.numel(), groups, quant_max)
        ctx.quant = (quant_min, quant_max, axis, grad_scale, backend)
        if backend.name == "torch":
            return fake_quant_ref(x, scale, zero_point, quant_min, quant_max, axis)
        return backend.fwd(x, _as_f32(scale), _as_f32(zero_point), quant_min, quant_max, axis)

    @staticmethod
    def backward(ctx, dy):
        x, scale, zero_point = ctx.saved_tensors
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        dx, dscale, dzp = FakeQuantBackwardFn.apply(dy, x, scale, zero_point, need_s, need_z, *ctx.quant)
        return (dx if need_x else None), dscale, dzp, None, None, None, None


class FakeQuantBackwardFn(torch.autograd.Function):
    """``(dy, x, scale, zero_point) -> (dx, dscale, dzero_point)``: the STE/LSQ gradients, differentiable again.

    Forward: one fused pass of the backend. Backward: the exact derivatives of the gradient formulas of
    :mod:`qgrad.reference` (``m`` = inside the range, ``o = 1 - m``, ``G`` = grad_scale, ``xs = x / s``)::

        d dx / d dy         = m
        d dscale / d dy     = G * e_s            e_s = round(xs) - xs inside, quant_min/max - zp outside
        d dscale / d x      = -G * dy * m / s
        d dscale / d s      = G * sum(dy * m * xs / s)
        d dzp / d dy        = -G * s * o
        d dzp / d s         = -G * sum(dy * o)

    and zero for every other pair (``round`` and the range test are piecewise constant, and the zero point is
    rounded before use).
    """

    @staticmethod
    def forward(ctx, dy, x, scale, zero_point, need_s, need_z, quant_min, quant_max, axis, grad_scale, backend):
        ctx.save_for_backward(dy, x, scale, zero_point)
        ctx.quant = (quant_min, quant_max, axis, grad_scale)
        if backend.name == "torch":
            dx, ds, dz = fake_quant_backward_ref(dy, x, scale, zero_point, quant_min, quant_max, axis, grad_scale)
            ds, dz = (ds if need_s else None), (dz if need_z else None)
        else:
            dx, ds, dz = backend.bwd(
                dy, x, _as_f32(scale), _as_f32(zero_point), quant_min, quant_max, axis, grad_scale, need_s, need_z
            )
            ds = ds.to(scale.dtype) if ds is not None else None
            dz = dz.to(zero_point.dtype) if dz is not None else None
        return dx, ds, dz

    @staticmethod
    def backward(ctx, gdx, gds, gdz):
        dy, x, scale, zero_point = ctx.saved_tensors
        quant_min, quant_max, axis, G = ctx.quant
        cdt = compute_dtype(x.dtype)
        s, _, xs, _, inside, e_s = grid_terms(
            x, scale, zero_point, quant_min, quant_max, axis, scale_error=gds is not None
        )
        g = dy.to(cdt)
        outside = (~inside).to(cdt)
        m = inside.to(cdt)

        grad_dy = torch.zeros_like(g)
        grad_x = torch.zeros_like(g) if ctx.needs_input_grad[1] else None
        grad_s = torch.zeros_like(g) if ctx.needs_input_grad[2] else None  # element terms, reduced below
        if gdx is not None:
            grad_dy = grad_dy + gdx.to(cdt) * m
        if gds is not None:
            gs = view_param(gds.to(cdt), x, axis) * G
            grad_dy = grad_dy + gs * e_s
            if grad_x is not None:
                grad_x = grad_x - gs * g * m / s
            if grad_s is not None:
                grad_s = grad_s + gs * g * m * xs / s
        if gdz is not None:
            gz = view_param(gdz.to(cdt), x, axis) * G
            grad_dy = grad_dy - gz * s * outside
            if grad_s is not None:
                grad_s = grad_s - gz * g * outside
        return (
            grad_dy.to(dy.dtype) if ctx.needs_input_grad[0] else None,
            grad_x.to(x.dtype) if grad_x is not None else None,
            reduce_like(grad_s, scale, axis).to(scale.dtype) if grad_s is not None else None,
            None, None, None, None, None, None, None, None,
        )


def _as_f32(p: torch.Tensor) -> torch.Tensor:
    return p.detach().to(torch.float32).contiguous()


def fake_quant(
    x: torch.Tensor,
    scale: TensorOrNumber,
    zero_point: TensorOrNumber,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    grad_scale: Optional[float] = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` onto a uniform integer grid and back to floating point.

    ``q = clamp(round(x / scale) + zero_point, quant_min, quant_max)``, ``y = (q - zero_point) * scale``, with
    round-half-to-even and a true division; arithmetic in float32 (float64 for float64 inputs), ``y`` in the
    dtype of ``x``.

    Args:
        x: float16, bfloat16, float32 or float64 tensor of any shape and strides.
        scale: step size; a 0-d tensor or number (per-tensor), or a 1-d tensor of length ``x.shape[axis]``
            (per-channel). Must be finite and positive.
        zero_point: integer offset, 0-d or shaped like ``scale``; fractional values are rounded first. Must lie in
            ``[quant_min, quant_max]``.
        quant_min, quant_max: the integer grid, ``quant_min < quant_max`` (e.g. -127, 127 for signed 8-bit
            restricted-symmetric, 0, 255 for unsigned 8-bit).
        axis: channel dimension for per-channel quantization (negative values count from the end), or ``None``.
        grad_scale: multiplier of the LSQ scale / zero-point gradients, finite and > 0; default
            ``1 / sqrt(N * quant_max)``, N the number of elements that share one scale value.

    Gradients: straight-through for ``x`` (``dy`` where ``quant_min <= x/scale + zero_point <= quant_max``, else
    0), LSQ for ``scale`` and ``zero_point`` when they require grad (see :mod:`qgrad.reference`). The op is twice
    differentiable, so ``torch.autograd.grad(..., create_graph=True)`` through it works.

    Returns:
        Tensor of the shape and dtype of ``x``, with ``x``'s strides when ``x`` is dense (contiguous,
        channels-last, transposed); the gradient w.r.t. ``x`` likewise.
    """
    scale, zero_point, axis = check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis)
    grad_scale = check_grad_scale(grad_scale)
    return FakeQuantFn.apply(x, scale, zero_point, int(quant_min), int(quant_max), axis, grad_scale)
