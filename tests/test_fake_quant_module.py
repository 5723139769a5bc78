"""qgrad.FakeQuant: grid choice, range initialization, LSQ learning, state_dict round trips, errors."""
import copy

import pytest
import torch

from qgrad.nn.fake_quant import FakeQuant, quant_range
from qgrad.ops.fake_quant import fake_quant


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quant_range_restricted_symmetric_and_unsigned(bits):
    assert quant_range(bits, True) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    assert quant_range(bits, False) == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [1, 17, 0, 4.0, True])
def test_bits_outside_range_rejected(bits):
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 16\]"):
        FakeQuant(bits=bits)


def test_symmetric_signed_grid_from_first_input():
    x = torch.tensor([-3.0, 0.5, 1.5, 2.0])
    fq = FakeQuant(bits=4)
    y = fq(x)
    assert fq.initialized and fq.signed is True
    assert (fq.quant_min, fq.quant_max) == (-7, 7)
    torch.testing.assert_close(fq.scale, torch.tensor(3.0 / 7))
    assert torch.equal(y, fake_quant(x, torch.tensor(3.0 / 7), 0.0, -7, 7))
    # the first input fixed the grid: a larger second input is clipped, not re-fitted
    assert fq(torch.tensor([30.0])).item() == pytest.approx(3.0)


def test_non_negative_input_gets_unsigned_grid():
    fq = FakeQuant(bits=4)
    fq(torch.rand(100) * 2)
    assert fq.signed is False and (fq.quant_min, fq.quant_max) == (0, 15)


def test_affine_grid_represents_zero_exactly():
    fq = FakeQuant(bits=8, symmetric=False)
    x = torch.linspace(-0.7, 2.3, 101)
    y = fq(x)
    assert fq.quant_min == 0 and fq.quant_max == 255
    assert float(fq.zero_point) == float(torch.round(fq.zero_point))
    assert fq(torch.zeros(3)).abs().max().item() == 0.0
    assert (y - x).abs().max() <= fq.scale / 2 + 1e-6


def test_per_channel_range_on_axis_zero():
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).reshape(6, 1, 1, 1)
    fq = FakeQuant(bits=8, axis=0)
    y = fq(w)
    amax = w.abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(fq.scale, amax / 127)
    err = (y - w).abs().amax(dim=(1, 2, 3))
    assert torch.all(err <= fq.scale / 2 + 1e-6)


def test_all_zero_tensor_does_not_fail():
    fq = FakeQuant(bits=8)
    assert torch.equal(fq(torch.zeros(10)), torch.zeros(10))


def test_learnable_scale_keeps_identity_and_trains():
    torch.manual_seed(0)
    fq = FakeQuant(bits=3, learnable=True)
    param = fq.scale
    opt = torch.optim.SGD(fq.parameters(), lr=0.05)  # built before the first forward
    x = torch.randn(4096)
    losses = []
    for _ in range(30):
        loss = (fq(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert fq.scale is param and isinstance(param, torch.nn.Parameter)
    assert losses[-1] < losses[0]


def test_learnable_scale_pushed_below_zero_is_clamped_not_an_error():
    fq = FakeQuant(bits=4, learnable=True)
    param = fq.scale
    x = torch.randn(100)
    fq(x)
    with torch.no_grad():
        param.fill_(-0.3)  # what a large optimizer step can do
    y = fq(x)
    assert fq.scale is param and float(param.detach()) == torch.finfo(torch.float32).tiny
    assert torch.equal(y, fake_quant(x, param.detach(), 0.0, -7, 7))  # codes times the tiny scale
    y.sum().backward()
    assert param.grad is not None and float(param.grad) != 0


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cast_keeps_the_grid_in_float32(dtype, learnable):
    fq = FakeQuant(bits=8, axis=0, learnable=learnable)
    amax = torch.tensor([0.0123456 * 127, 0.0])  # channel 1: a zero-width range
    fq.set_range(-amax, amax)
    scale, param = fq.scale.detach().clone(), fq.scale
    fq.to(dtype)
    assert fq.scale.dtype == fq.zero_point.dtype == torch.float32 and torch.equal(fq.scale, scale)
    assert fq.scale is param or not learnable  # a learnable scale keeps its identity for the optimizer
    x = torch.randn(2, 8).to(dtype)
    assert torch.equal(fq(x), fake_quant(x, scale, torch.zeros(2), -127, 127, 0))
    assert fq.double().scale.dtype == torch.float64


def test_state_dict_round_trip_per_channel():
    fq = FakeQuant(bits=4, axis=0, learnable=True)
    w = torch.randn(5, 7)
    y = fq(w)
    fresh = FakeQuant(bits=4, axis=0, learnable=True)
    fresh.load_state_dict(fq.state_dict())
    assert fresh.initialized and fresh.signed is True and fresh.scale.shape == (5,)
    assert torch.equal(fresh(w), y)


@pytest.mark.parametrize(
    "saved, loading, match",
    [
        (dict(bits=8), dict(bits=4), "saved with bits=8; this FakeQuant has bits=4"),
        (dict(bits=4, axis=0), dict(bits=4), "saved with axis=0; this FakeQuant has axis=None"),
        (dict(bits=4, symmetric=False), dict(bits=4), "saved with symmetric=False"),
    ],
)
def test_state_of_another_grid_is_refused(saved, loading, match):
    source = FakeQuant(**saved)
    source(torch.randn(3, 6))
    target = FakeQuant(**loading)
    with pytest.raises(RuntimeError, match=match):
        target.load_state_dict(source.state_dict())
    assert not target.initialized  # left as it was


def test_state_without_grid_settings_still_loads():
    """States written before the settings were stored (only "initialized" and "signed") load as they are."""
    source = FakeQuant(bits=4)
    x = torch.randn(10)
    y = source(x)
    state = source.state_dict()
    state["_extra_state"] = {"initialized": True, "signed": True}
    target = FakeQuant(bits=4)
    target.load_state_dict(state)
    assert torch.equal(target(x), y)


@pytest.mark.parametrize("grad_scale", [-1.0, 0.0, float("nan"), float("inf")])
def test_bad_grad_scale_rejected_at_construction(grad_scale):
    with pytest.raises(ValueError, match="grad_scale must be finite and > 0"):
        FakeQuant(bits=8, learnable=True, grad_scale=grad_scale)


def test_deepcopy_and_set_scale():
    fq = FakeQuant(bits=8, signed=True)
    fq.set_scale(0.5)
    clone = copy.deepcopy(fq)
    x = torch.tensor([0.2, 0.3, 100.0])
    assert torch.equal(clone(x), fq(x))
    assert fq(x).tolist() == [0.0, 0.5, 63.5]


def test_set_scale_needs_known_sign_and_zero_zero_point_when_symmetric():
    with pytest.raises(ValueError, match="needs signed=True/False"):
        FakeQuant(bits=8).set_scale(0.1)
    with pytest.raises(ValueError, match="zero_point 0"):
        FakeQuant(bits=8, signed=True).set_scale(0.1, 3.0)


def test_set_range_rejects_bad_ranges():
    fq = FakeQuant(bits=8)
    with pytest.raises(ValueError, match="finite"):
        fq.set_range(0.0, float("inf"))
    with pytest.raises(ValueError, match="lo <= hi"):
        fq.set_range(1.0, -1.0)
    assert not fq.initialized


def test_empty_first_input_is_an_error():
    with pytest.raises(ValueError, match="empty tensor"):
        FakeQuant(bits=8)(torch.empty(0))
