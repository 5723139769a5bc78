"""Fused Triton fake-quantization: forward, and backward with the LSQ scale / zero-point sums in one pass.

Semantics are those of :mod:`qgrad.reference`, bit for bit for ``y`` and ``dx``:

* arithmetic in float32 (inputs may be float32, float16 or bfloat16; ``y`` and ``dx`` are cast back with
  round-to-nearest-even, like ``Tensor.to``);
* ``x / scale`` is an IEEE round-to-nearest division (``tl.math.div_rn``). Triton's ``/`` on float32
  compiles to an approximate division on NVIDIA GPUs, which differs from PyTorch's in the last bit and
  would move ties and clip edges;
* ``round`` is round-half-to-even, computed exactly by :func:`_round_half_even` (no libdevice call, so the
  same code runs under ``TRITON_INTERPRET=1``); the zero point is rounded the same way, on the device;
* ``q = clamp(round(x/s) + zp, quant_min, quant_max)``, ``y = (q - zp) * s``; NaN passes through the clamp
  (as in ``torch.clamp``), so a NaN input gives a NaN output;
* the gradients use the *unrounded* ``v = x/s + zp``: inside when ``quant_min <= v <= quant_max``,
  ``dx = dy`` inside and 0 elsewhere; ``dscale = grad_scale * sum(dy * e_s)`` and
  ``dzp = grad_scale * sum(dy * e_z)`` with ``e_s = round(x/s) - x/s`` inside, ``quant_min - zp`` below,
  ``quant_max - zp`` above (NaN counts as above), ``e_z = 0`` inside and ``-s`` outside.

How a tensor is mapped onto the kernels
---------------------------------------
The dims of ``x`` are put in memory order (sorted by ``x``'s strides, as PyTorch's elementwise ops do),
size-1 dims are dropped, and neighbours that are contiguous with each other in every input (``x``, and
``dy`` in the backward) are merged; the channel dim is never merged. The result is addressed as four
logical dims ``(i0, i1, i2, i3)`` with their own strides per input, read as a matrix of
``M = D0*D1`` rows and ``N = D2*D3`` columns (``m = i0*D1 + i1``, ``n = i2*D3 + i3``), tiled by
``[BLOCK_M, BLOCK_N]``. The channel index of a per-channel scale is

* ``i1`` (a row property, mode ``_ROW``) when the elements after the channel dim number at least
  ``_ROW_MIN_INNER``: e.g. weights ``(C_out, ...)`` on axis 0, NCHW activations on axis 1;
* ``i2`` (a column property, mode ``_COL``) otherwise: e.g. the last axis, channels-last activations.

Divisions by ``D1`` / ``D3`` happen once per tile row / column, never per element. Every layout whose
merged form fits these four dims runs **without a copy**: contiguous tensors, any permutation of a
contiguous tensor (``x.t()``, ``x.permute(...)``, channels-last), slices with steps or offsets of those
(``x[:, ::2]``, ``x.t()[1:]``), expanded (stride-0) tensors, and a ``dy`` whose layout differs from
``x``'s. Concretely: per-tensor needs at most 4 merged dims; per-channel needs at most one merged dim
before and two after the channel dim (``_ROW``) or two before and one after (``_COL``). Anything else
(e.g. a 5-d tensor with steps on every dim) is first copied to the memory order of ``x``; ``y`` and
``dx`` keep ``x``'s dim order either way (contiguous when ``x`` is contiguous).

The backward writes per-program partial sums of ``dy * e_s`` and ``dy * e_z`` (one value per program,
per tile row, or per tile column) to a small float32 buffer that ``torch.sum`` reduces in a fixed order:
no atomics, deterministic, no host synchronization. Offsets are int32 unless an index or an address of any
operand could exceed ``2**31 - 1``, in which case the kernels compute them in int64 (``INT64``).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2

__all__ = ["fake_quant_fwd", "fake_quant_bwd"]

# Channel-index modes of the kernels.
_NONE, _ROW, _COL = 0, 1, 2
# Per-channel tensors with at least this many elements after the channel dim take the _ROW mapping: a
# tile row is then a contiguous run of >= 64 elements of one channel, and the backward's per-row partial
# buffer holds at most numel / 64 values. Below it, rows would be short and mostly masked, so the channel
# moves to the columns (_COL), where consecutive channels fill a tile row.
_ROW_MIN_INNER = 64
# Elements per program tile, and the widest tile row.
_TILE = 2048
# _COL backward: tile rows at most this wide, so narrow problems still split into many column blocks.
_COL_BWD_BLOCK_N = 256
# _COL backward: each program sums at least this many rows, so the partial buffer holds <= numel / 32.
_COL_MIN_ROWS = 32
# Largest offset the int32 path may form; a module attribute so that tests can force the int64 path.
_INT32_LIMIT = 2**31 - 1


@triton.jit
def _round_half_even(v):
    """Round float32 ``v`` to the nearest integer, ties to even, exactly like ``torch.round`` (incl. -0.0).

    For ``|v| < 2**23``, ``|v| + 2**23`` lies in ``[2**23, 2**24)`` where float32 spacing is 1, so the
    IEEE addition itself rounds ``|v|`` to an integer, ties to even (2**23 is even, so the parity of the sum
    is that of the rounded value); subtracting 2**23 again is exact. Larger magnitudes, inf and NaN are
    already integral (or NaN) and pass through. The sign bit of ``v`` is copied back, which gives -0.0 for
    ``v`` in ``(-0.5, -0.0]`` as ``torch.round`` does.
    """
    a = tl.abs(v)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(a < 8388608.0, r, a)
    bits = r.to(tl.uint32, bitcast=True) | (v.to(tl.uint32, bitcast=True) & 0x80000000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _row_offsets(m, D1, stride0, stride1, SPLIT_M: tl.constexpr):
    """Offsets of rows ``m = i0*D1 + i1`` for an operand with strides ``(stride0, stride1)`` of ``(i0, i1)``."""
    if SPLIT_M:
        i0 = m // D1
        return i0 * stride0 + (m - i0 * D1) * stride1
    else:
        return m * stride1


@triton.jit
def _row_channel(m, D1, SPLIT_M: tl.constexpr):
    """``i1`` of rows ``m = i0*D1 + i1``: the channel index in ``_ROW`` mode."""
    if SPLIT_M:
        return m % D1
    else:
        return m


@triton.jit
def _col_offsets(n, D3, stride2, stride3, SPLIT_N: tl.constexpr):
    """Offsets of columns ``n = i2*D3 + i3`` for an operand with strides ``(stride2, stride3)`` of ``(i2, i3)``."""
    if SPLIT_N:
        i2 = n // D3
        return i2 * stride2 + (n - i2 * D3) * stride3
    else:
        return n * stride2


@triton.jit
def _col_channel(n, D3, SPLIT_N: tl.constexpr):
    """``i2`` of columns ``n = i2*D3 + i3``: the channel index in ``_COL`` mode."""
    if SPLIT_N:
        return n // D3
    else:
        return n


@triton.jit
def _load_params(scale_ptr, zp_ptr, ch, mask, scale_stride, zp_stride):
    """Per-channel ``(scale, round(zero_point))`` in float32; masked lanes get (1, 0) so they stay finite."""
    s = tl.load(scale_ptr + ch * scale_stride, mask=mask, other=1.0).to(tl.float32)
    zp = tl.load(zp_ptr + ch * zp_stride, mask=mask, other=0.0).to(tl.float32)
    return s, _round_half_even(zp)


@triton.jit
def _fake_quant_fwd_kernel(
    x_ptr, y_ptr, scale_ptr, zp_ptr,
    M, N, D1, D3,
    xs0, xs1, xs2, xs3,
    scale_stride, zp_stride,
    quant_min, quant_max,
    num_n_blocks,
    CH_MODE: tl.constexpr, SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INT64: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y = (clamp(round(x/s) + zp, qmin, qmax) - zp) * s``.

    ``x`` is read through the strides ``xs0..xs3`` of the logical dims ``(i0, i1, i2, i3)``; ``y`` is the
    contiguous ``(M, N)`` matrix. Program ``pid`` covers row block ``pid // num_n_blocks`` and column block
    ``pid % num_n_blocks``.
    """
    pid = tl.program_id(0)
    pid_m = pid // num_n_blocks
    pid_n = pid - pid_m * num_n_blocks
    if INT64:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    n_mask = n < N
    mask = m_mask[:, None] & n_mask[None, :]

    x_row = _row_offsets(m, D1, xs0, xs1, SPLIT_M)
    x_col = _col_offsets(n, D3, xs2, xs3, SPLIT_N)
    if CH_MODE == 1:
        s, zp = _load_params(scale_ptr, zp_ptr, _row_channel(m, D1, SPLIT_M), m_mask, scale_stride, zp_stride)
        s = s[:, None]
        zp = zp[:, None]
    elif CH_MODE == 2:
        s, zp = _load_params(scale_ptr, zp_ptr, _col_channel(n, D3, SPLIT_N), n_mask, scale_stride, zp_stride)
        s = s[None, :]
        zp = zp[None, :]
    else:
        s = tl.load(scale_ptr).to(tl.float32)
        zp = _round_half_even(tl.load(zp_ptr).to(tl.float32))

    x = tl.load(x_ptr + (x_row[:, None] + x_col[None, :]), mask=mask, other=0.0).to(tl.float32)
    q = _round_half_even(tl.math.div_rn(x, s)) + zp
    # where() rather than minimum/maximum: a NaN compares false and passes through, as in torch.clamp
    q = tl.where(q < quant_min, quant_min, q)
    q = tl.where(q > quant_max, quant_max, q)
    y = (q - zp) * s
    tl.store(y_ptr + (m[:, None] * N + n[None, :]), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quant_bwd_kernel(
    dy_ptr, x_ptr, dx_ptr, scale_ptr, zp_ptr, ds_part_ptr, dz_part_ptr,
    M, N, D1, D3,
    xs0, xs1, xs2, xs3,
    gs0, gs1, gs2, gs3,
    scale_stride, zp_stride,
    quant_min, quant_max,
    num_n_blocks, m_iters,
    CH_MODE: tl.constexpr, SPLIT_M: tl.constexpr, SPLIT_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INT64: tl.constexpr,
    NEED_DS: tl.constexpr, NEED_DZ: tl.constexpr,
):
    """``dx`` for ``m_iters`` consecutive row tiles of one column block, plus partial LSQ sums.

    ``x`` and ``dy`` are read through their own strides (``xs*``, ``gs*``); ``dx`` is the contiguous
    ``(M, N)`` matrix. Program ``pid`` covers rows ``[pid_m * BLOCK_M * m_iters, ... + BLOCK_M * m_iters)``
    of column block ``pid_n``. The partial sums of ``dy * e_s`` (``NEED_DS``) and ``dy * e_z``
    (``NEED_DZ``) go to float32 buffers laid out by ``CH_MODE``:

    * ``_NONE``: one total per program, buffer ``(num_programs,)``;
    * ``_ROW`` (``m_iters == 1``): one sum per tile row, buffer ``(num_n_blocks, M)``;
    * ``_COL``: one sum per tile column, buffer ``(num_m_chunks, N)``.
    """
    pid = tl.program_id(0)
    pid_m = pid // num_n_blocks
    pid_n = pid - pid_m * num_n_blocks
    if INT64:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    row_start = pid_m * (BLOCK_M * m_iters)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    x_col = _col_offsets(n, D3, xs2, xs3, SPLIT_N)
    g_col = _col_offsets(n, D3, gs2, gs3, SPLIT_N)
    if CH_MODE == 2:
        s_col, zp_col = _load_params(
            scale_ptr, zp_ptr, _col_channel(n, D3, SPLIT_N), n_mask, scale_stride, zp_stride
        )
    elif CH_MODE == 0:
        s_all = tl.load(scale_ptr).to(tl.float32)
        zp_all = _round_half_even(tl.load(zp_ptr).to(tl.float32))

    acc_s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(m_iters):
        m = row_start + it * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < M
        mask = m_mask[:, None] & n_mask[None, :]
        x_row = _row_offsets(m, D1, xs0, xs1, SPLIT_M)
        g_row = _row_offsets(m, D1, gs0, gs1, SPLIT_M)
        if CH_MODE == 1:
            s_row, zp_row = _load_params(
                scale_ptr, zp_ptr, _row_channel(m, D1, SPLIT_M), m_mask, scale_stride, zp_stride
            )
            s = s_row[:, None]
            zp = zp_row[:, None]
        elif CH_MODE == 2:
            s = s_col[None, :]
            zp = zp_col[None, :]
        else:
            s = s_all
            zp = zp_all

        x = tl.load(x_ptr + (x_row[:, None] + x_col[None, :]), mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + (g_row[:, None] + g_col[None, :]), mask=mask, other=0.0).to(tl.float32)
        xs = tl.math.div_rn(x, s)
        v = xs + zp
        inside = (v >= quant_min) & (v <= quant_max)
        dx = tl.where(inside, g, 0.0)
        tl.store(dx_ptr + (m[:, None] * N + n[None, :]), dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DS:
            below = v < quant_min
            e_s = tl.where(inside, _round_half_even(xs) - xs, tl.where(below, quant_min - zp, quant_max - zp))
            acc_s += tl.where(mask, g * e_s, 0.0)
        if NEED_DZ:
            e_z = tl.where(inside, 0.0, -s)
            acc_z += tl.where(mask, g * e_z, 0.0)

    if CH_MODE == 0:
        if NEED_DS:
            tl.store(ds_part_ptr + pid, tl.sum(tl.sum(acc_s, axis=1), axis=0))
        if NEED_DZ:
            tl.store(dz_part_ptr + pid, tl.sum(tl.sum(acc_z, axis=1), axis=0))
    elif CH_MODE == 1:
        m = row_start + tl.arange(0, BLOCK_M)
        part = pid_n * M + m
        if NEED_DS:
            tl.store(ds_part_ptr + part, tl.sum(acc_s, axis=1), mask=m < M)
        if NEED_DZ:
            tl.store(dz_part_ptr + part, tl.sum(acc_z, axis=1), mask=m < M)
    else:
        part = pid_m * N + n
        if NEED_DS:
            tl.store(ds_part_ptr + part, tl.sum(acc_s, axis=0), mask=n_mask)
        if NEED_DZ:
            tl.store(dz_part_ptr + part, tl.sum(acc_z, axis=0), mask=n_mask)


# --------------------------------------------------------------------------------------------- launchers

# The kernels were built for the interpreter when TRITON_INTERPRET=1 was set at import time.
_INTERPRETED = not isinstance(_fake_quant_fwd_kernel, triton.runtime.JITFunction)


@dataclass(frozen=True)
class _Plan:
    """How ``x`` (and ``dy``) map onto the kernels' logical dims ``(i0, i1, i2, i3)``.

    ``sizes`` are ``(D0, D1, D2, D3)``; ``strides[k]`` the four strides of input ``k`` (in the order the
    inputs were given); ``perm`` the order of ``x``'s dims in memory (outputs are allocated contiguous in that
    order); ``copied`` whether the inputs had to be copied first because their layout did not fit.
    """

    mode: int
    sizes: Tuple[int, int, int, int]
    strides: Tuple[Tuple[int, int, int, int], ...]
    perm: Tuple[int, ...]
    copied: bool

    @property
    def rows(self) -> int:
        return self.sizes[0] * self.sizes[1]

    @property
    def cols(self) -> int:
        return self.sizes[2] * self.sizes[3]


def _merged_dims(shape: Sequence[int], strides: Sequence[Sequence[int]], channel: Optional[int]):
    """Drop size-1 dims and merge neighbours contiguous in every operand; never touch ``channel``.

    Returns ``(dims, channel_pos)``: ``dims`` a list of ``(size, (stride per operand))``, ``channel_pos``
    the index of the channel dim in it (``None`` per-tensor).
    """
    dims: List[Tuple[int, Tuple[int, ...]]] = []
    channel_pos = None
    prev_mergeable = False
    for d, size in enumerate(shape):
        if d == channel:
            channel_pos = len(dims)
            dims.append((size, tuple(s[d] for s in strides)))
            prev_mergeable = False
            continue
        if size == 1:
            continue
        st = tuple(s[d] for s in strides)
        if prev_mergeable and all(ps == s * size for ps, s in zip(dims[-1][1], st)):
            dims[-1] = (dims[-1][0] * size, st)
        else:
            dims.append((size, st))
        prev_mergeable = True
    return dims, channel_pos


def _pack(dims, slots: Sequence[int], n_ops: int):
    """Place merged dims into the four logical slots listed in ``slots``; the others get size 1."""
    sizes = [1, 1, 1, 1]
    strides = [[0, 0, 0, 0] for _ in range(n_ops)]
    for slot, (size, st) in zip(slots, dims):
        sizes[slot] = size
        for k in range(n_ops):
            strides[k][slot] = st[k]
    return tuple(sizes), tuple(tuple(s) for s in strides)


def _fit(dims, channel_pos: Optional[int], n_ops: int):
    """The ``(mode, sizes, strides)`` of merged ``dims``, or ``None`` when they need more than 4 slots."""
    if channel_pos is None:
        # Per-tensor: the innermost merged dim fills the column slot i2 so that the common cases
        # (1 to 3 dims) need no per-column division; a 4th dim splits the columns.
        slots = {0: (), 1: (2,), 2: (1, 2), 3: (0, 1, 2), 4: (0, 1, 2, 3)}.get(len(dims))
        if slots is None:
            return None
        return (_NONE,) + _pack(dims, slots, n_ops)
    outer, channel, inner = dims[:channel_pos], dims[channel_pos], dims[channel_pos + 1:]
    inner_numel = 1
    for size, _ in inner:
        inner_numel *= size
    row_ok = len(outer) <= 1 and len(inner) <= 2
    col_ok = len(outer) <= 2 and len(inner) <= 1
    use_row = row_ok and (inner_numel >= _ROW_MIN_INNER or not col_ok)
    if use_row:
        # (outer -> i0, channel -> i1, inner -> i2[, i3])
        slots = (0,) * len(outer) + (1,) + (2, 3)[: len(inner)]
        return (_ROW,) + _pack(outer + [channel] + inner, slots, n_ops)
    if col_ok:
        # (outer -> [i0,] i1, channel -> i2, inner -> i3)
        slots = (0, 1)[2 - len(outer):] + (2,) + (3,) * len(inner)
        return (_COL,) + _pack(outer + [channel] + inner, slots, n_ops)
    return None


def _make_plan(tensors: Sequence[torch.Tensor], channel: Optional[int]) -> Tuple[_Plan, List[torch.Tensor]]:
    """Map same-shaped ``tensors`` (``x`` first) onto the kernels; returns the plan and the tensors to read.

    The returned tensors are the inputs themselves unless the layout did not fit, in which case they are
    copies made contiguous in the memory order of ``x`` (``plan.copied``).
    """
    x = tensors[0]
    nd = x.dim()
    # memory order of x: larger strides first; the stable sort keeps equal strides in logical order
    perm = tuple(sorted(range(nd), key=lambda d: -x.stride(d)))
    shape = [x.shape[d] for d in perm]
    ch = perm.index(channel) if channel is not None else None
    strides = [[t.stride(d) for d in perm] for t in tensors]
    fit = _fit(*_merged_dims(shape, strides, ch), len(tensors))
    copied = False
    if fit is None:
        tensors = [t.permute(perm).contiguous().permute(_inverse(perm)) for t in tensors]
        strides = [[t.stride(d) for d in perm] for t in tensors]
        fit = _fit(*_merged_dims(shape, strides, ch), len(tensors))
        copied = True
    mode, sizes, st = fit
    return _Plan(mode, sizes, st, perm, copied), list(tensors)


def _inverse(perm: Sequence[int]) -> Tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _empty_like_plan(x: torch.Tensor, plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """An output shaped like ``x``, contiguous in the memory order ``plan.perm`` (the kernels' (M, N))."""
    out = torch.empty([x.shape[d] for d in plan.perm], dtype=dtype, device=x.device)
    return out.permute(_inverse(plan.perm))


def _blocks(plan: _Plan, max_block_n: int) -> Tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)``: a tile of about ``_TILE`` elements, as wide as the rows allow."""
    block_n = min(next_power_of_2(plan.cols), max_block_n)
    block_m = min(next_power_of_2(plan.rows), max(1, _TILE // block_n))
    return block_m, block_n


def _needs_int64(plan: _Plan, block_m: int, block_n: int, m_iters: int = 1) -> bool:
    """Whether any index or address offset the kernels form could leave int32.

    Takes the largest row and column index any lane of the grid forms (masked lanes of the last tiles
    included, so that no intermediate overflows either) and bounds with them every operand's offset, the
    ``(M, N)`` outputs and the partial-sum buffers.
    """
    (d0, d1, _, d3), rows, cols = plan.sizes, plan.rows, plan.cols
    row_chunk = block_m * m_iters
    m_max = cdiv(rows, row_chunk) * row_chunk - 1
    n_max = cdiv(cols, block_n) * block_n - 1
    index_max = (
        (m_max // d1, d1 - 1) if d0 > 1 else (0, m_max),
        (n_max // d3, d3 - 1) if d3 > 1 else (n_max, 0),
    )
    reach = index_max[0] + index_max[1]
    worst = m_max * cols + n_max  # outputs; the partial buffers are smaller than this bound
    for strides in plan.strides:
        worst = max(worst, sum(i * abs(s) for i, s in zip(reach, strides)))
    return worst > _INT32_LIMIT


def _num_programs_target(device: torch.device) -> int:
    """Programs the backward aims for: a few waves of the GPU's SMs (a handful under the interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _check(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: Optional[int]):
    """Validate the launcher arguments (shapes, dtypes, devices only; no values, so no host sync)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"x must be float32, float16 or bfloat16 for the Triton kernels, got {x.dtype} "
            "(float64 runs on the reference implementation)"
        )
    for name, p in (("scale", scale), ("zero_point", zero_point)):
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}; put both on one device")
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
        if p.dim() > 1:
            raise ValueError(f"{name} must be 0-d or 1-d, got shape {tuple(p.shape)}")
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"x is on {x.device}; the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before qgrad.kernels is imported, to run them on the CPU)"
        )
    if axis is not None:
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis} is out of range for x with {x.dim()} dimensions")
        axis %= x.dim()
    if (scale.dim() == 1 and scale.numel() != 1) or (zero_point.dim() == 1 and zero_point.numel() != 1):
        if axis is None:
            raise ValueError(
                f"per-channel scale/zero_point (shapes {tuple(scale.shape)}, {tuple(zero_point.shape)}) need axis"
            )
        channels = x.shape[axis]
        if scale.dim() != 1 or scale.numel() != channels:
            raise ValueError(
                f"per-channel scale along axis {axis} must be 1-d of length {channels}, got shape {tuple(scale.shape)}"
            )
        if zero_point.dim() == 1 and zero_point.numel() != channels:
            raise ValueError(
                f"per-channel zero_point along axis {axis} must be 0-d or 1-d of length {channels}, "
                f"got shape {tuple(zero_point.shape)}"
            )
        return axis
    # one scale value: per-tensor, whatever axis says (as in the reference)
    return None


def _param_strides(scale: torch.Tensor, zero_point: torch.Tensor) -> Tuple[int, int]:
    """Element strides of scale and zero point; a single value has stride 0 (read by every channel)."""
    return (scale.stride(0) if scale.numel() > 1 else 0), (zero_point.stride(0) if zero_point.numel() > 1 else 0)


def fake_quant_fwd(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int],
) -> torch.Tensor:
    """Fused forward fake-quantization, bit-identical to :func:`qgrad.reference.fake_quant_ref`.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape and strides (CUDA, or CPU under
            ``TRITON_INTERPRET=1``).
        scale: float32, 0-d (per-tensor) or 1-d of length ``x.shape[axis]`` (per-channel).
        zero_point: float32, 0-d or 1-d like ``scale``; rounded half-to-even on the device.
        quant_min, quant_max: integer grid bounds, ``|.| <= 2**24``.
        axis: channel dim for a per-channel ``scale`` (non-negative; negative values count from the end),
            or ``None``.

    Returns:
        ``y`` with the shape and dtype of ``x``, laid out in ``x``'s memory order (contiguous for contiguous
        ``x``).
    """
    axis = _check(x, scale, zero_point, axis)
    if x.numel() == 0:
        return torch.empty_like(x)
    plan, (xr,) = _make_plan([x], axis)
    y = _empty_like_plan(x, plan, x.dtype)
    block_m, block_n = _blocks(plan, _TILE)
    num_n_blocks = cdiv(plan.cols, block_n)
    grid = (cdiv(plan.rows, block_m) * num_n_blocks,)
    scale_stride, zp_stride = _param_strides(scale, zero_point)
    (xst,) = plan.strides
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _fake_quant_fwd_kernel[grid](
            xr, y, scale, zero_point,
            plan.rows, plan.cols, plan.sizes[1], plan.sizes[3],
            *xst,
            scale_stride, zp_stride,
            float(quant_min), float(quant_max),
            num_n_blocks,
            CH_MODE=plan.mode, SPLIT_M=plan.sizes[0] > 1, SPLIT_N=plan.sizes[3] > 1,
            BLOCK_M=block_m, BLOCK_N=block_n, INT64=_needs_int64(plan, block_m, block_n),
            num_warps=4,
        )
    return y


def fake_quant_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int],
    grad_scale: float,
    need_dscale: bool,
    need_dzp: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused backward: ``dx`` and the LSQ ``dscale`` / ``dzp`` sums in one pass over ``x`` and ``dy``.

    Same conventions as :func:`qgrad.reference.fake_quant_backward_ref`; ``dx`` is bit-identical, the sums
    differ only by float32 summation order (deterministic: partial sums per program, then ``torch.sum``).

    Args:
        dy: gradient of ``y``, shape of ``x``, any floating dtype and strides (stride 0 included).
        x, scale, zero_point, quant_min, quant_max, axis: as in :func:`fake_quant_fwd`.
        grad_scale: multiplier of both sums (already resolved, e.g. LSQ's ``1/sqrt(N * quant_max)``).
        need_dscale, need_dzp: compute ``dscale`` / ``dzp``; ``None`` is returned in their place otherwise.

    Returns:
        ``(dx, dscale, dzp)``: ``dx`` shaped like ``x`` in its dtype and memory order, ``dscale`` float32
        shaped like ``scale``, ``dzp`` float32 shaped like ``zero_point``.
    """
    axis = _check(x, scale, zero_point, axis)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}")
    if not dy.is_floating_point() or dy.device != x.device:
        raise ValueError(f"dy must be a floating-point tensor on {x.device}, got {dy.dtype} on {dy.device}")
    if x.numel() == 0:
        dx = torch.empty_like(x)
        dscale = torch.zeros(scale.shape, dtype=torch.float32, device=x.device) if need_dscale else None
        dzp = torch.zeros(zero_point.shape, dtype=torch.float32, device=x.device) if need_dzp else None
        return dx, dscale, dzp

    plan, (xr, dyr) = _make_plan([x, dy], axis)
    dx = _empty_like_plan(x, plan, x.dtype)
    max_block_n = _COL_BWD_BLOCK_N if plan.mode == _COL else _TILE
    block_m, block_n = _blocks(plan, max_block_n)
    num_n_blocks = cdiv(plan.cols, block_n)
    m_blocks = cdiv(plan.rows, block_m)
    m_iters = 1
    if plan.mode == _COL:
        # Each program sums m_iters row tiles of one column block: at least _COL_MIN_ROWS rows (bounding the
        # partial buffer), and more when that still leaves enough programs to fill the device.
        min_iters = cdiv(_COL_MIN_ROWS, block_m)
        target_chunks = cdiv(_num_programs_target(x.device), num_n_blocks)
        chunks = max(1, min(m_blocks // min_iters, target_chunks))
        m_iters = cdiv(m_blocks, chunks)
    m_chunks = cdiv(m_blocks, m_iters)
    num_programs = m_chunks * num_n_blocks

    part_shape = {_NONE: (num_programs,), _ROW: (num_n_blocks, plan.rows), _COL: (m_chunks, plan.cols)}[plan.mode]
    # an unneeded buffer is never touched (NEED_DS / NEED_DZ are constexpr); dx stands in for its pointer
    ds_part = torch.empty(part_shape, dtype=torch.float32, device=x.device) if need_dscale else dx
    dz_part = torch.empty(part_shape, dtype=torch.float32, device=x.device) if need_dzp else dx
    scale_stride, zp_stride = _param_strides(scale, zero_point)
    xst, gst = plan.strides
    with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
        _fake_quant_bwd_kernel[(num_programs,)](
            dyr, xr, dx, scale, zero_point, ds_part, dz_part,
            plan.rows, plan.cols, plan.sizes[1], plan.sizes[3],
            *xst, *gst,
            scale_stride, zp_stride,
            float(quant_min), float(quant_max),
            num_n_blocks, m_iters,
            CH_MODE=plan.mode, SPLIT_M=plan.sizes[0] > 1, SPLIT_N=plan.sizes[3] > 1,
            BLOCK_M=block_m, BLOCK_N=block_n, INT64=_needs_int64(plan, block_m, block_n, m_iters),
            NEED_DS=need_dscale, NEED_DZ=need_dzp,
            num_warps=8 if block_m * block_n >= 2048 else 4,
        )
    dscale = _finish_sum(ds_part, plan, scale, grad_scale) if need_dscale else None
    dzp = _finish_sum(dz_part, plan, zero_point, grad_scale) if need_dzp else None
    return dx, dscale, dzp


def _finish_sum(part: torch.Tensor, plan: _Plan, param: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """Reduce a partial-sum buffer to ``param``'s shape (fixed-order ``torch.sum``) and apply ``grad_scale``."""
    if param.numel() == 1 or plan.mode == _NONE:
        total = part.sum()
    elif plan.mode == _ROW:
        total = part.view(part.shape[0], plan.sizes[0], plan.sizes[1]).sum(dim=(0, 1))
    else:
        total = part.view(part.shape[0], plan.sizes[2], plan.sizes[3]).sum(dim=(0, 2))
    return (total * grad_scale).reshape(param.shape)

