"""CPU throughput of the compiled fake-quantization kernels (``qgrad._C``) against PyTorch's own ops.

Rows: ``impl`` in {qgrad (``qgrad._C.fake_quant_fwd`` / ``fake_quant_bwd``), torch}, on about 4M float32
elements in two layouts, a conv weight ``(1024, 455, 3, 3)`` and an activation ``(16, 64, 64, 64)``, each
quantized per tensor and per channel (axis 0 for the weight, axis 1 for the activation), and two modes:

* ``fwd``: forward only; torch is ``torch.fake_quantize_per_{tensor,channel}_affine``.
* ``fwd_bwd``: forward and backward with the scale and zero-point gradients; torch is
  ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` through autograd.

``extra_info`` holds ``GBps`` for the essential traffic (forward: read x, write y; backward: read x and dy,
write dx; ``fwd_bwd`` counts both), ``copy_GBps`` (``y.copy_(x)`` of the same size, measured in the same run),
their ratio, the thread count, and for qgrad rows ``speedup_vs_torch`` (torch's median over qgrad's median,
both timed in the same test with the same timer). Run with a fixed thread count, e.g.::

    OMP_NUM_THREADS=2 pytest benchmarks/test_fake_quant_cpu.py --benchmark-only
"""

import pytest
import torch
from _timing import copy_gbps, median_ms

try:
    from qgrad import _C
except ImportError as exc:
    pytest.skip(
        f"qgrad._C is not built ({exc}); build it with `pip install --no-build-isolation -e .`",
        allow_module_level=True,
    )

QMIN, QMAX = -127, 127
LAYOUTS = {"weight": ((1024, 455, 3, 3), 0), "activation": ((16, 64, 64, 64), 1)}


def _inputs(layout, per_channel):
    shape, axis = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 2
    dy = torch.randn(shape, generator=g)
    if per_channel:
        scale = torch.rand(shape[axis], generator=g) * 0.02 + 0.01
        zp = torch.zeros(shape[axis])
    else:
        scale, zp = torch.tensor(0.02), torch.tensor(0.0)
    return x, dy, scale, zp, (axis if per_channel else None)


def _qgrad_fn(mode, x, dy, scale, zp, axis):
    ax = -1 if axis is None else axis
    groups = 1 if axis is None else scale.numel()
    grad_scale = 1.0 / (x.numel() / groups * QMAX) ** 0.5
    if mode == "fwd":
        return lambda: _C.fake_quant_fwd(x, scale, zp, QMIN, QMAX, ax)
    return lambda: (
        _C.fake_quant_fwd(x, scale, zp, QMIN, QMAX, ax),
        _C.fake_quant_bwd(dy, x, scale, zp, QMIN, QMAX, ax, grad_scale, True, True),
    )


def _torch_fn(mode, x, dy, scale, zp, axis):
    groups = 1 if axis is None else scale.numel()
    grad_scale = 1.0 / (x.numel() / groups * QMAX) ** 0.5
    if mode == "fwd":
        if axis is None:
            s, z = float(scale), int(zp)
            return lambda: torch.fake_quantize_per_tensor_affine(x, s, z, QMIN, QMAX)
        zp_int = zp.to(torch.int32)
        return lambda: torch.fake_quantize_per_channel_affine(x, scale, zp_int, axis, QMIN, QMAX)
    # the learnable ops take 1-d scale / zero-point tensors (one element per tensor)
    s = scale.reshape(-1).clone().requires_grad_(True)
    z = zp.reshape(-1).clone().requires_grad_(True)
    xg = x.detach().requires_grad_(True)

    def fwd_bwd():
        if axis is None:
            y = torch._fake_quantize_learnable_per_tensor_affine(xg, s, z, QMIN, QMAX, grad_scale)
        else:
            y = torch._fake_quantize_learnable_per_channel_affine(xg, s, z, axis, QMIN, QMAX, grad_scale)
        return torch.autograd.grad(y, [xg, s, z], dy)

    return fwd_bwd


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl", ["qgrad", "torch"])
def test_fake_quant_cpu_throughput(benchmark, impl, layout, granularity, mode):
    x, dy, scale, zp, axis = _inputs(layout, granularity == "per_channel")
    make = _qgrad_fn if impl == "qgrad" else _torch_fn
    fn = make(mode, x, dy, scale, zp, axis)
    benchmark.pedantic(fn, rounds=9, warmup_rounds=2)
    ms = 1e3 * benchmark.stats.stats.median
    numel = x.numel()
    passes = 2 if mode == "fwd" else 5
    gbps = passes * numel * 4 / (ms * 1e-3) / 1e9
    copy = copy_gbps(numel)
    info = {
        "impl": impl,
        "layout": layout,
        "shape": list(x.shape),
        "granularity": granularity,
        "axis": axis,
        "mode": mode,
        "numel": numel,
        "dtype": "float32",
        "median_ms": ms,
        "bytes": passes * numel * 4,
        "GBps": gbps,
        "copy_GBps": copy,
        "fraction_of_copy": gbps / copy,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
    }
    if impl == "qgrad":
        info["torch_median_ms"] = median_ms(_torch_fn(mode, x, dy, scale, zp, axis))
        info["speedup_vs_torch"] = info["torch_median_ms"] / median_ms(fn)
    benchmark.extra_info.update(info)
