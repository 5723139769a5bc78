"""BatchNorm forward + backward (create_graph) + double backward: PyTorch against qgrad.

What the gradient-norm penalties run per BatchNorm layer: the forward, the first backward with
``create_graph=True`` and the backward through it (here with a random outer gradient for dx, as the penalties
produce; the BatchNorm weight gradient is not differentiated further), with contiguous and with channels-last
tensors. Variants:

* ``torch``: ``torch.nn.functional.batch_norm`` (the double backward is ``NativeBatchNormBackwardBackward0``);
* ``qgrad``: :func:`qgrad.ops.batch_norm.batch_norm` with its fused double backward (the C++ kernel of
  ``qgrad._C`` on a CPU, the Triton kernels on CUDA);
* ``qgrad_torch_ops``: the same under ``QGRAD_BACKEND=torch``, i.e. the PyTorch-op fallback of the double
  backward (what runs without the compiled extension or Triton).

Each result's ``extra_info`` carries the ``speedup_vs_torch`` of the median, measured against the torch variant
of the same case in the same process. The penalized training step with either BatchNorm is in
``test_penalized_resnet18_step``; its ``extra_info`` has the ratio to a plain step measured right before.

    pytest benchmarks/test_batch_norm.py --benchmark-only
"""
import statistics

import pytest
import torch
import torch.nn.functional as F
from _timing import triton_version, wall_times

import qgrad.models
import qgrad.ops.batch_norm as bn_ops
from qgrad.nn.batch_norm import BatchNorm2d, convert_batchnorm, revert_batchnorm
from qgrad.ops.dispatch import cpu_kernel
from qgrad.penalties import L1GradPenalty

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# the shapes of the first and of a late stage of a CIFAR ResNet (batch 32): large planes, or many channels
SHAPES = [(32, 16, 32, 32), (32, 128, 8, 8)] if not CUDA else [(128, 64, 32, 32), (128, 512, 4, 4)]
VARIANTS = ["torch", "qgrad", "qgrad_torch_ops"]
_TORCH_MEDIANS = {}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _case(shape, training, layout):
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
    b = torch.randn(c, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=fmt)
    ggx = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=fmt)
    stats = (torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE))
    return x, w, b, dy, ggx, stats


def _step(fn, x, w, b, dy, ggx, stats, training):
    y = fn(x, stats[0], stats[1], w, b, training, 0.1, 1e-5)
    dyr = dy.detach().requires_grad_()
    dx, _ = torch.autograd.grad(y, (x, w), dyr, create_graph=True)
    torch.autograd.grad(dx, (x, w, dyr), ggx, allow_unused=True)
    _sync()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_double_backward(benchmark, monkeypatch, shape, training, layout, variant):
    if variant == "qgrad" and not CUDA and cpu_kernel("batch_norm_double_backward") is None:
        pytest.skip("qgrad._C is not built with batch_norm_double_backward (pip install --no-build-isolation .)")
    if variant == "qgrad_torch_ops":
        monkeypatch.setenv("QGRAD_BACKEND", "torch")
    fn = F.batch_norm if variant == "torch" else bn_ops.batch_norm
    args = _case(shape, training, layout)
    benchmark.pedantic(_step, args=(fn, *args, training), rounds=30, warmup_rounds=3)
    median = benchmark.stats.stats.median
    key = (shape, training, layout)
    if variant == "torch":
        _TORCH_MEDIANS[key] = median
    benchmark.extra_info.update(
        shape=list(shape),
        mode="train" if training else "eval",
        layout=layout,
        variant=variant,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        triton=triton_version(),
        speedup_vs_torch=_TORCH_MEDIANS[key] / median if key in _TORCH_MEDIANS else None,
    )


@pytest.mark.parametrize("bn", ["torch", "qgrad"])
def test_penalized_resnet18_step(benchmark, bn):
    """ResNet-18 (CPU: width 0.25, batch 32; GPU: width 1, batch 128), 32x32 inputs, BatchNorm in train mode,
    L1GradPenalty on weights and activations, with torch's BatchNorm or qgrad's (``bn``)."""
    torch.manual_seed(0)
    width, batch = (1.0, 128) if CUDA else (0.25, 32)
    model = qgrad.models.get("resnet18", num_classes=10, width=width, in_channels=3).to(DEVICE).train()
    penalty = L1GradPenalty(model, weight=0.05, activation=0.05)
    # the penalty may convert the BatchNorms itself: pin the model to the variant measured
    (convert_batchnorm if bn == "qgrad" else revert_batchnorm)(model)
    bn_types = {type(m) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn_types == {BatchNorm2d if bn == "qgrad" else torch.nn.BatchNorm2d}, bn_types
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        _sync()

    def penalized():
        model.zero_grad(set_to_none=True)
        penalty.backward(F.cross_entropy(model(x), y))
        _sync()

    plain_s = statistics.median(wall_times(plain, repeats=5))
    benchmark.pedantic(penalized, rounds=5, warmup_rounds=2)
    penalty.remove()
    benchmark.extra_info.update(
        bn=bn,
        width=width,
        batch=batch,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        triton=triton_version(),
        plain_step_s=plain_s,
        ratio_to_plain=benchmark.stats.stats.median / plain_s,
    )
