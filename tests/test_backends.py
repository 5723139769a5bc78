"""qgrad.fake_quant on every backend that can run here, and the rules that pick the backend."""
import os
import warnings

import pytest
import torch

import qgrad
from qgrad.ops import dispatch as B
from qgrad.reference import fake_quant_backward_ref, fake_quant_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


def _runnable():
    names = []
    for name, info in qgrad.backends().items():
        if info["available"] or (name == "triton" and INTERPRETED and B._load("triton")[0] is not None):
            names.append(pytest.param(name))
        else:
            names.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {info['reason']}")))
    return names


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _device(backend):
    """Where ``backend`` runs: ``cpp`` on CPU tensors, the others on the GPU when there is one."""
    return "cpu" if backend == "cpp" else DEVICE


def _skip_unsupported(backend, dtype):
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter rounds float32 -> bfloat16 by truncation; runs on a GPU")


CASES = [
    # (shape, axis, quant_min, quant_max, zero_point)
    ((1000,), None, -127, 127, 0.0),
    ((37, 29), None, 0, 15, 3.0),
    ((5, 123, 7), 1, -7, 7, 0.0),
    ((6, 3, 5, 5), 0, -1, 1, 0.0),
    ((4, 5, 6, 7), 3, 0, 255, 17.0),
    ((4, 5, 6, 7), 2, -32767, 32767, 0.0),
    ((0, 3), None, -7, 7, 0.0),
]


def _inputs(shape, axis, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    c = shape[axis] if axis is not None else 1
    # powers of two: many elements sit exactly on ties and on the clip edges
    scale = (2.0 ** torch.randint(-5, -1, (c,), generator=g).float()).reshape(() if axis is None else (c,))
    return x.to(device), scale.to(device)


@pytest.mark.parametrize("backend", _runnable())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, axis, qmin, qmax, zp", CASES)
def test_backend_matches_reference(backend, dtype, shape, axis, qmin, qmax, zp):
    _skip_unsupported(backend, dtype)
    device = _device(backend)
    x, scale = _inputs(shape, axis, dtype, device)
    zero_point = torch.full(scale.shape, zp, device=device)
    x.requires_grad_()
    scale.requires_grad_()
    zero_point.requires_grad_()
    with B.use_backend(backend):
        y = qgrad.fake_quant(x, scale, zero_point, qmin, qmax, axis=axis)
        dy = torch.randn_like(y)
        dx, ds, dz = torch.autograd.grad(y, (x, scale, zero_point), dy)
    assert torch.equal(y, fake_quant_ref(x.detach(), scale.detach(), zero_point.detach(), qmin, qmax, axis))
    rdx, rds, rdz = fake_quant_backward_ref(dy, x.detach(), scale.detach(), zero_point.detach(), qmin, qmax, axis)
    assert torch.equal(dx, rdx)
    # float32 sums in a different order: relative to the sum of |terms|
    bound = 1e-5 * (fake_quant_backward_ref(dy.abs(), x.detach(), scale.detach(), zero_point.detach(), qmin, qmax, axis)[1].abs() + 1)
    assert torch.all((ds - rds).abs() <= bound), (ds, rds)
    torch.testing.assert_close(dz, rdz, rtol=1e-5, atol=1e-5 * (1 + x.numel()))


@pytest.mark.parametrize("backend", _runnable())
def test_non_contiguous_and_channels_last(backend):
    device = _device(backend)
    base = torch.randn(8, 6, 10, 12, device=device)
    views = [base.transpose(1, 3), base[:, ::2, 1::3], base.to(memory_format=torch.channels_last)]
    zero = torch.tensor(0.0, device=device)
    with B.use_backend(backend):
        for v in views:
            for axis in (1, None):
                scale = torch.rand(v.shape[1], device=device) * 0.1 + 0.02 if axis else torch.tensor(0.05)
                scale = scale.to(device)
                x = v.detach().requires_grad_()
                y = qgrad.fake_quant(x, scale, 0.0, -7, 7, axis=axis)
                assert torch.equal(y, fake_quant_ref(v, scale, zero, -7, 7, axis))
                dy = torch.randn_like(v)
                (dx,) = torch.autograd.grad(y, x, dy)
                assert torch.equal(dx, fake_quant_backward_ref(dy, v, scale, zero, -7, 7, axis)[0])
                if v is not views[1]:  # dense: results in the input's layout, whichever backend ran
                    assert y.stride() == v.stride() and dx.stride() == v.stride()


@pytest.mark.parametrize("backend", _runnable())
@pytest.mark.parametrize("axis", [None, 1])
def test_double_backward_matches_autograd_of_reference(backend, axis):
    """Gradients of (dx, dscale, dzp) w.r.t. (dy, x, scale): closed-form backward vs autograd of the reference."""
    device = _device(backend)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 5, 4, generator=g) * 2).to(device).requires_grad_()
    scale = (torch.rand(5 if axis else (), generator=g) * 0.3 + 0.2).to(device).requires_grad_()
    zp = torch.full(scale.shape, 1.0, device=device).requires_grad_()
    dy = torch.randn(6, 5, 4, generator=g).to(device).requires_grad_()
    w = [torch.randn(t.shape, generator=g).to(device) for t in (x, scale, zp)]

    def second(fn):
        grads = fn()
        total = sum((gr * wi).sum() for gr, wi in zip(grads, w))
        return torch.autograd.grad(total, (dy, x, scale), allow_unused=True, materialize_grads=True)

    with B.use_backend(backend):
        ours = second(lambda: torch.autograd.grad(qgrad.fake_quant(x, scale, zp, -4, 3, axis=axis), (x, scale, zp), dy, create_graph=True))
    ref = second(lambda: fake_quant_backward_ref(dy, x, scale, zp, -4, 3, axis))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- dispatch
def test_backends_lists_every_backend_with_a_reason():
    info = qgrad.backends()
    assert set(info) == {"torch", "cpp", "cuda", "triton"}
    assert info["torch"]["available"]
    for name, entry in info.items():
        assert entry["available"] or entry["reason"], name


def test_unknown_backend_name_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown qgrad backend 'fast'"):
        with B.use_backend("fast"):
            pass
    monkeypatch.setenv("QGRAD_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown qgrad backend"):
        qgrad.fake_quant(torch.randn(3), 0.1, 0.0, -7, 7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_explicit_backend_that_cannot_run_raises_with_reason(monkeypatch):
    monkeypatch.setenv("QGRAD_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="qgrad backend 'cuda' was requested but cannot run here"):
        qgrad.fake_quant(torch.randn(3), 0.1, 0.0, -7, 7)


def test_context_manager_beats_environment(monkeypatch):
    monkeypatch.setenv("QGRAD_BACKEND", "cuda")
    with B.use_backend("torch"):
        assert B.select_backend(torch.randn(2)).name == "torch"


def test_float64_always_runs_the_reference(monkeypatch):
    monkeypatch.setenv("QGRAD_BACKEND", "cpp")
    assert B.select_backend(torch.randn(2, dtype=torch.float64)).name == "torch"


def test_auto_falls_back_with_one_warning_when_no_kernels(monkeypatch):
    monkeypatch.setattr(B, "_LOADED", {"cpp": (None, "qgrad._C is not installed (simulated)")})
    monkeypatch.setattr(B, "_AUTO", {})
    monkeypatch.setattr(B, "_WARNED", set())
    monkeypatch.delenv("QGRAD_BACKEND", raising=False)
    x = torch.randn(10)
    with pytest.warns(RuntimeWarning, match="falling back to the PyTorch reference"):
        y = qgrad.fake_quant(x, 0.1, 0.0, -7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qgrad.fake_quant(x, 0.1, 0.0, -7, 7)  # warned once, not again
    assert torch.equal(y, fake_quant_ref(x, torch.tensor(0.1), torch.tensor(0.0), -7, 7))


def test_a_missing_extension_is_explained_by_where_qgrad_was_imported_from(tmp_path, monkeypatch):
    """Imported from a checkout (python -m qgrad in its root shadows an installed copy) the reason says so;
    imported from an installation it says how to build the extension."""
    import sys

    monkeypatch.setitem(sys.modules, "qgrad._C", None)  # the import of qgrad._C raises ImportError
    monkeypatch.delattr(qgrad, "_C", raising=False)
    checkout = tmp_path / "checkout"
    (checkout / "qgrad" / "ops").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    monkeypatch.setattr(B, "__file__", str(checkout / "qgrad" / "ops" / "dispatch.py"))
    ext, why = B._load_ext()
    assert ext is None and f"imported from the source tree {checkout}" in why and "run from another" in why
    site = tmp_path / "site-packages"
    monkeypatch.setattr(B, "__file__", str(site / "qgrad" / "ops" / "dispatch.py"))
    ext, why = B._load_ext()
    assert ext is None and "qgrad._C is not installed" in why and "pip install --no-build-isolation ." in why


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU rule")
def test_auto_on_cpu_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setattr(B, "_AUTO", {})
    monkeypatch.delenv("QGRAD_BACKEND", raising=False)
    assert B.select_backend(torch.randn(4)).name in ("cpp", "torch")


@pytest.mark.parametrize("kernel", ["batch_norm_double_backward", "l1_norm_sign"])
def test_cpu_kernels_follow_the_backend_switch(kernel):
    with B.use_backend("torch"):
        assert B.cpu_kernel(kernel) is None
    if qgrad.backends()["cpp"]["available"]:
        assert B.cpu_kernel(kernel) is not None
        with B.use_backend("cpp"):
            assert B.cpu_kernel(kernel) is not None


def test_a_requested_cpp_backend_without_the_kernel_raises(monkeypatch):
    monkeypatch.setitem(B._CPU_KERNELS, "l1_norm_sign", (None, "the test removed it"))
    assert B.cpu_kernel("l1_norm_sign") is None  # auto: the callers compute with PyTorch ops
    with B.use_backend("cpp"), pytest.raises(RuntimeError, match="backend 'cpp' was requested but the test"):
        B.cpu_kernel("l1_norm_sign")
