"""qgrad.models: layer lists, parameter counts against independent formulas, shapes, fx tracing, errors."""

import math
import operator

import pytest
import torch
from torch import nn

import qgrad.models as models
from qgrad.models.resnet import ResNet18
from qgrad.models.vgg import VGGLike


def c(n, width):
    return max(1, int(round(n * width)))


def conv_params(cin, cout, k):
    return cin * cout * k * k  # bias-free convolutions


def bn_params(ch):
    return 2 * ch


def linear_params(fin, fout):
    return fin * fout + fout


def vgg_param_formula(num_classes, width, in_channels):
    """From the documented list 2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-FC1024-FC, flatten 4*4*c(512)."""
    chans = [in_channels] + [c(n, width) for n in (128, 128, 256, 256, 512, 512)]
    total = sum(conv_params(a, b, 3) + bn_params(b) for a, b in zip(chans[:-1], chans[1:]))
    hidden = c(1024, width)
    total += linear_params(16 * chans[-1], hidden) + bn_params(hidden) + linear_params(hidden, num_classes)
    return total


def resnet_param_formula(num_classes, width, in_channels, stem_kernel=3):
    """Stem conv + BN, 4 stages x 2 BasicBlocks (two 3x3 conv+BN, 1x1 conv+BN shortcut on shape change), FC.

    The max-pool of the ImageNet stem (7x7 kernel) has no parameters."""
    stem = c(64, width)
    total = conv_params(in_channels, stem, stem_kernel) + bn_params(stem)
    cin = stem
    for n, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        cout = c(n, width)
        for s in (stride, 1):
            total += (
                conv_params(cin, cout, 3) + bn_params(cout) + conv_params(cout, cout, 3) + bn_params(cout)
            )
            if s != 1 or cin != cout:
                total += conv_params(cin, cout, 1) + bn_params(cout)
            cin = cout
    return total + linear_params(cin, num_classes)


FORMULAS = {
    "vgg_like": vgg_param_formula,
    "resnet18": resnet_param_formula,
    "resnet18_imagenet": lambda *args: resnet_param_formula(*args, stem_kernel=7),
}
ALL = ["vgg_like", "resnet18", "resnet18_imagenet"]


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_names():
    assert models.names() == ["resnet18", "resnet18_imagenet", "vgg_like"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "num_classes,width,in_channels", [(10, 1.0, 3), (100, 1.0, 3), (10, 0.5, 1), (7, 0.3, 2), (3, 0.001, 3)]
)
def test_parameter_count_matches_formula(name, num_classes, width, in_channels):
    model = models.get(name, num_classes=num_classes, width=width, in_channels=in_channels)
    assert count(model) == FORMULAS[name](num_classes, width, in_channels)


def test_documented_parameter_counts():
    assert resnet_param_formula(10, 1.0, 3) == 11_173_962
    assert count(models.get("resnet18")) == 11_173_962
    vgg = vgg_param_formula(10, 1.0, 3)
    assert count(models.get("vgg_like")) == vgg
    assert f"{vgg:,}" in VGGLike.__doc__ and "11,173,962" in ResNet18.__doc__
    assert abs(vgg / 1e6 - 13.0) < 0.05
    # the usual ImageNet ResNet-18 (7x7 stem, 1000 classes) has 11,689,512 parameters
    assert resnet_param_formula(1000, 1.0, 3, stem_kernel=7) == 11_689_512
    assert count(models.get("resnet18_imagenet", num_classes=1000)) == 11_689_512
    assert "11,689,512" in ResNet18.__doc__


def test_vgg_layer_list():
    model = models.get("vgg_like", num_classes=10, width=0.5, in_channels=1)
    convs = [
        (m.in_channels, m.out_channels, m.kernel_size, m.padding, m.stride, m.bias is None)
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    chans = [1, 64, 64, 128, 128, 256, 256]
    assert convs == [(a, b, (3, 3), (1, 1), (1, 1), True) for a, b in zip(chans[:-1], chans[1:])]
    kinds = [type(m) for m in model.features]
    assert (
        kinds
        == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
        + [nn.MaxPool2d]
        + ([nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2 + [nn.MaxPool2d]) * 2
    )
    linears = [
        (m.in_features, m.out_features, m.bias is not None)
        for m in model.modules()
        if isinstance(m, nn.Linear)
    ]
    assert linears == [(16 * 256, 512, True), (512, 10, True)]
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm1d)] == [512]


def test_resnet_layer_list():
    model = models.get("resnet18", num_classes=10, width=1.0, in_channels=3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    convs = [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.bias is None)
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    expected = [(3, 64, 3, 1, True)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for s in (stride, 1):
            expected += [(cin, cout, 3, s, True), (cout, cout, 3, 1, True)]
            if s != 1 or cin != cout:
                expected.append((cin, cout, 1, s, True))
            cin = cout
    assert convs == expected
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(expected)


def test_resnet_imagenet_stem():
    model = models.get("resnet18_imagenet", num_classes=1000, width=0.25)
    conv = model.conv1
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
        3, 16, (7, 7), (2, 2), (3, 3)
    )
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 1 and (pools[0].kernel_size, pools[0].stride, pools[0].padding) == (3, 2, 1)
    seen = {}
    model.layer1.register_forward_hook(lambda m, inp, out: seen.update(shape=inp[0].shape))
    assert model.eval()(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
    assert seen["shape"] == (2, 16, 56, 56)  # the stem divides 224 by 4
    # the same blocks as the CIFAR variant: state_dict keys differ only by nothing (the pool has no state)
    assert list(model.state_dict()) == list(models.get("resnet18", 1000, 0.25).state_dict())
    with pytest.raises(ValueError, match="stem must be one of"):
        ResNet18(stem="tiny")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [(8, 8), (11, 13), (32, 32)])
def test_output_shape(name, in_channels, size):
    torch.manual_seed(0)
    model = models.get(name, num_classes=7, width=0.125, in_channels=in_channels)
    x = torch.randn(3, in_channels, *size)
    out = model(x)  # train mode: BatchNorm uses batch statistics
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(x[:1]).shape == (1, 7)


def test_full_width_forward_32x32():
    torch.manual_seed(0)
    for name in models.names():
        model = models.get(name).eval()
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_adaptive_pool_is_identity_at_32x32():
    model = models.get("vgg_like", width=0.25).eval()
    seen = {}
    model.pool.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0], out=out))
    model(torch.randn(2, 3, 32, 32))
    assert seen["inp"].shape == (2, 128, 4, 4)
    torch.testing.assert_close(seen["out"], seen["inp"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_fx_traceable(name):
    torch.manual_seed(0)
    model = models.get(name, width=0.25, in_channels=1).eval()
    traced = torch.fx.symbolic_trace(model)
    for size in [(8, 8), (11, 13)]:
        x = torch.randn(2, 1, *size)
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    if name.startswith("resnet18"):
        targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
        assert targets.count(torch.nn.functional.relu) == 17  # stem + 2 per block
        assert targets.count(operator.add) == 8  # one residual add per block


def test_width_scaling_rounds_channels():
    model = models.get("resnet18", width=0.3)
    assert model.conv1.out_channels == 19  # round(19.2)
    assert model.layer4[1].conv2.out_channels == 154  # round(153.6)
    tiny = models.get("vgg_like", width=1e-4)
    assert all(m.out_channels == 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))


def test_init():
    torch.manual_seed(0)
    model = models.get("resnet18")
    w = model.layer4[1].conv2.weight
    # kaiming normal, fan_out mode: std = sqrt(2 / (out_channels * k * k))
    expected = math.sqrt(2.0 / (512 * 9))
    assert abs(w.std().item() / expected - 1) < 0.02
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(
                m.bias, torch.zeros_like(m.bias)
            )


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*resnet18, resnet18_imagenet, vgg_like"):
        models.get("vgg16")
    with pytest.raises(ValueError, match="known models"):
        models.get(None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=0), "num_classes must be an int >= 1, got 0"),
        (dict(num_classes=2.5), "num_classes"),
        (dict(num_classes=True), "num_classes"),
        (dict(in_channels=0), "in_channels must be an int >= 1, got 0"),
        (dict(width=0.0), "width must be a finite number > 0, got 0.0"),
        (dict(width=-1), "width"),
        (dict(width=float("nan")), "width"),
        (dict(width="1"), "width"),
    ],
)
@pytest.mark.parametrize("name", ALL)
def test_bad_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.get(name, **kwargs)
    builders = {"vgg_like": VGGLike, "resnet18": ResNet18, "resnet18_imagenet": models.resnet18_imagenet}
    with pytest.raises(ValueError, match=match):
        builders[name](**kwargs)


def test_resnet_loads_torchvision_style_state_dicts():
    """torchvision names the shortcut ``downsample`` and its older files lack ``num_batches_tracked``."""
    torch.manual_seed(0)
    source = models.get("resnet18_imagenet", num_classes=1000, width=0.125)
    for bn in source.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    theirs = {
        k.replace(".shortcut.", ".downsample."): v.clone()
        for k, v in source.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert any(".downsample." in k for k in theirs)
    target = models.get("resnet18_imagenet", num_classes=1000, width=0.125)
    target.load_state_dict(theirs)  # strict: every key found, none left over
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)
    assert not any(".shortcut." in k for k in theirs)  # the caller's dict is left as it was
