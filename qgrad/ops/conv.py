"""``conv``: an N-d convolution whose backward is itself an autograd node with a direct double backward.

Why: the gradient-norm penalties differentiate the backward pass. PyTorch's convolution double backward
(``aten::_convolution_double_backward``) obtains the second-order weight gradient by running a convolution
with the roles of batch and channels swapped (the input used as a kernel as large as the feature map), which
on a CPU (oneDNN) costs several times a regular weight gradient. Here the backward is
:class:`ConvBackwardFn`, whose own backward uses the regular kernels only. With ``gx = dgrad(gy, w)``,
``gw = wgrad(x, gy)``, ``gb = sum(gy)`` (both bilinear) and incoming gradients ``ggx``, ``ggw``, ``ggb``:

    d/d gy = conv(ggx, w) + conv(x, ggw) + ggb      (two forward convolutions and a broadcast)
    d/d x  = dgrad(gy, ggw)                          (an input gradient with ggw as the weight)
    d/d w  = wgrad(ggx, gy)                          (a weight gradient with ggx as the input)

(the last two in one ``convolution_backward`` call with input ``ggx`` and weight ``ggw``)

all through ``aten.convolution`` and ``aten.convolution_backward`` (the kernels of the first-order pass),
each term computed only when its incoming gradient exists and its output is needed. Measured on one CPU
thread (CIFAR ResNet-18 / VGG-like at width 0.25, batch 32, exact gradient-l1 penalty on weights and
activations): the penalized step went from 3.8x to 3.2x (ResNet-18) and from 3.2x to 2.9x (VGG-like) a
plain step.

The chain: :class:`ConvFn` (forward node; forward and first backward are exactly PyTorch's kernels, so
outputs and first gradients are bit-identical to ``torch.nn.functional.conv{1,2,3}d``) ->
:class:`ConvBackwardFn` (backward node, once differentiable: its backward is not itself differentiated) ->
:func:`conv` (public function). The reference is PyTorch's own convolution with autograd's double backward.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch.autograd.function import once_differentiable

from qgrad.ops.l1_norm import accept_seeds, add_seeds

__all__ = ["conv", "ConvFn", "ConvBackwardFn"]

_aten = torch.ops.aten
IntOrSeq = Union[int, Sequence[int]]


def _conv(x, w, b, stride, padding, dilation, groups):
    n = x.dim() - 2
    return _aten.convolution(x, w, b, stride, padding, dilation, False, [0] * n, groups)


def _conv_backward(gy, x, w, bias_size, stride, padding, dilation, groups, mask):
    n = x.dim() - 2
    return _aten.convolution_backward(
        gy, x, w, bias_size, stride, padding, dilation, False, [0] * n, groups, mask
    )


def _recomputable(t: torch.Tensor):
    """``(node, index)`` when ``t`` is output ``index`` of a custom autograd node that can recompute it
    (its Function defines ``recompute_output(ctx, index)``, e.g. qgrad's BatchNorm backward), else None."""
    node = t.grad_fn
    function = getattr(type(node), "_forward_cls", None)
    if function is None or not hasattr(function, "recompute_output"):
        return None
    return node, t.output_nr


class ConvBackwardFn(torch.autograd.Function):
    """``(gy, x, w) -> (gx, gw, gb)`` (None where not requested by ``mask``); backward as in the module
    docstring. It accepts the deferred l1 seeds of :mod:`qgrad.ops.l1_norm` for its outputs."""

    @staticmethod
    def forward(ctx, gy, x, w, mask, stride, padding, dilation, groups):
        bias_size = [w.shape[0]] if mask[2] else None
        gx, gw, gb = _conv_backward(gy, x, w, bias_size, stride, padding, dilation, groups, list(mask))
        # gy is usually the input gradient of a BatchNorm that follows the convolution: its node can
        # recompute it exactly (one elementwise pass) when this node's backward needs it, which saves keeping
        # a second copy of an activation-sized gradient through the double backward
        ctx.gy_source = _recomputable(gy)
        ctx.gy_shape = gy.shape
        ctx.save_for_backward(gy if ctx.gy_source is None else None, x, w)
        ctx.args = (stride, padding, dilation, groups)
        # outputs nobody differentiates arrive as None rather than as materialized zeros
        ctx.set_materialize_grads(False)
        accept_seeds(ctx)
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        ggx, ggw, ggb = add_seeds(ctx, (ggx, ggw, ggb))
        gy, x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        want_x = ggw is not None and ctx.needs_input_grad[1]
        want_w = ggx is not None and ctx.needs_input_grad[2]
        d_gy = d_x = d_w = None
        # the products with gy first, so that gy (recomputed, or saved) is released before the two
        # activation-sized forward convolutions below are allocated
        if want_x or want_w:
            if gy is None:
                node, index = ctx.gy_source
                gy = type(node)._forward_cls.recompute_output(node, index)
            # both are products with gy, so one convolution_backward computes them: its input gradient
            # dgrad(gy, weight) with weight = ggw, its weight gradient wgrad(input, gy) with input = ggx
            d_x, d_w, _ = _conv_backward(
                gy,
                ggx if want_w else x,
                ggw if want_x else w,
                None,
                stride,
                padding,
                dilation,
                groups,
                [want_x, want_w, False],
            )
        del gy
        if ctx.needs_input_grad[0]:
            if ggx is not None:
                d_gy = _conv(ggx, w, None, stride, padding, dilation, groups)
            if ggw is not None:
                term = _conv(x, ggw, None, stride, padding, dilation, groups)
                d_gy = term if d_gy is None else d_gy.add_(term)
                del term
            if ggb is not None:
                term = ggb.view(1, -1, *([1] * (len(ctx.gy_shape) - 2)))
                d_gy = term.expand(ctx.gy_shape).clone() if d_gy is None else d_gy.add_(term)
        return d_gy, d_x, d_w, None, None, None, None, None


class ConvFn(torch.autograd.Function):
    """``(x, w, b) -> y``; the backward runs :class:`ConvBackwardFn` (recorded when it must be
    differentiable again, i.e. under ``create_graph=True``)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.args = (stride, padding, dilation, groups)
        return _conv(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # create_graph=True: record the node that holds the double backward
            gx, gw, gb = ConvBackwardFn.apply(gy, x, w, mask, *ctx.args)
        else:
            bias_size = [w.shape[0]] if mask[2] else None
            gx, gw, gb = _conv_backward(gy, x, w, bias_size, *ctx.args, list(mask))
        return gx, gw, gb, None, None, None, None


def _expand(value: IntOrSeq, n: int, name: str) -> List[int]:
    if isinstance(value, int):
        return [value] * n
    out = [int(v) for v in value]
    if len(out) != n:
        raise ValueError(
            f"{name} must be an int or a sequence of {n} ints for a {n}-d convolution, got {value}"
        )
    return out


def conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrSeq = 1,
    padding: IntOrSeq = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``torch.nn.functional.conv1d/2d/3d`` (by ``input.dim()`` = 3, 4, 5) with a direct double backward.

    Shapes as in PyTorch: ``input (N, C_in, *spatial)``, ``weight (C_out, C_in / groups, *kernel)``, ``bias
    (C_out,)`` or None; ``stride``, ``padding`` (zeros, symmetric; ints only), ``dilation`` an int or one int
    per spatial dim. Output, first gradients and their dtypes are those of the PyTorch functional; second
    derivatives (one level) follow the module docstring. Under autocast the caller casts (see
    :class:`qgrad.nn.conv.Conv2d`): this function computes in the dtype of its inputs.
    """
    if input.dim() not in (3, 4, 5):
        raise ValueError(f"input must be 3-d, 4-d or 5-d (N, C, *spatial), got shape {tuple(input.shape)}")
    n = input.dim() - 2
    return ConvFn.apply(
        input,
        weight,
        bias,
        _expand(stride, n, "stride"),
        _expand(padding, n, "padding"),
        _expand(dilation, n, "dilation"),
        int(groups),
    )
