"""``batch_norm``: batch normalization whose backward is itself an autograd node with a fused double backward.

Why: the gradient-norm penalties differentiate the backward pass (``create_graph=True``). PyTorch's BatchNorm
backward is a single fused kernel, but its derivative (``NativeBatchNormBackwardBackward0``) is a composite of
many small elementwise ops and reductions, which dominates a penalized training step. Here the backward is
:class:`BatchNormBackwardFn`, whose own backward evaluates the closed-form second derivatives of
:mod:`qgrad.reference` (section "BatchNorm") with a few per-channel reductions and two elementwise passes.

The chain, top to bottom:

* forward and first backward: PyTorch's native kernels (``torch.native_batch_norm`` and
  ``aten.native_batch_norm_backward``) -- already fused, and using them keeps outputs, gradients and the
  running-statistics update bit-identical to ``torch.nn.functional.batch_norm``;
* :class:`BatchNormFn` (autograd node of the forward) whose backward calls :class:`BatchNormBackwardFn`;
* :class:`BatchNormBackwardFn`, whose backward is the fused double backward, computed by
  ``qgrad.kernels.batch_norm_double_backward`` (``kernels/batch_norm.py``: a split per-channel reduction,
  a coefficient kernel and one elementwise pass; three launches) for CUDA tensors, by
  ``qgrad._C.batch_norm_double_backward`` (``csrc/cpu/batch_norm.cpp``: two passes per channel) for CPU
  tensors when the compiled extension provides it, and otherwise by :func:`_double_backward_torch` (a dozen
  large PyTorch ops on the compute dtype: under ``QGRAD_BACKEND=torch``, and where neither kernel can run);
  ``QGRAD_BACKEND=triton`` runs the Triton kernels on CPU tensors too, under ``TRITON_INTERPRET=1`` (a test
  vehicle), and raises ``RuntimeError`` where they cannot run;
* :func:`batch_norm`, the public function (same signature and semantics as
  ``torch.nn.functional.batch_norm``);
* :func:`qgrad.reference.batch_norm_double_backward_ref`, the formulas written out with plain ops.

Layouts: when ``x``, ``dy`` and the incoming gradient are all channels-last (channels innermost in memory),
both kernels run on their ``(M, C)`` views, as on ``(N, C)`` inputs, and the results keep that layout; other
non-contiguous layouts are copied to contiguous first (see :mod:`qgrad.ops.layout`).

Higher derivatives: when the double backward itself runs under ``create_graph=True``, it evaluates the same
closed forms through :func:`qgrad.reference.batch_norm_double_backward_ref` (plain differentiable ops, batch
statistics recomputed from ``x``), so third and higher derivatives are exact too, only not fused.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from qgrad.ops.dispatch import cpu_kernel, triton_kernel
from qgrad.ops.layout import channels_last_rows, from_channels_last_rows
from qgrad.reference import batch_norm_double_backward_ref, compute_dtype

__all__ = ["batch_norm", "BatchNormFn", "BatchNormBackwardFn"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------- double backward
def _channel_dims(x: torch.Tensor) -> Tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _double_backward_torch(
    ggx: Optional[torch.Tensor],
    ggw: Optional[torch.Tensor],
    ggb: Optional[torch.Tensor],
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    invstd: torch.Tensor,
    training: bool,
    need: Tuple[bool, bool, bool],
    sum_dy: Optional[torch.Tensor] = None,
    sum_dy_xhat: Optional[torch.Tensor] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients ``(d_dy, d_x, d_w)`` of ``sum(ggx*dx) + ggw.dw + ggb.db`` (formulas: :mod:`qgrad.reference`).

    ``ggx`` (shape of x), ``ggw``, ``ggb`` ((C,)) may be None for zero; ``mean`` and ``invstd`` are the (C,)
    statistics the forward used (batch statistics in training mode, running ones in eval mode). ``need``
    selects which of the three results are computed (the others come back as None). ``sum_dy`` and
    ``sum_dy_xhat`` ((C,), the compute dtype) are ``db`` and ``dw`` of the first backward when it kept them;
    they are recomputed otherwise.

    Every coefficient that depends only on the channel is folded first, so the full-size work is: ``x - mean``
    once, three channel sums (``ggx``, ``ggx*xc``, ``ggx*dy``) plus, in training mode, ``dy`` and ``dy*xc``
    unless given, and one multiply-add chain per output. ``xhat * r`` is never formed: the coefficients of
    ``xhat`` are multiplied by ``r`` instead, and ``x - mean`` is taken before any scaling so that a large
    mean does not cancel against the products.
    """
    need_dy, need_x, need_w = need
    cdt = compute_dtype(x.dtype)
    dims = _channel_dims(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = x.numel() // x.shape[1]

    def per_channel(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(cdt).reshape(shape)

    r = per_channel(invstd)
    w = per_channel(weight)
    g = r if w is None else w * r
    gw, gb = per_channel(ggw), per_channel(ggb)
    gx = None if ggx is None else ggx.to(cdt)
    dyc = dy.to(cdt)
    xc = x.to(cdt) - per_channel(mean)  # x - mu; xhat = xc * r

    def csum(t: torch.Tensor) -> torch.Tensor:
        return t.sum(dim=dims, keepdim=True)

    d_dy = d_x = d_w = None
    if not training:
        # statistics are constants: dx = g*dy, dw = sum(dy*xhat), db = sum(dy)
        if need_dy:
            d_dy = torch.zeros_like(dyc) if gx is None else gx * g
            if gw is not None:
                d_dy.addcmul_(xc, gw * r)
            if gb is not None:
                d_dy.add_(gb)
        if need_x:
            d_x = None if gw is None else dyc * (gw * r)
        if need_w:
            d_w = torch.zeros_like(r) if gx is None else r * csum(gx * dyc)
    else:
        zero = torch.zeros_like(r)
        mean_dy = (csum(dyc) if sum_dy is None else per_channel(sum_dy)) / m
        if sum_dy_xhat is None:
            a = csum(dyc * xc) * (r / m)  # mean(dy * xhat)
        else:
            a = per_channel(sum_dy_xhat) / m
        if gx is not None:
            mean_g = csum(gx) / m
            mean_gx = csum(gx * xc) * (r / m)  # mean(ggx * xhat)
        else:
            mean_g = mean_gx = zero
        gw = zero if gw is None else gw
        gb = zero if gb is None else gb
        if need_x or need_w:
            q = csum(gx * dyc) if gx is not None else zero
            big_q = q - m * (mean_dy * mean_g + a * mean_gx)  # sum(ggx * P(dy))
        if need_dy:
            # g*(ggx - mean_g - xhat*mean_gx) + ggw*xhat + ggb
            coef_x = (gw - g * mean_gx) * r
            d_dy = (xc * coef_x).add_(gb - g * mean_g)
            if gx is not None:
                d_dy.addcmul_(gx, g)
        if need_x:
            # u = -g*a*ggx + bcoef*dy;  d_x = r*(u - mean(u) - xhat*mean(u*xhat)) - g*r*Q*xhat/m
            bcoef = gw - g * mean_gx
            mean_u = bcoef * mean_dy - g * a * mean_g
            mean_ux = bcoef * a - g * a * mean_gx
            coef_xc = -(r * r) * (mean_ux + g * big_q / m)
            d_x = (xc * coef_xc).sub_(r * mean_u)
            d_x.addcmul_(dyc, r * bcoef)
            if gx is not None:
                d_x.addcmul_(gx, -r * g * a)
        if need_w:
            d_w = r * big_q
    return (
        None if d_dy is None else d_dy.to(dy.dtype),
        None if d_x is None else d_x.to(x.dtype),
        None if d_w is None else d_w.reshape(-1).to(weight.dtype if weight is not None else cdt),
    )


def _run_kernel(kernel, args):
    """``kernel(*args)`` (arguments of ``qgrad._C.batch_norm_double_backward``), on the ``(M, C)`` views of
    ``x``, ``dy`` and ``ggx`` when all three are stored channels innermost (channels-last): the kernels take
    ``(M, C)`` inputs as they are, so nothing is copied, and ``d_dy`` / ``d_x`` come back in ``x``'s layout.
    Other layouts are handed over unchanged (the kernels copy them to contiguous)."""
    ggx, ggw, ggb, dy, x = args[:5]
    rows = channels_last_rows(x)
    if rows is None or dy.stride() != x.stride() or (ggx is not None and ggx.stride() != x.stride()):
        return kernel(*args)
    as_rows = None if ggx is None else channels_last_rows(ggx)
    d_dy, d_x, d_w = kernel(as_rows, ggw, ggb, channels_last_rows(dy), rows, *args[5:])
    back = [None if t is None else from_channels_last_rows(t, x) for t in (d_dy, d_x)]
    return back[0], back[1], d_w


# --------------------------------------------------------------------------------------------- autograd nodes
class BatchNormBackwardFn(torch.autograd.Function):
    """The backward of BatchNorm as an autograd node: ``(dy, x, weight) -> (dx, dweight, dbias)``.

    ``stat_a``, ``stat_b`` are ``(save_mean, save_invstd)`` in training mode and ``(running_mean,
    running_var)`` (copies taken at forward time) in eval mode; they are constants of this node, the
    dependence of the batch statistics on ``x`` being part of the derivative formulas. ``dweight`` and
    ``dbias`` are sums of ``dy * xhat`` and ``dy`` per channel (returned even when ``weight`` is None).
    Its backward is the fused double backward (the Triton kernels on CUDA, the C++ kernel on CPU, else
    :func:`_double_backward_torch`);
    under ``create_graph=True`` it is the differentiable reference formula instead (see the module docstring).
    In eval mode without ``ggw`` the gradient w.r.t. ``x`` is identically zero and is returned as None.
    """

    @staticmethod
    def _native(dy, x, weight, stat_a, stat_b, training, eps):
        if training:
            return torch.ops.aten.native_batch_norm_backward(
                dy, x, weight, None, None, stat_a, stat_b, True, eps, [True, True, True]
            )
        # eval mode: the running statistics are the ones used. CUDA's kernel for channels-last inputs wants
        # saved statistics in any case; empty ones (what native_batch_norm returns in eval mode) tell it to
        # derive them from the running ones
        empty = stat_a.new_empty(0) if x.is_cuda else None
        return torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, stat_a, stat_b, empty, empty, False, eps, [True, True, True]
        )

    @staticmethod
    def recompute_output(ctx, index: int) -> torch.Tensor:
        """Output ``index`` of this node's forward, bit for bit, from what it saved (callable until the node's
        backward has run). Lets the consumer of ``dx`` (qgrad's convolution backward) not keep a copy."""
        dy, x, weight, stat_a, stat_b = ctx.saved_tensors
        return BatchNormBackwardFn._native(dy, x, weight, stat_a, stat_b, ctx.training, ctx.eps)[index]

    @staticmethod
    def forward(ctx, dy, x, weight, stat_a, stat_b, training, eps):
        ctx.sums = (None, None)
        dx, dw, db = BatchNormBackwardFn._native(dy, x, weight, stat_a, stat_b, training, eps)
        if training:
            # the training-mode double backward needs sum(dy) and sum(dy * xhat), which are db and dw; they
            # are kept when the native kernel returned them in the compute dtype (low-precision parameters
            # get low-precision sums, which are then recomputed in float32)
            if dw.dtype == compute_dtype(x.dtype):
                ctx.sums = (db.detach(), dw.detach())
        ctx.save_for_backward(dy, x, weight, stat_a, stat_b)
        ctx.training, ctx.eps = training, eps
        ctx.set_materialize_grads(False)
        return dx, dw, db

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        dy, x, weight, stat_a, stat_b = ctx.saved_tensors
        training, eps = ctx.training, ctx.eps
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        if weight is None:
            ggw = ggb = None  # dweight / dbias of a BatchNorm without affine parameters are not used
        # with constant statistics x enters only dw, so without ggw its gradient is zero: None tells autograd so
        # without materializing it
        need = (need_dy, need_x and (training or ggw is not None), need_w)
        if torch.is_grad_enabled():
            # create_graph=True: the result must itself be differentiable (w.r.t. x through the batch
            # statistics too), which the reference formulas are
            if ggx is None:
                ggx = torch.zeros_like(x)
            running = (None, None) if training else (stat_a, stat_b)
            d_dy, d_x, d_w = batch_norm_double_backward_ref(ggx, ggw, ggb, dy, x, weight, *running, training, eps)
            d_dy, d_x, d_w = (t if n else None for t, n in zip((d_dy, d_x, d_w), need))
        else:
            cdt = compute_dtype(x.dtype)
            if not training:
                mean, invstd = stat_a, torch.rsqrt(stat_b.to(cdt) + eps)
            elif stat_a.dtype != cdt:
                # float16 / bfloat16 parameters make the native kernel save float16 / bfloat16 statistics;
                # the second derivatives use the batch statistics recomputed in float32 instead
                var, mean = torch.var_mean(x.to(cdt), dim=_channel_dims(x), correction=0)
                invstd = torch.rsqrt(var + eps)
            else:
                mean, invstd = stat_a, stat_b
            # both kernels take dy and ggx in the dtype of x only (the PyTorch ops take any)
            same_dtype = dy.dtype == x.dtype and (ggx is None or ggx.dtype == x.dtype)
            kernel = triton_kernel("batch_norm_double_backward", x.device)
            if kernel is None and x.device.type == "cpu":
                kernel = cpu_kernel("batch_norm_double_backward")
            if kernel is not None and same_dtype:
                d_dy, d_x, d_w = _run_kernel(
                    kernel, (ggx, ggw, ggb, dy, x, weight, mean, invstd, *ctx.sums, training, *need)
                )
                if d_w is not None:  # float64 from either kernel
                    d_w = d_w.to(weight.dtype if weight is not None else cdt)
            else:
                d_dy, d_x, d_w = _double_backward_torch(
                    ggx, ggw, ggb, dy, x, weight, mean, invstd, training, need, *ctx.sums
                )
        return d_dy, d_x, d_w, None, None, None, None


class BatchNormFn(torch.autograd.Function):
    """Autograd node of :func:`batch_norm` (arguments already validated).

    The forward is ``torch.native_batch_norm`` (which also updates the running statistics, once, in training
    mode); the backward calls :class:`BatchNormBackwardFn`, so a backward with ``create_graph=True`` records a
    node whose derivative is the fused double backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, save_mean, save_invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
        if training:
            stats = (save_mean, save_invstd)
        else:
            # copies: the backward must see the statistics of this forward even if the buffers change later
            stats = (running_mean.clone(), running_var.clone())
        ctx.save_for_backward(x, weight, *stats)
        ctx.training, ctx.eps = training, eps
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, stat_a, stat_b = ctx.saved_tensors
        dx, dw, db = BatchNormBackwardFn.apply(dy, x, weight, stat_a, stat_b, ctx.training, ctx.eps)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dw if need_w else None,
            db if need_b else None,
            None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------- public function
def _check_channel_tensor(t: Optional[torch.Tensor], name: str, x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(
            f"{name} must be 1-d of length {x.shape[1]} (the channels of input {tuple(x.shape)}), "
            f"got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}; put both on one device")


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization; a drop-in for ``torch.nn.functional.batch_norm`` with a fused double backward.

    ``y = weight * (x - mu) / sqrt(var + eps) + bias`` per channel (dim 1). In training mode ``mu`` and
    ``var`` are the batch mean and biased variance over every dimension but 1, and the running statistics (when
    given) are updated in place, once, as ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased batch variance; in eval mode the running statistics are used and left unchanged. Float16 and
    bfloat16 inputs are normalized in float32 (as PyTorch does); the output has the dtype of ``input``.

    Args:
        input: (N, C) or (N, C, L) or (N, C, H, W) (any number of trailing dims), any strides.
        running_mean, running_var: (C,) buffers or None; required in eval mode.
        weight, bias: (C,) affine parameters or None.
        training: use batch statistics (and update the running ones).
        momentum: running-average factor (the modules pass ``1 / num_batches_tracked`` for ``momentum=None``).
        eps: added to the variance.

    Differentiable to any order: the first backward is PyTorch's fused kernel, wrapped as an autograd node
    whose derivative is the fused closed form of :mod:`qgrad.reference` (section "BatchNorm"); third and
    higher derivatives go through the plain-op reference formulas.

    Returns:
        Tensor of the shape and dtype of ``input``.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, ...) with at least 2 dims, got shape {tuple(input.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_channel_tensor(t, name, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    eps, momentum = float(eps), float(momentum)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    training = bool(training)
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required in eval mode (training=False)")
    if training:
        size = list(input.shape)
        if size[0] * math.prod(size[2:]) == 1:
            # the message of torch.nn.functional.batch_norm, so code handling one handles both
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    if input.numel() == 0:
        # an empty batch, which the native kernel rejects: torch's function returns an empty output that still
        # depends on weight and bias, and leaves the running statistics alone
        return torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    return BatchNormFn.apply(input, weight, bias, running_mean, running_var, training, momentum, eps)
