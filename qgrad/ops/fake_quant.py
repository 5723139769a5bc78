"""``fake_quant``: the public fake-quantization op, its argument checks and its autograd wiring.

The anatomy follows one op top to bottom: argument validation -> ``FakeQuantFn`` (autograd.Function) ->
``fake_quant`` (public function). The math lives in :mod:`qgrad.reference`, which is the ground truth that
fused kernels must reproduce.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch

from qgrad.reference import fake_quant_backward_ref, fake_quant_ref

__all__ = ["fake_quant", "FakeQuantFn", "check_fake_quant_args"]

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


class FakeQuantFn(torch.autograd.Function):
    """Autograd node of :func:`fake_quant` (arguments already validated).

    The backward is written with differentiable ops on the saved inputs, so it can itself be differentiated
    (``create_graph=True``): the second derivatives are those of the STE/LSQ formulas in :mod:`qgrad.reference`.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, grad_scale):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.quant = (quant_min, quant_max, axis, grad_scale)
        return fake_quant_ref(x, scale, zero_point, quant_min, quant_max, axis)

    @staticmethod
    def backward(ctx, dy):
        x, scale, zero_point = ctx.saved_tensors
        quant_min, quant_max, axis, grad_scale = ctx.quant
        dx, dscale, dzp = fake_quant_backward_ref(dy, x, scale, zero_point, quant_min, quant_max, axis, grad_scale)
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dscale if need_s else None,
            dzp if need_z else None,
            None,
            None,
            None,
            None,
        )


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
        grad_scale: multiplier of the LSQ scale / zero-point gradients; default ``1 / sqrt(N * quant_max)``, N the
            number of elements that share one scale value.

    Gradients: straight-through for ``x`` (``dy`` where ``quant_min <= x/scale + zero_point <= quant_max``, else
    0), LSQ for ``scale`` and ``zero_point`` when they require grad (see :mod:`qgrad.reference`). The op is twice
    differentiable, so ``torch.autograd.grad(..., create_graph=True)`` through it works.

    Returns:
        Tensor of the shape and dtype of ``x`` (contiguous).
    """
    scale, zero_point, axis = check_fake_quant_args(x, scale, zero_point, quant_min, quant_max, axis)
    if grad_scale is not None:
        grad_scale = float(grad_scale)
    return FakeQuantFn.apply(x, scale, zero_point, int(quant_min), int(quant_max), axis, grad_scale)
