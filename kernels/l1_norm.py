"""Triton kernels of the l1 norm's forward and backward.

* :func:`l1_norm_sign`: the multi-tensor l1 norm with int8 signs, ``sum(|t_i|)`` and ``sign(t_i)`` for a list
  of tensors. Semantics are those of :func:`qgrad.ops.l1_norm.l1_norm_sign`: one norm per tensor (float32
  sums for float32 / float16 / bfloat16 inputs, float64 for float64) and, with ``keep_sign``, ``sign(t_i)``
  as int8 of ``t_i``'s shape (0 for 0 and for NaN).
* :func:`add_scaled_sign`: ``x + scale * sign`` from the int8 signs in one elementwise pass (the seeds of the
  double backward, the activation shifts of the worst-case penalty), semantics of
  :func:`qgrad.ops.l1_norm.add_scaled_sign`.

How the list is mapped onto one launch per dtype
------------------------------------------------
The tensors of one dtype (made contiguous) are described by a small device table (one host-to-device copy)
with three rows: the address of each tensor, the address of its int8 sign buffer and its length. The grid is
``(max_blocks, n_tensors)``: program ``(b, i)`` reads block ``b`` (``BLOCK`` elements) of tensor ``i``,
writes the block's signs and stores the sum of ``|t|`` over the block at ``partial[i, b]`` (0 for blocks
past the tensor's end, which load nothing). The norms are then ``partial.sum(dim=1)``: a fixed-order
reduction, so no atomics, deterministic results and no host synchronization. A single tensor (an activation
gradient reduced in a hook as the backward produces it) skips the table: its pointers are kernel arguments.
A CUDA graph cannot record the table's copy (it waits for the host): with ``per_tensor`` every tensor gets
such a launch of its own, filling its row of ``partial``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._host import cdiv

__all__ = ["add_scaled_sign", "l1_norm_sign"]

_BLOCK = 2048
_POINTER = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@triton.jit
def _block_l1_sign(x_ptr, s_ptr, n, b, out_ptr, ACC: tl.constexpr, KEEP_SIGN: tl.constexpr, BLOCK: tl.constexpr):
    """Block ``b`` of one tensor: stores sum(|x|) over the block at ``out_ptr`` and, with KEEP_SIGN, the
    block's int8 signs at ``s_ptr``."""
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr, tl.sum(tl.abs(x), axis=0))
    if KEEP_SIGN:
        sign = (x > 0).to(tl.int8) - (x < 0).to(tl.int8)
        tl.store(s_ptr + offs, sign, mask=mask)


@triton.jit
def _l1_sign_kernel(
    table_ptr, n_tensors, partial_ptr, max_blocks,
    DTYPE: tl.constexpr, ACC: tl.constexpr, KEEP_SIGN: tl.constexpr, BLOCK: tl.constexpr,
):
    # table rows: tensor addresses, sign-buffer addresses, lengths (each n_tensors long)
    b = tl.program_id(0)
    i = tl.program_id(1)
    x_ptr = tl.load(table_ptr + i).to(tl.pointer_type(DTYPE))
    s_ptr = tl.load(table_ptr + n_tensors + i).to(tl.pointer_type(tl.int8))
    n = tl.load(table_ptr + 2 * n_tensors + i)
    _block_l1_sign(x_ptr, s_ptr, n, b, partial_ptr + i * max_blocks + b, ACC, KEEP_SIGN, BLOCK)


@triton.jit
def _l1_sign_one_kernel(x_ptr, s_ptr, n, partial_ptr, ACC: tl.constexpr, KEEP_SIGN: tl.constexpr,
                        BLOCK: tl.constexpr):
    # one tensor (an activation gradient reduced in a hook): its pointers are arguments, no table to upload
    b = tl.program_id(0)
    _block_l1_sign(x_ptr, s_ptr, n, b, partial_ptr + b, ACC, KEEP_SIGN, BLOCK)


def _launch(
    items: List[torch.Tensor], keep_sign: bool, per_tensor: bool
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Norms (accumulation dtype) and signs of contiguous tensors that share a dtype and a device; one launch
    per tensor with ``per_tensor``, else one launch for all of them."""
    device, dtype = items[0].device, items[0].dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    signs = [torch.empty(t.shape, dtype=torch.int8, device=device) for t in items] if keep_sign else []
    max_blocks = max(1, max(cdiv(t.numel(), _BLOCK) for t in items))
    partial = torch.empty((len(items), max_blocks), dtype=acc, device=device)  # every entry is stored
    if len(items) == 1:
        # the sign pointer is unused without KEEP_SIGN; the partial buffer stands in for it
        _l1_sign_one_kernel[(max_blocks,)](
            items[0], signs[0] if keep_sign else partial, items[0].numel(), partial,
            ACC=acc_tl, KEEP_SIGN=keep_sign, BLOCK=_BLOCK,
        )
        return partial.sum(dim=1), signs
    if per_tensor:
        # no table: each launch fills its row of partial (blocks past a tensor's end store 0)
        for i, t in enumerate(items):
            _l1_sign_one_kernel[(max_blocks,)](
                t, signs[i] if keep_sign else partial, t.numel(), partial[i],
                ACC=acc_tl, KEEP_SIGN=keep_sign, BLOCK=_BLOCK,
            )
        return partial.sum(dim=1), signs
    # one host-to-device copy for the three tables
    table = [t.data_ptr() for t in items] + ([s.data_ptr() for s in signs] if keep_sign else [0] * len(items))
    table += [t.numel() for t in items]
    _l1_sign_kernel[(max_blocks, len(items))](
        torch.tensor(table, dtype=torch.int64).to(device),
        len(items),
        partial,
        max_blocks,
        DTYPE=_POINTER[dtype],
        ACC=acc_tl,
        KEEP_SIGN=keep_sign,
        BLOCK=_BLOCK,
    )
    return partial.sum(dim=1), signs


def l1_norm_sign(
    tensors: Sequence[torch.Tensor], keep_sign: bool, result_dtype: torch.dtype, per_tensor: bool = False
) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
    """``(norms, signs)`` for a checked, non-empty list of float tensors on one device (CUDA, or CPU under
    ``TRITON_INTERPRET=1``): ``norms`` ``(len(tensors),)`` in ``result_dtype``, ``signs`` int8 or None.

    One launch per distinct dtype in the list (usually one), or with ``per_tensor`` one per tensor and no
    host-to-device copy (what a CUDA graph can record); non-contiguous tensors are copied first.
    """
    items = [t.contiguous() for t in tensors]
    groups: Dict[torch.dtype, List[int]] = {}
    for k, t in enumerate(items):
        groups.setdefault(t.dtype, []).append(k)
    if len(groups) == 1:  # one dtype: the norms come out in order, no scatter (a list index is a host copy)
        norms, signs = _launch(items, keep_sign, per_tensor)
        return norms.to(result_dtype), (signs if keep_sign else None)
    # several dtypes (bfloat16 activation gradients beside float32 weight gradients under autocast): the
    # norms are put back in order by one stack of views; indexing with the list would copy it to the device
    # first, which a CUDA graph cannot record
    ordered: List[Optional[torch.Tensor]] = [None] * len(items)
    signs: List[Optional[torch.Tensor]] = [None] * len(items)
    for dtype, index in groups.items():
        group_norms, group_signs = _launch([items[k] for k in index], keep_sign, per_tensor)
        group_norms = group_norms.to(result_dtype)
        for j, k in enumerate(index):
            ordered[k] = group_norms[j]
            if keep_sign:
                signs[k] = group_signs[j]
    return torch.stack(ordered), (signs if keep_sign else None)


@triton.jit
def _add_scaled_sign_kernel(s_ptr, scale_ptr, x_ptr, out_ptr, n, HAS_X: tl.constexpr, ACC: tl.constexpr,
                            BLOCK: tl.constexpr):
    # scale * sign is exact in ACC (sign is -1, 0 or 1): the sum is rounded to ACC, then converted to out's
    # dtype, the arithmetic of the C++ kernel and the reference
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    value = tl.load(s_ptr + offs, mask=mask, other=0).to(ACC) * tl.load(scale_ptr).to(ACC)
    if HAS_X:
        value = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) + value
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=mask)


def add_scaled_sign(
    sign: torch.Tensor, scale: torch.Tensor, x: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """``x + scale * sign`` (``x`` None: ``scale * sign``), contiguous, in ``dtype``, for validated arguments:
    ``sign`` int8, ``scale`` a 0-d tensor on ``sign``'s device (read by the kernel: no host synchronization),
    ``x`` None or of ``sign``'s shape and of ``dtype``. Computed in float32 (float64 for float64)."""
    sign = sign.contiguous()
    x = None if x is None else x.contiguous()
    out = torch.empty(sign.shape, dtype=dtype, device=sign.device)
    n = sign.numel()
    if n:
        _add_scaled_sign_kernel[(cdiv(n, _BLOCK),)](
            sign, scale, out if x is None else x, out, n,
            HAS_X=x is not None, ACC=tl.float64 if dtype == torch.float64 else tl.float32, BLOCK=_BLOCK,
        )
    return out
