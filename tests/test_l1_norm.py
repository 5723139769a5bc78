"""Tests for qgrad.ops.l1_norm: ``multi_l1_norm`` against its plain-op reference and a float64 computation, on
both implementations (the C++ kernel for CPU tensors and the PyTorch ops), and the kernel's own properties."""

import pytest
import torch

from conftest import select_cpu_implementation

from qgrad.ops.l1_norm import (
    MultiL1NormFn,
    accept_seeds,
    add_seeds,
    l1_norm_sign,
    multi_l1_norm,
    multi_l1_norm_ref,
)


@pytest.fixture(autouse=True, params=["cpp", "triton", "torch"])
def implementation(request, monkeypatch):
    """Runs every test of this file with the C++ kernel, the Triton kernel (interpreted on a CPU) and the
    PyTorch ops."""
    return select_cpu_implementation("l1_norm_sign", request.param, monkeypatch)

SHAPES = [(5, 123, 123), (7,), (3, 1, 5, 9), ()]
TOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def make_tensors(dtype, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if t.dim() >= 2:
            t[..., ::3] = 0.0  # exact zeros: sign 0, the zero subgradient
        if noncontiguous and t.dim() >= 2:
            t = torch.randn(shape[::-1], generator=g, dtype=torch.float64).transpose(0, -1)[..., ::2]
        out.append(t.to(dtype).requires_grad_())
    return out


def worst(a, b):
    diff = (a.double() - b.double()).abs()
    i = int(diff.argmax())
    return f"worst mismatch at {i}: {a.flatten()[i].item()} vs {b.flatten()[i].item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_values_and_gradients_match_reference(dtype, noncontiguous):
    tensors = make_tensors(dtype, noncontiguous=noncontiguous)
    coeff = torch.tensor([0.3, -1.7, 2.0, 0.5], dtype=torch.float64)
    out = multi_l1_norm(tensors)
    ref = multi_l1_norm_ref(tensors)
    exact = torch.stack([t.detach().double().abs().sum() for t in tensors])  # float64 truth

    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (len(tensors),) and out.dtype == expected_dtype and ref.dtype == expected_dtype
    rel = ((out.double() - exact).abs() / exact.clamp_min(1e-30)).max().item()
    assert rel <= TOL[dtype], (rel, worst(out, exact))

    grads = torch.autograd.grad((out * coeff.to(out.dtype)).sum(), tensors)
    grads_ref = torch.autograd.grad((ref * coeff.to(ref.dtype)).sum(), tensors)
    for t, g, r, c in zip(tensors, grads, grads_ref, coeff):
        assert g.dtype == t.dtype and g.shape == t.shape
        # c * sign(t) is exact in every dtype where c is representable; compare with the reference bit for bit
        assert torch.equal(g, r), worst(g, r)
        assert torch.equal(g, (torch.sign(t.detach().double()) * c).to(t.dtype))


def test_signs_are_saved_as_int8_and_mixed_dtypes_work():
    tensors = [
        torch.randn(4, 5, dtype=torch.bfloat16, requires_grad=True),
        torch.randn(6, requires_grad=True),
        torch.randn(3, 3, dtype=torch.float16, requires_grad=True),
    ]
    out = multi_l1_norm(tensors)
    assert out.dtype == torch.float32
    saved = out.grad_fn.saved_tensors
    assert [s.dtype for s in saved] == [torch.int8] * 3
    assert all(torch.equal(s, torch.sign(t.detach()).to(torch.int8)) for s, t in zip(saved, tensors))
    grads = torch.autograd.grad(out.sum(), tensors)
    assert [g.dtype for g in grads] == [t.dtype for t in tensors]


def test_no_grad_skips_the_signs_and_keeps_values():
    tensors = make_tensors(torch.float32)
    with torch.no_grad():
        out = multi_l1_norm(tensors)
    assert out.grad_fn is None
    assert torch.equal(out, multi_l1_norm(tensors).detach())
    plain = [t.detach() for t in tensors]
    assert torch.equal(multi_l1_norm(plain), out)


def test_only_inputs_that_need_grad_get_one():
    a = torch.randn(5, requires_grad=True)
    b = torch.randn(5)
    out = multi_l1_norm([a, b])
    (ga,) = torch.autograd.grad(out.sum(), [a])
    assert torch.equal(ga, torch.sign(a.detach()))
    assert isinstance(out.grad_fn, MultiL1NormFn._backward_cls)


def test_errors():
    with pytest.raises(ValueError, match="tensors is empty"):
        multi_l1_norm([])
    with pytest.raises(TypeError, match="single tensor"):
        multi_l1_norm(torch.ones(3))
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a floating-point tensor"):
        multi_l1_norm([torch.ones(3), torch.ones(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a torch.Tensor"):
        multi_l1_norm([1.0])
    with pytest.raises(TypeError, match="must be a list of tensors"):
        multi_l1_norm(3)


def test_chunked_sums_and_signs_are_exact_and_thread_independent(implementation):
    # 2**16 + 5 elements: two full chunks of the kernel and a short one; tiny tensors and an empty one between
    g = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(2**16 + 5, generator=g),
        torch.randn(3, generator=g),
        torch.empty(0),
        torch.randn(1, 7, generator=g),
    ]
    tensors[0][::7] = 0.0
    tensors[3][0, 2] = float("nan")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        norms1, signs1 = l1_norm_sign(tensors, keep_sign=True)
        torch.set_num_threads(2)
        norms2, signs2 = l1_norm_sign(tensors, keep_sign=True)
    finally:
        torch.set_num_threads(threads)
    assert norms1[3].isnan() and norms2[3].isnan()
    if implementation == "cpp":  # fixed chunks in a fixed order; torch's own sum makes no such promise
        assert torch.equal(norms1[:3], norms2[:3])
    exact = torch.stack([t.double().abs().sum() for t in tensors[:3]]).float()
    torch.testing.assert_close(norms1[:3], exact, rtol=1e-6, atol=0)
    assert norms1[2] == 0
    for t, s1, s2 in zip(tensors, signs1, signs2):
        assert s1.dtype == torch.int8 and s1.shape == t.shape and torch.equal(s1, s2)
        assert torch.equal(s1, torch.sign(t).nan_to_num(0.0).to(torch.int8))
    assert signs1[3][0, 2] == 0  # NaN has no sign
    assert l1_norm_sign(tensors, keep_sign=False)[1] is None


class _Square(torch.autograd.Function):
    """``x -> x**2``, a node that takes deferred seeds; it records the gradient its backward received."""

    received = []

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        accept_seeds(ctx)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        _Square.received.append(grad)
        (grad,) = add_seeds(ctx, (grad,))
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_seeds_are_deferred_to_nodes_that_accept_them():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    coeff = torch.tensor([0.7, -1.3], dtype=torch.float64)
    _Square.received.clear()
    out = multi_l1_norm([_Square.apply(x), z * 3])
    grads = torch.autograd.grad((out * coeff).sum(), [x, z])
    # the node got a zero-stride zero in place of the seed ...
    (received,) = _Square.received
    assert received.stride() == (0, 0) and not received.any()
    # ... and the gradients are those of the plain-op reference
    ref = multi_l1_norm_ref([x * x, z * 3])
    expected = torch.autograd.grad((ref * coeff).sum(), [x, z])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    # a retained graph: a second backward through the l1 node gets the seeds again, one that bypasses it
    # does not see them
    y = _Square.apply(x)
    out = multi_l1_norm([y])
    for _ in range(2):
        (gx,) = torch.autograd.grad(out.sum(), [x], retain_graph=True)
        torch.testing.assert_close(gx, 2 * x * torch.sign(x * x), rtol=1e-14, atol=0)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(gx, 2 * x, rtol=1e-14, atol=0)


def test_each_implementation_is_the_one_that_runs(implementation, monkeypatch):
    from qgrad import kernels
    from qgrad.ops import dispatch

    ran = []

    def spy(name, real):
        return lambda *args: ran.append(name) or real(*args)

    monkeypatch.setattr(kernels, "l1_norm_sign", spy("triton", kernels.l1_norm_sign))
    kernel = dispatch.cpu_kernel("l1_norm_sign")
    if kernel is not None:  # the loader's cache is what the op reads
        monkeypatch.setitem(dispatch._CPU_KERNELS, "l1_norm_sign", (spy("cpp", kernel), ""))
    multi_l1_norm([torch.randn(3, 4), torch.randn(5)])
    assert ran == ([] if implementation == "torch" else [implementation])


def test_an_explicit_triton_request_that_cannot_run_raises(monkeypatch):
    from qgrad import kernels
    from qgrad.ops.dispatch import use_backend

    monkeypatch.setattr(kernels, "is_available", lambda: (False, "the test says no"))
    with use_backend("triton"), pytest.raises(RuntimeError, match="'triton' was requested but the test says"):
        multi_l1_norm([torch.randn(3)])
    with use_backend("auto"):  # falls back to the C++ kernel or the PyTorch ops
        multi_l1_norm([torch.randn(3)])
