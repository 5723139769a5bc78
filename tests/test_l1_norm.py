"""Tests for qgrad.ops.l1_norm: ``multi_l1_norm`` against its plain-op reference and a float64 computation, on
both implementations (the C++ kernel for CPU tensors and the PyTorch ops), and the kernel's own properties."""

import pytest
import torch

from conftest import recording_tensor_arguments, select_cpu_implementation

from qgrad.ops.l1_norm import (
    MultiL1NormFn,
    accept_seeds,
    add_scaled_sign,
    add_scaled_sign_ref,
    add_seeds,
    l1_norm_sign,
    multi_l1_norm,
    multi_l1_norm_ref,
)

INTERPRETER_BF16 = "the Triton interpreter converts float32 to bfloat16 by truncation (GPUs round to nearest even)"


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
def test_values_and_gradients_match_reference(dtype, noncontiguous, implementation):
    if implementation == "triton" and dtype == torch.bfloat16:  # the seeds are stored in bfloat16
        pytest.skip(INTERPRETER_BF16)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_norms_match_in_every_dtype_without_gradients(dtype):
    # the forward alone (no seeds stored), which the interpreter runs in bfloat16 too
    tensors = [t.detach() for t in make_tensors(dtype)]
    norms, signs = l1_norm_sign(tensors, keep_sign=True)
    exact = torch.stack([t.double().abs().sum() for t in tensors])
    assert ((norms.double() - exact).abs() / exact.clamp_min(1e-30)).max().item() <= TOL[dtype]
    for t, s in zip(tensors, signs):
        assert s.dtype == torch.int8 and torch.equal(s, torch.sign(t.double()).to(torch.int8))


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


@pytest.mark.parametrize("keep_sign", [True, False])
def test_triton_per_tensor_launches_match_the_table_launch(keep_sign, implementation):
    """The launches a CUDA graph can record (one per tensor, no table copied from the host) give the norms
    and signs of the single table launch, bit for bit, for one dtype and for mixed dtypes."""
    if implementation != "triton":
        pytest.skip("a property of the Triton launcher")
    from qgrad import kernels

    g = torch.Generator().manual_seed(3)
    one = [torch.randn(s, generator=g) for s in [(5, 123, 123), (7,), (3, 1, 5, 9), (), (4097,)]]
    mixed = one[:2] + [torch.randn(6, 7, generator=g, dtype=torch.float16), torch.randn(9, generator=g)]
    for items in (one, mixed):
        table = kernels.l1_norm_sign(items, keep_sign, torch.float32)
        launches = kernels.l1_norm_sign(items, keep_sign, torch.float32, per_tensor=True)
        assert torch.equal(table[0], launches[0])
        if keep_sign:
            assert all(torch.equal(a, b) for a, b in zip(table[1], launches[1]))
        else:
            assert table[1] is None and launches[1] is None


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


def test_seeds_are_deferred_to_the_nodes_that_produced_the_tensors():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    coeff = torch.tensor([0.7, -1.3], dtype=torch.float64)
    _Square.received.clear()
    z3 = z * 3  # a node of torch's: the seed reaches it through a pre-hook, registered after this one
    before_seed = []
    z3.grad_fn.register_prehook(lambda grads: before_seed.append(grads[0]))
    out = multi_l1_norm([_Square.apply(x), z3])
    grads = torch.autograd.grad((out * coeff).sum(), [x, z])
    # each node got a zero-stride zero in place of the seed ...
    (received,) = _Square.received
    assert received.stride() == (0, 0) and not received.any()
    assert before_seed[0].stride() == (0,) and not before_seed[0].any()
    # ... and the gradients are those of the plain-op reference
    ref = multi_l1_norm_ref([x * x, z * 3])
    expected = torch.autograd.grad((ref * coeff).sum(), [x, z])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    # a retained graph: a second backward through the l1 node gets the seeds again, one that bypasses it
    # does not see them
    for make, slope in ((_Square.apply, 2 * x), (lambda t: t * 3, 3)):
        y = make(x)
        out = multi_l1_norm([y])
        for _ in range(2):
            (gx,) = torch.autograd.grad(out.sum(), [x], retain_graph=True)
            torch.testing.assert_close(gx, slope * torch.sign(y), rtol=1e-14, atol=0)
        (gx,) = torch.autograd.grad(y.sum(), [x])
        torch.testing.assert_close(gx, slope * torch.ones_like(x), rtol=1e-14, atol=0)


def test_a_tensor_given_twice_gets_both_seeds():
    """The same tensor twice in the list (two regularized tensors with one gradient tensor): each occurrence
    has its seed, whether its producer takes deferred seeds or gets them through a pre-hook."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    coeff = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    for make, plain in ((_Square.apply, lambda t: t * t), (lambda t: t * 3, lambda t: t * 3)):
        y, other = make(x), x * 2
        out = multi_l1_norm([y, other, y])
        (got,) = torch.autograd.grad((out * coeff).sum(), [x])
        again = plain(x)
        ref = multi_l1_norm_ref([again, x * 2, again])
        (expected,) = torch.autograd.grad((ref * coeff).sum(), [x])
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------------------- add_scaled_sign
def make_sign(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 123, 123), (7,), (3, 1, 5, 9), (), (0, 4)])
@pytest.mark.parametrize("scale", [0.3, -1.7e-3, "tensor32", "tensor64"])
def test_add_scaled_sign_matches_reference_bit_for_bit(dtype, shape, scale, implementation):
    if implementation == "triton" and dtype == torch.bfloat16:
        pytest.skip(INTERPRETER_BF16)
    sign = make_sign(shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    if isinstance(scale, str):
        scale = torch.tensor(0.123456789, dtype=torch.float32 if scale == "tensor32" else torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = scale.to(acc) if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=acc)
    for xx in (x, None):
        out = add_scaled_sign(sign, scale, xx, dtype=dtype)
        assert out.dtype == dtype and out.shape == sign.shape and out.is_contiguous()
        assert torch.equal(out, add_scaled_sign_ref(sign, scale, xx, dtype))
        # the definition: the sum in the accumulation dtype (scale * sign is exact there), converted to dtype
        expected = sign.to(acc) * s + (0 if xx is None else xx.to(acc))
        assert torch.equal(out, expected.to(dtype))


def test_add_scaled_sign_other_layouts_and_dtypes():
    sign = make_sign((6, 8, 10))
    base = torch.randn(10, 8, 6, dtype=torch.float64)
    # strided x, and x of another dtype than the result: the reference's arithmetic, bit for bit
    for x in (base.transpose(0, 2), base.transpose(0, 2).float(), base.float().contiguous().transpose(0, 2)):
        for dtype in (torch.float32, torch.float64):
            out = add_scaled_sign(sign, 0.25, x, dtype=dtype)
            assert out.dtype == dtype
            assert torch.equal(out, add_scaled_sign_ref(sign, 0.25, x, dtype))
            truth = x.double() + 0.25 * sign.double()
            torch.testing.assert_close(out.double(), truth, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    # the zero-stride zero that stands in for a deferred seed
    zero = torch.zeros((), dtype=torch.float32).expand(6, 8, 10)
    assert torch.equal(add_scaled_sign(sign, 0.5, zero), 0.5 * sign.float())


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_dense_layouts_run_on_views_and_keep_their_strides(layout, implementation, monkeypatch):
    """A gradient stored densely in another layout (channels-last, a transpose) is reduced and seeded without a
    copy: the kernels get contiguous views of its memory, and signs, seeds and sums keep its strides."""
    from qgrad import kernels
    from qgrad.ops import dispatch

    received = []
    for name in ("l1_norm_sign", "add_scaled_sign"):
        monkeypatch.setattr(kernels, name, recording_tensor_arguments(received, getattr(kernels, name)))
        kernel = dispatch.cpu_kernel(name)
        if kernel is not None:
            monkeypatch.setitem(dispatch._CPU_KERNELS, name, (recording_tensor_arguments(received, kernel), ""))
    g = torch.Generator().manual_seed(4)
    if layout == "channels_last":
        t = torch.randn(4, 6, 5, 3, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    else:
        t = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64).transpose(1, 3)
    t[:, ::2] = 0.0
    assert not t.is_contiguous()
    x = torch.randn(t.shape, generator=g, dtype=torch.float64).as_strided(t.shape, t.stride())
    leaf = t.clone().requires_grad_()  # clone keeps the strides of a dense tensor
    assert leaf.stride() == t.stride()

    norms, signs = l1_norm_sign([t], keep_sign=True)
    torch.testing.assert_close(norms[0], t.abs().sum(), rtol=1e-13, atol=0)
    assert signs[0].stride() == t.stride() and torch.equal(signs[0], torch.sign(t).to(torch.int8))
    (seed,) = torch.autograd.grad(multi_l1_norm([leaf]).sum() * 0.5, leaf)
    assert seed.stride() == t.stride() and torch.equal(seed, 0.5 * torch.sign(t))
    for xx in (x, None):
        out = add_scaled_sign(signs[0], 0.25, xx, dtype=torch.float64)
        assert out.stride() == t.stride()
        assert torch.equal(out, add_scaled_sign_ref(signs[0], 0.25, xx, torch.float64))
    if implementation != "torch":
        assert received and all(r.is_contiguous() for r in received)


def test_add_scaled_sign_is_differentiable_in_x():
    sign = make_sign((3, 4, 5))
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: add_scaled_sign(sign, 0.3, t), (x,))
    out = add_scaled_sign(sign, torch.tensor(0.3, dtype=torch.float64), x)
    (gx,) = torch.autograd.grad(out, x, torch.arange(60.0, dtype=torch.float64).reshape(3, 4, 5))
    assert torch.equal(gx, torch.arange(60.0, dtype=torch.float64).reshape(3, 4, 5))
    with torch.no_grad():
        assert not add_scaled_sign(sign, 0.3, x).requires_grad
    # a bfloat16 result of a float32 input hands back a float32 gradient
    x32 = torch.randn(3, 4, 5, requires_grad=True)
    (g32,) = torch.autograd.grad(add_scaled_sign(sign, 0.5, x32, dtype=torch.float64).sum(), x32)
    assert g32.dtype == torch.float32 and torch.equal(g32, torch.ones_like(x32))


def test_add_scaled_sign_errors():
    sign = make_sign((2, 3))
    with pytest.raises(TypeError, match="sign must be an int8 tensor"):
        add_scaled_sign(sign.float(), 1.0, dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        add_scaled_sign(sign, 1.0)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        add_scaled_sign(sign, 1.0, dtype=torch.int32)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        add_scaled_sign(sign, 1.0, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must have sign's shape"):
        add_scaled_sign(sign, 1.0, torch.ones(3, 2))
    with pytest.raises(ValueError, match="scale must be a number or a 0-d tensor"):
        add_scaled_sign(sign, torch.ones(1), dtype=torch.float32)


def test_each_implementation_is_the_one_that_runs(implementation, monkeypatch):
    from qgrad import kernels
    from qgrad.ops import dispatch

    ran = []

    def spy(name, real):
        return lambda *args: ran.append(name) or real(*args)

    for name in ("l1_norm_sign", "add_scaled_sign"):
        monkeypatch.setattr(kernels, name, spy("triton", getattr(kernels, name)))
        kernel = dispatch.cpu_kernel(name)
        if kernel is not None:  # the loader's cache is what the op reads
            monkeypatch.setitem(dispatch._CPU_KERNELS, name, (spy("cpp", kernel), ""))
    multi_l1_norm([torch.randn(3, 4), torch.randn(5)])
    assert ran == ([] if implementation == "torch" else [implementation])
    ran.clear()
    add_scaled_sign(make_sign((4,)), 0.5, torch.randn(4))
    assert ran == ([] if implementation == "torch" else [implementation])


def test_an_explicit_triton_request_that_cannot_run_raises(monkeypatch):
    from qgrad import kernels
    from qgrad.ops.dispatch import use_backend

    monkeypatch.setattr(kernels, "is_available", lambda: (False, "the test says no"))
    with use_backend("triton"), pytest.raises(RuntimeError, match="'triton' was requested but the test says"):
        multi_l1_norm([torch.randn(3)])
    with use_backend("auto"):  # falls back to the C++ kernel or the PyTorch ops
        multi_l1_norm([torch.randn(3)])
