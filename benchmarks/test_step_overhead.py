"""Cost of a regularized training step relative to a plain one.

For each model this times one SGD step (forward, backward, update) without a penalty, with the exact
gradient-l1 penalty on the weights only, and on weights + activations (autograd double backward). The ratio
to the plain step, measured in the same process right before, goes into ``extra_info["ratio_to_plain"]``.

On a CPU the models run at a reduced width and batch so a run takes a few minutes; with CUDA they run at
full size (width 1, batch 128, 32x32 inputs), the setting the paper's 6-10x figures refer to.

    pytest benchmarks/ --benchmark-only
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import qgrad
from qgrad.penalties import L1GradPenalty

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (width, batch): full size on a GPU; on a CPU small enough for minutes, not hours.
SIZES = {"vgg_like": (1.0, 128) if CUDA else (0.25, 32), "resnet18": (1.0, 128) if CUDA else (0.25, 32)}
MODES = {"l1_weights": dict(weight=0.05, activation=0.0), "l1_weights_activations": dict(weight=0.05, activation=0.05)}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _setup(name):
    torch.manual_seed(0)
    width, batch = SIZES[name]
    model = qgrad.models.get(name, num_classes=10, width=width, in_channels=3).to(DEVICE).train()
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, x, y, opt


def _plain_step(model, x, y, opt):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    _sync()


def _penalized_step(penalty, model, x, y, opt):
    opt.zero_grad(set_to_none=True)
    penalty.backward(F.cross_entropy(model(x), y))
    opt.step()
    _sync()


def _median_seconds(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _info(benchmark, name, extra):
    width, batch = SIZES[name]
    benchmark.extra_info.update(
        model=name, width=width, batch=batch, device=torch.cuda.get_device_name() if CUDA else "cpu",
        threads=torch.get_num_threads(), torch=torch.__version__, **extra
    )


@pytest.mark.parametrize("name", list(SIZES))
def test_plain_step(benchmark, name):
    model, x, y, opt = _setup(name)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(_plain_step, args=(model, x, y, opt), rounds=5, warmup_rounds=2)
    _info(benchmark, name, {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if CUDA else None})


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(SIZES))
def test_penalized_step(benchmark, name, mode):
    model, x, y, opt = _setup(name)
    plain = _median_seconds(lambda: _plain_step(model, x, y, opt), repeats=5)
    penalty = L1GradPenalty(model, **MODES[mode])
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(_penalized_step, args=(penalty, model, x, y, opt), rounds=5, warmup_rounds=2)
    penalty.remove()
    _info(
        benchmark,
        name,
        {
            "mode": mode,
            "plain_step_s": plain,
            "ratio_to_plain": benchmark.stats.stats.median / plain,
            "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if CUDA else None,
        },
    )
