"""L1GradPenalty(recompute=...): segments' saved tensors dropped in the forward and recomputed on demand give
the same step, bit for bit, as the exact method without recomputation (qgrad.recompute)."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qgrad.models
from qgrad.penalties import L1GradPenalty


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _same(a, b):
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def _steps(model, penalty, batches, call=False):
    grads = []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if call:  # penalty(loss) and the caller's own backward
            (loss + penalty(loss)).backward()
        else:
            penalty.backward(loss)
        grads.append(_grads(model))
    return grads


def _batches(n, shape, classes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, classes, (shape[0],), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("name", ["resnet18", "vgg_like"])
@pytest.mark.parametrize("call", [False, True])
@pytest.mark.parametrize("every", [1, 2])
def test_the_step_is_that_of_the_exact_method_bit_for_bit(name, call, every):
    torch.manual_seed(0)
    model = qgrad.models.get(name, num_classes=5, width=0.0625).double()
    twin = copy.deepcopy(model)
    plain = L1GradPenalty(model, 0.05, 0.05, every=every)
    low = L1GradPenalty(twin, 0.05, 0.05, every=every, recompute=twin.recompute_segments())
    batches = _batches(4 if every > 1 else 2, (4, 3, 16, 16), 5, torch.float64)
    expected, got = _steps(model, plain, batches, call), _steps(twin, low, batches, call)
    assert all(_same(a, b) for a, b in zip(expected, got))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers()))  # running statistics


class _Unit(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn, self.drop = nn.BatchNorm2d(channels), nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(F.relu(self.bn(self.conv(x))))


class _Shared(nn.Module):
    """A stem, a unit called twice (two segments in one forward), and a three-module chain."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.unit = _Unit(8)
        self.conv, self.bn, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.fc = nn.Linear(8, 4)
        self.spare = nn.ReLU()  # not called

    def forward(self, x):
        h = self.unit(self.unit(self.stem(x)))
        return self.fc(self.relu(self.bn(self.conv(h))).mean((2, 3)))


def test_dropout_shared_modules_chains_and_autocast():
    torch.manual_seed(0)
    model = _Shared()
    twin = copy.deepcopy(model)
    plain = L1GradPenalty(model, 0.1, 0.1)
    low = L1GradPenalty(twin, 0.1, 0.1, recompute=[twin.unit, [twin.conv, twin.bn, twin.relu]])
    batches = _batches(2, (4, 3, 12, 12), 4, torch.float32)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(1)
            expected = _steps(model, plain, batches)
            rng = torch.get_rng_state()
            torch.manual_seed(1)
            got = _steps(twin, low, batches)
        assert all(_same(a, b) for a, b in zip(expected, got))
        assert torch.equal(torch.get_rng_state(), rng)  # the recomputation replays, it draws nothing


@pytest.mark.parametrize("recompute", [False, True])
def test_the_segments_saved_tensors_are_dropped(recompute):
    """A BatchNorm input (a convolution's output, saved by the BatchNorm for its backward) lives on after the
    forward only without recomputation: the control case shows that the check can fail."""
    torch.manual_seed(0)
    model = qgrad.models.get("resnet18", num_classes=5, width=0.0625)
    penalty = L1GradPenalty(model, 0.05, 0.05, recompute=model.recompute_segments() if recompute else None)
    kept = []
    model.layer1[0].bn1.register_forward_pre_hook(lambda m, args: kept.append(weakref.ref(args[0])))
    x, y = _batches(1, (4, 3, 16, 16), 5, torch.float32)[0]
    loss = F.cross_entropy(model(x), y)
    gc.collect()
    assert (kept[0]() is None) == recompute
    penalty.backward(loss)
    assert penalty._segments is None or not penalty._segments._calls  # released with the step


def test_a_backward_after_a_new_forward_is_a_clear_error():
    torch.manual_seed(0)
    model = qgrad.models.get("resnet18", num_classes=5, width=0.0625)
    penalty = L1GradPenalty(model, 0.05, 0.05, recompute=model.recompute_segments())
    (x, y), (x2, _) = _batches(2, (4, 3, 16, 16), 5, torch.float32)
    loss = F.cross_entropy(model(x), y)
    total = loss + penalty(loss)
    model(x2)
    with pytest.raises(RuntimeError, match="whose segments were released"):
        total.backward()


class _Fickle(nn.Module):
    """Takes another path at every call: running it again does not save what its forward saved."""

    def __init__(self):
        super().__init__()
        self.conv, self.calls = nn.Conv2d(3, 8, 3, padding=1), 0

    def forward(self, x):
        self.calls += 1
        h = self.conv(x)
        return torch.sin(torch.cat([h, h], 1) if self.calls % 2 else h).mean((1, 2, 3)).unsqueeze(1)


def test_a_segment_that_runs_differently_again_is_an_error():
    model = nn.Sequential(_Fickle(), nn.Linear(1, 3))
    penalty = L1GradPenalty(model, 0.05, 0.05, recompute=[model[0]])
    x, y = _batches(1, (4, 3, 32, 32), 3, torch.float32)[0]
    with pytest.raises(RuntimeError, match="saved other tensors than its forward did"):
        penalty.backward(F.cross_entropy(model(x), y))


def test_errors_and_remove():
    model = qgrad.models.get("resnet18", num_classes=5, width=0.0625)
    segments = model.recompute_segments()
    with pytest.raises(ValueError, match="method='worst-case' takes none"):
        L1GradPenalty(model, method="worst-case", recompute=segments)
    with pytest.raises(ValueError, match="not a submodule of the model"):
        L1GradPenalty(model, recompute=[nn.ReLU()])
    with pytest.raises(ValueError, match="segments cannot nest"):
        L1GradPenalty(model, recompute=[model.layer1, model.layer1[0]])
    with pytest.raises(ValueError, match="twice"):
        L1GradPenalty(model, recompute=[model.layer1, [model.layer1]])
    with pytest.raises(TypeError, match="got a single module"):
        L1GradPenalty(model, recompute=model.layer1)
    with pytest.raises(ValueError, match="recompute is empty"):
        L1GradPenalty(model, recompute=[])

    # a chain whose modules do not run one after the other
    chain = L1GradPenalty(model, recompute=[[model.layer1, model.layer3]])
    x, y = _batches(1, (4, 3, 16, 16), 5, torch.float32)[0]
    with pytest.raises(RuntimeError, match="did not get the output of module 0"):
        model(x)
    chain.remove()

    # a chain whose second module never runs
    shared = _Shared()
    lost = L1GradPenalty(shared, 0.05, 0.05, recompute=[[shared.stem, shared.spare]])
    x_small, y_small = _batches(1, (4, 3, 12, 12), 4, torch.float32)[0]
    with pytest.raises(RuntimeError, match="was still open at the end of the model's forward"):
        shared(x_small)
    lost.remove()
    shared(x_small)  # the model runs as before

    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    penalty = L1GradPenalty(model, recompute=segments)
    penalty.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    loss = F.cross_entropy(model(x), y)
    loss.backward()  # an ordinary step afterwards
