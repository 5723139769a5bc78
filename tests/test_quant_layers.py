"""QuantConv1d/2d/3d and QuantLinear: float equivalence, quantized math against the reference, STE gradients,
from_float copies."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgrad.nn import FakeQuant, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, quant_range
from qgrad.reference import fake_quant_ref

LAYERS = [
    (QuantConv1d, lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1, dilation=1), (2, 3, 11), F.conv1d),
    (QuantConv2d, lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (2, 4, 7, 5), F.conv2d),
    (QuantConv2d, lambda: nn.Conv2d(3, 5, (3, 2), padding=1, padding_mode="reflect"), (2, 3, 6, 7), None),
    (QuantConv3d, lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (2, 2, 4, 5, 3), F.conv3d),
    (QuantLinear, lambda: nn.Linear(13, 7), (4, 13), F.linear),
]


def _per_tensor_grid(t: torch.Tensor, bits: int, signed: bool):
    qmin, qmax = quant_range(bits, signed)
    amax = t.detach().abs().amax() if signed else t.detach().amax()
    return (amax / qmax).float(), qmin, qmax


@pytest.mark.parametrize("cls,make,shape,_", LAYERS)
def test_float_twin_is_identical_and_shares_nothing(cls, make, shape, _):
    torch.manual_seed(0)
    layer = make()
    q = cls.from_float(layer)
    assert isinstance(q, type(layer)) and q.weight_quant is None and q.input_quant is None
    x = torch.randn(shape)
    torch.testing.assert_close(q(x), layer(x), rtol=0, atol=0)
    for name, p in layer.named_parameters():
        assert getattr(q, name).data_ptr() != p.data_ptr()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        q.weight.add_(1.0)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("cls,make,shape,fn", [c for c in LAYERS if c[3] is not None])
@pytest.mark.parametrize("bits", [3, 8])
def test_quantized_forward_matches_reference(cls, make, shape, fn, bits):
    torch.manual_seed(1)
    layer = make()
    x = torch.randn(shape)
    wq, iq = FakeQuant(bits, signed=True), FakeQuant(bits, signed=True)
    q = cls.from_float(layer, weight_quant=wq, input_quant=iq)
    y = q(x)
    s_w, lo, hi = _per_tensor_grid(layer.weight, bits, True)
    s_x, _, _ = _per_tensor_grid(x, bits, True)
    w_ref = fake_quant_ref(layer.weight.detach(), s_w, torch.zeros(()), lo, hi)
    x_ref = fake_quant_ref(x, s_x, torch.zeros(()), lo, hi)
    if fn is F.linear:
        expected = F.linear(x_ref, w_ref, layer.bias)
    else:
        expected = fn(x_ref, w_ref, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(w_ref, layer.weight.detach()), "3/8-bit quantization must change the weights"


def test_padding_mode_and_hyperparameters_preserved():
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode="circular", bias=False)
    q = QuantConv2d.from_float(layer)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(q, attr) == getattr(layer, attr)
    assert q.bias is None
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(q(x), layer(x), rtol=0, atol=0)


def test_ste_gradients_reach_weight_and_input():
    torch.manual_seed(2)
    layer = nn.Linear(6, 4)
    x = torch.randn(5, 6, requires_grad=True)
    iq = FakeQuant(4, signed=True)
    iq.set_range(torch.tensor(-1.0), torch.tensor(1.0))  # narrower than x: some inputs clip
    q = QuantLinear.from_float(layer, weight_quant=FakeQuant(4, signed=True), input_quant=iq)
    dy = torch.randn(5, 4)
    q(x).backward(dy)
    # independent: y = xq @ wq.T + b with STE (pass-through inside the grid, zero outside)
    s_w, lo, hi = _per_tensor_grid(layer.weight, 4, True)
    wq = fake_quant_ref(layer.weight.detach(), s_w, torch.zeros(()), lo, hi)
    xq = fake_quant_ref(x.detach(), iq.scale, torch.zeros(()), lo, hi)
    inside = (x.detach() / iq.scale >= lo) & (x.detach() / iq.scale <= hi)
    assert not bool(inside.all()), "the test needs clipped inputs"
    torch.testing.assert_close(q.weight.grad, dy.T @ xq)
    torch.testing.assert_close(q.bias.grad, dy.sum(0))
    torch.testing.assert_close(x.grad, (dy @ wq) * inside)


def test_from_float_rejects_wrong_layer_type():
    with pytest.raises(TypeError, match="needs an nn.Conv2d"):
        QuantConv2d.from_float(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="weight_quant must be"):
        QuantLinear(2, 2, weight_quant="8bit")


def test_state_dict_round_trip_keeps_grids():
    torch.manual_seed(3)
    q = QuantConv2d.from_float(nn.Conv2d(2, 3, 3), weight_quant=FakeQuant(4, axis=0, signed=True),
                               input_quant=FakeQuant(4))
    x = torch.relu(torch.randn(2, 2, 6, 6))
    y = q(x)  # initializes both grids
    fresh = QuantConv2d(2, 3, 3, weight_quant=FakeQuant(4, axis=0, signed=True), input_quant=FakeQuant(4))
    fresh.load_state_dict(q.state_dict())
    assert fresh.input_quant.quant_min == 0  # the unsigned grid chosen after a ReLU survives the round trip
    torch.testing.assert_close(fresh(x * 2), q(x * 2), rtol=0, atol=0)
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
