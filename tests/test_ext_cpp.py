"""Tests of the compiled CPU kernels ``qgrad._C.fake_quant_fwd`` / ``fake_quant_bwd`` against qgrad.reference.

Outputs that are exact functions of the inputs (y, dx) must match the reference bit for bit, signed zeros
included; only the gradient sums (dscale, dzero_point) may differ, by float summation order, and they are
checked against float64 sums of the same float32 summands. The shapes are chosen to reach both tilings of the
CPU kernel (contiguous segments for inner extents >= 16, per-column accumulators below), several tiles per
channel, and tensors longer than one tile.
"""

from __future__ import annotations

import pytest
import torch

from qgrad.reference import default_grad_scale, fake_quant_backward_ref, fake_quant_ref

try:
    from qgrad import _C
except ImportError as exc:
    pytest.skip(
        f"the compiled extension qgrad._C is not built ({exc}); build it with "
        "`pip install --no-build-isolation -e .`",
        allow_module_level=True,
    )

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _axis_arg(axis):
    return -1 if axis is None else axis


def fwd(x, s, zp, qmin, qmax, axis=None):
    return _C.fake_quant_fwd(x, s, zp, qmin, qmax, _axis_arg(axis))


def bwd(dy, x, s, zp, qmin, qmax, axis=None, grad_scale=0.5, need_dscale=True, need_dzp=True):
    return _C.fake_quant_bwd(dy, x, s, zp, qmin, qmax, _axis_arg(axis), grad_scale, need_dscale, need_dzp)


def assert_bitwise_equal(actual, expected, what):
    """Same shape, dtype and bits (NaN payloads aside); prints the worst mismatches otherwise."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.reshape(-1), expected.reshape(-1)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    view = _BITS_VIEW[a.dtype]
    bad = (nan_a != nan_e) | (~nan_e & (a.view(view) != e.view(view)))
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        worst = idx[
            (a[idx].double() - e[idx].double()).abs().nan_to_num(float("inf")).argsort(descending=True)
        ]
        rows = [f"  [{i}] got {a[i].item()!r} expected {e[i].item()!r}" for i in worst[:8].tolist()]
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ\n" + "\n".join(rows))


def lsq_sums_fp64(dy, x, s, zp, qmin, qmax, axis, grad_scale, zp_shape):
    """Float64 sums of the reference's float32 summands g * e_s and g * e_z, plus the sums of their moduli."""
    g, xf = dy.float(), x.float()
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    sv = s.float().reshape(shape if s.dim() else [])
    zv = torch.round(zp.float()).reshape(shape if zp.dim() and axis is not None else [])
    xs = xf / sv
    v = xs + zv
    inside = (v >= qmin) & (v <= qmax)
    e_s = torch.where(inside, torch.round(xs) - xs, torch.where(v < qmin, qmin - zv, qmax - zv))
    t_s = (g * e_s).double()
    t_z = (g * torch.where(inside, torch.zeros_like(xs), -sv.expand_as(xs))).double()

    def reduce(t, per_channel):
        if not per_channel:
            return t.sum(), t.abs().sum()
        dims = [d for d in range(t.dim()) if d != axis]
        return t.sum(dims), t.abs().sum(dims)

    ds, ds_abs = reduce(t_s, axis is not None)
    dz, dz_abs = reduce(t_z, axis is not None and zp.numel() == s.numel() and zp.dim() == 1)
    return (
        ds * grad_scale,
        ds_abs * abs(grad_scale),
        (dz * grad_scale).reshape(zp_shape),
        dz_abs * abs(grad_scale),
    )


def check_all(x, s, zp, qmin, qmax, axis=None, dy=None, grad_scale=None):
    """Forward and backward of qgrad._C against the reference: y, dx bitwise; dscale, dzp to tolerance."""
    y = fwd(x, s, zp, qmin, qmax, axis)
    assert y.is_contiguous()
    assert_bitwise_equal(y, fake_quant_ref(x, s, zp, qmin, qmax, axis), "y")

    if dy is None:
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    if grad_scale is None:
        groups = s.numel() if axis is not None else 1
        grad_scale = default_grad_scale(x.numel(), groups, qmax)
    dx, ds, dz = bwd(dy, x, s, zp, qmin, qmax, axis, grad_scale)
    dx_ref, ds_ref, dz_ref = fake_quant_backward_ref(dy, x, s, zp, qmin, qmax, axis, grad_scale)
    assert dx.is_contiguous()
    assert_bitwise_equal(dx, dx_ref, "dx")
    assert ds.shape == ds_ref.shape and ds.dtype == torch.float32
    assert dz.shape == dz_ref.shape and dz.dtype == torch.float32

    # The kernel sums float32 products in 16 float lanes of at most 1024 terms each (64 in the column tiling),
    # then in float64; the rounding error of such a sum stays far below 1e-5 of the sum of the moduli.
    ds64, ds_abs, dz64, dz_abs = lsq_sums_fp64(dy, x, s, zp, qmin, qmax, axis, grad_scale, zp.shape)
    err_s = (ds.double() - ds64.reshape(ds.shape)).abs()
    tol_s = 1e-5 * ds_abs.reshape(ds.shape) + 1e-30
    assert bool((err_s <= tol_s).all()), (
        f"dscale off by {err_s.max().item():.3g} (tolerance {tol_s.max():.3g})"
    )
    err_z = (dz.double() - dz64).abs()
    tol_z = 1e-5 * dz_abs.reshape(dz.shape) + 1e-30
    assert bool((err_z <= tol_z).all()), f"dzero_point off by {err_z.max().item():.3g}"
    return y, dx, ds, dz


def quant_grid(bits, signed):
    if signed:  # restricted symmetric
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# --------------------------------------------------------------------------------------------------------
# exactness


def _all_values(dtype, limit):
    """Every finite value of a 16-bit dtype with |x| <= limit."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x) & (x.float().abs() <= limit)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.25, 0.046875, 0.0123, 1.7])
def test_ties_round_half_to_even(dtype, scale):
    qmin, qmax = -127, 127
    s = torch.tensor(scale)
    k = torch.arange(-130, 130, dtype=torch.float32)
    x32 = (k + 0.5) * s
    # candidate ties and their float32 neighbours on each side
    x = torch.cat([x32, x32.nextafter(x32 + 1), x32.nextafter(x32 - 1)]).to(dtype)
    if dtype != torch.float32:
        x = torch.cat([x, _all_values(dtype, 135 * scale)])
    xs = x.float() / s
    ties = int(((xs - xs.floor()) == 0.5).sum())
    # 0.25 and 0.046875 = 3 * 2**-6 give exact ties in every dtype; arbitrary scales only in float32
    if dtype == torch.float32 or scale in (0.25, 0.046875):
        assert ties > 50, f"the data must contain exact ties x / scale = k + 0.5, found {ties}"
    check_all(x, s, torch.tensor(0.0), qmin, qmax)
    check_all(x, s, torch.tensor(-4.0), qmin, qmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
def test_clip_edges(dtype, signed):
    qmin, qmax = quant_grid(4, signed)
    s = torch.tensor(0.125)  # a power of two: (edge + d) * s is exact, so v hits the edges exactly
    zps = [0.0, 2.0] if signed else [0.0, 5.0, float(qmax)]
    offsets = torch.tensor([-1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0])
    for zp in zps:
        edges = torch.tensor([float(qmin) - zp, float(qmax) - zp])
        x = ((edges[:, None] + offsets[None, :]) * s).flatten()
        x = torch.cat([x, x.nextafter(x + 1), x.nextafter(x - 1)]).to(dtype)
        check_all(x, s, torch.tensor(zp), qmin, qmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [True, False])
def test_all_bit_widths_and_zero_points(dtype, signed):
    gen = torch.Generator().manual_seed(0)
    for bits in range(2, 17):
        qmin, qmax = quant_grid(bits, signed)
        zps = {0, qmin + (qmax - qmin) // 3, qmax} if not signed else {0, qmin // 2, qmax // 3 + 1}
        for zp in sorted(zps):
            s = torch.tensor(2.0 / (qmax - qmin))
            # spread over the grid and beyond it on both sides
            x = (torch.randn(1500, generator=gen) * 0.8 - (zp - (qmin + qmax) / 2) * float(s)).to(dtype)
            # also a half-integer zero point, rounded half to even by the kernel
            check_all(x, s, torch.tensor(float(zp)), qmin, qmax)
        check_all(x, s, torch.tensor(float(qmin) + 0.5), qmin, qmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2, 3])
@pytest.mark.parametrize("zp_per_channel", [True, False])
def test_per_channel_every_axis(dtype, axis, zp_per_channel):
    gen = torch.Generator().manual_seed(axis)
    shape = (4, 6, 5, 18)  # inner extents 540, 90, 18 (segments) and 1 (columns)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    channels = shape[axis]
    s = torch.rand(channels, generator=gen) * 0.05 + 0.01
    zp = torch.randint(-20, 21, (channels,), generator=gen).float() if zp_per_channel else torch.tensor(-3.0)
    check_all(x, s, zp, -31, 31, axis)
    check_all(x, s, zp + 40, 0, 63, axis)


@pytest.mark.parametrize(
    "shape, axis",
    [
        ((100_003,), None),  # several tiles and a ragged last one
        ((2, 3, 20_000), 1),  # inner longer than one tile
        ((3, 1200, 20), 1),  # a tile covers a part of the channels
        ((5000, 7), 1),  # column tiling, several row tiles
        ((70, 2100), 1),  # column tiling, several column tiles
        ((200, 5, 3), 1),  # column tiling with inner = 3
        ((200, 5, 3), 2),
    ],
)
def test_tilings(shape, axis):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * 3
    if axis is None:
        s, zp = torch.tensor(0.02), torch.tensor(7.0)
    else:
        s = torch.rand(shape[axis], generator=gen) * 0.05 + 0.01
        zp = torch.randint(-5, 6, (shape[axis],), generator=gen).float()
    check_all(x, s, zp, -127, 127, axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123, 7), (1,), (0, 3), (), (3, 0, 4)])
def test_odd_shapes(dtype, shape):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen) * 2).to(dtype)
    y, dx, ds, dz = check_all(x, torch.tensor(0.03), torch.tensor(-2.0), -127, 127)
    assert y.shape == x.shape and dx.shape == x.shape
    if len(shape) == 3:
        s = torch.rand(shape[1], generator=gen) + 0.1
        check_all(x, s, torch.zeros(shape[1]), 0, 15, axis=1)
        check_all(x, s, torch.tensor(3.0), 0, 15, axis=1)
    if x.numel() == 0:
        assert float(ds) == 0.0 and float(dz) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(8, 40, 30, generator=gen) * 2).to(dtype)
    dy_base = torch.randn(8, 30, 40, generator=gen).to(dtype)
    for x, dy in [
        (base.transpose(1, 2), dy_base),  # permuted
        (base[:, ::3, 1:], dy_base[:, 1:, ::3].transpose(1, 2).contiguous()),  # strided slices
    ]:
        assert not x.is_contiguous()
        check_all(x, torch.tensor(0.05), torch.tensor(1.0), -7, 7, dy=dy)
        check_all(x, torch.rand(x.shape[2], generator=gen) + 0.02, torch.tensor(0.0), -7, 7, axis=2, dy=dy)
    dy_nc = torch.randn(8, 40, 30, generator=gen).to(dtype).transpose(1, 2)
    check_all(base.transpose(1, 2).contiguous(), torch.tensor(0.05), torch.tensor(1.0), -7, 7, dy=dy_nc)
    scale_nc = (torch.rand(2 * 30, generator=gen) + 0.02)[::2]
    check_all(base.transpose(1, 2), scale_nc, torch.zeros(60)[::2], -7, 7, axis=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    finfo = torch.finfo(dtype)
    vals = [
        0.0,
        -0.0,
        float("inf"),
        float("-inf"),
        float("nan"),
        finfo.max,
        -finfo.max,
        finfo.tiny,
        -finfo.tiny,
    ]
    vals += [finfo.tiny / 4, 1e30, -1e30]
    x = torch.tensor(vals, dtype=torch.float32).to(dtype)
    dy = torch.tensor([1.0, -0.0, 2.0, -3.0, 1.0, float("nan"), 0.5, -0.0, 4.0, 1.0, float("inf"), 2.0]).to(
        dtype
    )
    y = fwd(x, torch.tensor(0.1), torch.tensor(0.0), -127, 127)
    assert_bitwise_equal(y, fake_quant_ref(x, torch.tensor(0.1), torch.tensor(0.0), -127, 127), "y")
    dx, ds, dz = bwd(dy, x, torch.tensor(0.1), torch.tensor(0.0), -127, 127)
    dx_ref, ds_ref, dz_ref = fake_quant_backward_ref(
        dy, x, torch.tensor(0.1), torch.tensor(0.0), -127, 127, None, 0.5
    )
    assert_bitwise_equal(dx, dx_ref, "dx")
    # the summands contain NaN / inf; the sums must propagate them like the reference
    assert torch.isnan(ds) == torch.isnan(ds_ref) and torch.isnan(dz) == torch.isnan(dz_ref)


def test_true_division_is_required():
    """On this data x * (1 / s) rounds differently from x / s for some elements, and the kernel divides."""
    gen = torch.Generator().manual_seed(6)
    s = torch.tensor(0.0123)
    x = torch.randn(200_000, generator=gen) * 0.5
    by_reciprocal = torch.clamp(torch.round(x * (1 / s)), -127, 127) * s
    y_ref = fake_quant_ref(x, s, torch.tensor(0.0), -127, 127)
    assert not torch.equal(by_reciprocal, y_ref), (
        "the data must separate division from reciprocal multiplication"
    )
    assert_bitwise_equal(fwd(x, s, torch.tensor(0.0), -127, 127), y_ref, "y")


def test_parameter_shapes_follow_inputs():
    x = torch.randn(4, 5)
    dy = torch.randn(4, 5)
    for s, zp in [(torch.tensor(0.1), torch.tensor(0.0)), (torch.tensor([0.1]), torch.tensor([1.0]))]:
        _, ds, dz = bwd(dy, x, s, zp, -7, 7)
        assert ds.shape == s.shape and dz.shape == zp.shape
    dx, ds, dz = bwd(dy, x, torch.tensor(0.1), torch.tensor(0.0), -7, 7, need_dscale=False, need_dzp=False)
    assert ds is None and dz is None
    dx2, ds2, dz2 = bwd(dy, x, torch.tensor(0.1), torch.tensor(0.0), -7, 7, need_dscale=True, need_dzp=False)
    assert dz2 is None and ds2 is not None and torch.equal(dx, dx2)
    _, ds3, dz3 = bwd(dy, x, torch.tensor(0.1), torch.tensor(0.0), -7, 7, need_dscale=False, need_dzp=True)
    assert ds3 is None and dz3 is not None


# --------------------------------------------------------------------------------------------------------
# determinism


def _grads(x, dy, s, zp, axis):
    dx, ds, dz = bwd(dy, x, s, zp, -127, 127, axis, 0.01)
    return dx, ds, dz


@pytest.mark.parametrize("shape, axis", [((300_001,), None), ((3, 1200, 20), 1), ((5000, 7), 1)])
def test_deterministic_across_calls_and_threads(shape, axis):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen) * 3
    dy = torch.randn(shape, generator=gen)
    if axis is None:
        s, zp = torch.tensor(0.02), torch.tensor(1.0)
    else:
        s = torch.rand(shape[axis], generator=gen) * 0.05 + 0.01
        zp = torch.tensor(1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = _grads(x, dy, s, zp, axis), _grads(x, dy, s, zp, axis)
        torch.set_num_threads(1)
        single = _grads(x, dy, s, zp, axis)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


# --------------------------------------------------------------------------------------------------------
# argument checks of the binding


def _expect(exc_type, match, fn, *args):
    with pytest.raises(exc_type, match=match):
        fn(*args)


def test_binding_rejects_bad_arguments():
    x = torch.randn(4, 6)
    s, zp = torch.tensor(0.1), torch.tensor(0.0)
    before = x.clone()
    _expect(ValueError, "x must be float32, float16 or bfloat16, got Double", fwd, x.double(), s, zp, -7, 7)
    _expect(ValueError, "x must be float32, float16 or bfloat16, got Int", fwd, x.int(), s, zp, -7, 7)
    _expect(ValueError, "scale must be float32, got Double", fwd, x, s.double(), zp, -7, 7)
    _expect(ValueError, "zero_point must be float32, got Long", fwd, x, s, torch.tensor(0), -7, 7)
    _expect(ValueError, "quant_min must be < quant_max", fwd, x, s, zp, 7, 7)
    _expect(ValueError, r"must lie in \[-2\*\*24, 2\*\*24\]", fwd, x, s, zp, 0, 2**25)
    _expect(
        ValueError, "needs one scale and one zero_point value, got 6 and 1", fwd, x, torch.ones(6), zp, -7, 7
    )
    _expect(ValueError, "must be 1-d of length 6, got shape \\[4\\]", fwd, x, torch.ones(4), zp, -7, 7, 1)
    _expect(
        ValueError,
        "must be 0-d or 1-d of length 4, got shape \\[3\\]",
        fwd,
        x,
        torch.ones(4),
        torch.zeros(3),
        -7,
        7,
        0,
    )
    _expect(
        ValueError, "scale must be 0-d or 1-d, got shape \\[2, 3\\]", fwd, x, torch.ones(2, 3), zp, -7, 7, 1
    )
    _expect(
        ValueError, "axis must be -1 \\(per-tensor\\) or in \\[0, 2\\)", fwd, x, torch.ones(6), zp, -7, 7, 2
    )
    _expect(ValueError, "axis must be -1", fwd, x, torch.ones(6), zp, -7, 7, -2)
    meta = torch.tensor(0.1, device="meta")
    _expect(ValueError, "scale is on meta but x is on cpu; put both on one device", fwd, x, meta, zp, -7, 7)
    _expect(ValueError, "x must be on a cpu or cuda device, got meta", fwd, x.to("meta"), meta, meta, -7, 7)
    dy = torch.randn(4, 6)
    _expect(ValueError, "dy must have the shape of x", bwd, dy.t(), x, s, zp, -7, 7)
    _expect(ValueError, "dy must have the dtype of x", bwd, dy.half(), x, s, zp, -7, 7)
    _expect(ValueError, "dy must be on a cpu or cuda device, got meta", bwd, dy.to("meta"), x, s, zp, -7, 7)
    _expect(ValueError, "grad_scale must be finite", bwd, dy, x, s, zp, -7, 7, None, float("nan"))
    assert torch.equal(x, before)


# --------------------------------------------------------------------------------------------------------
# CUDA kernels (csrc/cuda), when this build has them and a GPU is present

CUDA_OK = torch.cuda.is_available() and getattr(_C, "with_cuda", False)
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and qgrad._C built with CUDA")


def _cuda_case(shape, axis, dtype, zp_per_channel, seed, offset=0):
    gen = torch.Generator().manual_seed(seed)
    numel = int(torch.tensor(shape).prod()) if len(shape) else 1
    flat = (torch.randn(numel + offset, generator=gen) * 3).to(dtype)
    x = flat[offset:].reshape(shape)  # offset 1 misaligns x for the 16-byte loads of the forward kernel
    if axis is None:
        s, zp = torch.tensor(0.021), torch.tensor(-3.0)
    else:
        s = torch.rand(shape[axis], generator=gen) * 0.05 + 0.01
        zp = (
            torch.randint(-9, 10, (shape[axis],), generator=gen).float()
            if zp_per_channel
            else torch.tensor(2.0)
        )
    return x.cuda(), s.cuda(), zp.cuda()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, axis, zp_per_channel, offset",
    [
        ((300_001,), None, False, 0),  # per-tensor, many warp items, a tail after the packs
        ((300_001,), None, False, 1),  # misaligned x: scalar forward path
        ((2, 3, 5000), 1, True, 0),  # rows layout, several chunks per row
        ((4, 6, 5, 40), 2, False, 0),  # rows layout, zero point shared by the channels
        ((4, 6, 5, 18), 3, True, 0),  # columns layout (inner = 1)
        ((5000, 7), 1, False, 0),  # columns layout, several row tiles, shared zero point
        ((200, 5, 3), 1, True, 0),  # columns layout, inner = 3
        ((5, 123, 7), None, False, 0),
        ((0, 3), 1, True, 0),
        ((), None, False, 0),
    ],
)
def test_cuda_matches_reference(dtype, shape, axis, zp_per_channel, offset):
    x, s, zp = _cuda_case(shape, axis, dtype, zp_per_channel, seed=len(shape) + offset, offset=offset)
    check_all(x, s, zp, -127, 127, axis)
    check_all(x, s, zp + 100, 0, 255, axis)
    dy = torch.randn(x.shape, device="cuda").to(dtype)
    first = bwd(dy, x, s, zp, -127, 127, axis, 0.01)
    second = bwd(dy, x, s, zp, -127, 127, axis, 0.01)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "the CUDA backward must be deterministic"


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ties_and_edges(dtype):
    s = torch.tensor(0.25)
    k = torch.arange(-130, 130, dtype=torch.float32)
    x = (k + 0.5) * s
    x = torch.cat(
        [x, x.nextafter(x + 1), x.nextafter(x - 1), torch.tensor([-127.0, 127.0, -127.5, 127.5]) * s]
    )
    check_all(x.to(dtype).cuda(), s.cuda(), torch.tensor(0.0, device="cuda"), -127, 127)


@needs_cuda
@pytest.mark.gpu
def test_cuda_binding_rejects_mixed_devices():
    x = torch.randn(4, 6, device="cuda")
    s = torch.tensor(0.1, device="cuda")
    zp = torch.tensor(0.0, device="cuda")
    _expect(ValueError, "scale is on cpu but x is on cuda", fwd, x, s.cpu(), zp, -7, 7)
    _expect(ValueError, "dy is on cpu but x is on cuda", bwd, x.cpu(), x, s, zp, -7, 7)
