"""``multi_l1_norm``: the l1 norms of a list of tensors in one call, with a sign-only backward.

The gradient-l1 penalty (:class:`qgrad.penalties.L1GradPenalty`) needs, for every weight gradient and every
activation gradient ``g_i`` of a step,

    forward:   n_i = ||g_i||_1 = sum_j |g_i[j]|
    backward:  dR/dg_i = (dR/dn_i) * sign(g_i)          (sign(0) = 0, the zero subgradient)

and then differentiates through ``g_i`` (a double backward). :class:`MultiL1NormFn` reduces all norms in one
call and keeps ``sign(g_i)`` as int8 for the backward, which then is one scaling pass per tensor: it never
reads ``g_i`` again, and it holds one byte per element between the penalty's forward and backward instead of
the four (float32) that saving ``g_i`` would cost. Nothing else keeps the activation gradients alive at that
point (autograd's double-backward graph does not save them), so the int8 copy is the penalty's only extra
memory, a quarter of the alternative.

Implementations (:func:`l1_norm_sign`), each reading every element once, accumulating ``|g|`` and writing
the int8 sign, with no temporaries: on CUDA tensors the Triton kernel ``qgrad.kernels.l1_norm_sign``
(``kernels/l1_norm.py``, one launch for all tensors of a dtype, or one without a pointer table for a single
tensor; tested on an H100 and under ``TRITON_INTERPRET=1``); on CPU tensors the C++ kernel
``qgrad._C.l1_norm_sign`` (``csrc/cpu/l1_norm.cpp``, one parallel loop over all tensors). Where neither can
run, or under ``QGRAD_BACKEND=torch``, ``abs().sum()`` and ``sign().to(int8)`` per tensor. Measured on the 38
gradients of a CIFAR ResNet-18 step (width 0.25, batch 32: 5.1 M float32 elements; 2-core Xeon): 2.1 ms for
the C++ kernel against 4.8 ms for the PyTorch ops on one thread, 1.1 ms against 2.7 ms on two (4.8 ms and 2.8
ms before the extension was built with ``-fno-wrapv`` and an AVX2 clone of its loop; see ``setup.py`` and
``csrc/cpu/multiversion.h``).

The backward turns each sign tensor into its seed with :func:`add_scaled_sign` (``x + scale * sign`` in one
pass: cast, scale and add fused; Triton on CUDA, C++ on CPU), which also makes the activation shifts of the
worst-case penalty.

Deferred seeds: the backward's output for ``g_i`` (``dR/dn_i * sign(g_i)``, the "seed" of the double
backward at ``g_i``) is a float tensor the size of ``g_i``; handing them all back at once would hold one such
tensor per activation gradient at the start of the double backward (about 20 MB of a ResNet-18 step at
width 0.25, batch 32). The backward instead leaves ``(int8 sign, scale)`` with the autograd node that
produced ``g_i`` and returns a zero-stride zero for ``g_i``; ``scale * sign`` is added to that node's incoming
gradient when it runs, so each seed exists only while its node runs. A node that accepts seeds
(:func:`accept_seeds`; qgrad's convolution backward does) adds them in its backward (:func:`add_seeds`);
any other node (a residual add's, torch's own) gets a pre-hook that adds them. The result is the same sum.

``multi_l1_norm_ref`` is the plain-op reference (``linalg.vector_norm`` per tensor, autograd's own
derivative); the two agree to float rounding in value and gradient.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from qgrad.cuda_graph import graph_safe_launches
from qgrad.ops.dispatch import cpu_kernel, triton_kernel
from qgrad.ops.layout import dense_order, inverse_order

__all__ = [
    "add_scaled_sign",
    "add_scaled_sign_ref",
    "multi_l1_norm",
    "multi_l1_norm_ref",
    "l1_norm_sign",
    "MultiL1NormFn",
    "accept_seeds",
    "add_seeds",
]

_SEEDS = "_qgrad_l1_seeds"  # attribute of an autograd node (its ctx) that takes deferred seeds
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # those of the C++ kernels


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision tensors are reduced in float32: an l1 norm sums millions of terms, which an 11-bit (or
    # 8-bit) mantissa cannot accumulate without dropping the small ones
    return torch.promote_types(dtype, torch.float32)


def _result_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, _accumulation_dtype(t.dtype))
    return dtype


def _check_tensors(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        raise TypeError("tensors must be a list of tensors, got a single tensor; pass [tensor]")
    try:
        items = list(tensors)
    except TypeError:
        raise TypeError(f"tensors must be a list of tensors, got {type(tensors).__name__}") from None
    if not items:
        raise ValueError("tensors is empty; pass at least one tensor")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"tensors[{i}] must be a floating-point tensor, got dtype {t.dtype}")
        if t.device != items[0].device:
            raise ValueError(
                f"tensors[{i}] is on {t.device} but tensors[0] is on {items[0].device}; put all on one device"
            )
    return items


def l1_norm_sign(
    tensors: Sequence[torch.Tensor], keep_sign: bool
) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
    """``(norms, signs)`` of a checked, non-empty list of floating-point tensors on one device, no autograd.

    ``norms``: ``(len(tensors),)`` in :func:`_result_dtype` of the list, ``norms[i] = sum(|tensors[i]|)``
    (half-precision summed in float32 or better); ``signs``: ``sign(tensors[i])`` as int8 (0 for 0 and NaN)
    with ``tensors[i]``'s shape (and strides, when it is dense: contiguous, channels-last, ...), or None
    without ``keep_sign``. The C++ kernel sums in double, the Triton kernel in blocks of the result dtype, the
    PyTorch path in the result dtype: they agree to its rounding.
    """
    dtype = _result_dtype(tensors)
    with torch.no_grad():
        launcher = triton_kernel("l1_norm_sign", tensors[0].device)
        kernel = cpu_kernel("l1_norm_sign") if launcher is None and tensors[0].device.type == "cpu" else None
        if launcher is not None or kernel is not None:
            # dense tensors in another layout (channels-last) go in as contiguous views of their memory, and
            # their signs come back in their layout
            orders = [dense_order(t) for t in tensors]
            views = [t if o is None else t.permute(o) for t, o in zip(tensors, orders)]
            if launcher is not None:
                # in a CUDA graph, and in the warm-up calls before its capture (so that the capture compiles
                # no new kernel), one launch per tensor instead of a table copied from the host
                per_tensor = tensors[0].is_cuda and graph_safe_launches()
                norms, signs = launcher(views, keep_sign, dtype, per_tensor)
            else:
                norms, signs = kernel(views, keep_sign)
            if keep_sign:
                signs = [s if o is None else s.permute(inverse_order(o)) for s, o in zip(signs, orders)]
            return norms.to(dtype), (signs if keep_sign else None)
        norms = torch.stack([t.abs().sum(dtype=dtype) for t in tensors])
        # sign() keeps NaN, which int8 cannot hold: zero it so that both paths agree
        signs = [torch.sign(t).nan_to_num_(0.0).to(torch.int8) for t in tensors] if keep_sign else None
        return norms, signs


def add_scaled_sign(
    sign: torch.Tensor,
    scale,
    x: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``x + scale * sign`` from int8 signs, in one pass: the seeds of the double backward (``x`` the incoming
    gradient) and the activation shifts of the worst-case penalty (``x`` the activation).

    Args:
        sign: int8 tensor of any shape (the signs kept by :func:`l1_norm_sign`: -1, 0 or 1).
        scale: a number, or a 0-d floating-point tensor on ``sign``'s device (read on the device: no host
            synchronization on a GPU).
        x: None (zero) or a floating-point tensor of ``sign``'s shape on its device.
        dtype: the result's dtype; default ``x``'s. Required when ``x`` is None.

    Returns:
        a new tensor of ``sign``'s shape in ``dtype``: ``x + scale * sign`` computed in float32 (float64 for
        float64), where ``scale * sign`` is exact, and converted to ``dtype`` (for float32 and float64 the
        correctly rounded sum), bit for bit the same on every backend. Kernels: Triton on CUDA tensors, C++ on
        CPU tensors (``x`` of ``dtype`` laid out like ``sign``); otherwise :func:`add_scaled_sign_ref`. A
        ``sign`` stored densely (contiguous, channels-last, ...) gives a result with its strides. Differentiable
        w.r.t. ``x`` (the identity) when ``x`` requires grad; ``sign`` and ``scale`` are constants.
    """
    if not isinstance(sign, torch.Tensor) or sign.dtype != torch.int8:
        got = sign.dtype if isinstance(sign, torch.Tensor) else type(sign).__name__
        raise TypeError(f"sign must be an int8 tensor, got {got}")
    if x is not None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor or None, got {getattr(x, 'dtype', type(x))}")
        if x.shape != sign.shape or x.device != sign.device:
            raise ValueError(
                f"x must have sign's shape {tuple(sign.shape)} and device {sign.device}, "
                f"got {tuple(x.shape)} on {x.device}"
            )
        dtype = x.dtype if dtype is None else dtype
    if dtype is None or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype (required when x is None), got {dtype}")
    if isinstance(scale, torch.Tensor) and (scale.dim() != 0 or scale.device != sign.device):
        raise ValueError(
            f"scale must be a number or a 0-d tensor on {sign.device}, got shape {tuple(scale.shape)} "
            f"on {scale.device}"
        )
    if x is not None and x.requires_grad and torch.is_grad_enabled():
        return _AddScaledSignFn.apply(x, sign, scale, dtype)
    return _add_scaled_sign(sign, scale, x, dtype)


def _add_scaled_sign(sign, scale, x, dtype):
    # The kernels read contiguous arrays (copying other layouts) and write a contiguous result. A sign (and
    # an x of the same strides) stored densely in another layout, channels-last say, goes in as contiguous
    # views of its memory, and the result is permuted back into that layout.
    same_layout = x is None or x.stride() == sign.stride() or (x.is_contiguous() and sign.is_contiguous())
    use_kernel = same_layout and (x is None or x.dtype == dtype)
    order = dense_order(sign) if use_kernel else None
    s, v = sign, x
    if order is not None:
        s = sign.permute(order)
        v = None if x is None else x.permute(order)
    out = None
    with torch.no_grad():
        launcher = triton_kernel("add_scaled_sign", sign.device) if use_kernel else None
        if launcher is not None:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            if not isinstance(scale, torch.Tensor):
                scale = torch.full((), scale, dtype=acc, device=sign.device)
            out = launcher(s, scale, v, dtype)
        elif use_kernel and sign.device.type == "cpu" and dtype in _KERNEL_DTYPES:
            kernel = cpu_kernel("add_scaled_sign")
            out = None if kernel is None else kernel(s, float(scale), v, dtype)
        if out is None:
            return add_scaled_sign_ref(sign, scale, x, dtype)
    return out if order is None else out.permute(inverse_order(order))


class _AddScaledSignFn(torch.autograd.Function):
    """``x + scale * sign`` as an autograd node: the derivative w.r.t. ``x`` is the identity (``sign`` and
    ``scale`` are constants), e.g. for an activation shifted by the worst-case penalty."""

    @staticmethod
    def forward(ctx, x, sign, scale, dtype):
        ctx.x_dtype = x.dtype
        return _add_scaled_sign(sign, scale, x, dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.x_dtype), None, None, None


def add_scaled_sign_ref(
    sign: torch.Tensor, scale, x: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Reference for :func:`add_scaled_sign` (same arguments, no checks) with PyTorch ops."""
    dtype = x.dtype if dtype is None else dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    value = sign.to(acc) * (scale.to(acc) if isinstance(scale, torch.Tensor) else scale)
    if x is not None:
        value = x.to(acc) + value
    return value.to(dtype)


def accept_seeds(ctx) -> None:
    """Called in a custom autograd Function's forward: :class:`MultiL1NormFn` then leaves the seeds of this
    node's outputs on it instead of in a pre-hook (see the module docstring); its backward must call
    :func:`add_seeds`."""
    setattr(ctx, _SEEDS, {})


def add_seeds(ctx, grads: Sequence[Optional[torch.Tensor]]) -> Tuple[Optional[torch.Tensor], ...]:
    """The incoming gradients of a node's outputs (None for none) plus the deferred seeds left on it.

    The seeds are consumed: a later backward through the same (retained) graph gets them again only if it
    passes through the l1 node again, whose backward runs before this node's in every backward call."""
    seeds = getattr(ctx, _SEEDS, None)
    if not seeds:
        return tuple(grads)
    out = list(grads)
    for k, (sign, scale, dtype, stand_in) in seeds.items():
        # the stand-in zero arrives unchanged when nothing else reached this output (a weight gradient):
        # the seed alone, without reading a broadcast zero
        out[k] = add_scaled_sign(sign, scale, None if out[k] is stand_in else out[k], dtype)
    seeds.clear()
    return tuple(out)


class MultiL1NormFn(torch.autograd.Function):
    """``(t_0, ..., t_{n-1}) -> norms`` of shape ``(n,)``; backward ``grad[i] * sign(t_i)``.

    The signs are saved as int8 (one byte per element); the backward turns them into ``grad[i] * sign`` in
    each tensor's dtype (:func:`add_scaled_sign`), or defers that to the tensor's producer (see the module
    docstring). The backward is not itself differentiable (the derivative of ``sign`` is 0 almost
    everywhere), which is all a gradient-norm penalty needs.
    """

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        norms, signs = l1_norm_sign(tensors, keep_sign=True)
        ctx.save_for_backward(*signs)
        ctx.dtypes = [t.dtype for t in tensors]
        ctx.producers = [None if t.grad_fn is None else (t.grad_fn, t.output_nr) for t in tensors]
        return norms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        out = []
        hooked = {}  # producers without add_seeds: node -> its seeds, added by a pre-hook
        for i, (s, dtype, producer) in enumerate(zip(ctx.saved_tensors, ctx.dtypes, ctx.producers)):
            if not ctx.needs_input_grad[i]:
                out.append(None)
            elif producer is not None:  # deferred to the node that produced the tensor
                stand_in = torch.zeros((), dtype=dtype, device=s.device).expand(s.shape)
                node, k = producer
                seeds = getattr(node, _SEEDS, None)
                if seeds is None:
                    seeds = hooked.setdefault(node, {})
                if k in seeds:
                    # the same tensor once more (a gradient that two regularized tensors share, as where one
                    # reaches the loss only through `+ c` or `.clone()` of the other): a node keeps one seed
                    # per output, so this one is handed back now; the engine adds it to the other's stand-in
                    out.append(add_scaled_sign(s, grad[i], dtype=dtype))
                    continue
                seeds[k] = (s, grad[i], dtype, stand_in)
                out.append(stand_in)
            else:
                out.append(add_scaled_sign(s, grad[i], dtype=dtype))
        for node, seeds in hooked.items():
            node.register_prehook(_SeedHook(seeds))
        return tuple(out)


class _SeedHook:
    """A pre-hook of an autograd node that adds the deferred seeds of its outputs to their incoming
    gradients (once: the seeds are consumed, as by :func:`add_seeds`)."""

    def __init__(self, seeds):
        self.seeds = seeds

    def __call__(self, grad_outputs):
        if not self.seeds:
            return None
        out = list(grad_outputs)
        for k, (sign, scale, dtype, stand_in) in self.seeds.items():
            out[k] = add_scaled_sign(sign, scale, None if out[k] is stand_in else out[k], dtype)
        self.seeds = {}
        return tuple(out)


def multi_l1_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The l1 norm of every tensor of a list: ``out[i] = sum(|tensors[i]|)``.

    Args:
        tensors: non-empty list of floating-point tensors of any shapes and dtypes, on one device.

    Returns:
        1-d tensor of shape ``(len(tensors),)`` on that device, float32 (float64 if any input is float64);
        half-precision inputs are summed in float32. Differentiable: the gradient w.r.t. ``tensors[i]`` is
        ``grad[i] * sign(tensors[i])`` in ``tensors[i]``'s dtype, 0 where an entry is 0 (the subgradient
        PyTorch's ``vector_norm`` uses too). The int8 signs are kept only when grad mode is on and an input
        requires grad.
    """
    items = _check_tensors(tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in items):
        return MultiL1NormFn.apply(*items)
    return l1_norm_sign(items, keep_sign=False)[0]  # nothing to differentiate: no signs


def multi_l1_norm_ref(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reference for :func:`multi_l1_norm`: ``linalg.vector_norm(t, 1)`` per tensor, stacked; autograd
    differentiates it."""
    items = _check_tensors(tensors)
    dtype = _result_dtype(items)
    return torch.stack([torch.linalg.vector_norm(t, ord=1, dtype=dtype) for t in items])
