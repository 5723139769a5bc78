"""BatchNorm folding, activation ranges, quantize_model, prepare_qat and sweep, checked against independent
computations on small hand-built models."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgrad import L1GradPenalty
from qgrad.nn import QuantConv2d, QuantLinear, quant_range
from qgrad.quantization import (
    bn_input_ranges,
    calibration_ranges,
    fold_bn,
    format_table,
    prepare_qat,
    quantize_model,
    sweep,
)
from qgrad.quantization import ranges as ranges_mod
from qgrad.quantization._common import trace

BN_N = 6.0


# ---------------------------------------------------------------------------------------------------- models
class ResBlockNet(nn.Module):
    """conv-BN-ReLU -> conv-BN, plus a 1x1 conv-BN shortcut, F.relu of the sum, conv-BN (no ReLU), pool, linear."""

    def __init__(self, c_in=3, c=4, c3=5, classes=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.short, self.bns = nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c3, 3, padding=1), nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3, classes)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        z = F.relu(y + self.bns(self.short(x)))
        z = self.bn3(self.conv3(z))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def seq_net(affine=True):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, affine=affine), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=affine), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 7), nn.BatchNorm1d(7, affine=affine), nn.ReLU(),
        nn.Linear(7, 4),
    )


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 1.0
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def randomize_bn(model, seed=0, dtype=torch.float32):
    """Non-trivial running statistics and affine parameters (some negative gammas)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.3)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    return model.to(dtype)


def calibrate_bn(model, x, steps=3):
    """Running statistics that match the data (cumulative average), then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m), m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in
         model.named_modules()],
    )


def assert_same(model, snap):
    state, mods = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert torch.equal(state[k], now[k]), k
    assert mods == [(n, type(m), m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in
                    model.named_modules()]


# ---------------------------------------------------------------------------------------------------- folding
@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_equivalence_float64(affine):
    torch.manual_seed(0)
    for model in (seq_net(affine), ResBlockNet()):
        model = randomize_bn(model, seed=1, dtype=torch.float64).eval()
        x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
        folded = fold_bn(model)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-10)


def test_fold_bn_formula_on_one_conv():
    torch.manual_seed(1)
    model = randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)), seed=2, dtype=torch.float64)
    conv, bn = model[0], model[1]
    folded = fold_bn(model)
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(folded[0].weight, conv.weight * k[:, None, None, None], rtol=1e-14, atol=0)
    torch.testing.assert_close(folded[0].bias, (conv.bias - bn.running_mean) * k + bn.bias, rtol=1e-14, atol=0)
    assert isinstance(folded[1], nn.Identity)


class TwoConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y  # the conv output is read twice: folding would change the second use
        return self.bn2(self.conv2(z))  # no running statistics: batch statistics cannot be folded


def test_fold_bn_skips_unsafe_pairs():
    model = randomize_bn(TwoConsumers(), seed=3, dtype=torch.float64).eval()
    folded = fold_bn(model)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.BatchNorm2d)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-12)


class TiedAndAliased(nn.Module):
    """Two convs sharing one weight, each with its own BatchNorm; the second BatchNorm is called through an
    alias attribute (fx reports the first name)."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv_b, self.bn_b = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.conv_b.weight = self.conv_a.weight
        self.norm_b = self.bn_b

    def forward(self, x):
        return self.bn_a(self.conv_a(x)) + self.norm_b(self.conv_b(x))


def test_fold_bn_with_tied_weights_and_an_aliased_batchnorm():
    model = randomize_bn(TiedAndAliased(), seed=4, dtype=torch.float64).eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=0, atol=1e-12)
    assert model.conv_a.weight is model.conv_b.weight  # the original stays tied
    q = quantize_model(model, None, None)
    torch.testing.assert_close(q(x), model(x), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- bn ranges
def hand_ranges(net: ResBlockNet, n=BN_N):
    """Expected per-tensor input ranges of ResBlockNet, written out channel by channel with Python floats."""

    def bn_bounds(bn):
        g, b = bn.weight.tolist(), bn.bias.tolist()
        return [bi - n * abs(gi) for gi, bi in zip(g, b)], [bi + n * abs(gi) for gi, bi in zip(g, b)]

    lo1, hi1 = bn_bounds(net.bn1)
    lo2, hi2 = bn_bounds(net.bn2)
    los, his = bn_bounds(net.bns)
    lo3, hi3 = bn_bounds(net.bn3)
    conv2 = (min(max(v, 0.0) for v in lo1), max(max(v, 0.0) for v in hi1))
    conv3 = (min(max(a + b, 0.0) for a, b in zip(lo2, los)), max(max(a + b, 0.0) for a, b in zip(hi2, his)))
    fc = (min(lo3), max(hi3))
    return {"conv2": conv2, "conv3": conv3, "fc": fc}


def test_bn_ranges_by_hand_with_residual_add():
    torch.manual_seed(4)
    net = randomize_bn(ResBlockNet(), seed=5).eval()
    got = bn_input_ranges(net, trace(net), BN_N)
    expected = hand_ranges(net)
    assert set(got) == set(expected), "conv1 and short read the network input: unknown"
    for name, (lo, hi) in expected.items():
        assert math.isclose(float(got[name][0]), lo, rel_tol=1e-12, abs_tol=1e-12), name
        assert math.isclose(float(got[name][1]), hi, rel_tol=1e-12, abs_tol=1e-12), name
    assert expected["fc"][0] < 0 < expected["conv3"][1]  # the cases the test is meant to cover


def test_quantize_model_bn_ranges_set_the_grids():
    torch.manual_seed(6)
    net = randomize_bn(ResBlockNet(), seed=7).eval()
    expected = hand_ranges(net)
    q = quantize_model(net, weight_bits=8, act_bits=6, act_range="bn")
    assert q.conv1.input_quant is None and q.short.input_quant is None  # network input stays float
    for name in ("conv2", "conv3"):  # after a ReLU: unsigned grid, scale = hi / (2^6 - 1)
        iq = getattr(q, name).input_quant
        assert (iq.quant_min, iq.quant_max) == (0, 63)
        assert math.isclose(float(iq.scale), expected[name][1] / 63, rel_tol=1e-6)
    iq = q.fc.input_quant  # after a BN without ReLU: signed
    assert (iq.quant_min, iq.quant_max) == (-31, 31)
    assert math.isclose(float(iq.scale), max(-expected["fc"][0], expected["fc"][1]) / 31, rel_tol=1e-6)

    # with calibration data the unknown inputs get the calibration min/max, the others keep their bn ranges
    x = torch.randn(6, 3, 8, 8) + 0.3
    qc = quantize_model(net, weight_bits=8, act_bits=6, act_range="bn", calib=x)
    for name in ("conv1", "short"):
        assert math.isclose(float(getattr(qc, name).input_quant.scale), float(x.abs().max()) / 31, rel_tol=1e-6)
    assert torch.equal(qc.conv3.input_quant.scale, q.conv3.input_quant.scale)


def test_bn_range_rules_for_functional_ops():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_a, self.bn_b = nn.BatchNorm2d(2), nn.BatchNorm2d(3)
            self.conv_cat, self.conv_clip, self.conv_pad = nn.Conv2d(5, 1, 1), nn.Conv2d(2, 1, 1), nn.Conv2d(2, 1, 1)

        def forward(self, x):
            a, b = self.bn_a(x[:, :2]), self.bn_b(x[:, 2:])
            cat = self.conv_cat(torch.cat([F.relu6(a), b], dim=1))
            clip = self.conv_clip(torch.clamp(a * 2.0 - 1.0, min=-0.5, max=3.0))
            pad = self.conv_pad(F.avg_pool2d(F.relu(a) + 1.0, 3, 1, 1))
            return cat + clip + pad

    net = Net()
    with torch.no_grad():
        net.bn_a.weight.copy_(torch.tensor([0.1, -0.2]))
        net.bn_a.bias.copy_(torch.tensor([0.5, -3.0]))
        net.bn_b.weight.copy_(torch.tensor([0.05, 1.0, 0.3]))
        net.bn_b.bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
    r = {k: (float(v[0]), float(v[1])) for k, v in bn_input_ranges(net, trace(net), 2.0).items()}
    # bn_a channels: [0.3, 0.7], [-3.4, -2.6]; bn_b: [1.9, 2.1], [-2, 2], [-1.6, -0.4]
    # cat: relu6(bn_a) -> [0.3, 0.7], [0, 0]; with bn_b -> overall [-2, 2.1]
    assert r["conv_cat"] == pytest.approx((-2.0, 2.1))
    # 2a - 1 -> [-0.4, 0.4], [-7.8, -6.2]; clamp(-0.5, 3) -> [-0.4, 0.4], [-0.5, -0.5]
    assert r["conv_clip"] == pytest.approx((-0.5, 0.4))
    # relu(a) + 1 -> [1.3, 1.7], [1, 1]; zero-padded average pooling widens to contain 0
    assert r["conv_pad"] == pytest.approx((0.0, 1.7))


@pytest.mark.parametrize("act", ["relu_", "silu"])
def test_layers_left_with_a_float_input_are_named_in_a_warning(act, recwarn):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.c2, self.bn2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.bn1(self.c1(x))
            h = torch.relu_(h) if act == "relu_" else F.silu(h)  # SiLU has no range rule
            return self.bn2(self.c2(h))

    net, x = randomize_bn(Net()).eval(), torch.randn(2, 3, 8, 8)
    q = quantize_model(net, 8, 4)  # c1 reads the network input, which stays float without calib: no warning
    messages = [str(w.message) for w in recwarn.list if "keep a float input" in str(w.message)]
    if act == "relu_":
        assert messages == [] and q.c2.input_quant is not None
        assert (q.c2.input_quant.quant_min, q.c2.input_quant.quant_max) == (0, 15)
    else:
        assert q.c2.input_quant is None
        assert len(messages) == 1 and "1 of 2 quantized layers" in messages[0] and "(c2)" in messages[0]
        q = quantize_model(net, 8, 4, calib=x)  # measured: no warning, every input quantized
        assert len([w for w in recwarn.list if "keep a float input" in str(w.message)]) == 1
        assert q.c1.input_quant is not None and q.c2.input_quant is not None


# ---------------------------------------------------------------------------------------------------- calibration
def _layer_inputs_seq(model, x):
    """Inputs of the conv/linear layers of an nn.Sequential, computed by slicing the (unfolded, eval) model."""
    out = {}
    for i, m in enumerate(model):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            out[str(i)] = model[:i](x)
    return out


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_calibration_ranges_against_direct_computation(method):
    torch.manual_seed(8)
    net = randomize_bn(seq_net(), seed=9).eval()
    calib = [(torch.randn(n, 3, 8, 8) * 2, torch.zeros(n)) for n in (4, 7, 3)]
    p = 97.5
    got = calibration_ranges(fold_bn(net), calib, method=method, percentile=p)
    with torch.no_grad():
        per_batch = [_layer_inputs_seq(net, x) for x, _ in calib]
    assert set(got) == set(per_batch[0])
    for name in per_batch[0]:
        v = torch.cat([b[name].reshape(-1) for b in per_batch]).double()
        if method == "minmax":
            lo, hi = v.min(), v.max()
        else:
            lo, hi = torch.quantile(v, torch.tensor([0.025, 0.975], dtype=torch.float64))
            assert hi < v.max()
        torch.testing.assert_close(got[name][0], lo, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[name][1], hi, rtol=1e-5, atol=1e-5)

    q = quantize_model(net, 8, 8, act_range=method, calib=calib, percentile=p)
    for name, m in quant_layers(q).items():
        lo, hi = got[name]
        iq = m.input_quant
        expected = float(hi) / 255 if lo >= 0 else float(max(-lo, hi)) / 127
        assert (iq.quant_min == 0) == bool(lo >= 0)
        assert math.isclose(float(iq.scale), expected, rel_tol=1e-6)


def test_percentile_subsample_is_deterministic_and_close(monkeypatch):
    monkeypatch.setattr(ranges_mod, "MAX_QUANTILE_SAMPLES", 2000)
    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(50, 2))
    calib = [torch.randn(100, 50) for _ in range(4)]  # 20000 values > 2000
    a = calibration_ranges(net, calib, method="percentile", percentile=90)["0"]
    b = calibration_ranges(net, calib, method="percentile", percentile=90)["0"]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    exact = torch.quantile(torch.cat(calib).reshape(-1).double(), torch.tensor([0.1, 0.9], dtype=torch.float64))
    # the 0.9-quantile of 2000 uniform draws from N(0,1) has a standard error of about 0.03
    assert abs(float(a[0]) - float(exact[0])) < 0.15 and abs(float(a[1]) - float(exact[1])) < 0.15


# ---------------------------------------------------------------------------------------------------- quantize_model
def test_16_bit_is_close_to_float_and_original_untouched():
    torch.manual_seed(11)
    net = ResBlockNet()
    x = torch.randn(16, 3, 8, 8)
    calibrate_bn(net, x)
    net.train()  # a training-mode model with hooks must come back unchanged
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(1))
    net.conv2.register_forward_pre_hook(lambda m, i: None)
    snap = snapshot(net)
    ref = copy.deepcopy(net).eval()(x)
    for act_range, calib in (("bn", None), ("minmax", x), ("percentile", x)):
        q = quantize_model(net, 16, 16, act_range=act_range, calib=calib, percentile=100.0)
        assert not q.training and all(not m.training for m in q.modules())
        err = (q(x) - ref).abs().max() / ref.abs().max()
        assert err < 2e-3, (act_range, float(err))
        q4 = quantize_model(net, 4, 4, act_range=act_range, calib=calib, percentile=100.0)
        assert (q4(x) - ref).abs().max() / ref.abs().max() > 10 * err  # 4 bits must be visibly coarser
    assert_same(net, snap)
    assert net.training


@pytest.mark.parametrize("act_range", ["bn", "minmax"])
def test_model_with_an_attached_penalty_quantizes_like_the_torch_model(act_range):
    # L1GradPenalty swaps the convolutions for qgrad.nn twins while attached; a model quantized meanwhile (or
    # a copy taken meanwhile, e.g. the best model so far) must be quantized like the torch model
    torch.manual_seed(12)
    net, x = ResBlockNet(), torch.randn(16, 3, 8, 8)
    calibrate_bn(net, x)
    calib = None if act_range == "bn" else x
    expected = quantize_model(net, 4, 4, act_range=act_range, calib=calib)(x)
    expected_qat = prepare_qat(net, 4, 4)(x)
    penalty = L1GradPenalty(net, weight=0.05, activation=0.05)
    assert type(net.conv1) is not nn.Conv2d  # the twin
    for model in (net, copy.deepcopy(net)):
        q = quantize_model(model, 4, 4, act_range=act_range, calib=calib)
        kinds = sorted(type(m).__name__ for m in quant_layers(q).values())
        assert kinds == ["QuantConv2d"] * 4 + ["QuantLinear"]
        assert torch.equal(q(x), expected)
        assert torch.equal(prepare_qat(model, 4, 4)(x), expected_qat)
    penalty.remove()


@pytest.mark.parametrize("per_channel", [False, True])
def test_weights_lie_on_their_grid(per_channel):
    torch.manual_seed(12)
    net = randomize_bn(ResBlockNet(), seed=13).eval()
    folded = fold_bn(net)
    q = quantize_model(net, weight_bits=5, act_bits=None, per_channel_weights=per_channel)
    qmin, qmax = quant_range(5, True)
    for name, m in quant_layers(q).items():
        w_folded = folded.get_submodule(name).weight.detach()
        torch.testing.assert_close(m.weight, w_folded, rtol=0, atol=0)
        a = w_folded.abs().reshape(w_folded.shape[0], -1).amax(1) if per_channel else w_folded.abs().max()
        s = (a / qmax).float()
        torch.testing.assert_close(m.weight_quant.scale, s, rtol=0, atol=0)
        wq = m.weight_quant(m.weight).detach()
        k = wq / (s.reshape(-1, *[1] * (wq.dim() - 1)) if per_channel else s)
        torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
        k = k.round()
        assert k.min() >= qmin and k.max() <= qmax
        assert k.abs().max() == qmax  # the largest weight maps to the outermost code
        assert not torch.equal(wq, m.weight.detach())


def test_per_channel_beats_per_tensor_on_unequal_channels():
    torch.manual_seed(14)
    lin = nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight.mul_(torch.tensor([0.01, 0.1, 1.0, 30.0])[:, None])
    net = nn.Sequential(lin)
    x = torch.randn(64, 16)
    errs = {}
    for pc in (False, True):
        q = quantize_model(net, weight_bits=4, act_bits=None, per_channel_weights=pc)
        w = q[0].weight_quant(q[0].weight).detach()
        errs[pc] = ((w - lin.weight) / lin.weight.abs().amax(1, keepdim=True)).pow(2).mean(1)  # relative per row
        errs[pc, "out"] = ((q(x) - net(x)) / net(x).abs().amax(0)).pow(2).mean()
    assert bool((errs[True] <= errs[False] + 1e-12).all()) and errs[True][:2].sum() < 0.01 * errs[False][:2].sum()
    assert errs[True, "out"] < errs[False, "out"]


def test_none_bits_keep_float():
    torch.manual_seed(15)
    net = randomize_bn(ResBlockNet(), seed=16).eval()
    x = torch.randn(4, 3, 8, 8)
    folded = fold_bn(net)
    q = quantize_model(net, None, None)
    assert all(m.weight_quant is None and m.input_quant is None for m in quant_layers(q).values())
    torch.testing.assert_close(q(x), folded(x), rtol=0, atol=0)
    qw = quantize_model(net, weight_bits=None, act_bits=4)
    assert all(m.weight_quant is None for m in quant_layers(qw).values())
    assert qw.conv2.input_quant is not None
    qa = quantize_model(net, weight_bits=4, act_bits=None)
    assert all(m.input_quant is None and m.weight_quant is not None for m in quant_layers(qa).values())


def test_non_finite_weights_or_calibration_data_name_the_layer():
    net = seq_net().eval()
    with torch.no_grad():
        net[4].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '4': cannot quantize its weight"):
        quantize_model(net, 4, 4)
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer '0': cannot quantize its input"):
        quantize_model(seq_net().eval(), 4, 4, act_range="minmax", calib=x)


def test_calibration_batches_of_another_dtype_are_refused():
    net = seq_net().eval()
    x = torch.randn(2, 3, 8, 8)
    for bad in (x.double(), (x * 100).to(torch.uint8)):
        with pytest.raises(TypeError, match=f"calibration batch 0 has dtype {bad.dtype}, the model's parameters"):
            quantize_model(net, 4, 4, act_range="minmax", calib=[bad])
    quantize_model(net, 4, 4, act_range="minmax", calib=[x])


def test_quantize_model_errors():
    net = ResBlockNet().eval()
    snap = snapshot(net)
    x = torch.randn(2, 3, 8, 8)
    for bad in (1, 17, True, 8.0, "8"):
        with pytest.raises(ValueError, match=r"weight_bits must be an int in \[2, 16\]"):
            quantize_model(net, weight_bits=bad)
        with pytest.raises(ValueError, match=r"act_bits must be an int in \[2, 16\]"):
            quantize_model(net, act_bits=bad)
    with pytest.raises(ValueError, match="'bn', 'minmax', 'percentile'"):
        quantize_model(net, act_range="max")
    for method in ("minmax", "percentile"):
        with pytest.raises(ValueError, match="calib"):
            quantize_model(net, act_range=method)
    with pytest.raises(ValueError, match="percentile"):
        quantize_model(net, act_range="percentile", calib=x, percentile=40)
    with pytest.raises(ValueError, match="bn_n"):
        quantize_model(net, bn_n=0)
    with pytest.raises(ValueError, match="no nn.Conv1d/Conv2d/Conv3d or nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match="calibration data is empty"):
        quantize_model(net, act_range="minmax", calib=[])
    assert_same(net, snap)


def test_untraceable_model():
    torch.manual_seed(17)
    net = randomize_bn(Untraceable(), seed=18).eval()
    x = torch.randn(8, 3, 6, 6)
    with pytest.raises(ValueError, match="act_range='minmax'"):
        quantize_model(net, 8, 8, act_range="bn")
    with pytest.warns(UserWarning, match="not folded"):
        q = quantize_model(net, 16, 16, act_range="minmax", calib=x)
    assert isinstance(q.bn, nn.BatchNorm2d)
    ref = net(x)
    assert (q(x) - ref).abs().max() / ref.abs().max() < 1e-3
    assert q.conv.input_quant is not None and q.fc.input_quant.quant_min == 0


# ---------------------------------------------------------------------------------------------------- prepare_qat
def test_prepare_qat_trains_with_ste_on_a_fixed_grid():
    torch.manual_seed(19)
    net = seq_net()
    snap = snapshot(net)
    qat = prepare_qat(net, weight_bits=4, act_bits=4)
    assert_same(net, snap)
    layers = quant_layers(qat)
    assert len(layers) == 4 and all(m.weight_quant.quant_max == 7 for m in layers.values())
    scales = {n: m.weight_quant.scale.clone() for n, m in layers.items()}
    for n, m in layers.items():  # grid fixed at preparation: max|w| / quant_max
        assert math.isclose(float(scales[n]), float(net.get_submodule(n).weight.detach().abs().max()) / 7, rel_tol=1e-6)

    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(qat(x), y)
        loss.backward()
        if step == 0:
            for n, m in layers.items():
                assert m.weight.grad is not None and bool(torch.isfinite(m.weight.grad).all())
                assert float(m.weight.grad.abs().sum()) > 0, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for n, m in layers.items():
        assert torch.equal(m.weight_quant.scale, scales[n])  # the weight grid does not follow the weight
        assert not torch.equal(m.weight, net.get_submodule(n).weight)
    # input grids were fitted to the first batch; after a ReLU they are unsigned
    assert layers["0"].input_quant.quant_min == -7
    assert all(layers[n].input_quant.quant_min == 0 for n in ("4", "9", "12"))
    assert_same(net, snap)


def test_prepare_qat_none_bits_and_errors():
    net = seq_net()
    q = prepare_qat(net, None, 8)
    assert all(m.weight_quant is None and m.input_quant is not None for m in quant_layers(q).values())
    q = prepare_qat(net, 8, None)
    assert all(m.weight_quant is not None and m.input_quant is None for m in quant_layers(q).values())
    x = torch.randn(3, 3, 8, 8)
    net.eval()
    torch.testing.assert_close(prepare_qat(net, None, None).eval()(x), net(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"weight_bits must be an int in \[2, 16\]"):
        prepare_qat(net, 1, 4)
    with pytest.raises(ValueError, match="no nn.Conv1d"):
        prepare_qat(nn.Sequential(nn.ReLU()), 8, 8)


def test_ste_gradient_through_prepared_model():
    """The gradient of a QAT linear is the float gradient evaluated at the quantized weight and input."""
    torch.manual_seed(20)
    net = nn.Sequential(nn.Linear(5, 3))
    qat = prepare_qat(net, 3, 3)
    x = torch.randn(7, 5)
    qat(x).pow(2).sum().backward()
    layer = qat[0]
    wq = layer.weight_quant(layer.weight).detach().requires_grad_()
    xq = layer.input_quant(x).detach()
    F.linear(xq, wq, layer.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad)


# ---------------------------------------------------------------------------------------------------- sweep
def _sweep_setup():
    torch.manual_seed(21)
    net = ResBlockNet(classes=4)
    xs = torch.randn(40, 3, 8, 8)
    calibrate_bn(net, xs)
    ys = net(xs).argmax(1)
    ys[::3] = torch.randint(0, 4, ys[::3].shape)  # not all correct
    data = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 40, 16)]  # batches of 16, 16, 8
    return net, data


def test_sweep_rows_against_direct_evaluation(capsys):
    net, data = _sweep_setup()
    net.train()
    snap = snapshot(net)
    rows = sweep(net, data, configs=[(8, 4), (4, 4)], progress=True)
    assert_same(net, snap)
    assert [(r["weight_bits"], r["act_bits"]) for r in rows] == [(None, None), (8, 4), (4, 4)]
    for r in rows:
        assert set(r) == {"weight_bits", "act_bits", "accuracy", "loss", "kl", "samples"}
        assert r["samples"] == 40 and r["kl"] >= 0 and 0 <= r["accuracy"] <= 100
    assert rows[0]["kl"] == 0
    assert rows[2]["kl"] > 0

    float_net = copy.deepcopy(net).eval()
    with torch.no_grad():
        for r in rows:
            m = float_net if r["weight_bits"] is None else quantize_model(net, r["weight_bits"], r["act_bits"])
            logits = [m(x) for x, _ in data]
            ys = torch.cat([y for _, y in data])
            all_logits = torch.cat(logits)
            acc = 100.0 * int((all_logits.argmax(1) == ys).sum()) / len(ys)
            loss = float(F.cross_entropy(all_logits, ys))
            kls = [F.kl_div(F.log_softmax(q.double(), 1), F.log_softmax(float_net(x).double(), 1), log_target=True,
                            reduction="batchmean") for q, (x, _) in zip(logits, data)]
            assert r["accuracy"] == pytest.approx(acc, abs=1e-9)
            assert r["loss"] == pytest.approx(loss, rel=1e-5)
            assert r["kl"] == pytest.approx(float(torch.stack(kls).mean()), rel=1e-6, abs=1e-12)

    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and lines[2].startswith("| float | float |")
    assert f"{rows[1]['accuracy']:.2f}" in lines[3] and lines[3].startswith("| 8 | 4 |")


def test_sweep_default_configs_and_generators():
    net, data = _sweep_setup()
    rows = sweep(net, (b for b in data))  # a one-shot generator is materialized
    assert [(r["weight_bits"], r["act_bits"]) for r in rows] == [(None, None), (8, 4), (6, 4), (4, 4)]
    rows2 = sweep(net, data, configs=[(None, None), (6, 4)], act_range="minmax", calib=data)
    assert len(rows2) == 2 and rows2[0] == rows[0]
    # a one-shot calib iterator calibrates every config alike
    configs = [(8, 4), (4, 4)]
    rows3 = sweep(net, data, configs=configs, act_range="minmax", calib=(x for x, _ in data))
    assert rows3 == sweep(net, data, configs=configs, act_range="minmax", calib=[x for x, _ in data])


def test_sweep_errors():
    net, data = _sweep_setup()
    for bad in ([(8,)], [(1, 4)], [("8", 4)], [(8, 4.0)], "84", [None]):
        with pytest.raises((ValueError, TypeError)):
            sweep(net, data, configs=bad)

    class Reshuffled:
        def __init__(self):
            self.epoch = 0

        def __iter__(self):
            self.epoch += 1
            order = data if self.epoch == 1 else data[::-1]
            return iter(order)

    with pytest.raises(ValueError, match="same batches"):
        sweep(net, Reshuffled(), configs=[(8, 8)])

    def never(batches=[]):  # bad quantization arguments are reported before the float pass reads any data
        yield from batches
        raise AssertionError("the data was read")

    for kwargs, message in ((dict(act_range="bnn"), "act_range must be one of"),
                            (dict(act_range="minmax"), "pass calib=")):
        with pytest.raises(ValueError, match=message):
            sweep(net, never(), configs=[(8, 4)], **kwargs)


# ---------------------------------------------------------------------------------------------------- model zoo
@pytest.mark.parametrize("name", ["resnet18", "vgg_like"])
def test_zoo_models_quantize(name):
    import qgrad.models

    torch.manual_seed(22)
    net = qgrad.models.get(name, num_classes=10, width=0.125)
    x = torch.randn(16, 3, 32, 32)
    calibrate_bn(net, x)
    n_layers = sum(type(m) in (nn.Conv2d, nn.Linear) for m in net.modules())
    q = quantize_model(net, 16, 16)
    layers = quant_layers(q)
    assert len(layers) == n_layers
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in q.modules())
    float_inputs = [n for n, m in layers.items() if m.input_quant is None]
    assert len(float_inputs) == 1  # only the stem reads the network input
    # every other layer reads a post-ReLU tensor (also the shortcuts and the classifier)
    assert all(m.input_quant.quant_min == 0 for n, m in layers.items() if n not in float_inputs)
    ref = net(x)
    assert (q(x) - ref).abs().max() / ref.abs().max() < 1e-2
