"""Convolution modules with a direct double backward, and the in-place swap for a model's torch convolutions.

:class:`Conv1d`, :class:`Conv2d` and :class:`Conv3d` subclass their ``torch.nn`` namesakes and change only the
function the forward calls (:func:`qgrad.ops.conv.conv` instead of ``torch.nn.functional.conv{1,2,3}d``).
Everything else is torch's: constructor arguments, parameters, ``state_dict`` keys, ``repr``, hooks,
``padding_mode`` (non-zero modes pad with ``F.pad`` first, as torch does), unbatched inputs. Outputs and first
gradients are bit-identical to torch's module; only the second derivative (what the gradient-norm penalties of
:mod:`qgrad.penalties` differentiate) runs through the direct formulas of :mod:`qgrad.ops.conv`. String
padding (``"same"``, ``"valid"``) is passed to torch's own forward unchanged, and so is every input of a
module whose ``fused_double_backward`` attribute is False (:class:`qgrad.penalties.L1GradPenalty` sets it for
the forwards of the plain steps of ``every > 1``) and every input under a ``torch.func`` transform.

``torch.fx.symbolic_trace`` records a converted module as one ``call_module`` node, as it does torch's own.

Under autocast the forward casts its floating-point inputs (except float64) to the autocast dtype and
computes in it, the cast torch's autocast applies to a convolution.

:func:`convert_conv` turns the torch convolutions of an existing model into these classes in place, by
changing the class of each module object (modules, parameters, hooks and ``state_dict`` are untouched);
:func:`revert_conv` is the inverse. Only modules whose type is exactly ``nn.Conv1d/2d/3d`` are converted;
subclasses (qgrad's quantized layers, user classes) are left as they are.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from qgrad.nn._swap import functorch_active, swap_classes, traced_as_leaf
from qgrad.ops.conv import conv

__all__ = ["Conv1d", "Conv2d", "Conv3d", "convert_conv", "revert_conv"]


def _forward(self: nn.modules.conv._ConvNd, input: Tensor) -> Tensor:
    leaf = traced_as_leaf(self, input)
    return self._conv_forward(input, self.weight, self.bias) if leaf is None else leaf


def _conv_forward(
    self: nn.modules.conv._ConvNd, input: Tensor, weight: Tensor, bias: Optional[Tensor]
) -> Tensor:
    if (isinstance(self.padding, str) or not self.fused_double_backward or functorch_active()
            or input.dim() not in (weight.dim(), weight.dim() - 1)):  # torch reports a wrong rank
        return super(type(self), self)._conv_forward(input, weight, bias)
    if input.dim() < weight.dim():  # one unbatched sample (C, *spatial), as torch's convolutions take it
        return self._conv_forward(input.unsqueeze(0), weight, bias).squeeze(0)
    padding = self.padding
    if self.padding_mode != "zeros":
        input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = 0
    device = input.device.type
    if not torch.is_autocast_enabled(device):
        return conv(input, weight, bias, self.stride, padding, self.dilation, self.groups)
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t if t is None or t.dtype == torch.float64 else t.to(dtype)

    with torch.autocast(device, enabled=False):
        return conv(cast(input), cast(weight), cast(bias), self.stride, padding, self.dilation, self.groups)


class Conv1d(nn.Conv1d):
    """``torch.nn.Conv1d`` with qgrad's direct double backward; see :mod:`qgrad.nn.conv`."""

    forward = _forward
    _conv_forward = _conv_forward
    fused_double_backward = True


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with qgrad's direct double backward; see :mod:`qgrad.nn.conv`."""

    forward = _forward
    _conv_forward = _conv_forward
    fused_double_backward = True


class Conv3d(nn.Conv3d):
    """``torch.nn.Conv3d`` with qgrad's direct double backward; see :mod:`qgrad.nn.conv`."""

    forward = _forward
    _conv_forward = _conv_forward
    fused_double_backward = True


_TWINS = {nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
_ORIGINALS = {v: k for k, v in _TWINS.items()}


def convert_conv(model: nn.Module) -> nn.Module:
    """Make every ``nn.Conv1d/2d/3d`` of ``model`` (``model`` itself included) qgrad's twin, in place.

    The module objects stay (their class changes), so parameters, hooks, ``state_dict`` keys and values, and
    references held elsewhere (optimizers, penalties) are unchanged. Subclasses of the torch convolutions are
    left alone; converting twice is harmless.

    Returns:
        ``model`` (the same object).
    """
    return swap_classes(model, _TWINS)


def revert_conv(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_conv` in place: qgrad's convolution modules become torch's again.

    Returns:
        ``model`` (the same object).
    """
    return swap_classes(model, _ORIGINALS)
