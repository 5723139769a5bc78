"""The Triton kernels (``qgrad.kernels``) against :mod:`qgrad.reference`.

Fake quantization: ``y`` and ``dx`` must match the reference bit for bit (ties, clip edges, special values,
every layout); ``dscale`` / ``dzp`` are float32 sums in a different order and are compared with a tolerance
against a float64 sum of the same float32 terms. The multi-tensor l1 norm: signs exactly, norms against a
float64 sum. Without a GPU the kernels run under ``TRITON_INTERPRET=1``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import recording_tensor_arguments

import qgrad.kernels as K
import qgrad.kernels.fake_quant as FQ
from qgrad.reference import fake_quant_backward_ref, fake_quant_ref

AVAILABLE, WHY = K.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"Triton kernels unavailable: {WHY}")
INTERPRETED = FQ._INTERPRETED
DEVICE = "cpu" if INTERPRETED else "cuda"

DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            INTERPRETED,
            reason="the Triton interpreter converts float32 to bfloat16 by truncation (GPUs round to nearest even)",
        ),
    ),
]


# ----------------------------------------------------------------------------------------------- helpers
def _int_view(t):
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_bits(actual, expected, x=None, what="output"):
    """Bitwise equality (NaN only needs to be NaN in both); prints the worst mismatches otherwise."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.reshape(-1), expected.reshape(-1)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    bad = (nan_a != nan_e) | (~nan_a & ~nan_e & (_int_view(a) != _int_view(e)))
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        worst = idx[torch.argsort((a[idx].double() - e[idx].double()).abs().nan_to_num(float("inf")), descending=True)]
        lines = [f"{what}: {idx.numel()} of {a.numel()} elements differ; worst:"]
        xs = x.reshape(-1) if x is not None else None
        for i in worst[:8].tolist():
            src = f" x={xs[i].item()!r}" if xs is not None else ""
            lines.append(f"  [{i}]{src} kernel={a[i].item()!r} reference={e[i].item()!r}")
        pytest.fail("\n".join(lines))


def lsq_terms(dy, x, scale, zero_point, qmin, qmax, axis):
    """The float32 per-element terms ``dy * e_s`` and ``dy * e_z`` written out from the documented formulas."""
    shape = [1] * x.dim()
    if axis is not None and scale.dim() == 1:
        shape[axis] = -1
    s = scale.float().reshape(shape if scale.dim() == 1 else [])
    zp = torch.round(zero_point.float()).reshape(shape if zero_point.dim() == 1 else [])
    g, xs = dy.float(), x.float() / s
    v = xs + zp
    inside = (v >= qmin) & (v <= qmax)
    e_s = torch.where(inside, torch.round(xs) - xs, torch.where(v < qmin, qmin - zp, qmax - zp))
    e_z = torch.where(inside, torch.zeros_like(xs), -s.expand_as(xs))
    return g * e_s, g * e_z


def assert_sum_close(actual, terms, param, axis, grad_scale, what):
    """``actual`` against the float64 sum of the float32 ``terms`` reduced to ``param``'s shape.

    Tolerance: ``1e-5`` relative plus ``1e-6 * sum(|terms|)`` absolute. A float32 sum of n terms in any
    blocked/tree order errs by at most about ``log2(n) * 2**-24 * sum|t|`` (< 1e-6 * sum|t| for the sizes
    here, and far less in practice), while one wrong or missing term shifts it by ``|t|``, which is of order
    ``sum|t| / n`` >> ``1e-6 * sum|t|`` for n <= 2e5.
    """
    t = terms.double()
    if param.dim() == 1 and axis is not None:
        dims = [d for d in range(t.dim()) if d != axis]
        exact, mag = t.sum(dim=dims), t.abs().sum(dim=dims)
    else:
        exact, mag = t.sum().reshape(param.shape), t.abs().sum().reshape(param.shape)
    exact, mag = exact * grad_scale, mag * abs(grad_scale)
    assert actual.shape == param.shape and actual.dtype == torch.float32, f"{what}: {actual.shape} {actual.dtype}"
    err = (actual.double() - exact).abs()
    tol = 1e-5 * exact.abs() + 1e-6 * mag
    if not bool((err <= tol).all()):
        i = int(torch.argmax(err - tol))
        pytest.fail(f"{what}: |kernel - exact| = {err.flatten()[i].item():.3e} > tol {tol.flatten()[i].item():.3e} "
                    f"at {i} (kernel {actual.flatten()[i].item()!r}, exact {exact.flatten()[i].item()!r})")


def check_all(x, scale, zp, qmin, qmax, axis=None, dy=None, grad_scale=0.37, ref_axis=None):
    """Forward and backward of the kernels against the reference (``ref_axis`` defaults to ``axis``)."""
    ref_axis = axis if ref_axis is None else ref_axis
    y = K.fake_quant_fwd(x, scale, zp, qmin, qmax, axis)
    assert_same_bits(y, fake_quant_ref(x, scale, zp, qmin, qmax, ref_axis), x, "y")
    if dy is None:
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    dx, ds, dz = K.fake_quant_bwd(dy, x, scale, zp, qmin, qmax, axis, grad_scale, True, True)
    dx_ref, ds_ref, dz_ref = fake_quant_backward_ref(dy, x, scale, zp, qmin, qmax, ref_axis, grad_scale)
    assert_same_bits(dx, dx_ref, x, "dx")
    t_s, t_z = lsq_terms(dy, x, scale, zp, qmin, qmax, ref_axis)
    assert_sum_close(ds_ref, t_s, scale, ref_axis, grad_scale, "reference dscale (checks the test's formula)")
    assert_sum_close(ds, t_s, scale, ref_axis, grad_scale, "dscale")
    assert_sum_close(dz_ref, t_z, zp, ref_axis, grad_scale, "reference dzp (checks the test's formula)")
    assert_sum_close(dz, t_z, zp, ref_axis, grad_scale, "dzp")
    return y, dx


def grid_points(qmin, qmax, zp, scale, n=1500):
    """x whose x/scale + zp hits ties (k + 0.5), integers, both clip edges +-0.5 / +-1 ulp, and beyond."""
    lo, hi = qmin - zp, qmax - zp
    k = torch.unique(torch.linspace(lo - 3, hi + 3, min(n, hi - lo + 7)).round())
    edges = torch.tensor([lo, hi], dtype=torch.float32)
    u = torch.cat([
        k, k + 0.5, k - 0.5, k + 0.25,
        edges, edges + 0.5, edges - 0.5,
        torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1),
    ])
    return u * scale  # exact: scale is a power of two


# ------------------------------------------------------------------------------------- forward + backward
GRIDS = [(b, kind) for b in range(2, 17) for kind in ("signed", "unsigned", "zero_point")]


@pytest.mark.parametrize("bits,kind", GRIDS, ids=[f"{b}bit-{k}" for b, k in GRIDS])
def test_grids_ties_and_clip_edges(bits, kind):
    """Every bit-width 2..16 on restricted-signed, unsigned and shifted grids, ties and clip edges exact."""
    if kind == "signed":
        qmin, qmax, zp = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1, 0.0
    elif kind == "unsigned":
        qmin, qmax, zp = 0, 2**bits - 1, 0.0
    else:  # asymmetric unsigned grid with a fractional zero point stored: 2**(b-1) - 0.5 rounds half to even
        qmin, qmax, zp = 0, 2**bits - 1, 2 ** (bits - 1) - 0.5
    scale = 2.0**-5
    zp_r = round(zp)  # Python's round is half-to-even too
    x = grid_points(qmin, qmax, zp_r, scale).to(DEVICE)
    check_all(x, torch.tensor(scale, device=DEVICE), torch.tensor(zp, device=DEVICE), qmin, qmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_power_of_two_scale_random(dtype):
    """Scales that are not powers of two: near-ties where an approximate division would flip the rounding."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor(0.0371)
    k = torch.randint(-140, 140, (6000,), generator=g).float()
    x = torch.cat([(k + 0.5) * scale, (k + torch.rand(6000, generator=g)) * scale]).to(dtype)
    check_all(x.to(DEVICE), scale.to(DEVICE), torch.tensor(-3.0, device=DEVICE), -127, 127)


@pytest.mark.parametrize("axis", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel_each_axis(axis, dtype):
    """Per-channel scale and zero point along every axis of a 4-d tensor (row and column channel mappings)."""
    g = torch.Generator().manual_seed(axis)
    shape = (3, 5, 6, 7)
    if axis == 1:
        shape = (3, 5, 9, 8)  # 72 elements behind the channel dim: the per-row mapping
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEVICE)
    c = shape[axis]
    scale = (2.0 ** -torch.randint(2, 6, (c,), generator=g).float() * (1 + torch.rand(c, generator=g))).to(DEVICE)
    zp = (torch.randint(-20, 20, (c,), generator=g).float() + 0.5 * torch.randint(0, 2, (c,), generator=g)).to(DEVICE)
    check_all(x, scale, zp, -63, 63, axis=axis)


def test_negative_axis_and_scalar_zero_point():
    """axis=-1 gives what axis=2 gives (the launcher normalizes it); a 0-d zero point with a 1-d scale."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 6, 11, generator=g) * 4).to(DEVICE)
    scale = (torch.rand(11, generator=g) * 0.1 + 0.02).to(DEVICE)
    zp = torch.tensor(2.0, device=DEVICE)
    y, _ = check_all(x, scale, zp, -8, 7, axis=-1, ref_axis=2)
    assert_same_bits(y, fake_quant_ref(x, scale, zp, -8, 7, -1), x, "y against the reference's axis=-1")
    assert_same_bits(y, K.fake_quant_fwd(x, scale, zp, -8, 7, 2), x, "y for axis=-1 vs axis=2")


@pytest.mark.parametrize(
    "shape,axis",
    [((5, 123, 7), None), ((5, 123, 7), 0), ((5, 123, 7), 1), ((5, 123, 7), 2), ((1,), None), ((1,), 0),
     ((), None), ((3, 5000), 0), ((600, 10), 1), ((700, 3), None)],
)
def test_odd_shapes(shape, axis):
    """Shapes that are not powers of two, single elements, 0-d, several column blocks, several row chunks."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g) * 2).to(DEVICE)
    if axis is None:
        scale, zp = torch.tensor(0.05, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    else:
        c = shape[axis]
        scale = (torch.rand(c, generator=g) * 0.1 + 0.01).to(DEVICE)
        zp = torch.randint(-3, 3, (c,), generator=g).float().to(DEVICE)
    check_all(x, scale, zp, -15, 15, axis=axis)


@pytest.mark.parametrize("axis", [None, 1])
def test_empty(axis):
    """Empty tensors come back empty, with zero scale / zero-point gradients."""
    x = torch.empty(0, 3, device=DEVICE)
    scale = torch.full((3,) if axis else (), 0.1, device=DEVICE)
    zp = torch.zeros((3,) if axis else (), device=DEVICE)
    y = K.fake_quant_fwd(x, scale, zp, -8, 7, axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    dx, ds, dz = K.fake_quant_bwd(torch.empty_like(x), x, scale, zp, -8, 7, axis, 1.0, True, True)
    assert dx.shape == x.shape
    assert torch.equal(ds, torch.zeros_like(scale)) and torch.equal(dz, torch.zeros_like(zp))


# -------------------------------------------------------------------------------------- special values
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy warns about inf / NaN
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype):
    """inf, NaN, -0.0, denormals, magnitudes around 2**22..2**24 and beyond, overflow of x/scale."""
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1e-40, 3e38, -3e38,
         2.0**22 + 0.5, -(2.0**22 + 0.5), 2.0**23 - 0.5, 2.0**23 - 1.5, 2.0**23, 2.0**23 + 1, 2.0**24, 2.0**24 + 2,
         2.0**24 - 1, -(2.0**24) - 2, 2.0**25, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997]
    )
    big = 2**24
    x = specials.to(dtype).to(DEVICE)
    for scale, zp, qmin, qmax in [(1.0, 0.0, -big, big), (0.01, -0.0, -big, big), (0.75, 5.0, -127, 127),
                                  (2.0**-7, 0.0, 0, 255)]:
        s, z = torch.tensor(scale, device=DEVICE), torch.tensor(zp, device=DEVICE)
        y = K.fake_quant_fwd(x, s, z, qmin, qmax, None)
        assert_same_bits(y, fake_quant_ref(x, s, z, qmin, qmax, None), x, f"y (scale={scale}, zp={zp})")
        dy = torch.ones_like(x)
        dx, ds, dz = K.fake_quant_bwd(dy, x, s, z, qmin, qmax, None, 1.0, True, True)
        dx_ref, ds_ref, dz_ref = fake_quant_backward_ref(dy, x, s, z, qmin, qmax, None, 1.0)
        assert_same_bits(dx, dx_ref, x, "dx")
        t_s, t_z = lsq_terms(dy, x, s, z, qmin, qmax, None)
        for actual, expected_terms, p, name in [(ds_ref, t_s, s, "reference dscale"), (ds, t_s, s, "dscale"),
                                                (dz_ref, t_z, z, "reference dzp"), (dz, t_z, z, "dzp")]:
            assert_sum_close(actual, expected_terms, p, None, 1.0, name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_rounding_on_random_bit_patterns():
    """2**16 random float32 bit patterns (all magnitudes, denormals, inf, NaN) on the widest grid."""
    g = torch.Generator().manual_seed(5)
    bits = torch.randint(-(2**31), 2**31, (2**16,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).to(DEVICE)
    for scale in (1.0, 3.0e-3):
        s, z = torch.tensor(scale, device=DEVICE), torch.tensor(0.0, device=DEVICE)
        y = K.fake_quant_fwd(x, s, z, -(2**24), 2**24, None)
        assert_same_bits(y, fake_quant_ref(x, s, z, -(2**24), 2**24, None), x, f"y (scale={scale})")


# ---------------------------------------------------------------------------------------------- layouts
def _layouts():
    """Views made on the device (``.to()`` of a sliced CPU tensor would hand over a contiguous copy)."""
    g = torch.Generator().manual_seed(6)
    base = (torch.randn(4, 6, 10, 12, generator=g) * 3).to(DEVICE)
    return {
        "transpose": base.transpose(1, 3),
        "permute": base.permute(2, 0, 3, 1),
        "step_slices": base[:, ::2, :, 1::3],
        "transpose_then_slice": base.transpose(0, 2)[:, 1:, ::3],
        "transpose_slice_channel": base.transpose(1, 3)[:, 1:, :, ::2],
        "permute_then_slice": base.permute(3, 1, 0, 2)[::2, :, 1:],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "expanded": base[:, :1].expand(4, 6, 10, 12),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("axis", [None, 1, 3])
def test_non_contiguous_layouts_without_copy(layout, axis):
    """Strided / permuted views run through the strided path (no copy) and match the reference exactly."""
    x = _layouts()[layout]
    plan, _ = FQ._make_plan([x], axis)
    assert not plan.copied, f"{layout} was copied"
    if axis is None:
        scale, zp = torch.tensor(0.0625, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    else:
        c = x.shape[axis]
        scale = (torch.arange(c, dtype=torch.float32) * 0.01 + 0.03).to(DEVICE)
        zp = (torch.arange(c, dtype=torch.float32) - c // 2).to(DEVICE)
    y, dx = check_all(x, scale, zp, -31, 31, axis=axis)
    if layout in ("transpose", "permute", "channels_last"):  # dense: outputs keep x's memory order
        assert y.stride() == x.stride() and dx.stride() == x.stride()


def test_dy_layouts():
    """dy with stride 0 (as from .sum().backward()) and dy laid out differently from x, without copies."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 8, 5, 6, generator=g) * 3).contiguous(memory_format=torch.channels_last).to(DEVICE)
    scale = (torch.rand(8, generator=g) * 0.1 + 0.05).to(DEVICE)
    zp = torch.zeros(8, device=DEVICE)
    for dy in (torch.ones((), device=DEVICE).expand(x.shape),
               torch.randn(1, 8, 1, 1, generator=g).to(DEVICE).expand(x.shape),
               torch.randn(x.shape, generator=g).to(DEVICE)):
        plan, _ = FQ._make_plan([x, dy], 1)
        assert not plan.copied
        check_all(x, scale, zp, -15, 15, axis=1, dy=dy)


def test_layouts_that_need_a_copy():
    """Layouts beyond four merged dims fall back to one copy (in x's memory order) and are still exact.

    Five dims with a step on each (per-tensor and per-channel), and a last-axis channel behind three
    unmergeable dims (the column mapping takes at most two).
    """
    g = torch.Generator().manual_seed(8)
    # slice on the device: .to() of a non-contiguous CPU tensor would hand over a contiguous copy
    x = (torch.randn(5, 5, 5, 5, 5, generator=g) * 3).to(DEVICE)[::2, 1:, ::2, 1:, ::2]
    assert FQ._make_plan([x], None)[0].copied
    assert FQ._make_plan([x], 2)[0].copied
    check_all(x, torch.tensor(0.1, device=DEVICE), torch.tensor(1.0, device=DEVICE), -7, 7)
    scale = torch.tensor([0.1, 0.2, 0.05], device=DEVICE)
    check_all(x, scale, torch.zeros(3, device=DEVICE), -7, 7, axis=2)
    x = (torch.randn(4, 6, 10, 12, generator=g) * 3).to(DEVICE).transpose(0, 2)[1:, :, ::3]
    assert FQ._make_plan([x], 3)[0].copied
    scale = (torch.rand(12, generator=g) * 0.1 + 0.05).to(DEVICE)
    y, dx = check_all(x, scale, torch.zeros(12, device=DEVICE), -7, 7, axis=3)
    assert y.stride() == dx.stride() == (12, 108, 648, 1), "outputs follow x's memory order"


@pytest.mark.parametrize(
    "shape,axis,mode",
    [((64, 3, 3, 3), 0, "COL"), ((16, 8, 9, 9), 1, "ROW"), ((512, 4608), 0, "ROW"), ((32, 77, 12), 2, "COL"),
     ((1000,), None, "NONE"), ((8, 16, 16, 3), 3, "COL")],
)
def test_channel_mapping_choice(shape, axis, mode):
    """Per-row channels need >= 64 elements behind the channel dim; the last axis maps to columns."""
    x = torch.empty(shape, device="meta")
    plan, _ = FQ._make_plan([x], axis)
    assert plan.mode == getattr(FQ, "_" + mode) and not plan.copied


# ------------------------------------------------------------------------- determinism, flags, indexing
@pytest.mark.parametrize("shape,axis", [((40, 300), None), ((600, 12), 1), ((6, 3, 200), 1)])
def test_backward_is_deterministic(shape, axis):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE)
    dy = torch.randn(shape, generator=g).to(DEVICE)
    n = shape[axis] if axis is not None else None
    scale = torch.full((n,) if n else (), 0.07, device=DEVICE)
    zp = torch.zeros((n,) if n else (), device=DEVICE)
    first = K.fake_quant_bwd(dy, x, scale, zp, -7, 7, axis, 0.5, True, True)
    second = K.fake_quant_bwd(dy, x, scale, zp, -7, 7, axis, 0.5, True, True)
    for a, b in zip(first, second):
        assert torch.equal(_int_view(a), _int_view(b))


def test_gradient_flags():
    """need_dscale / need_dzp = False return None in their place; dx is unchanged."""
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(50, 30, generator=g) * 2).to(DEVICE)
    dy = torch.randn(50, 30, generator=g).to(DEVICE)
    s, z = torch.tensor(0.1, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    dx_ref = fake_quant_backward_ref(dy, x, s, z, -7, 7, None, 1.0)[0]
    for need_s, need_z in [(False, False), (True, False), (False, True)]:
        dx, ds, dz = K.fake_quant_bwd(dy, x, s, z, -7, 7, None, 1.0, need_s, need_z)
        assert_same_bits(dx, dx_ref, x, "dx")
        assert (ds is not None) == need_s and (dz is not None) == need_z


@pytest.mark.parametrize("layout", ["contiguous", "step_slices"])
@pytest.mark.parametrize("axis", [None, 0, 3])
def test_int64_index_path(layout, axis, monkeypatch):
    """The int64 offset code (taken for > 2**31 - 1 reachable offsets) gives the same results."""
    monkeypatch.setattr(FQ, "_INT32_LIMIT", 0)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 6, 7, 9, generator=g) * 3
    x = (x if layout == "contiguous" else x[:, ::2, :, 1::2]).to(DEVICE)
    if axis is None:
        scale, zp = torch.tensor(0.1, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    else:
        scale = (torch.rand(x.shape[axis], generator=g) * 0.1 + 0.05).to(DEVICE)
        zp = torch.randint(-2, 3, (x.shape[axis],), generator=g).float().to(DEVICE)
    plan, _ = FQ._make_plan([x], axis)
    assert FQ._needs_int64(plan, *FQ._blocks(plan, FQ._TILE))
    check_all(x, scale, zp, -15, 15, axis=axis)


def test_needs_int64_bounds():
    """The int32/int64 decision on layouts too large to allocate (meta tensors carry only shape and strides)."""
    def needs(x, axis=None):
        plan, _ = FQ._make_plan([x], axis)
        return FQ._needs_int64(plan, *FQ._blocks(plan, FQ._TILE))

    assert not needs(torch.empty(2**30, device="meta"))
    assert not needs(torch.empty(2**31, device="meta"))  # largest offset 2**31 - 1 still fits
    assert needs(torch.empty(2**31 + 1, device="meta"))  # the last tile's (masked) lanes reach 2**31 + 2047
    # x's own offsets stay below 2**31 (stride 0 on the last dim), but the output has about 2**32 elements
    assert needs(torch.empty(2**31 - 2047, 1, device="meta").expand(2**31 - 2047, 2))
    assert needs(torch.empty(2**16, 2**15 + 1, device="meta"), axis=0)
    # few elements, but far apart: the address offsets exceed int32
    assert needs(torch.empty(3, 2**31, device="meta")[:, ::2**20])
    assert not needs(torch.empty(3, 2**20, device="meta")[:, ::2**10])


# ------------------------------------------------------------------------------------ errors, availability
def test_bad_arguments_raise():
    x = torch.randn(4, 5, device=DEVICE)
    s, z = torch.tensor(0.1, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        K.fake_quant_fwd(x.double(), s, z, -7, 7, None)
    with pytest.raises(ValueError, match="length 5"):
        K.fake_quant_fwd(x, torch.ones(4, device=DEVICE), z, -7, 7, 1)
    with pytest.raises(ValueError, match="need axis"):
        K.fake_quant_fwd(x, torch.ones(5, device=DEVICE), z, -7, 7, None)
    with pytest.raises(ValueError, match="out of range"):
        K.fake_quant_fwd(x, torch.ones(5, device=DEVICE), z, -7, 7, 2)
    with pytest.raises(ValueError, match="shape of x"):
        K.fake_quant_bwd(torch.ones(5, device=DEVICE), x, s, z, -7, 7, None, 1.0, True, True)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(FQ, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="CUDA tensor"):
        K.fake_quant_fwd(torch.randn(3), torch.tensor(0.1), torch.tensor(0.0), -7, 7, None)


def test_is_available_reports_mode():
    ok, reason = K.is_available()
    assert ok
    assert ("interpreter" in reason) == INTERPRETED


_CODEGEN_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import qgrad.kernels.fake_quant as mod
fp = {"quant_min": "fp32", "quant_max": "fp32"}
cases = [
    (mod._fake_quant_fwd_kernel, {"x_ptr": "*fp16", "y_ptr": "*fp16", "scale_ptr": "*fp32", "zp_ptr": "*fp32", **fp},
     dict(CH_MODE=1, SPLIT_M=True, SPLIT_N=False, BLOCK_M=16, BLOCK_N=128, INT64=False)),
    (mod._fake_quant_bwd_kernel, {"dy_ptr": "*fp32", "x_ptr": "*fp32", "dx_ptr": "*fp32", "scale_ptr": "*fp32",
                                  "zp_ptr": "*fp32", "ds_part_ptr": "*fp32", "dz_part_ptr": "*fp32", **fp},
     dict(CH_MODE=2, SPLIT_M=False, SPLIT_N=True, BLOCK_M=8, BLOCK_N=256, INT64=True, NEED_DS=True, NEED_DZ=True)),
]
out = {}
for fn, types, consts in cases:
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    out[fn.__name__] = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
print(json.dumps(out))
"""


def test_gpu_code_uses_ieee_division():
    """Compile both kernels for sm_90 (no GPU needed): the PTX must divide with div.rn, never approximately.

    Triton's ``/`` on float32 lowers to an approximate division (``div.full.f32``); the interpreter cannot
    tell the two apart, so this guards the bit-exactness on GPUs from a CPU-only machine. It runs in a fresh
    process because the interpreter leaves parts of ``triton.language`` patched after it ran kernels.
    """
    triton = pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip(f"triton {triton.__version__} was built without the NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _CODEGEN_SCRIPT], capture_output=True, text=True, env=env, timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, ptx in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        assert "div.rn.f32" in ptx, f"{name}: no IEEE division in the PTX"
        assert "div.full.f32" not in ptx and "div.approx.f32" not in ptx, f"{name}: approximate division"
        assert "0f4B000000" in ptx, f"{name}: the 2**23 rounding constant is missing"


# ------------------------------------------------------------------------------------- multi-tensor l1 norm
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_l1_norm_sign_kernel(dtype):
    """Norms and int8 signs of a mixed list (a multi-block tensor, tiny, empty, 0-d, NaN, a strided view)."""
    from qgrad.ops.l1_norm import multi_l1_norm, multi_l1_norm_ref

    g = torch.Generator().manual_seed(11)
    shapes = [(3 * 2048 + 5,), (3,), (0,), (1, 7), (16, 3, 3, 3), ()]
    tensors = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE) for s in shapes]
    tensors[0][::7] = 0.0
    tensors[3][0, 2] = float("nan")
    tensors.append(torch.randn(9, 12, generator=g).to(dtype).to(DEVICE).t()[::2])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    norms, signs = K.l1_norm_sign(tensors, True, acc)
    assert norms.dtype == acc and norms.device.type == DEVICE and norms[3].isnan()
    keep = [k for k in range(len(tensors)) if k != 3]
    exact = torch.stack([tensors[k].double().abs().sum() for k in keep])
    torch.testing.assert_close(norms[keep].double(), exact, rtol=1e-6 if acc == torch.float32 else 1e-13, atol=0)
    for t, s in zip(tensors, signs):
        assert s.dtype == torch.int8 and s.shape == t.shape
        assert torch.equal(s, torch.sign(t).nan_to_num(0.0).to(torch.int8))
    assert K.l1_norm_sign(tensors, False, acc)[1] is None
    for k in (0, 4, 6):  # one tensor alone takes the launch without a table
        one_norm, (one_sign,) = K.l1_norm_sign([tensors[k]], True, acc)
        assert torch.equal(one_sign, signs[k])
        # the same block sums, added by torch in an order that may depend on the partial buffer's shape
        torch.testing.assert_close(one_norm, norms[k : k + 1], rtol=1e-6 if acc == torch.float32 else 1e-13, atol=0)
    # through the op: the gradient is coeff * sign(t), as in the plain-op reference
    leaves = [t.detach().requires_grad_() for k, t in enumerate(tensors) if k != 3]
    coeff = torch.linspace(-2, 2, len(leaves), dtype=acc, device=DEVICE)
    grads = torch.autograd.grad((multi_l1_norm(leaves) * coeff).sum(), leaves)
    expected = torch.autograd.grad((multi_l1_norm_ref(leaves) * coeff).sum(), leaves)
    for a, b in zip(grads, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_add_scaled_sign_kernel(dtype):
    """``x + scale * sign`` against the reference bit for bit: several blocks with a tail, x absent, a scale
    tensor of another dtype than the result, an empty tensor."""
    from qgrad.ops.l1_norm import add_scaled_sign_ref

    g = torch.Generator().manual_seed(12)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for shape in [(3 * 2048 + 5,), (4, 7, 9), (0,), ()]:
        sign = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8).to(DEVICE)
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
        for scale in (torch.tensor(0.3, dtype=acc), torch.tensor(-1.2345678901234, dtype=torch.float64)):
            scale = scale.to(DEVICE)
            for xx in (x, None):
                out = K.add_scaled_sign(sign, scale, xx, dtype)
                assert out.dtype == dtype and out.shape == sign.shape and out.device.type == DEVICE
                assert torch.equal(out, add_scaled_sign_ref(sign, scale, xx, dtype))


def test_ops_hand_channels_last_gradients_to_the_launchers_as_views(monkeypatch):
    """Through the ops (on the GPU, or here with QGRAD_BACKEND=triton): a channels-last gradient's norm, signs
    and seeds go to the launchers as contiguous views of its memory and come back in its layout."""
    from qgrad.ops.l1_norm import add_scaled_sign, add_scaled_sign_ref, multi_l1_norm

    if INTERPRETED:
        monkeypatch.setenv("QGRAD_BACKEND", "triton")
    received = []
    for name in ("l1_norm_sign", "add_scaled_sign"):
        monkeypatch.setattr(K, name, recording_tensor_arguments(received, getattr(K, name)))
    g = torch.Generator().manual_seed(13)
    t = torch.randn(4, 24, 5, 7, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    leaf = t.clone().requires_grad_()
    norm = multi_l1_norm([leaf])
    torch.testing.assert_close(norm[0].double(), t.double().abs().sum(), rtol=1e-6, atol=0)
    (seed,) = torch.autograd.grad(norm.sum() * 0.5, leaf)
    assert seed.stride() == t.stride() and torch.equal(seed, 0.5 * torch.sign(t))
    sign = torch.sign(t).to(torch.int8)
    out = add_scaled_sign(sign, 0.25, t)
    assert out.stride() == t.stride() and torch.equal(out, add_scaled_sign_ref(sign, 0.25, t, t.dtype))
    assert received and all(r.is_contiguous() for r in received)


def test_host_integer_helpers_match_triton():
    """The launchers' grid and block arithmetic (``kernels/_host.py``) agrees with Triton's own helpers."""
    import triton

    from qgrad.kernels._host import cdiv, next_power_of_2

    for a in list(range(0, 300)) + [2**31 - 1, 2**31, 2**40 + 3]:
        for b in (1, 2, 3, 7, 64, 2048):
            assert cdiv(a, b) == triton.cdiv(a, b)
    for n in list(range(0, 5000)) + [2**31 - 1, 2**31, 2**31 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)
