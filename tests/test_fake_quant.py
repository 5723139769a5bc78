"""qgrad.fake_quant against an element-wise NumPy reference, the gradient formulas, and float64 gradcheck."""
import math

import numpy as np
import pytest
import torch

from qgrad.ops.fake_quant import fake_quant
from qgrad.reference import default_grad_scale


# ----------------------------------------------------------------------------------------------- helpers
def naive_fake_quant(x, scale, zero_point, qmin, qmax, axis=None):
    """One element at a time with NumPy float32 scalars: IEEE division, np.rint (half to even)."""
    xf = x.detach().float().cpu().numpy()
    s = np.atleast_1d(scale.detach().float().cpu().numpy())
    z = np.atleast_1d(np.rint(zero_point.detach().float().cpu().numpy()))
    out = np.empty_like(xf)
    for idx in np.ndindex(xf.shape):
        c = idx[axis] if axis is not None else 0
        sv, zv = np.float32(s[c if s.size > 1 else 0]), np.float32(z[c if z.size > 1 else 0])
        q = np.float32(np.rint(np.float32(xf[idx]) / sv)) + zv
        q = np.float32(min(max(q, qmin), qmax))
        out[idx] = np.float32((q - zv) * sv)
    return torch.from_numpy(out).to(x.dtype)


def naive_grads(x, dy, scale, zero_point, qmin, qmax, axis, grad_scale):
    """The STE/LSQ formulas element by element; sums in float64."""
    xf = x.detach().float().numpy()
    g = dy.detach().float().numpy()
    s = np.atleast_1d(scale.detach().float().numpy())
    z = np.atleast_1d(np.rint(zero_point.detach().float().numpy()))
    dx = np.zeros_like(xf)
    ds = np.zeros(s.size, dtype=np.float64)
    dz = np.zeros(z.size, dtype=np.float64)
    for idx in np.ndindex(xf.shape):
        c = idx[axis] if axis is not None else 0
        sc, zc = (c if s.size > 1 else 0), (c if z.size > 1 else 0)
        xs = np.float32(np.float32(xf[idx]) / np.float32(s[sc]))
        v = np.float32(xs + np.float32(z[zc]))
        if qmin <= v <= qmax:
            dx[idx] = g[idx]
            ds[sc] += float(g[idx]) * float(np.float32(np.rint(xs) - xs))
        else:
            edge = qmin if v < qmin else qmax
            ds[sc] += float(g[idx]) * (edge - float(z[zc]))
            dz[zc] += float(g[idx]) * -float(s[sc])
    return torch.from_numpy(dx), torch.from_numpy(ds * grad_scale), torch.from_numpy(dz * grad_scale)


def grid_values(scale, qmin, qmax, n_extra=0, generator=None):
    """Values that hit every tie (k + 0.5), both clip edges, half a step around them, zero and +-0."""
    ks = torch.arange(qmin - 2, qmax + 3, dtype=torch.float32)
    vals = [ks, ks + 0.5, ks - 0.5, ks + 0.25, torch.tensor([0.0, -0.0, qmin - 0.5, qmax + 0.5, qmin - 1e-3, qmax + 1e-3])]
    if n_extra:
        vals.append(torch.randn(n_extra, generator=generator) * (qmax - qmin))
    return torch.cat(vals) * scale


# ----------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("bits", list(range(2, 17)))
@pytest.mark.parametrize("signed", [True, False])
def test_forward_bit_exact_all_bit_widths(bits, signed):
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    scale = torch.tensor(2.0**-6)  # a power of two: (k + 0.5) * scale is exactly a tie
    if bits > 10:  # keep the element-wise loop short: sample the grid instead of enumerating it
        x = (torch.tensor([qmin - 1.0, qmin, qmin + 0.5, -2.5, -0.5, 0.5, 1.5, qmax - 0.5, qmax, qmax + 0.5, qmax + 7]) * scale)
    else:
        x = grid_values(scale, qmin, qmax)
    y = fake_quant(x, scale, torch.tensor(0.0), qmin, qmax)
    assert torch.equal(y, naive_fake_quant(x, scale, torch.tensor(0.0), qmin, qmax))


def test_ties_round_half_to_even():
    s = torch.tensor(1.0)
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    y = fake_quant(x, s, torch.tensor(0.0), -8, 7)
    assert y.tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]


def test_zero_point_grid_and_fractional_zero_point_rounded():
    g = torch.Generator().manual_seed(0)
    s = torch.tensor(0.037)
    x = grid_values(s, -3, 12, n_extra=200, generator=g)
    for zp in (3.0, 2.5, 3.4):  # 2.5 rounds to 2 (half to even), 3.4 to 3
        y = fake_quant(x, s, torch.tensor(zp), 0, 15)
        assert torch.equal(y, naive_fake_quant(x, s, torch.tensor(zp), 0, 15))
    assert torch.equal(fake_quant(x, s, torch.tensor(2.5), 0, 15), fake_quant(x, s, torch.tensor(2.0), 0, 15))


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_per_channel_every_axis(axis):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, 7, generator=g) * 3
    c = x.shape[axis]
    scale = torch.rand(c, generator=g) * 0.3 + 0.05
    zp = torch.randint(-3, 4, (c,), generator=g).float()
    y = fake_quant(x, scale, zp, -8, 7, axis=axis)
    assert torch.equal(y, naive_fake_quant(x, scale, zp, -8, 7, axis=axis % 4))


@pytest.mark.parametrize("shape", [(1,), (5, 123, 7), (3, 1, 1), (0, 3), ()])
def test_odd_shapes(shape):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g) * 2
    s = torch.tensor(0.11)
    y = fake_quant(x, s, torch.tensor(0.0), -7, 7)
    assert y.shape == x.shape
    assert torch.equal(y, naive_fake_quant(x, s, torch.tensor(0.0), -7, 7))


def test_non_contiguous_views():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, 9, generator=g)
    s = torch.rand(5, generator=g) + 0.1
    for view, axis in ((base.transpose(0, 2), None), (base[::2, 1::2], 1), (base.permute(1, 2, 0)[:5], 0)):
        assert not view.is_contiguous()
        sc = s if axis is not None else torch.tensor(0.2)
        if axis is not None:
            sc = (torch.rand(view.shape[axis], generator=g) + 0.1)
        y = fake_quant(view, sc, torch.tensor(0.0), -7, 7, axis=axis)
        assert torch.equal(y, fake_quant(view.contiguous(), sc, torch.tensor(0.0), -7, 7, axis=axis))
        assert torch.equal(y, naive_fake_quant(view, sc, torch.tensor(0.0), -7, 7, axis=axis))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(257, generator=g) * 4).to(dtype)
    s = torch.tensor(0.0625)
    y = fake_quant(x, s, torch.tensor(0.0), -127, 127)
    assert y.dtype == dtype
    assert torch.equal(y, fake_quant(x.float(), s, torch.tensor(0.0), -127, 127).to(dtype))


def test_accepts_python_numbers():
    x = torch.linspace(-2, 2, 17)
    assert torch.equal(fake_quant(x, 0.25, 0, -4, 3), fake_quant(x, torch.tensor(0.25), torch.tensor(0.0), -4, 3))


# ----------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("axis", [None, 0, 2])
@pytest.mark.parametrize("zp", [0.0, 2.0])
def test_gradients_match_formulas(axis, zp):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 3, 6, generator=g) * 1.5).requires_grad_()
    c = 1 if axis is None else x.shape[axis]
    scale = (torch.rand(c, generator=g) * 0.2 + 0.1).reshape(() if axis is None else (c,)).requires_grad_()
    zero_point = torch.full(scale.shape, zp).requires_grad_()
    dy = torch.randn(x.shape, generator=g)
    y = fake_quant(x, scale, zero_point, -4, 3, axis=axis)
    dx, ds, dz = torch.autograd.grad(y, (x, scale, zero_point), dy)
    gs = default_grad_scale(x.numel(), c if axis is not None else 1, 3)
    ndx, nds, ndz = naive_grads(x, dy, scale, zero_point, -4, 3, axis, gs)
    assert torch.equal(dx, ndx)
    torch.testing.assert_close(ds.double().reshape(-1), nds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz.double().reshape(-1), ndz, rtol=1e-5, atol=1e-6)


def test_default_grad_scale_counts_elements_per_channel():
    x = torch.randn(8, 5, 3)
    scale = torch.full((5,), 0.1, requires_grad=True)
    dy = torch.ones_like(x)
    (g1,) = torch.autograd.grad(fake_quant(x, scale, 0.0, -7, 7, axis=1), scale, dy)
    (g2,) = torch.autograd.grad(fake_quant(x, scale, 0.0, -7, 7, axis=1, grad_scale=1.0), scale, dy)
    torch.testing.assert_close(g1, g2 / math.sqrt(8 * 3 * 7))


def test_grad_scale_argument_multiplies_scale_gradient():
    x = torch.randn(50)
    s = torch.tensor(0.05, requires_grad=True)
    (a,) = torch.autograd.grad(fake_quant(x, s, 0, -7, 7, grad_scale=1.0).sum(), s)
    (b,) = torch.autograd.grad(fake_quant(x, s, 0, -7, 7, grad_scale=0.25).sum(), s)
    torch.testing.assert_close(b, a * 0.25)


def _smooth_inputs(shape, scale, qmin, qmax, generator):
    """x with x/scale at k + u, |u| <= 0.3, inside and outside the range but never near a boundary."""
    k = torch.randint(qmin - 3, qmax + 4, shape, generator=generator).double()
    k = torch.where((k >= qmin - 1) & (k <= qmin), k - 2, k)  # keep clear of the lower edge...
    k = torch.where((k >= qmax) & (k <= qmax + 1), k + 2, k)  # ...and of the upper one
    u = (torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5) * 0.6
    return (k + u) * scale


@pytest.mark.parametrize("axis", [None, 1])
def test_gradcheck_and_gradgradcheck_of_the_gradient_map(axis):
    """The first derivatives (STE/LSQ) are smooth away from rounding and clip boundaries: check them and
    their derivatives (the second derivatives of fake_quant) by finite differences in float64."""
    g = torch.Generator().manual_seed(6)
    shape = (3, 4, 5)
    c = shape[1]
    scale = (torch.rand(c, dtype=torch.float64, generator=g) * 0.2 + 0.3) if axis is not None else torch.tensor(
        0.4, dtype=torch.float64
    )
    view = scale.reshape(1, c, 1) if axis is not None else scale
    x = _smooth_inputs(shape, view, -4, 3, g).requires_grad_()
    scale.requires_grad_()
    zp = torch.zeros_like(scale).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()

    def grads(x, s, z, dy):
        y = fake_quant(x, s, z, -4, 3, axis=axis)
        return torch.autograd.grad(y, (x, s, z), dy, create_graph=True)

    assert torch.autograd.gradcheck(grads, (x, scale, zp, dy), eps=1e-7, atol=1e-6)
    assert torch.autograd.gradgradcheck(grads, (x, scale, zp, dy), eps=1e-7, atol=1e-6)


def test_second_derivative_of_scale_gradient_wrt_x():
    """d(dscale)/dx = -dy * grad_scale / scale inside the range, 0 outside."""
    x = torch.tensor([0.12, 0.61, -0.33, 5.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    dy = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (ds,) = torch.autograd.grad(fake_quant(x, s, 0.0, -7, 7, grad_scale=0.5), s, dy, create_graph=True)
    (h,) = torch.autograd.grad(ds, x)
    inside = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(h, -dy * 0.5 / 0.1 * inside)


def test_empty_tensor_gradients_are_zero():
    x = torch.empty(0, 3, requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = fake_quant(x, s, 0.0, -7, 7)
    dx, ds = torch.autograd.grad(y.sum(), (x, s))
    assert dx.shape == x.shape and ds.item() == 0.0


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(scale=0.0), ValueError, "scale must be finite and > 0"),
        (dict(scale=-0.1), ValueError, "scale must be finite and > 0"),
        (dict(scale=float("inf")), ValueError, "scale must be finite and > 0"),
        (dict(scale=float("nan")), ValueError, "scale must be finite and > 0"),
        (dict(zero_point=9.0), ValueError, r"zero_point must lie in \[quant_min, quant_max\]"),
        (dict(quant_min=7, quant_max=7), ValueError, "quant_min must be < quant_max"),
        (dict(quant_min=8, quant_max=7), ValueError, "quant_min must be < quant_max"),
        (dict(quant_min=-8.0), TypeError, "quant_min must be an int"),
        (dict(axis=3), ValueError, "axis 3 is out of range"),
        (dict(axis=-4), ValueError, "axis -4 is out of range"),
        (dict(axis=1, scale=torch.ones(4)), ValueError, "must be 1-d of length 5"),
        (dict(axis=1, scale=torch.ones(5), zero_point=torch.zeros(3)), ValueError, "zero_point along axis 1"),
        (dict(scale=torch.ones(5)), ValueError, "per-tensor quantization"),
        (dict(scale=torch.ones(2, 2)), ValueError, "0-d \\(per-tensor\\) or 1-d"),
        (dict(scale=torch.tensor(1)), TypeError, "scale must be a floating-point tensor"),
        (dict(x=torch.ones(2, 5, 3, dtype=torch.int32)), TypeError, "x must be float16, bfloat16, float32 or float64"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (dict(grad_scale=-1.0), ValueError, "grad_scale must be finite and > 0"),
        (dict(grad_scale=0.0), ValueError, "grad_scale must be finite and > 0"),
        (dict(grad_scale=float("nan")), ValueError, "grad_scale must be finite and > 0"),
        (dict(grad_scale=float("inf")), ValueError, "grad_scale must be finite and > 0"),
        (dict(grad_scale=torch.tensor(0.5)), TypeError, "grad_scale must be a float or None"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, err, match):
    args = dict(x=torch.randn(2, 5, 3), scale=torch.tensor(0.1), zero_point=torch.tensor(0.0), quant_min=-8, quant_max=7)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        fake_quant(**args)


def test_gradient_range_test_at_clip_edges_uses_true_division():
    """Elements within a few ulps of quant_min*scale and quant_max*scale: the inside/outside decision of the
    straight-through gradient must follow the float32 value of x / scale exactly."""
    xs, scales = [], []
    for s in (0.1, 0.3, 0.7, 1.9, 0.0123):
        st = torch.tensor(s, dtype=torch.float32)
        for edge in (-7, 7):
            centre = torch.tensor(edge, dtype=torch.float32) * st
            ulps = torch.arange(-6, 7, dtype=torch.float32)
            xs.append(centre + ulps * torch.finfo(torch.float32).eps * centre.abs())  # a few ulps either side
            scales.append(st.expand(13))
    x = torch.cat(xs).reshape(-1, 13)
    scale = torch.stack([s[0] for s in scales])
    dy = torch.ones_like(x)
    x.requires_grad_()
    y = fake_quant(x, scale, 0.0, -7, 7, axis=0)
    (dx,) = torch.autograd.grad(y, x, dy)
    ndx, _, _ = naive_grads(x, dy, scale, torch.tensor(0.0), -7, 7, 0, 1.0)
    assert torch.equal(dx, ndx)
    assert 0 < int(dx.sum()) < x.numel()  # both sides of the edges are exercised
