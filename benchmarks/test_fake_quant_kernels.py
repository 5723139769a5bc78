"""Fake-quantization throughput: the fused Triton kernels against the reference and PyTorch's own ops.

Rows: ``impl`` in {triton, reference, torch_compile (``torch.compile`` of the reference), torch
(``torch.fake_quantize_per_{tensor,channel}_affine``),
torch_learnable (``torch._fake_quantize_learnable_per_{tensor,channel}_affine``)}, per-tensor and per-channel
(axis 0 of a ``(256, numel / 256)`` float32 tensor, the weight layout), forward (``fwd``) and forward +
backward (``fwd_bwd``; dx, and the scale / zero-point gradients where the op has them).

``extra_info`` holds ``GBps`` for the essential traffic (forward: read x, write y; backward: read x and dy,
write dx; fwd_bwd counts both), the device's measured copy bandwidth ``copy_GBps`` (``y.copy_(x)`` of the
same size) and their ratio ``fraction_of_copy``. On CUDA the time behind ``GBps`` is the median of
``triton.testing.do_bench`` (device events); on a CPU it is pytest-benchmark's median.

Sizes: 1M, 16M and 64M elements with CUDA; 1M and 4M on a CPU, where the Triton rows are skipped (the
Triton interpreter is a correctness tool, not a performance target).

    pytest benchmarks/test_fake_quant_kernels.py --benchmark-only
"""
import pytest
import torch
from _timing import copy_gbps, median_ms, triton_version

import qgrad.kernels as K
import qgrad.kernels.fake_quant as FQ
from qgrad.reference import fake_quant_backward_ref, fake_quant_ref

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SIZES = [2**20, 2**24, 2**26] if CUDA else [2**20, 2**22]
CHANNELS = 256
QMIN, QMAX = -128, 127
IMPLS = ["triton", "reference", "torch_compile", "torch", "torch_learnable"]


_OK, _WHY = K.is_available()
TRITON_REASON = None
if not CUDA:
    TRITON_REASON = "no CUDA device: the Triton interpreter is a correctness tool, not a performance target"
elif not _OK or FQ._INTERPRETED:
    TRITON_REASON = f"Triton kernels not compiled for the GPU here: {_WHY}"


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _device_ms(fn):
    """Median milliseconds of ``fn``: device events on CUDA, wall clock (after warm-up) on a CPU."""
    if CUDA:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return median_ms(fn, repeats=7)


def _inputs(numel, per_channel):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(CHANNELS, numel // CHANNELS, generator=g) * 2).to(DEVICE)
    dy = torch.randn(x.shape, generator=g).to(DEVICE)
    if per_channel:
        scale = (torch.rand(CHANNELS, generator=g) * 0.02 + 0.01).to(DEVICE)
        zp = torch.zeros(CHANNELS, device=DEVICE)
    else:
        scale, zp = torch.tensor(0.02, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    return x, dy, scale, zp


def _make_fn(impl, mode, x, dy, scale, zp, per_channel):
    """A zero-argument callable running ``impl`` once (forward, or forward + backward)."""
    axis = 0 if per_channel else None
    n_groups = CHANNELS if per_channel else 1
    grad_scale = 1.0 / (x.numel() / n_groups * QMAX) ** 0.5
    if impl == "triton":
        if mode == "fwd":
            return lambda: K.fake_quant_fwd(x, scale, zp, QMIN, QMAX, axis)
        return lambda: (K.fake_quant_fwd(x, scale, zp, QMIN, QMAX, axis),
                        K.fake_quant_bwd(dy, x, scale, zp, QMIN, QMAX, axis, grad_scale, True, True))
    if impl == "reference":
        if mode == "fwd":
            return lambda: fake_quant_ref(x, scale, zp, QMIN, QMAX, axis)
        return lambda: (fake_quant_ref(x, scale, zp, QMIN, QMAX, axis),
                        fake_quant_backward_ref(dy, x, scale, zp, QMIN, QMAX, axis, grad_scale))
    if impl == "torch_compile":
        # the reference as a user would speed it up without qgrad's kernels: one compiled graph per mode
        if mode == "fwd":
            compiled = torch.compile(fake_quant_ref, dynamic=False)
            return lambda: compiled(x, scale, zp, QMIN, QMAX, axis)

        def fwd_bwd(x, dy, scale, zp):
            return fake_quant_ref(x, scale, zp, QMIN, QMAX, axis), fake_quant_backward_ref(
                dy, x, scale, zp, QMIN, QMAX, axis, grad_scale)

        compiled = torch.compile(fwd_bwd, dynamic=False)
        return lambda: compiled(x, dy, scale, zp)
    if impl == "torch":
        if per_channel:
            zp_int = zp.to(torch.int32)
            op = lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp_int, 0, QMIN, QMAX)
        else:
            s, z = float(scale), int(zp)
            op = lambda t: torch.fake_quantize_per_tensor_affine(t, s, z, QMIN, QMAX)
        params = []
    else:  # torch_learnable
        # the per-tensor learnable op takes 1-element 1-d scale / zero-point tensors
        scale, zp = scale.reshape(-1).clone().requires_grad_(True), zp.reshape(-1).clone().requires_grad_(True)
        if per_channel:
            op = lambda t: torch._fake_quantize_learnable_per_channel_affine(
                t, scale, zp, 0, QMIN, QMAX, grad_scale)
        else:
            op = lambda t: torch._fake_quantize_learnable_per_tensor_affine(
                t, scale, zp, QMIN, QMAX, grad_scale)
        params = [scale, zp]
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return op(x)
        return fwd
    xg = x.detach().requires_grad_(True)
    return lambda: torch.autograd.grad(op(xg), [xg] + params, dy)


@pytest.mark.parametrize("numel", SIZES, ids=[f"{n >> 20}M" for n in SIZES])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fake_quant_throughput(benchmark, impl, granularity, mode, numel):
    if impl == "triton" and TRITON_REASON:
        pytest.skip(TRITON_REASON)
    per_channel = granularity == "per_channel"
    x, dy, scale, zp = _inputs(numel, per_channel)
    fn = _make_fn(impl, mode, x, dy, scale, zp, per_channel)

    def run():
        fn()
        _sync()

    ms = _device_ms(fn) if CUDA else None
    benchmark.pedantic(run, rounds=20 if CUDA else 5, warmup_rounds=2)
    if ms is None:
        ms = 1e3 * benchmark.stats.stats.median
    passes = 2 if mode == "fwd" else 5
    gbps = passes * numel * x.element_size() / (ms * 1e-3) / 1e9
    copy = copy_gbps(numel, DEVICE, _device_ms)
    benchmark.extra_info.update(
        impl=impl, granularity=granularity, mode=mode, numel=numel, dtype="float32",
        median_ms=ms, timer="triton.testing.do_bench" if CUDA else "pytest-benchmark",
        bytes=passes * numel * x.element_size(), GBps=gbps, copy_GBps=copy, fraction_of_copy=gbps / copy,
        device=torch.cuda.get_device_name() if CUDA else "cpu", threads=torch.get_num_threads(),
        torch=torch.__version__, triton=triton_version(),
    )
