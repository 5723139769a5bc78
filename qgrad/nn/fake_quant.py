"""``FakeQuant``: an ``nn.Module`` that holds a quantization grid (bits, sign, scale, zero point) and applies
:func:`qgrad.fake_quant` with it."""
from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from qgrad.ops.fake_quant import check_grad_scale, fake_quant

__all__ = ["FakeQuant", "quant_range"]

MIN_BITS, MAX_BITS = 2, 16


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return int(bits)


def quant_range(bits: int, signed: bool) -> tuple:
    """The integer grid ``(quant_min, quant_max)`` qgrad uses for ``bits``.

    Signed grids are *restricted* symmetric, ``[-(2^(b-1) - 1), 2^(b-1) - 1]``: dropping the single most
    negative code makes the grid symmetric around zero, so ``x`` and ``-x`` quantize to opposite values and a
    symmetric scale ``max|x| / quant_max`` covers both signs equally. Unsigned grids are ``[0, 2^b - 1]``.
    """
    bits = _check_bits(bits)
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class FakeQuant(nn.Module):
    """Fake-quantization with a stored grid, per-tensor or per-channel.

    Args:
        bits: bit-width in [2, 16].
        symmetric: ``True`` fixes ``zero_point = 0`` and uses ``scale = max|x| / quant_max``; ``False`` uses an
            affine unsigned grid ``[0, 2^b - 1]`` with ``scale = (max - min) / (2^b - 1)`` and an integer zero point.
        axis: channel dimension for per-channel grids (e.g. 0 for conv/linear weights), ``None`` for per-tensor.
        learnable: make ``scale`` an ``nn.Parameter`` trained by the LSQ gradient (Esser et al. 2020). Each
            forward first clamps it to at least the smallest normal float32, as an optimizer step may have
            taken it to 0 or below.
        signed: for symmetric grids, whether the grid has negative codes (:func:`quant_range`). ``None`` decides from
            the range it is initialized with: unsigned when that range is non-negative (e.g. after a ReLU).
        grad_scale: LSQ gradient multiplier passed to :func:`qgrad.fake_quant`, finite and > 0 (default
            ``1/sqrt(N*quant_max)``).

    The range is taken from the first tensor seen in ``forward`` (its min/max, per channel when ``axis`` is set)
    unless :meth:`set_range` or :meth:`set_scale` was called first. ``scale`` and ``zero_point`` keep their identity
    when they are (re)initialized, so an optimizer created before the first forward still trains the scale.

    Shape: input of any shape (``x.shape[axis]`` channels when per-channel), output of the same shape and dtype.

    ``scale`` and ``zero_point`` are float32 and stay so when the module is cast to float16 or bfloat16
    (``model.half()``): the kernels compute in float32 for those inputs, and a rounded grid would move the
    codes.
    """

    def __init__(
        self,
        bits: int = 8,
        symmetric: bool = True,
        axis: Optional[int] = None,
        learnable: bool = False,
        signed: Optional[bool] = None,
        grad_scale: Optional[float] = None,
    ):
        super().__init__()
        self.bits = _check_bits(bits)
        self.symmetric = bool(symmetric)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
            raise TypeError(f"axis must be an int or None, got {axis!r}")
        self.axis = axis
        self.learnable = bool(learnable)
        self.signed = signed if symmetric else False
        self.grad_scale = check_grad_scale(grad_scale)
        scale = torch.ones(())
        if self.learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(()))
        self.initialized = False

    # ------------------------------------------------------------------ grid
    @property
    def quant_min(self) -> int:
        return quant_range(self.bits, bool(self.signed))[0] if self.symmetric else 0

    @property
    def quant_max(self) -> int:
        return quant_range(self.bits, bool(self.signed))[1] if self.symmetric else 2**self.bits - 1

    def set_scale(self, scale: Union[torch.Tensor, float], zero_point: Union[torch.Tensor, float, None] = None) -> None:
        """Set the grid directly. ``signed`` must be known (given at construction or by an earlier range)."""
        if self.symmetric and self.signed is None:
            raise ValueError("set_scale on a symmetric FakeQuant needs signed=True/False; use set_range instead")
        scale = torch.as_tensor(scale, dtype=torch.float32, device=self.scale.device)
        zp = torch.zeros_like(scale) if zero_point is None else torch.as_tensor(
            zero_point, dtype=torch.float32, device=self.scale.device
        )
        if self.symmetric and bool((zp != 0).any()):
            raise ValueError("a symmetric FakeQuant has zero_point 0")
        with torch.no_grad():
            self.scale.data = scale.clone()
            self.zero_point.data = zp.clone().expand_as(scale).clone()
        self.initialized = True

    @torch.no_grad()
    def set_range(self, lo: Union[torch.Tensor, float], hi: Union[torch.Tensor, float]) -> None:
        """Fit the grid to the value range ``[lo, hi]`` (0-d, or 1-d per channel).

        Symmetric: ``scale = max(|lo|, |hi|) / quant_max``. Affine: ``scale = (hi - lo) / (quant_max - quant_min)``
        with ``lo`` widened to <= 0 and ``hi`` to >= 0 so that zero is exactly representable. A zero-width range
        gets the smallest normal float32 scale, so an all-zero tensor quantizes to zeros instead of failing.
        """
        lo = torch.as_tensor(lo, dtype=torch.float32, device=self.scale.device)
        hi = torch.as_tensor(hi, dtype=torch.float32, device=self.scale.device)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError("set_range needs a finite range")
        if bool((lo > hi).any()):
            raise ValueError("set_range needs lo <= hi")
        tiny = torch.finfo(torch.float32).tiny
        if self.symmetric:
            if self.signed is None:
                self.signed = bool((lo < 0).any())
            amax = torch.maximum(lo.abs(), hi.abs()) if self.signed else hi.clamp_min(0)
            scale = (amax / self.quant_max).clamp_min(tiny)
            zp = torch.zeros_like(scale)
        else:
            lo, hi = lo.clamp_max(0), hi.clamp_min(0)
            scale = ((hi - lo) / (self.quant_max - self.quant_min)).clamp_min(tiny)
            zp = torch.round(self.quant_min - lo / scale).clamp(self.quant_min, self.quant_max)
        self.scale.data = scale
        self.zero_point.data = zp
        self.initialized = True

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        xd = x.detach().float()
        if self.axis is None:
            lo, hi = xd.amin(), xd.amax()
        else:
            axis = self.axis % x.dim()
            flat = xd.movedim(axis, 0).reshape(x.shape[axis], -1)
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        self.set_range(lo, hi)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            if x.numel() == 0:
                raise ValueError("FakeQuant cannot initialize its range from an empty tensor; call set_range first")
            self._init_from(x)
        if self.learnable:
            # an optimizer step can take the scale to <= 0; clamp it back in place (through .data, which
            # leaves autograd's version counter alone) to the float32 minimum: everything then clips, and
            # the LSQ gradient of the clipped values moves the scale up again
            self.scale.data.clamp_(min=torch.finfo(torch.float32).tiny)
        return fake_quant(x, self.scale, self.zero_point, self.quant_min, self.quant_max, self.axis, self.grad_scale)

    def extra_repr(self) -> str:
        sign = {None: "auto", True: "signed", False: "unsigned"}[self.signed]
        return (
            f"bits={self.bits}, symmetric={self.symmetric}, {sign}, axis={self.axis}, learnable={self.learnable}, "
            f"quant_range=({self.quant_min}, {self.quant_max})"
        )

    # ------------------------------------------------------------------ state
    def _apply(self, fn, recurse=True):
        # .half(), .bfloat16() and .to(float16) would round the grid (a scale of 0.0123456 moves the code
        # boundaries; the float32 minimum scale of an all-zero range becomes 0) while the kernels compute in
        # float32 for those inputs anyway: scale and zero_point stay float32 (or float64 after .double())
        kept = {name: getattr(self, name).data for name in ("scale", "zero_point")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if old.dtype == torch.float32 and new.dtype in (torch.float16, torch.bfloat16):
                new.data = old.to(new.device)
        return self

    #: settings fixed at construction that a loaded grid must share: ``scale`` and ``zero_point`` mean
    #: something else on another bit-width, sign convention or channel axis
    _GRID_SETTINGS = ("bits", "symmetric", "axis")

    def get_extra_state(self) -> Dict[str, Any]:
        state = {"initialized": self.initialized, "signed": self.signed}
        state.update({name: getattr(self, name) for name in self._GRID_SETTINGS})
        return state

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.initialized = bool(state["initialized"])
        self.signed = state["signed"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a state saved by a FakeQuant of another grid loads without a shape error (per-tensor grids are all
        # 0-d) and would quantize wrongly: refuse it, as torch refuses a parameter of another shape (states
        # written before the settings were stored carry none and load as they are)
        stored = state_dict.get(prefix + "_extra_state")
        if isinstance(stored, dict):
            differ = [n for n in self._GRID_SETTINGS if n in stored and stored[n] != getattr(self, n)]
            if differ:
                theirs = ", ".join(f"{n}={stored[n]!r}" for n in differ)
                ours = ", ".join(f"{n}={getattr(self, n)!r}" for n in differ)
                error_msgs.append(
                    f"the quantizer state {prefix.rstrip('.') or '(root)'!r} was saved with {theirs}; this "
                    f"FakeQuant has {ours}. "
                    "Build the model with the settings of the checkpoint (e.g. the same bit-widths and "
                    "per_channel_weights in quantize_model) before loading it"
                )
                return
        # per-channel grids only learn their length from data: adopt the stored shape before copying
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                getattr(self, name).data = torch.empty_like(state_dict[key], device=getattr(self, name).device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
