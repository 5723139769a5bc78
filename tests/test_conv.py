"""Tests for qgrad.ops.conv and qgrad.nn.conv: convolutions with a direct double backward.

The reference is PyTorch's own convolution: forward and first gradients must be bit-identical, second
derivatives equal to autograd's double backward up to rounding, and ``gradgradcheck`` (float64, finite
differences) checks the second derivatives independently of both.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgrad.nn.conv import Conv1d, Conv2d, Conv3d, convert_conv, revert_conv
from qgrad.ops.conv import conv

FUNCTIONAL = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
# (input shape, weight shape, bias, stride, padding, dilation, groups)
CASES = {
    "1d_stride": ((2, 2, 7), (3, 2, 3), True, 2, 1, 1, 1),
    "2d_dilation": ((1, 2, 6, 5), (3, 2, 3, 3), True, 1, 2, 2, 1),
    "2d_groups_nobias": ((2, 4, 5, 4), (4, 2, 3, 1), False, (2, 1), (1, 0), 1, 2),
    "3d": ((1, 2, 3, 4, 3), (2, 2, 2, 2, 2), True, 1, (0, 1, 1), 1, 1),
}


def make(case, dtype=torch.float64, seed=0):
    xs, ws, has_bias, stride, padding, dilation, groups = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(xs, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(ws, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(ws[0], generator=g, dtype=dtype).requires_grad_() if has_bias else None
    return x, w, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def second_order(fn, x, w, b, seed=1):
    """Output, first gradients and the gradients of a random functional of them (also w.r.t. the seed gy)."""
    y = fn(x, w, b)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype).requires_grad_()
    inputs = [t for t in (x, w, b) if t is not None]
    first = torch.autograd.grad(y, inputs, gy, create_graph=True)
    probe = sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in first)
    second = torch.autograd.grad(probe, inputs + [gy], allow_unused=True)
    return y, first, [torch.zeros_like(t) if s is None else s for s, t in zip(second, inputs + [gy])]


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_and_gradgradcheck(case):
    x, w, b, kw = make(case)
    inputs = (x, w) if b is None else (x, w, b)

    def fn(*args):
        return conv(*args, **kw)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_first_order_exactly_and_second_order_to_rounding(case, channels_last):
    x, w, b, kw = make(case, torch.float32)
    if channels_last and x.dim() == 4:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    torch_fn = FUNCTIONAL[x.dim()]
    y_ref, first_ref, second_ref = second_order(lambda *a: torch_fn(*a, **kw), x, w, b)
    y, first, second = second_order(lambda *a: conv(*a, **kw), x, w, b)
    assert torch.equal(y, y_ref)
    for a, r in zip(first, first_ref):
        assert torch.equal(a, r)
    for a, r in zip(second, second_ref):
        err = (a - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
        assert err <= 1e-5, err


def test_input_that_needs_no_gradient():
    # e.g. the network input: the first-order pass skips the input gradient, the second order still matches
    x, w, b, kw = make("2d_dilation", torch.float32)
    x = x.detach()
    results = []
    for fn in (lambda: F.conv2d(x, w, b, **kw), lambda: conv(x, w, b, **kw)):
        y = fn()
        gw, gb = torch.autograd.grad(y.square().sum() / 2, [w, b], create_graph=True)  # dL/dy = y
        results.append([gw, gb, *torch.autograd.grad(gw.abs().sum() + gb.abs().sum(), [w, b])])
    for a, r in zip(results[1], results[0]):
        assert torch.allclose(a, r, rtol=1e-5, atol=0)


MODULES = [
    (nn.Conv1d(3, 4, 3, padding=1, stride=2), (2, 3, 9), Conv1d),
    (nn.Conv2d(3, 4, 3, padding=2, dilation=2), (2, 3, 7, 7), Conv2d),
    (nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False, padding_mode="reflect"), (2, 4, 5, 6), Conv2d),
    (nn.Conv2d(3, 4, 3, padding="same"), (2, 3, 6, 5), Conv2d),
    (nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 3), Conv3d),
]


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("index", range(len(MODULES)))
def test_module_swap_is_transparent(index, batched):
    module, shape, twin = MODULES[index]
    torch.manual_seed(index)
    module = copy.deepcopy(module).double()
    reference = copy.deepcopy(module)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    params = [id(p) for p in module.parameters()]
    assert convert_conv(module) is module
    assert type(module) is twin and isinstance(module, type(reference)) and repr(module) == repr(reference)
    assert [id(p) for p in module.parameters()] == params
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    # torch's convolutions also take one sample without the batch dimension
    x = torch.randn(shape if batched else shape[1:], dtype=torch.float64, requires_grad=True)
    y, first, second = second_order(lambda x_, w_, b_: module(x_), x, module.weight, module.bias)
    y_ref, first_ref, second_ref = second_order(lambda x_, w_, b_: reference(x_), x, reference.weight,
                                                reference.bias)
    assert torch.equal(y, y_ref) and all(torch.equal(a, r) for a, r in zip(first, first_ref))
    assert all(torch.allclose(a, r, rtol=1e-12, atol=1e-12) for a, r in zip(second, second_ref))
    clone = copy.deepcopy(module)
    assert type(clone) is twin and torch.equal(clone(x), y)
    assert revert_conv(module) is module and type(module) is type(reference)


def test_autocast_matches_torch():
    torch.manual_seed(0)
    module = nn.Conv2d(3, 5, 3, padding=1)
    reference = copy.deepcopy(module)
    convert_conv(module)
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = module(x), reference(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    assert module.weight.grad.dtype == torch.float32
    assert torch.equal(module.weight.grad, reference.weight.grad)


def test_subclasses_are_left_alone_and_errors():
    class Custom(nn.Conv2d):
        pass

    model = nn.Sequential(Custom(3, 3, 1), nn.Conv2d(3, 3, 1))
    convert_conv(model)
    assert type(model[0]) is Custom and type(model[1]) is Conv2d
    convert_conv(model)  # twice is harmless
    assert type(model[1]) is Conv2d
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert_conv(lambda t: t)
    with pytest.raises(ValueError, match="input must be 3-d, 4-d or 5-d"):
        conv(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="stride must be an int or a sequence of 2 ints"):
        conv(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 1, 1), stride=(1, 1, 1))
    with pytest.raises(RuntimeError, match="Expected 3D .unbatched. or 4D .batched. input to conv2d"):
        model[1](torch.ones(1, 1, 3, 4, 4))  # torch's own message for a wrong rank


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradient_is_recomputed_not_saved_and_second_order_is_exact(training):
    # conv -> qgrad BatchNorm: the convolution's backward node keeps no copy of its incoming gradient (the
    # BatchNorm backward recomputes it bit for bit), and the second derivatives still match PyTorch's
    from qgrad.ops.batch_norm import batch_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    stats = (
        torch.randn(4, generator=g, dtype=torch.float64),
        torch.rand(4, generator=g, dtype=torch.float64) + 0.5,
    )
    head = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64)

    def grads(conv_fn, bn_fn):
        y = bn_fn(conv_fn(x, w, None, padding=1), *[s.clone() for s in stats], gamma, None, training)
        gx, gw = torch.autograd.grad((y * head).sum(), [x, w], create_graph=True)
        if conv_fn is conv:
            assert gw.grad_fn.gy_source is not None and gw.grad_fn.saved_tensors[0] is None
        reg = gx.abs().sum() + gw.square().sum()
        return torch.autograd.grad(reg, [x, w, gamma])

    ours = grads(conv, batch_norm)
    expected = grads(F.conv2d, F.batch_norm)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
