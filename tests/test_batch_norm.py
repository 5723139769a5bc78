"""Tests for qgrad.ops.batch_norm, qgrad.nn.batch_norm and the BatchNorm section of qgrad.reference.

Three independent routes to every derivative: PyTorch's own ``torch.nn.functional.batch_norm`` through autograd
(first and second derivatives), autograd through the plain-op :func:`batch_norm_backward_ref`, and finite
differences (``gradcheck`` / ``gradgradcheck``). The closed forms of :func:`batch_norm_double_backward_ref` are
checked against the autograd route as well. The double backward has three implementations, the C++ kernel of
``qgrad._C``, the Triton kernels of ``qgrad.kernels`` (under Triton's interpreter on a CPU) and the PyTorch-op
fallback; the ``double_backward`` fixture runs the tests on each. The Triton launcher is also compared directly
with the PyTorch ops (and the C++ kernel) on odd shapes, every optional input and every requested subset of
results, and, on a GPU (``gpu`` tests), with a float64 computation in float32, float16 and bfloat16.
"""

import copy
import io
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import select_cpu_implementation
from torch import nn

from qgrad.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm, revert_batchnorm
from qgrad.ops.batch_norm import batch_norm
from qgrad.ops.dispatch import cpu_kernel
from qgrad.penalties import L1GradPenalty
from qgrad.reference import batch_norm_backward_ref, batch_norm_double_backward_ref

F64 = torch.float64
INTERPRETER_BF16 = "the Triton interpreter converts float32 to bfloat16 by truncation (GPUs round to nearest even)"
# The C++ kernel's task shapes: (2, 3, 5, 4) and (64, 2, 160) take its per-channel segment loops (the latter
# folds its float sums mid-channel); (3, 5, 7, 2), (2, 3, 9), (1, 4, 3, 3) its column blocks; the (N, C) ones
# its row tasks ((130, 3): more rows than one fold, (1100, 3): three row chunks, (3, 4500): nine column blocks)
SHAPES = [
    (3, 5, 7, 2), (4, 6), (2, 3, 9), (1, 4, 3, 3), (2, 3, 5, 4), (130, 3), (1100, 3), (3, 4500), (64, 2, 160)
]


@pytest.fixture(params=["cpp", "triton", "torch"])
def double_backward(request, monkeypatch):
    """Selects the implementation of the fused double backward for the test."""
    return select_cpu_implementation("batch_norm_double_backward", request.param, monkeypatch)


def _assert_close(actual, expected, rtol, atol, what):
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{what}: one of the two is None"
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    bad = diff > bound
    if bad.any():
        idx = diff.flatten().argsort(descending=True)[:5]
        worst = [
            (int(i), actual.flatten()[i].item(), expected.flatten()[i].item()) for i in idx
        ]
        pytest.fail(f"{what}: {int(bad.sum())} of {diff.numel()} entries differ; worst (index, got, expected): {worst}")


def _inputs(shape, affine, dtype=F64, seed=0, offset=2.0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + offset
    w = torch.randn(c, generator=gen, dtype=dtype) if affine else None
    b = torch.randn(c, generator=gen, dtype=dtype) if affine else None
    rm = torch.randn(c, generator=gen, dtype=dtype)
    rv = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    return x, w, b, rm, rv


def _first_and_second(fn, x, w, b, rm, rv, training, momentum, seed=1):
    """Output, running stats, first grads (create_graph) and second grads of a random contraction.

    The random tensors are drawn in float64 and rounded to the dtype they are used in: ``randn`` draws
    different sequences for different dtypes, and a low-precision run must differentiate the same
    contraction as its float64 counterpart."""
    gen = torch.Generator().manual_seed(seed)
    x = x.detach().requires_grad_()
    params = [None if p is None else p.detach().requires_grad_() for p in (w, b)]
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    y = fn(x, rm, rv, params[0], params[1], training, momentum, 1e-5)
    dy = torch.randn(y.shape, generator=gen, dtype=F64).to(y.device, y.dtype).requires_grad_()
    inputs = [x] + [p for p in params if p is not None]
    firsts = torch.autograd.grad(y, inputs, dy, create_graph=True)
    # the contraction touches every first gradient: sum(ggx * dx) + ggw . dw + ggb . db
    s = sum((g * torch.randn(g.shape, generator=gen, dtype=F64).to(g.device, g.dtype)).sum() for g in firsts)
    seconds = torch.autograd.grad(s, inputs + [dy], allow_unused=True)
    seconds = [torch.zeros_like(t) if g is None else g for g, t in zip(seconds, inputs + [dy])]
    return y, rm, rv, list(firsts), seconds


# ------------------------------------------------------------------------------------------ functional
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training,stats", [(True, "tracked"), (True, "untracked"), (False, "tracked")])
@pytest.mark.parametrize("affine", [True, False])
def test_functional_matches_torch_float64(shape, training, affine, stats, double_backward):
    x, w, b, rm, rv = _inputs(shape, affine)
    if stats == "untracked":
        rm = rv = None
    ours = _first_and_second(batch_norm, x, w, b, rm, rv, training, 0.3)
    ref = _first_and_second(F.batch_norm, x, w, b, rm, rv, training, 0.3)
    _assert_close(ours[0], ref[0], 0, 0, "output")
    _assert_close(ours[1], ref[1], 0, 0, "running_mean")
    _assert_close(ours[2], ref[2], 0, 0, "running_var")
    for i, (a, e) in enumerate(zip(ours[3], ref[3])):
        _assert_close(a, e, 0, 0, f"first derivative {i}")
    for i, (a, e) in enumerate(zip(ours[4], ref[4])):
        _assert_close(a, e, 1e-10, 1e-10, f"second derivative {i}")


def test_functional_non_contiguous_and_channels_last(double_backward):
    base, w, b, rm, rv = _inputs((6, 5, 8, 4), affine=True)
    for x in (base[::2, :, 1:, :].transpose(2, 3), base.to(memory_format=torch.channels_last)):
        assert not x.is_contiguous()
        for training in (True, False):
            ours = _first_and_second(batch_norm, x, w, b, rm, rv, training, 0.1)
            ref = _first_and_second(F.batch_norm, x, w, b, rm, rv, training, 0.1)
            _assert_close(ours[0], ref[0], 1e-12, 1e-12, "output")
            for a, e in zip(ours[3] + ours[4], ref[3] + ref[4]):
                _assert_close(a, e, 1e-10, 1e-10, "gradient")


CHANNELS_LAST_SHAPES = [(6, 5, 8, 4), (5, 20, 11, 12), (3, 18, 4, 2, 5)]


def _check_channels_last(shape, training, implementation, device, monkeypatch):
    """x, dy and the incoming gradient all channels-last: the kernel gets their (M, C) views (no copies), and
    the second derivatives come back channels-last, equal to those of the contiguous layout."""
    from qgrad import kernels
    from qgrad.ops import dispatch

    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    seen = []

    def spy(real):
        return lambda *args: seen.append(tuple(args[4].shape)) or real(*args)

    if implementation == "triton":
        monkeypatch.setattr(kernels, "batch_norm_double_backward", spy(kernels.batch_norm_double_backward))
    elif implementation == "cpp":
        kernel = dispatch.cpu_kernel("batch_norm_double_backward")
        monkeypatch.setitem(dispatch._CPU_KERNELS, "batch_norm_double_backward", (spy(kernel), ""))
    x, w, b, rm, rv = (t.to(device) for t in _inputs(shape, affine=True))
    gen = torch.Generator().manual_seed(5)
    dy, ggx = (torch.randn(shape, generator=gen, dtype=F64).to(device) for _ in range(2))
    results = []
    for fmt in (torch.contiguous_format, layout):
        leaves = [t.contiguous(memory_format=fmt).requires_grad_() for t in (x, dy)] + [w.clone().requires_grad_()]
        y = batch_norm(leaves[0], rm.clone(), rv.clone(), leaves[2], b, training=training)
        dx = torch.autograd.grad(y, leaves[0], leaves[1], create_graph=True)[0]
        results.append(torch.autograd.grad(dx, leaves, ggx.contiguous(memory_format=fmt), allow_unused=True))
    for name, a, e in zip(("d_x", "d_dy", "d_w"), results[1], results[0]):
        _assert_close(a, e, 1e-12, 1e-12, name)
    if implementation != "torch":
        rows = math.prod(shape) // shape[1]
        assert seen == [tuple(shape), (rows, shape[1])]  # the contiguous run, then the channels-last one
        # (in eval mode d_x is zero, returned as None)
        assert all(t is None or t.is_contiguous(memory_format=layout) for t in results[1][:2])
        assert results[1][1].is_contiguous(memory_format=layout)


@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_double_backward_runs_on_views_and_keeps_the_layout(
    shape, training, double_backward, monkeypatch
):
    """(5, 20, 11, 12): 660 rows (two row chunks of the C++ kernel) of 20 channels (a register group of 16
    and 4 single ones)."""
    _check_channels_last(shape, training, double_backward, "cpu", monkeypatch)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(training, affine, double_backward):
    x, w, b, rm, rv = _inputs((2, 3, 2, 3), affine, offset=0.5)
    inputs = [x.requires_grad_()] + ([w.requires_grad_(), b.requires_grad_()] if affine else [])

    def fn(x, *p):
        # momentum 0 leaves the running statistics unchanged across gradcheck's many evaluations
        return batch_norm(x, rm, rv, p[0] if p else None, p[1] if p else None, training, 0.0, 1e-5)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("shape", [(3, 5, 7, 2), (4, 6)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("outer", ["all", "dx_only"])
def test_double_backward_matches_autograd_of_reference(shape, training, affine, outer, double_backward):
    """The fused double backward and the closed forms of the reference, against autograd through the
    plain-op backward. ``dx_only`` is what the penalties produce: dweight / dbias are not used (ggw = ggb = 0)."""
    x, w, b, rm, rv = _inputs(shape, affine)
    gen = torch.Generator().manual_seed(3)
    c = shape[1]
    dy = torch.randn(shape, generator=gen, dtype=F64)
    ggx = torch.randn(shape, generator=gen, dtype=F64)
    ggw = torch.randn(c, generator=gen, dtype=F64) if outer == "all" and affine else None
    ggb = torch.randn(c, generator=gen, dtype=F64) if outer == "all" and affine else None

    def contraction(dx, dw, db):
        s = (ggx * dx).sum()
        if ggw is not None:
            s = s + (ggw * dw).sum() + (ggb * db).sum()
        return s

    leaves = [t.clone().requires_grad_() for t in (dy, x)] + ([w.clone().requires_grad_()] if affine else [])
    weight = leaves[2] if affine else None
    s = contraction(*batch_norm_backward_ref(leaves[0], leaves[1], weight, rm, rv, training))
    expected = torch.autograd.grad(s, leaves, allow_unused=True)
    expected = [torch.zeros_like(t) if g is None else g for g, t in zip(expected, leaves)]

    # the closed forms of the reference
    closed = batch_norm_double_backward_ref(ggx, ggw, ggb, dy, x, w, rm, rv, training)
    for name, a, e in zip(("d_dy", "d_x", "d_w"), closed, expected):
        _assert_close(a, e, 1e-10, 1e-10, f"reference closed form {name}")

    # the fused autograd node: differentiate batch_norm's backward (db flows through it too)
    xl = x.clone().requires_grad_()
    params = [w.clone().requires_grad_(), b.clone().requires_grad_()] if affine else []
    dyl = dy.clone().requires_grad_()
    y = batch_norm(xl, rm.clone(), rv.clone(), *(params or [None, None]), training=training)
    firsts = torch.autograd.grad(y, [xl] + params, dyl, create_graph=True)
    s2 = contraction(firsts[0], *(firsts[1:] if affine else (None, None)))
    got = torch.autograd.grad(s2, [dyl, xl] + params[:1], allow_unused=True)
    got = [torch.zeros_like(t) if g is None else g for g, t in zip(got, [dyl, xl] + params[:1])]
    for name, a, e in zip(("d_dy", "d_x", "d_w"), got, expected):
        _assert_close(a, e, 1e-10, 1e-10, f"fused double backward {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("param_dtype", ["float32", "same"])
def test_low_precision_error_at_most_twice_torch(dtype, training, param_dtype, double_backward):
    """Against a float64 computation, qgrad's error is at most twice PyTorch's in the same low precision."""
    if double_backward == "triton" and dtype == torch.bfloat16:
        pytest.skip(INTERPRETER_BF16)
    x64, w64, b64, rm, rv = _inputs((8, 6, 5, 5), affine=True, offset=1.0)
    pdt = torch.float32 if param_dtype == "float32" else dtype
    # PyTorch's CPU kernel takes parameters and running statistics of one dtype: float32, or that of x
    low = [x64.to(dtype), w64.to(pdt), b64.to(pdt), rm.to(pdt), rv.to(pdt)]
    exact = _first_and_second(F.batch_norm, *[t.double() for t in low], training, 0.1)
    ours = _first_and_second(batch_norm, *low, training, 0.1)
    theirs = _first_and_second(F.batch_norm, *low, training, 0.1)
    assert ours[0].dtype == dtype and all(a.dtype == e.dtype for a, e in zip(ours[3] + ours[4], theirs[3] + theirs[4]))
    for i, (a, t, e) in enumerate(zip([ours[0], *ours[3], *ours[4]], [theirs[0], *theirs[3], *theirs[4]],
                                      [exact[0], *exact[3], *exact[4]])):
        scale = e.abs().max().item() + 1e-12
        err_ours = (a.double() - e).abs().max().item() / scale
        err_torch = (t.double() - e).abs().max().item() / scale
        # the floor is half an ulp of the output dtype: both can be exactly rounded
        floor = torch.finfo(a.dtype).eps
        assert err_ours <= 2 * err_torch + floor, f"output/gradient {i}: error {err_ours:.3g} vs torch {err_torch:.3g}"


def test_running_stats_untouched_by_backward_and_double_backward():
    x, w, b, rm, rv = _inputs((4, 3, 5, 5), affine=True)
    rm0, rv0 = rm.clone(), rv.clone()
    x.requires_grad_(), w.requires_grad_()
    y = batch_norm(x, rm, rv, w, b, True, 0.1)
    # the forward updated them exactly once, like torch's
    F.batch_norm(x.detach(), rm0, rv0, w.detach(), b, True, 0.1)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
    (gx.abs().sum() + gw.abs().sum()).backward()
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_eval_backward_uses_statistics_of_its_forward():
    x, w, b, rm, rv = _inputs((4, 3, 5), affine=True)
    x.requires_grad_()
    y = batch_norm(x, rm, rv, w, b, False)
    expected = torch.autograd.grad(F.batch_norm(x, rm.clone(), rv.clone(), w, b, False).sum(), x)[0]
    rm.add_(1.0), rv.mul_(3.0)  # a later update of the buffers must not change this forward's gradient
    _assert_close(torch.autograd.grad(y.sum(), x)[0], expected, 0, 0, "dx")


@pytest.mark.parametrize("training", [True, False])
def test_third_derivative_by_finite_differences(training):
    """Under create_graph=True the double backward switches to the differentiable reference formulas, so the
    second derivative is itself differentiable. Checked by finite differences: PyTorch's own third derivative
    of batch_norm fails this check in training mode (torch 2.x), so it cannot serve as the reference."""
    x, w, b, rm, rv = _inputs((3, 2, 4), affine=True)

    def second(xl, wl):
        y = batch_norm(xl, rm, rv, wl, b, training, 0.0)
        # (the sum of y**2 would be nearly constant: sum(xhat**2) = M * var / (var + eps))
        gx, gw = torch.autograd.grad(y.pow(3).sum(), (xl, wl), create_graph=True)
        return torch.autograd.grad(gx.square().sum() + gw.square().sum(), (xl, wl), create_graph=True)

    assert torch.autograd.gradcheck(second, (x.requires_grad_(), w.requires_grad_()))


def test_batch_size_one():
    x, w, b, rm, rv = _inputs((1, 3, 2, 2), affine=True)
    _assert_close(batch_norm(x, rm.clone(), rv.clone(), w, b, True),
                  F.batch_norm(x, rm.clone(), rv.clone(), w, b, True), 0, 0, "output")
    x1 = torch.randn(1, 4)
    with pytest.raises(ValueError) as ours:
        batch_norm(x1, None, None, training=True)
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(x1, None, None, training=True)
    assert str(ours.value) == str(theirs.value)
    # eval mode normalizes a single sample with the running statistics
    _assert_close(batch_norm(x1, torch.zeros(4), torch.ones(4)), F.batch_norm(x1, torch.zeros(4), torch.ones(4)),
                  0, 0, "eval output")


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_like_torch(training):
    """An empty batch (which the native kernel rejects) gives torch's empty output, still connected to weight
    and bias, and leaves the running statistics alone, also inside a model that a penalty converted."""
    x, w, b, rm, rv = _inputs((0, 3, 4), affine=True)
    w.requires_grad_()
    ours, theirs = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    y = batch_norm(x, *ours, w, b, training)
    y_ref = F.batch_norm(x, *theirs, w, b, training)
    assert y.shape == y_ref.shape == (0, 3, 4) and y.requires_grad
    assert all(torch.equal(a, c) for a, c in zip(ours + theirs, (rm, rv) * 2))
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).train(training)
    L1GradPenalty(model)
    assert model(torch.randn(0, 2, 5, 5)).shape == (0, 3, 3, 3)


def test_errors_change_nothing():
    x, w, b, rm, rv = _inputs((2, 3, 4), affine=True)
    before = (rm.clone(), rv.clone())
    cases = [
        ((x, rm, rv, torch.ones(4)), ValueError, "weight must be 1-d of length 3"),
        ((x, rm[:2], rv), ValueError, "running_mean must be 1-d of length 3"),
        ((x, rm, None, w, b, True), ValueError, "both be tensors or both be None"),
        ((x, None, None, w, b, False), ValueError, "required in eval mode"),
        ((x.long(), rm, rv), TypeError, "float16, bfloat16, float32 or float64"),
        ((x[0, 0], rm, rv), ValueError, "at least 2 dims"),
        ((x, rm, rv, w, b, True, 0.1, -1.0), ValueError, "eps must be"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            batch_norm(*args)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


# ------------------------------------------------------------------------------------------ modules
MODULES = [(nn.BatchNorm1d, BatchNorm1d, (6, 5)), (nn.BatchNorm1d, BatchNorm1d, (4, 5, 7)),
           (nn.BatchNorm2d, BatchNorm2d, (4, 5, 3, 3)), (nn.BatchNorm3d, BatchNorm3d, (2, 5, 3, 2, 2))]


@pytest.mark.parametrize("torch_cls,qgrad_cls,shape", MODULES)
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}])
def test_module_matches_torch_over_steps(torch_cls, qgrad_cls, shape, kwargs):
    torch.manual_seed(0)
    ref = torch_cls(shape[1], **kwargs).double()
    ours = qgrad_cls(shape[1], **kwargs).double()
    assert isinstance(ours, torch_cls) and repr(ours) == repr(ref)
    if ref.affine:
        with torch.no_grad():
            for m in (ref, ours):
                m.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
                m.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    for step in range(4):
        for m in (ref, ours):
            m.train(step < 3)
        x = torch.randn(shape, dtype=F64) * (step + 1) + step
        outs = []
        for m in (ref, ours):
            xi = x.clone().requires_grad_()
            y = m(xi)
            g = torch.autograd.grad(y.square().sum(), xi, create_graph=True)[0]
            outs.append((y, torch.autograd.grad(g.abs().sum(), xi)[0]))
        _assert_close(outs[1][0], outs[0][0], 0, 0, f"output at step {step}")
        _assert_close(outs[1][1], outs[0][1], 1e-10, 1e-10, f"second derivative at step {step}")
        sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
        assert list(sd_ref) == list(sd_ours)
        for k in sd_ref:
            assert torch.equal(sd_ref[k], sd_ours[k]), f"{k} differs at step {step}"


def test_module_state_dict_round_trips_both_ways():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5)
    ref(torch.randn(4, 5, 3, 3))
    ours = BatchNorm2d(5)
    ours.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v) and torch.equal(back.state_dict()[k], v)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    assert list(torch.load(buf)) == list(ref.state_dict())


class Net(nn.Module):
    """Conv -> BN -> ReLU -> residual (Conv -> BN) -> ReLU -> avg-pool -> Linear -> BN1d -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, affine=False)
        self.fc1 = nn.Linear(6 * 4 * 4, 10)
        self.bn3 = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn2(self.conv2(h)))
        h = F.avg_pool2d(h, 2).flatten(1)
        return self.fc2(F.relu(self.bn3(self.fc1(h))))


def test_convert_in_place_keeps_identity_state_and_optimizer():
    torch.manual_seed(0)
    model = Net()
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bn1 = model.bn1
    assert convert_batchnorm(model) is model
    assert model.bn1 is bn1 and type(bn1) is BatchNorm2d and type(model.bn3) is BatchNorm1d
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert {k: v for k, v in model.state_dict().items()}.keys() == sd_before.keys()
    assert convert_batchnorm(model) is model and type(model.bn2) is BatchNorm2d  # idempotent

    # one penalized step: the optimizer moves the module's own parameters; the statistics move once
    twin = revert_batchnorm(copy.deepcopy(model))
    assert type(twin.bn1) is nn.BatchNorm2d and type(model.bn1) is BatchNorm2d
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    penalty = L1GradPenalty(model, weight=0.05, activation=0.05)
    penalty.backward(F.cross_entropy(model(x), y))
    w_before = model.conv1.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.conv1.weight, w_before)
    assert int(model.bn1.num_batches_tracked) == 1
    twin(x)  # the torch twin's forward: running statistics after one forward
    for k in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn3.running_var"):
        assert torch.equal(model.state_dict()[k], twin.state_dict()[k]), k

    clone = copy.deepcopy(model)
    assert type(clone.bn1) is BatchNorm2d and clone.bn1.weight is not model.bn1.weight
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored.bn3) is BatchNorm1d
    assert revert_batchnorm(model) is model and type(model.bn1) is nn.BatchNorm2d and model.bn1 is bn1


def test_convert_leaves_subclasses_and_rejects_non_modules():
    class MyBN(nn.BatchNorm2d):
        pass

    seq = nn.Sequential(MyBN(3), nn.BatchNorm2d(3), nn.SyncBatchNorm(3))
    convert_batchnorm(seq)
    assert [type(m) for m in seq] == [MyBN, BatchNorm2d, nn.SyncBatchNorm]
    bn = nn.BatchNorm1d(2)
    assert convert_batchnorm(bn) is bn and type(bn) is BatchNorm1d
    with pytest.raises(TypeError, match="must be an nn.Module"):
        convert_batchnorm([bn])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_l1_penalty_gradient_unchanged_by_conversion(mode, double_backward):
    """L1GradPenalty on weights and activations: the gradient of loss + penalty with qgrad's BatchNorm equals
    the one with torch's (float32, relative error <= 1e-5), and so do the statistics."""
    torch.manual_seed(0)
    ref = Net()
    if mode == "eval":  # give the running statistics non-trivial values first
        with torch.no_grad():
            for _ in range(3):
                ref(torch.randn(16, 3, 8, 8) * 2 + 1)
        ref.eval()
    ours = convert_batchnorm(copy.deepcopy(ref))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    results = []
    for model, fused in ((ref, False), (ours, True)):
        # the penalty records activations only in training mode; in eval mode it regularizes the weights
        penalty = L1GradPenalty(model, weight=0.05, activation=0.05 if mode == "train" else 0.0)
        # the penalty may convert the BatchNorms itself: pin each model to the implementation under test
        (convert_batchnorm if fused else revert_batchnorm)(model)
        assert type(model.bn1) is (BatchNorm2d if fused else nn.BatchNorm2d)
        stats = penalty.backward(F.cross_entropy(model(x), y))
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((stats, grads, {k: v.clone() for k, v in model.state_dict().items()}))
    (s_ref, g_ref, sd_ref), (s_ours, g_ours, sd_ours) = results
    assert s_ref["penalty"] > 0
    for k in s_ref:
        assert abs(s_ours[k] - s_ref[k]) <= 1e-5 * abs(s_ref[k]), k
    rel = ((g_ours - g_ref).norm() / g_ref.norm()).item()
    assert rel <= 1e-5, f"relative error of the parameter gradient {rel:.3g}"
    for k in sd_ref:
        assert torch.equal(sd_ours[k], sd_ref[k]), k


def _kernel_arguments(device="cpu"):
    """Valid arguments of a double-backward kernel, and changes to them that it must reject (with the message)."""
    x, dy, c = (torch.randn(2, 3, 4, device=device), torch.randn(2, 3, 4, device=device),
                torch.ones(3, device=device))
    good = dict(ggx=None, ggw=None, ggb=None, dy=dy, x=x, weight=None, mean=c, invstd=c, sum_dy=None,
                sum_dy_xhat=None, training=True, need_dy=True, need_x=True, need_w=True)
    bad = [
        (dict(dy=torch.randn(2, 3, 5, device=device)), "dy must have the shape of x"),
        (dict(ggx=torch.randn(2, 3, 4, dtype=F64, device=device)), "ggx must have the dtype of x"),
        (dict(mean=torch.ones(4, device=device)), "mean must be 1-d of length 3"),
        (dict(x=x.long(), dy=dy.long()), "x must be float32, float64, float16 or bfloat16"),
        (dict(x=torch.randn(3, device=device), dy=torch.randn(3, device=device), mean=c[:1], invstd=c[:1]),
         "shape \\(N, C"),
    ]
    return good, bad


def test_cpp_kernel_rejects_bad_arguments():
    kernel = cpu_kernel("batch_norm_double_backward")
    if kernel is None:
        pytest.skip("qgrad._C is not built with batch_norm_double_backward (pip install --no-build-isolation .)")
    good, bad = _kernel_arguments()
    kernel(**good)
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            kernel(**{**good, **change})


def test_each_implementation_is_the_one_that_runs(double_backward, monkeypatch):
    from qgrad import kernels
    from qgrad.ops import dispatch

    ran = []

    def spy(name, real):
        return lambda *args: ran.append(name) or real(*args)

    if kernels.is_available()[0]:
        monkeypatch.setattr(
            kernels, "batch_norm_double_backward", spy("triton", kernels.batch_norm_double_backward)
        )
    kernel = dispatch.cpu_kernel("batch_norm_double_backward")
    if kernel is not None:  # the loader's cache is what the op reads
        monkeypatch.setitem(dispatch._CPU_KERNELS, "batch_norm_double_backward", (spy("cpp", kernel), ""))
    x = torch.randn(4, 3, 5, requires_grad=True)
    gx = torch.autograd.grad(batch_norm(x, None, None, training=True).pow(3).sum(), x, create_graph=True)[0]
    gx.square().sum().backward()
    assert ran == ([] if double_backward == "torch" else [double_backward])


def test_an_explicit_triton_request_that_cannot_run_raises(monkeypatch):
    from qgrad import kernels
    from qgrad.ops.dispatch import use_backend

    monkeypatch.setattr(kernels, "is_available", lambda: (False, "the test says no"))

    def second_derivative():
        x = torch.randn(4, 3, 5, requires_grad=True)
        gx = torch.autograd.grad(batch_norm(x, None, None, training=True).pow(3).sum(), x, create_graph=True)[0]
        return torch.autograd.grad(gx.square().sum(), x)[0]

    with use_backend("triton"), pytest.raises(RuntimeError, match="'triton' was requested but the test says no"):
        second_derivative()
    with use_backend("auto"):  # falls back to the C++ kernel or the PyTorch ops
        second_derivative()


# ------------------------------------------------------------------------------------------ Triton launcher
# Direct tests of qgrad.kernels.batch_norm_double_backward: on CPU tensors under the interpreter, on CUDA
# tensors where there is a GPU.
@pytest.fixture
def triton_bn():
    """The module of the Triton launcher and the device its tests run on."""
    from qgrad import kernels

    ok, why = kernels.is_available()
    if not ok:
        pytest.skip(f"Triton cannot run here: {why}")
    import qgrad.kernels.batch_norm as kb

    return kb, torch.device("cpu" if kb._INTERPRETED else "cuda")


def _launcher_inputs(shape, dtype, device, training, seed=0):
    """Every argument of the launcher, drawn in float64 and rounded: x, dy, ggx in ``dtype``, the (C,) tensors
    in float32 (float64 for float64 inputs); batch statistics of x in training mode, others in eval mode;
    ``sum_dy`` and ``sum_dy_xhat`` as the first backward computes them."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    pdt = F64 if dtype == F64 else torch.float32
    dims = (0,) + tuple(range(2, len(shape)))

    def draw(size, scale=1.0, offset=0.0, out=dtype):
        return (torch.randn(size, generator=gen, dtype=F64) * scale + offset).to(out).to(device)

    x, dy, ggx = draw(shape, 3.0, 2.0), draw(shape), draw(shape)
    if training:
        var, mean = torch.var_mean(x.to(pdt), dim=dims, correction=0)
        invstd = torch.rsqrt(var + 1e-5)
    else:
        mean, invstd = draw(c, out=pdt), (torch.rand(c, generator=gen, dtype=F64) + 0.5).to(pdt).to(device)
    xhat = (x.to(pdt) - mean.reshape((1, c) + (1,) * (len(shape) - 2))) * invstd.reshape(
        (1, c) + (1,) * (len(shape) - 2)
    )
    return dict(
        ggx=ggx, ggw=draw(c, out=pdt), ggb=draw(c, out=pdt), dy=dy, x=x, weight=draw(c, out=pdt),
        mean=mean, invstd=invstd, sum_dy=dy.to(pdt).sum(dims), sum_dy_xhat=(dy.to(pdt) * xhat).sum(dims),
    )


# which optional arguments are None
LAUNCHER_VARIANTS = {
    "all": (),
    "no_sums": ("sum_dy", "sum_dy_xhat"),
    "no_ggx": ("ggx",),
    "no_affine": ("weight", "ggw", "ggb", "sum_dy", "sum_dy_xhat"),
    "ggw_only": ("ggx", "ggb", "sum_dy", "sum_dy_xhat"),
}
NEEDS = [(dy, x, w) for dy in (False, True) for x in (False, True) for w in (False, True)]
LAUNCHER_DTYPES = [
    torch.float32,
    F64,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1",
        reason=INTERPRETER_BF16,
    )),
]


def _rel_tol(dtype):
    """Relative tolerance of d_dy / d_x against the PyTorch ops: a few float32 roundings for float32 (the ops
    round every intermediate, the kernel keeps its coefficients in float64), a few float64 ones for float64,
    one rounding of the output for float16 / bfloat16."""
    return {torch.float32: 1e-5, F64: 1e-12}.get(dtype, torch.finfo(dtype).eps)


def _assert_rel(actual, expected, rtol, what):
    """|actual - expected| <= rtol * (|expected| + max|expected|), elementwise."""
    _assert_close(actual, expected, rtol, rtol * expected.double().abs().max().item(), what)


def _run_launcher(kb, args, training, need):
    return kb.batch_norm_double_backward(
        args["ggx"], args["ggw"], args["ggb"], args["dy"], args["x"], args["weight"], args["mean"], args["invstd"],
        args["sum_dy"], args["sum_dy_xhat"], training, *need,
    )


def _check_launcher(kb, args, training, need, what):
    """The launcher against _double_backward_torch (values, None pattern, dtypes) and, on CPU tensors, the
    C++ kernel (the same results, of the same dtypes)."""
    from qgrad.ops.batch_norm import _double_backward_torch

    got = _run_launcher(kb, args, training, need)
    expected = _double_backward_torch(
        args["ggx"], args["ggw"], args["ggb"], args["dy"], args["x"], args["weight"], args["mean"],
        args["invstd"], training, need, args["sum_dy"], args["sum_dy_xhat"],
    )
    x = args["x"]
    rtol = _rel_tol(x.dtype)
    for name, a, e, n in zip(("d_dy", "d_x", "d_w"), got, expected, need):
        where = f"{what} need={need} {name}"
        if not n:
            assert a is None, f"{where}: not requested but returned"
            continue
        if name == "d_w":
            assert a.dtype == F64 and a.shape == (x.shape[1],), f"{where}: {a.dtype} {tuple(a.shape)}"
            # float32 sums for every input dtype but float64
            _assert_rel(a, e, 1e-12 if x.dtype == F64 else 1e-5, where)
            continue
        assert a.dtype == x.dtype and a.shape == x.shape and a.is_contiguous(), f"{where}: {a.dtype}"
        if e is None:  # eval mode without ggw: identically zero, which the PyTorch ops report as None
            assert not training and args["ggw"] is None and not a.any(), f"{where}: not zero"
        else:
            _assert_rel(a, e, rtol, where)
    cpp = cpu_kernel("batch_norm_double_backward") if x.device.type == "cpu" else None
    if cpp is not None:
        ref = cpp(*(args[k] for k in ("ggx", "ggw", "ggb", "dy", "x", "weight", "mean", "invstd", "sum_dy",
                                      "sum_dy_xhat")), training, *need)
        for name, a, e in zip(("d_dy", "d_x", "d_w"), got, ref):
            where = f"{what} need={need} {name} against the C++ kernel"
            assert (a is None) == (e is None), f"{where}: None pattern differs"
            if a is not None:
                assert a.dtype == e.dtype and a.shape == e.shape, f"{where}: {a.dtype} vs {e.dtype}"
                _assert_rel(a, e, 1e-12 if x.dtype == F64 else rtol, where)
    return got


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7), (4, 6, 5, 3), (1, 4, 3, 3), (6, 3, 1, 1), (1, 5),
                                   (2, 3, 16, 16)])
@pytest.mark.parametrize("dtype", LAUNCHER_DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_triton_launcher_matches_torch_ops(triton_bn, shape, dtype, training):
    """Odd shapes ((1, 5): batch 1 and S = 1; (2, 3, 16, 16): one channel per elementwise block), every
    optional argument present or None, every subset of requested results."""
    kb, device = triton_bn
    if training and shape[0] * math.prod(shape[2:]) == 1:
        pytest.skip("one value per channel: batch_norm rejects it in training mode (and every result is 0 up to "
                    "rounding noise, which a relative tolerance cannot judge)")
    full = _launcher_inputs(shape, dtype, device, training)
    for variant, absent in LAUNCHER_VARIANTS.items():
        args = {k: (None if k in absent else v) for k, v in full.items()}
        for need in NEEDS:
            _check_launcher(kb, args, training, need, f"{variant} {dtype} {shape}")


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's grid and INT64 flag, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs["INT64"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("shape", [(5, 3, 7, 6), (37, 6), (9, 70, 3)])
def test_triton_launcher_split_reduction_and_int64_offsets(triton_bn, shape, monkeypatch):
    """Small tiles make every channel block span many tiles, so the sums are split over several programs
    (``SPLIT > 1``), with masked rows, channels and columns; a zero int32 limit forces the int64 offsets."""
    kb, device = triton_bn
    monkeypatch.setattr(kb, "_SUM_TILE", 8)
    sums = _LaunchSpy(kb._bn_sums_kernel)
    monkeypatch.setattr(kb, "_bn_sums_kernel", sums)
    for limit in (2**31 - 1, 0):
        monkeypatch.setattr(kb, "_INT32_LIMIT", limit)
        for training in (True, False):
            args = _launcher_inputs(shape, F64, device, training)
            args["sum_dy"] = args["sum_dy_xhat"] = None
            _check_launcher(kb, args, training, (True, True, True), f"limit {limit} {shape}")
    assert all(grid[1] > 1 for grid, _ in sums.launches), sums.launches
    assert {int64 for _, int64 in sums.launches} == {False, True}


def test_triton_launcher_rejects_bad_arguments(triton_bn):
    kb, device = triton_bn
    good, bad = _kernel_arguments(device)
    kb.batch_norm_double_backward(**good)
    if device.type == "cuda":
        cpu = dict(x=good["x"].cpu(), dy=good["dy"].cpu())
        bad += [(dict(mean=good["mean"].cpu()), "mean is on cpu but x is on cuda"),
                (dict(cpu, mean=good["mean"].cpu(), invstd=good["invstd"].cpu()), "need a CUDA tensor")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            kb.batch_norm_double_backward(**{**good, **change})


def test_triton_launcher_handles_empty_inputs(triton_bn):
    kb, device = triton_bn
    args = _launcher_inputs((0, 3, 4), torch.float32, device, training=False)
    d_dy, d_x, d_w = _run_launcher(kb, args, True, (True, True, True))
    assert d_dy.shape == d_x.shape == (0, 3, 4) and d_w.dtype == F64 and not d_w.any()


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(32, 64, 16, 16), (64, 512, 4, 4), (512, 384), (16, 96, 7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training,sums", [(True, False), (True, True), (False, False)])
def test_triton_launcher_on_gpu_against_float64(shape, dtype, training, sums):
    """On CUDA tensors, against _double_backward_torch on the same values in float64: the kernel's error is at
    most twice that of the PyTorch ops run on the low-precision inputs, plus one rounding of the output."""
    from qgrad.kernels import batch_norm_double_backward
    from qgrad.ops.batch_norm import _double_backward_torch

    args = _launcher_inputs(shape, dtype, torch.device("cuda"), training, seed=4)
    if not sums:
        args["sum_dy"] = args["sum_dy_xhat"] = None
    keys = ("ggx", "ggw", "ggb", "dy", "x", "weight", "mean", "invstd")
    need = (True, True, True)
    ours = batch_norm_double_backward(*(args[k] for k in keys), args["sum_dy"], args["sum_dy_xhat"], training, *need)
    theirs = _double_backward_torch(*(args[k] for k in keys), training, need, args["sum_dy"], args["sum_dy_xhat"])
    exact = _double_backward_torch(
        *(None if args[k] is None else args[k].double() for k in keys), training, need,
        *(None if args[k] is None else args[k].double() for k in ("sum_dy", "sum_dy_xhat")),
    )
    assert ours[0].dtype == ours[1].dtype == dtype and ours[2].dtype == F64
    for name, a, t, e in zip(("d_dy", "d_x", "d_w"), ours, theirs, exact):
        scale = e.abs().max().item() + 1e-30
        err_ours = (a.double() - e).abs().max().item() / scale
        err_torch = (t.double() - e).abs().max().item() / scale
        floor = torch.finfo(t.dtype).eps
        assert err_ours <= 2 * err_torch + floor, f"{name}: error {err_ours:.3g} vs PyTorch ops {err_torch:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("training", [True, False])
def test_cuda_double_backward_runs_the_triton_kernel(training, monkeypatch):
    """batch_norm's double backward on CUDA tensors goes through the Triton kernel and matches PyTorch's own
    second derivatives (float64)."""
    from qgrad import kernels

    monkeypatch.delenv("QGRAD_BACKEND", raising=False)
    ran = []
    real = kernels.batch_norm_double_backward
    monkeypatch.setattr(kernels, "batch_norm_double_backward", lambda *args: ran.append(1) or real(*args))
    x, w, b, rm, rv = (None if t is None else t.cuda() for t in _inputs((8, 5, 6, 6), affine=True))
    ours = _first_and_second(batch_norm, x, w, b, rm, rv, training, 0.1)
    ref = _first_and_second(F.batch_norm, x, w, b, rm, rv, training, 0.1)
    assert ran
    for a, e in zip(ours[3] + ours[4], ref[3] + ref[4]):
        _assert_close(a, e, 1e-10, 1e-10, "gradient")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES + [(32, 64, 16, 16)])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_channels_last_double_backward_runs_the_triton_kernel_on_views(shape, training, monkeypatch):
    monkeypatch.delenv("QGRAD_BACKEND", raising=False)
    _check_channels_last(shape, training, "triton", "cuda", monkeypatch)
