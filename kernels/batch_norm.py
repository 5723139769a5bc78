"""Triton kernels of BatchNorm's double backward: the gradients ``(d_dy, d_x, d_w)`` of
``S = sum(ggx * dx) + ggw . dw + ggb . db``, where ``(dx, dw, db)`` is BatchNorm's backward.

The formulas are those of the BatchNorm section of :mod:`qgrad.reference`; the semantics, arguments and
result dtypes those of the C++ kernel ``qgrad._C.batch_norm_double_backward`` (``csrc/cpu/batch_norm.cpp``).
Per channel ``c``, with ``xc = x - mean`` and ``M = N * S`` elements:

1. up to five sums: ``sum(ggx)``, ``sum(ggx * xc)``, ``sum(ggx * dy)``, ``sum(dy)``, ``sum(dy * xc)``, only
   those the requested results depend on (``sum(dy)`` and ``sum(dy * xc)`` not at all when the first
   backward kept them as ``sum_dy`` / ``sum_dy_xhat``);
2. from those, seven coefficients, and ``d_w = r * Q`` (``r = invstd``, ``Q = sum(ggx * P(dy))``);
3. elementwise ``d_dy = a1 * ggx + b1 * xc + c1`` and ``d_x = a2 * ggx + b2 * xc + d2 * dy + c2`` (eval
   mode is the same with the coefficients of constant statistics).

How the work is mapped onto three launches
------------------------------------------
``x``, ``dy`` and ``ggx`` are read as contiguous ``(N, C, S)`` arrays, ``S`` the product of the trailing
dims (``S = 1`` for ``(N, C)`` inputs). Inputs that are not contiguous, channels-last ones included, are
copied to that layout first, and ``d_dy`` / ``d_x`` come back contiguous.

* :func:`_bn_sums_kernel`, grid ``(C / BLOCK_C, SPLIT)``: the ``M`` elements of a channel form an
  ``N x S`` matrix, cut into tiles of ``BLOCK_N`` rows by ``BLOCK_S`` columns; a program takes ``BLOCK_C``
  neighbouring channels at once when their rows are short (``BLOCK_C * BLOCK_S >= 64``), so that every tile
  row is a contiguous run of memory: 64 channels side by side for ``(N, C)`` inputs, 4 for 4x4 feature
  maps, 1 from 8x8 up. Program ``(b, p)`` accumulates the ``p``-th contiguous range of the tiles
  elementwise in the accumulation dtype (float32, float64 for float64 inputs), reduces its accumulators
  once, and writes the sums to ``partial[c, p, :]`` for each of its channels. ``SPLIT`` is chosen so that
  the grid holds about eight programs per multiprocessor even when there are few channel blocks
  (``(128, 64, 32, 32)``: 64 x 16 programs of 4 tiles of 2048 elements on an H100), but never more
  programs per channel block than it has tiles.
* :func:`_bn_coef_kernel`, one program per block of channels: adds the ``SPLIT`` partial sums of each
  channel in float64, in a fixed order, and evaluates the coefficients in float64 (as the C++ kernel does);
  writes them, with the mean, to a ``(8, C)`` table in the accumulation dtype, and ``d_w`` in float64.
  One launch instead of the dozens of tiny PyTorch ops the same arithmetic on ``(C,)`` tensors would take.
* :func:`_bn_apply_kernel`, one program per ``BLOCK`` elements in memory order: reads the channel's
  coefficients (a scalar per program when ``BLOCK`` divides ``S``, which then makes every block one
  channel's; a gather by ``(index // S) % C`` otherwise) and writes the requested outputs, computed in the
  accumulation dtype and rounded to the dtype of ``x``.

No atomics (the results are deterministic) and no host synchronization. Offsets are int32 unless an index
of ``x`` could exceed ``2**31 - 1``, in which case the kernels compute them in int64 (``INT64``).

Measured on an H100 (torch 2.11, Triton 3.6; CUDA time of the three kernels, all results requested, training
mode, ``ggx`` given): float32 ``(128, 64, 32, 32)`` 98 us, i.e. 2.7 TB/s counting the eight passes over a
tensor the size of ``x`` (three reads for the sums, three reads and two writes for the outputs); bfloat16
53 us; float32 ``(1024, 256, 7, 7)`` 155 us; float32 ``(128, 512, 4, 4)`` 12 us. The weakest case is the
sums of ``(N, C)`` inputs (float32 ``(4096, 1024)``: 46 us, 1.1 TB/s, of 79 us in all).
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2

__all__ = ["batch_norm_double_backward"]

# Elements of one tile of the sums kernel, and the shortest contiguous run a tile row should cover (in
# elements; neighbouring channels are added until it does; 128 and 256 were slower on (4096, 1024) inputs).
# Module attributes, like the int32 limit, so that tests can shrink them (the interpreter then runs several
# tiles and programs per channel on small inputs) or force the int64 path.
_SUM_TILE = 2048
_SUM_RUN = 64
_INT32_LIMIT = 2**31 - 1
# Elements per program of the elementwise kernel; the smaller blocks are used when they divide S and
# this one does not, so that each program still covers a single channel (e.g. 16x16 feature maps).
_APPLY_BLOCKS = (1024, 512, 256)
# Channels per program of the coefficient kernel at most, and the largest (channels x SPLIT) tile it loads:
# small tiles give more programs, e.g. 128 instead of 32 for (4096, 1024) inputs (3.3 instead of 7.9 us on
# an H100).
_COEF_BLOCK_C = 64
_COEF_TILE = 512
# Sums per channel and program in the partial buffer, in the order sum(ggx), sum(ggx * xc), sum(ggx * dy),
# sum(dy), sum(dy * xc). The coefficient table holds, per channel, the mean, (a1, b1, c1) of d_dy and
# (a2, b2, c2, d2) of d_x, in that order: 8 rows of C.
_NUM_SUMS = 5


@triton.jit
def _bn_sums_kernel(
    ggx_ptr, dy_ptr, x_ptr, mean_ptr, part_ptr,
    N, C, S, s_blocks, num_tiles, tiles_per_program,
    SUM_G: tl.constexpr, SUM_Q: tl.constexpr, SUM_DY: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr,
):
    """Partial sums of ``BLOCK_C`` channels over a range of their ``[BLOCK_N, BLOCK_C, BLOCK_S]`` tiles.

    Program ``(b, p)`` covers channels ``[b * BLOCK_C, (b + 1) * BLOCK_C)`` and tiles
    ``[p * tiles_per_program, (p + 1) * tiles_per_program)`` of them (tile ``t``: row block ``t // s_blocks``
    and column block ``t % s_blocks`` of each channel's ``N x S`` matrix). For every channel ``c`` it writes
    to ``part_ptr[(c * SPLIT + p) * 5 + k]`` the sums it computes: ``SUM_G``: ``sum(ggx)``,
    ``sum(ggx * xc)``; ``SUM_Q``: ``sum(ggx * dy)``; ``SUM_DY``: ``sum(dy)``, ``sum(dy * xc)``.
    """
    p = tl.program_id(1)
    split = tl.num_programs(1)
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_S)
    if INT64:
        ch = ch.to(tl.int64)
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    ch_mask = ch < C
    mu = tl.load(mean_ptr + ch, mask=ch_mask, other=0.0).to(ACC)[None, :, None]
    acc_g = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC)
    acc_gx = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC)
    acc_gdy = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC)
    acc_dy = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC)
    acc_dyx = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC)
    t_begin = p * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, num_tiles)
    for t in range(t_begin, t_end):
        rb = t // s_blocks
        n = rb * BLOCK_N + rows
        s = (t - rb * s_blocks) * BLOCK_S + cols
        mask = (n < N)[:, None, None] & ch_mask[None, :, None] & (s < S)[None, None, :]
        offs = ((n[:, None] * C + ch[None, :]) * S)[:, :, None] + s[None, None, :]
        # masked lanes load 0 for ggx and dy, so their products with xc (= -mu there) add nothing
        if SUM_G or SUM_DY:
            xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mu
        if SUM_G or SUM_Q:
            g = tl.load(ggx_ptr + offs, mask=mask, other=0.0).to(ACC)
        if SUM_Q or SUM_DY:
            d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        if SUM_G:
            acc_g += g
            acc_gx += g * xc
        if SUM_Q:
            acc_gdy += g * d
        if SUM_DY:
            acc_dy += d
            acc_dyx += d * xc
    out = part_ptr + (ch * split + p) * 5
    if SUM_G:
        tl.store(out + 0, tl.sum(tl.sum(acc_g, axis=2), axis=0), mask=ch_mask)
        tl.store(out + 1, tl.sum(tl.sum(acc_gx, axis=2), axis=0), mask=ch_mask)
    if SUM_Q:
        tl.store(out + 2, tl.sum(tl.sum(acc_gdy, axis=2), axis=0), mask=ch_mask)
    if SUM_DY:
        tl.store(out + 3, tl.sum(tl.sum(acc_dy, axis=2), axis=0), mask=ch_mask)
        tl.store(out + 4, tl.sum(tl.sum(acc_dyx, axis=2), axis=0), mask=ch_mask)


@triton.jit
def _channel_sum(part_ptr, ch, ch_mask, sp, sp_mask, split, k):
    """``sum_p partial[ch, p, k]`` in float64, for a block of channels (one fixed summation order)."""
    offs = (ch[:, None] * split + sp[None, :]) * 5 + k
    v = tl.load(part_ptr + offs, mask=ch_mask[:, None] & sp_mask[None, :], other=0.0).to(tl.float64)
    return tl.sum(v, axis=1)


@triton.jit
def _channel_load(ptr, ch, mask, zero, HAS: tl.constexpr, default: tl.constexpr):
    """A per-channel vector in float64, or ``default`` where it is absent (``HAS`` false)."""
    if HAS:
        return tl.load(ptr + ch, mask=mask, other=default).to(tl.float64)
    else:
        return zero + default


@triton.jit
def _bn_coef_kernel(
    part_ptr, mean_ptr, invstd_ptr, weight_ptr, ggw_ptr, ggb_ptr, sum_dy_ptr, sum_dyx_ptr, coef_ptr, dw_ptr,
    C, M, split,
    TRAINING: tl.constexpr, HAS_W: tl.constexpr, HAS_GGW: tl.constexpr, HAS_GGB: tl.constexpr,
    SUM_G: tl.constexpr, SUM_Q: tl.constexpr, SUM_DY: tl.constexpr, GIVEN_DY: tl.constexpr,
    WRITE: tl.constexpr, NEED_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
):
    """Coefficients of ``BLOCK_C`` channels from their partial sums, in float64 (formulas: module docstring
    and :mod:`qgrad.reference`); sums that were not computed count as 0 (``ggx`` is None, or the requested
    results do not depend on them). The table is written only with ``WRITE``, ``d_w`` only with ``NEED_W``."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_mask = ch < C
    sp = tl.arange(0, BLOCK_SPLIT)
    sp_mask = sp < split
    zero = tl.zeros([BLOCK_C], tl.float64)
    r = tl.load(invstd_ptr + ch, mask=ch_mask, other=1.0).to(tl.float64)
    w = _channel_load(weight_ptr, ch, ch_mask, zero, HAS_W, 1.0)
    gw = _channel_load(ggw_ptr, ch, ch_mask, zero, HAS_GGW, 0.0)
    gb = _channel_load(ggb_ptr, ch, ch_mask, zero, HAS_GGB, 0.0)
    g = w * r
    q = zero
    if SUM_Q:
        q = _channel_sum(part_ptr, ch, ch_mask, sp, sp_mask, split, 2)
    if TRAINING:
        md = zero + M  # M as float64 (a plain int argument, or a constexpr when it is 1)
        m_g = zero
        m_gx = zero
        if SUM_G:
            m_g = _channel_sum(part_ptr, ch, ch_mask, sp, sp_mask, split, 0) / md
            m_gx = _channel_sum(part_ptr, ch, ch_mask, sp, sp_mask, split, 1) * r / md
        m_dy = zero
        a = zero  # mean(dy * xhat)
        if GIVEN_DY:
            m_dy = tl.load(sum_dy_ptr + ch, mask=ch_mask, other=0.0).to(tl.float64) / md
            a = tl.load(sum_dyx_ptr + ch, mask=ch_mask, other=0.0).to(tl.float64) / md
        elif SUM_DY:
            m_dy = _channel_sum(part_ptr, ch, ch_mask, sp, sp_mask, split, 3) / md
            a = _channel_sum(part_ptr, ch, ch_mask, sp, sp_mask, split, 4) * r / md
        big_q = q - md * (m_dy * m_g + a * m_gx)  # sum(ggx * P(dy))
        bcoef = gw - g * m_gx
        mean_u = bcoef * m_dy - g * a * m_g
        mean_ux = bcoef * a - g * a * m_gx
        a1 = g
        b1 = bcoef * r
        c1 = gb - g * m_g
        a2 = -r * g * a
        b2 = -(r * r) * (mean_ux + g * big_q / md)
        c2 = -r * mean_u
        d2 = r * bcoef
        d_w = r * big_q
    else:
        a1 = g
        b1 = gw * r
        c1 = gb
        a2 = zero
        b2 = zero
        c2 = zero
        d2 = gw * r
        d_w = r * q
    if WRITE:
        mu = tl.load(mean_ptr + ch, mask=ch_mask, other=0.0)
        ty = coef_ptr.dtype.element_ty
        tl.store(coef_ptr + 0 * C + ch, mu.to(ty), mask=ch_mask)
        tl.store(coef_ptr + 1 * C + ch, a1.to(ty), mask=ch_mask)
        tl.store(coef_ptr + 2 * C + ch, b1.to(ty), mask=ch_mask)
        tl.store(coef_ptr + 3 * C + ch, c1.to(ty), mask=ch_mask)
        tl.store(coef_ptr + 4 * C + ch, a2.to(ty), mask=ch_mask)
        tl.store(coef_ptr + 5 * C + ch, b2.to(ty), mask=ch_mask)
        tl.store(coef_ptr + 6 * C + ch, c2.to(ty), mask=ch_mask)
        tl.store(coef_ptr + 7 * C + ch, d2.to(ty), mask=ch_mask)
    if NEED_W:
        tl.store(dw_ptr + ch, d_w, mask=ch_mask)


@triton.jit
def _bn_apply_kernel(
    ggx_ptr, dy_ptr, x_ptr, coef_ptr, d_dy_ptr, d_x_ptr,
    numel, C, S,
    HAS_GGX: tl.constexpr, NEED_DY: tl.constexpr, NEED_X: tl.constexpr, ONE_CHANNEL: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr,
):
    """``d_dy`` and/or ``d_x`` for ``BLOCK`` consecutive elements of the contiguous ``(N, C, S)`` arrays.

    With ``ONE_CHANNEL`` (``BLOCK`` divides ``S``) the block lies in one channel and its coefficients are
    scalars; otherwise each element gathers them by its channel ``(index // S) % C``, which lies in
    ``[0, C)`` for masked lanes too, so the gathers need no mask.
    """
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    if ONE_CHANNEL:
        ch = (start // S) % C
    else:
        ch = (offs // S) % C
    mu = tl.load(coef_ptr + 0 * C + ch)
    xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mu
    g = tl.zeros([BLOCK], ACC)
    if HAS_GGX:
        g = tl.load(ggx_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NEED_DY:
        a1 = tl.load(coef_ptr + 1 * C + ch)
        b1 = tl.load(coef_ptr + 2 * C + ch)
        c1 = tl.load(coef_ptr + 3 * C + ch)
        out = a1 * g + b1 * xc + c1
        tl.store(d_dy_ptr + offs, out.to(d_dy_ptr.dtype.element_ty), mask=mask)
    if NEED_X:
        d = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        a2 = tl.load(coef_ptr + 4 * C + ch)
        b2 = tl.load(coef_ptr + 5 * C + ch)
        c2 = tl.load(coef_ptr + 6 * C + ch)
        d2 = tl.load(coef_ptr + 7 * C + ch)
        out = a2 * g + b2 * xc + d2 * d + c2
        tl.store(d_x_ptr + offs, out.to(d_x_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launcher

# The kernels were built for the interpreter when TRITON_INTERPRET=1 was set at import time.
_INTERPRETED = not isinstance(_bn_apply_kernel, triton.runtime.JITFunction)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def _num_programs_target(device: torch.device) -> int:
    """Programs the sums kernel aims for: eight per multiprocessor, so that a GPU holds enough loads in
    flight to reach its memory bandwidth; a handful under the interpreter, which runs them one by one.
    Cached per device: every BatchNorm layer asks, on each double backward."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _check(ggx, ggw, ggb, dy, x, weight, mean, invstd, sum_dy, sum_dy_xhat) -> None:
    """The argument checks of the C++ binding (shapes, dtypes, devices; no values, so no host sync)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, ...), got {tuple(x.shape)}")
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"x is on {x.device}; the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before qgrad.kernels is imported, to run them on the CPU)"
        )
    for name, t in (("dy", dy), ("ggx", ggx)):
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put both on one device")
    channels = x.shape[1]
    for name, t, required in (
        ("ggw", ggw, False), ("ggb", ggb, False), ("weight", weight, False), ("mean", mean, True),
        ("invstd", invstd, True), ("sum_dy", sum_dy, False), ("sum_dy_xhat", sum_dy_xhat, False),
    ):
        if t is None:
            if required:
                raise ValueError(f"{name} must be a tensor, got None")
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put both on one device")
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{name} must be 1-d of length {channels}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")


def _padded(size: int, block: int) -> int:
    return cdiv(size, block) * block


def _sum_tiles(n: int, c: int, s: int) -> Tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_C, BLOCK_S)`` of the sums kernel: whole rows of ``S`` up to ``_SUM_TILE`` elements;
    neighbouring channels while a row of one is shorter than ``_SUM_RUN`` (so that each tile row is a
    contiguous run of at least that many elements in memory: ``(N, C)`` inputs read ``_SUM_RUN`` channels
    side by side); and as many rows as fill the tile."""
    block_s = min(next_power_of_2(s), _SUM_TILE)
    block_c = max(1, min(next_power_of_2(c), _SUM_RUN // block_s))
    block_n = max(1, min(next_power_of_2(n), _SUM_TILE // (block_c * block_s)))
    return block_n, block_c, block_s


def batch_norm_double_backward(
    ggx: Optional[torch.Tensor],
    ggw: Optional[torch.Tensor],
    ggb: Optional[torch.Tensor],
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    invstd: torch.Tensor,
    sum_dy: Optional[torch.Tensor],
    sum_dy_xhat: Optional[torch.Tensor],
    training: bool,
    need_dy: bool,
    need_x: bool,
    need_w: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """BatchNorm's double backward; the arguments and results of ``qgrad._C.batch_norm_double_backward``.

    Args:
        ggx: gradient w.r.t. BatchNorm's ``dx``, shape and dtype of ``x``, or None for zero.
        ggw, ggb: gradients w.r.t. ``dw`` and ``db``, ``(C,)``, or None for zero.
        dy: the output gradient of the first backward, shape and dtype of ``x``.
        x: ``(N, C, *)`` float32, float64, float16 or bfloat16 (CUDA, or CPU under ``TRITON_INTERPRET=1``);
            ``x``, ``dy`` and ``ggx`` are copied to contiguous ``(N, C, S)`` first unless they already are
            (a channels-last input is copied).
        weight: ``(C,)`` or None for ones.
        mean, invstd: the ``(C,)`` statistics of the forward (batch statistics in training mode, running
            ones in eval mode, ``invstd = 1 / sqrt(var + eps)``).
        sum_dy, sum_dy_xhat: ``db`` and ``dw`` of the first backward, ``(C,)``; used only when both are
            given (otherwise recomputed from ``dy``).
        training: batch statistics (their dependence on ``x`` is part of the derivatives) or constant ones.
        need_dy, need_x, need_w: which results to compute.

    Per-channel tensors may have any floating dtype; they are read in float64 (``mean`` in the accumulation
    dtype, in which it is subtracted from ``x``). Sums accumulate in float32 (float64 for float64 inputs)
    per program and are added across programs in float64; coefficients are computed in float64 and applied
    in the accumulation dtype.

    Returns:
        ``(d_dy, d_x, d_w)``, each None unless requested: ``d_dy`` and ``d_x`` contiguous with the shape and
        dtype of ``x``, ``d_w`` float64 ``(C,)`` (the gradient w.r.t. a weight of ones when ``weight`` is
        None).
    """
    _check(ggx, ggw, ggb, dy, x, weight, mean, invstd, sum_dy, sum_dy_xhat)
    device = x.device
    channels = x.shape[1]
    numel = x.numel()
    d_dy = torch.empty(x.shape, dtype=x.dtype, device=device) if need_dy else None
    d_x = torch.empty(x.shape, dtype=x.dtype, device=device) if need_x else None
    d_w = torch.empty(channels, dtype=torch.float64, device=device) if need_w else None
    if numel == 0:
        return (
            None if d_dy is None else d_dy.zero_(),
            None if d_x is None else d_x.zero_(),
            None if d_w is None else d_w.zero_(),
        )
    if not (need_dy or need_x or need_w):
        return None, None, None

    n = x.shape[0]
    s = numel // (n * channels)
    m = n * s
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    x = x.contiguous()
    dy = dy.contiguous()
    ggx = None if ggx is None else ggx.contiguous()
    per_channel = [None if t is None else t.contiguous() for t in (weight, ggw, ggb, sum_dy, sum_dy_xhat)]
    weight, ggw, ggb, sum_dy, sum_dy_xhat = per_channel
    mean, invstd = mean.contiguous(), invstd.contiguous()
    given_dy = sum_dy is not None and sum_dy_xhat is not None
    has_ggx = ggx is not None
    block_n, block_c, block_s = _sum_tiles(n, channels, s)
    block = next((b for b in _APPLY_BLOCKS if s % b == 0), _APPLY_BLOCKS[0])
    # the largest offset any lane forms, masked ones included: the last row, channel and column blocks of
    # the sums kernel may run past N, C and S, the last elementwise block past numel
    reach = (_padded(n, block_n) * channels + _padded(channels, block_c)) * s + _padded(s, block_s)
    int64 = max(reach, _padded(numel, block)) > _INT32_LIMIT

    # The sums each result depends on: d_dy needs m(ggx) and m(ggx * xhat) (training); d_x and d_w also
    # need q = sum(ggx * dy) and, in training mode, m(dy) and m(dy * xhat); eval-mode d_x needs no sum.
    sum_g = training and has_ggx
    sum_q = has_ggx and (need_w or (training and need_x))
    sum_dy_needed = training and (need_x or need_w) and not given_dy

    # an absent pointer argument is never read (its flag is constexpr); invstd stands in for it
    dummy = invstd
    split = 1
    part = dummy
    with torch.cuda.device(device) if x.is_cuda else nullcontext():
        if sum_g or sum_q or sum_dy_needed:
            s_blocks = cdiv(s, block_s)
            num_tiles = cdiv(n, block_n) * s_blocks
            channel_blocks = cdiv(channels, block_c)
            split = max(1, min(num_tiles, cdiv(_num_programs_target(device), channel_blocks)))
            tiles_per_program = cdiv(num_tiles, split)
            split = cdiv(num_tiles, tiles_per_program)  # no program without a tile
            part = torch.empty((channels, split, _NUM_SUMS), dtype=acc, device=device)
            _bn_sums_kernel[(channel_blocks, split)](
                ggx if has_ggx else dummy, dy, x, mean, part,
                n, channels, s, s_blocks, num_tiles, tiles_per_program,
                SUM_G=sum_g, SUM_Q=sum_q, SUM_DY=sum_dy_needed, ACC=acc_tl,
                BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_S=block_s, INT64=int64,
                num_warps=8 if block_n * block_c * block_s >= 2048 else 4,
            )

        write = need_dy or need_x
        coef = torch.empty((8, channels), dtype=acc, device=device) if write else dummy
        block_split = next_power_of_2(split)
        coef_block = max(1, min(_COEF_BLOCK_C, next_power_of_2(channels), _COEF_TILE // block_split))
        _bn_coef_kernel[(cdiv(channels, coef_block),)](
            part, mean, invstd,
            *(dummy if t is None else t for t in (weight, ggw, ggb)),
            sum_dy if given_dy else dummy, sum_dy_xhat if given_dy else dummy,
            coef, d_w if need_w else dummy,
            channels, m, split,
            TRAINING=training, HAS_W=weight is not None, HAS_GGW=ggw is not None, HAS_GGB=ggb is not None,
            SUM_G=sum_g, SUM_Q=sum_q, SUM_DY=sum_dy_needed, GIVEN_DY=given_dy and training,
            WRITE=write, NEED_W=need_w, BLOCK_C=coef_block, BLOCK_SPLIT=block_split,
            num_warps=4,
        )
        if not write:
            return None, None, d_w

        _bn_apply_kernel[(cdiv(numel, block),)](
            ggx if has_ggx else dummy, dy, x, coef, d_dy if need_dy else dummy, d_x if need_x else dummy,
            numel, channels, s,
            HAS_GGX=has_ggx, NEED_DY=need_dy, NEED_X=need_x, ONE_CHANNEL=s % block == 0,
            ACC=acc_tl, BLOCK=block, INT64=int64,
            num_warps=4,
        )
    return d_dy, d_x, d_w
