"""Tests for qgrad.penalties.

The gradient penalties are checked against an independent functional re-derivation of the test network: the
activations of Eq. 3 are exposed as additive perturbations ``eps`` (the gradient w.r.t. a tensor equals the
gradient w.r.t. a zero perturbation added to it), the penalty value comes from ``torch.func.grad``, and its
gradient w.r.t. the parameters is the Hessian-vector product ``H @ d`` (``d = sign(g)`` for l1, ``g/||g||``
for l2) computed forward-over-reverse with ``torch.func.jvp`` -- a different route from the penalty's
reverse-over-reverse double backward.
"""

import contextlib
import copy
import gc
import io
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qgrad.penalties import L1GradPenalty, L2GradPenalty, OrthogonalityPenalty

# torch's forward-mode decompositions (loaded by the first torch.func.jvp) still go through torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DTYPE = torch.float64
WEIGHTS = ("conv1.weight", "conv2.weight", "fc.weight")


class SubclassedConv(nn.Conv2d):
    """Stands in for a quantized layer: a Conv2d subclass must be regularized like a Conv2d."""


class Net(nn.Module):
    """Conv -> BN -> ReLU -> residual (Conv -> BN) -> ReLU -> max-pool -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = SubclassedConv(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(36, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(h + self.bn2(self.conv2(h)))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


def reference_loss(p, eps, x, y):
    """``Net``'s training-mode loss written out with functionals; ``eps`` perturbs the two recorded
    activations (the input of conv2, which also feeds the residual add, and the input of fc)."""
    h = F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)
    h = F.relu(F.batch_norm(h, None, None, p["bn1.weight"], p["bn1.bias"], training=True))
    a1 = h + eps[0]
    r = F.batch_norm(
        F.conv2d(a1, p["conv2.weight"], padding=1), None, None, p["bn2.weight"], p["bn2.bias"], training=True
    )
    a2 = F.max_pool2d(F.relu(a1 + r), 2).flatten(1) + eps[1]
    return F.cross_entropy(F.linear(a2, p["fc.weight"], p["fc.bias"]), y)


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net().to(DTYPE)
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net.train()


def make_batch(seed=1, n=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


def zero_eps(n=5):
    return [torch.zeros(n, 4, 6, 6, dtype=DTYPE), torch.zeros(n, 36, dtype=DTYPE)]


def rel_err(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)


def hook_counts(model):
    return [
        (len(m._forward_pre_hooks), len(m._forward_pre_hooks_with_kwargs), len(m._forward_hooks))
        for m in model.modules()
    ]


def reference_penalty(net, x, y, lw, la, ord):
    """(value, {param name: d value / d param}) of the gradient-norm penalty, via torch.func."""
    p = {k: v.detach() for k, v in net.named_parameters()}
    eps = zero_eps(x.shape[0])
    grad_fn = torch.func.grad(reference_loss, argnums=(0, 1))
    g_p, g_e = grad_fn(p, eps, x, y)

    def norm(g):
        return g.abs().sum() if ord == 1 else g.square().sum().sqrt()

    def direction(g):
        return torch.sign(g) if ord == 1 else g / g.square().sum().sqrt()

    value = lw * sum(norm(g_p[k]) for k in WEIGHTS) + la * sum(norm(g) for g in g_e)
    d_p = {k: (lw * direction(v) if k in WEIGHTS else torch.zeros_like(v)) for k, v in g_p.items()}
    d_e = [la * direction(g) for g in g_e]
    _, (hvp_p, _) = torch.func.jvp(lambda p_, e_: grad_fn(p_, e_, x, y), (p, eps), (d_p, d_e))
    return value, hvp_p


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("cls,ord", [(L1GradPenalty, 1), (L2GradPenalty, 2)])
@pytest.mark.parametrize("lw,la", [(0.3, 0.0), (0.0, 0.7), (0.3, 0.7)])
def test_grad_penalty_value_and_gradient_match_torch_func(cls, ord, lw, la):
    net = make_net()
    x, y = make_batch()
    ref_value, ref_grads = reference_penalty(net, x, y, lw, la, ord)

    penalty = cls(net, weight=lw, activation=la)
    loss = F.cross_entropy(net(x), y)
    reg = penalty(loss)
    names, params = zip(*net.named_parameters())
    grads = torch.autograd.grad(reg, params, allow_unused=True)

    assert reg.dim() == 0
    assert abs(reg.item() - ref_value.item()) <= 1e-10 * ref_value.item(), (reg.item(), ref_value.item())
    scale = max(r.abs().max().item() for r in ref_grads.values())
    for name, p, g in zip(names, params, grads):
        g = torch.zeros_like(p) if g is None else g
        # conv1.bias feeds a BatchNorm, so its true gradient is 0 and the reference holds only round-off:
        # such tensors are measured against the largest gradient of the network instead of their own
        ref = ref_grads[name]
        err = (g - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6 * scale)
        assert err <= 1e-8, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("cls,suffix", [(L1GradPenalty, "l1"), (L2GradPenalty, "l2")])
def test_backward_stats_match_reference(cls, suffix):
    net = make_net()
    x, y = make_batch()
    p = {k: v.detach() for k, v in net.named_parameters()}
    g_p, g_e = torch.func.grad(reference_loss, argnums=(0, 1))(p, zero_eps(), x, y)
    norm = (lambda g: g.abs().sum()) if suffix == "l1" else (lambda g: g.square().sum().sqrt())
    weight_term = sum(norm(g_p[k]) for k in WEIGHTS).item()
    activation_term = sum(norm(g) for g in g_e).item()
    loss_ref = reference_loss(p, zero_eps(), x, y).item()

    penalty = cls(net, weight=0.2, activation=0.4)
    stats = penalty.backward(F.cross_entropy(net(x), y))
    assert set(stats) == {"loss", "penalty", f"weight_{suffix}", f"activation_{suffix}"}
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["loss"] == pytest.approx(loss_ref, rel=1e-12)
    assert stats[f"weight_{suffix}"] == pytest.approx(weight_term, rel=1e-10)
    assert stats[f"activation_{suffix}"] == pytest.approx(activation_term, rel=1e-10)
    assert stats["penalty"] == pytest.approx(0.2 * weight_term + 0.4 * activation_term, rel=1e-10)
    # backward accumulated d(loss + penalty)/dtheta into .grad
    assert all(p_.grad is not None for p_ in net.parameters())


def test_l2_stats_and_zero_gradient_has_zero_subgradient():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            # b's weight gradient is exactly zero: the l2 norm sits at its non-differentiable point
            return self.a(x) + 0.0 * self.b(x)

    torch.manual_seed(0)
    model = TwoHeads().to(DTYPE)
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    penalty = L2GradPenalty(model, weight=1.0, activation=0.0)
    loss = F.cross_entropy(model(x), y)
    reg = penalty(loss)
    grads = torch.autograd.grad(reg, list(model.parameters()), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, model.parameters())]
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.count_nonzero(grads[2]) == 0 and torch.count_nonzero(grads[3]) == 0  # b gets no gradient

    # value: per-tensor l2 norms, summed; the zero tensor contributes 0
    ga, gb = torch.autograd.grad(F.cross_entropy(model(x), y), [model.a.weight, model.b.weight])
    assert torch.count_nonzero(gb) == 0
    assert reg.item() == pytest.approx(ga.norm().item(), rel=1e-12)
    # the gradient of ||ga||_2 alone (b excluded) must be the same
    only_a = L2GradPenalty(model, weight=1.0, activation=0.0, params=[model.a.weight])
    grads_a = torch.autograd.grad(only_a(F.cross_entropy(model(x), y)), [model.a.weight, model.a.bias])
    assert rel_err(grads[0], grads_a[0]) <= 1e-12 and rel_err(grads[1], grads_a[1]) <= 1e-12

    stats = L2GradPenalty(model, weight=0.5, activation=0.0).backward(F.cross_entropy(model(x), y))
    assert stats["weight_l2"] == pytest.approx(ga.norm().item(), rel=1e-12)
    assert stats["penalty"] == pytest.approx(0.5 * ga.norm().item(), rel=1e-12)
    assert stats["activation_l2"] == 0.0


def test_activation_fed_to_two_layers_counts_once():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0 = nn.Linear(5, 6)
            self.a = nn.Linear(6, 3)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.fc0(x))
            return self.a(h) * self.b(h)

    torch.manual_seed(0)
    model = Fork().to(DTYPE)
    x, y = torch.randn(7, 5, dtype=DTYPE), torch.randint(0, 3, (7,))

    def loss_of_h(h):  # same network from h on, without the modules (and their hooks)
        out = F.linear(h, model.a.weight, model.a.bias) * F.linear(h, model.b.weight, model.b.bias)
        return F.cross_entropy(out, y)

    h = torch.tanh(F.linear(x, model.fc0.weight, model.fc0.bias)).detach()
    expected = torch.func.grad(loss_of_h)(h).abs().sum().item()

    stats = L1GradPenalty(model, weight=0.0, activation=1.0).backward(F.cross_entropy(model(x), y))
    assert stats["activation_l1"] == pytest.approx(expected, rel=1e-12)
    assert stats["penalty"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("conv", [False, True])
def test_activations_that_share_one_gradient_tensor(conv):
    """``h`` feeds an auxiliary layer whose output this loss does not use, and ``h + 1`` the next layer:
    autograd hands both the same gradient tensor, and the gradient of the penalty counts both terms."""
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            make = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if conv else nn.Linear
            self.a, self.aux, self.b = make(3, 4), make(4, 2), make(4, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            self.aux_out = self.aux(h)
            out = self.b(h + 1)
            return out.mean((2, 3)) if conv else out

    torch.manual_seed(0)
    model = Aux().to(DTYPE)
    x = torch.randn(4, 3, 5, 5, dtype=DTYPE) if conv else torch.randn(4, 3, dtype=DTYPE)
    y = torch.randint(0, 3, (4,))
    penalized = copy.deepcopy(model)
    L1GradPenalty(penalized, weight=0.3, activation=0.2).backward(F.cross_entropy(penalized(x), y))

    h = torch.tanh(model.a(x))
    model.aux(h)
    h1 = h + 1
    out = model.b(h1)
    loss = F.cross_entropy(out.mean((2, 3)) if conv else out, y)
    weights = [model.a.weight, model.aux.weight, model.b.weight]
    grads = torch.autograd.grad(loss, weights + [h, h1], create_graph=True, allow_unused=True)
    assert grads[3] is grads[4]  # the case under test
    reg = 0.3 * sum(g.abs().sum() for g in grads[:3] if g is not None)
    reg = reg + 0.2 * (grads[3].abs().sum() + grads[4].abs().sum())
    (loss + reg).backward()
    for name, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        got = penalized.get_parameter(name).grad
        got = got if got is not None else torch.zeros_like(p)
        assert rel_err(got, expected) < 1e-10, name


def test_explicit_params_and_tied_weights():
    net = make_net()
    x, y = make_batch()
    (g_fc,) = torch.autograd.grad(F.cross_entropy(net(x), y), [net.fc.weight])
    penalty = L1GradPenalty(net, weight=1.0, activation=0.0, params=[net.fc.weight, net.fc.weight])
    assert penalty(F.cross_entropy(net(x), y)).item() == pytest.approx(g_fc.abs().sum().item(), rel=1e-12)

    # one parameter shared by two layers is one variable: its (total) gradient is counted once
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(DTYPE)
    tied[2].weight = tied[0].weight
    xt, yt = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 4, (5,))
    (g_w,) = torch.autograd.grad(F.cross_entropy(tied(xt), yt), [tied[0].weight])
    value = L1GradPenalty(tied, weight=1.0, activation=0.0)(F.cross_entropy(tied(xt), yt))
    assert value.item() == pytest.approx(g_w.abs().sum().item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------ halves
def test_halves_are_independent_and_skipped_when_off(monkeypatch):
    x, y = make_batch()
    stats = {}
    calls = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        calls.append(len(inputs))
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    for lw, la in [(0.3, 0.7), (0.3, 0.0), (0.0, 0.7)]:
        net = make_net()
        with L1GradPenalty(net, weight=lw, activation=la) as penalty:
            if la == 0:
                assert all(c == (0, 0, 0) for c in hook_counts(net)), "activation=0 must register no hooks"
            calls.clear()
            stats[lw, la] = penalty.backward(F.cross_entropy(net(x), y))
            # one autograd.grad call: 3 weights and/or 2 recorded activations
            assert calls == [(3 if lw else 0) + (2 if la else 0)]
    both, w_only, a_only = stats[0.3, 0.7], stats[0.3, 0.0], stats[0.0, 0.7]
    assert w_only["activation_l1"] == 0.0 and a_only["weight_l1"] == 0.0
    assert w_only["weight_l1"] == pytest.approx(both["weight_l1"], rel=1e-14)
    assert a_only["activation_l1"] == pytest.approx(both["activation_l1"], rel=1e-14)
    assert w_only["penalty"] == pytest.approx(0.3 * both["weight_l1"], rel=1e-14)
    assert a_only["penalty"] == pytest.approx(0.7 * both["activation_l1"], rel=1e-14)
    assert both["penalty"] == pytest.approx(w_only["penalty"] + a_only["penalty"], rel=1e-14)

    net = make_net()
    zero = L1GradPenalty(net, weight=0.0, activation=0.0)
    assert zero(F.cross_entropy(net(x), y)).item() == 0.0


# ------------------------------------------------------------------------------------------------ recording
def test_batchnorm_statistics_update_once_per_step():
    x, y = make_batch()
    plain, regularized = make_net(), make_net()
    F.cross_entropy(plain(x), y).backward()
    penalty = L1GradPenalty(regularized, weight=0.1, activation=0.1)
    penalty.backward(F.cross_entropy(regularized(x), y))
    for name in ("bn1", "bn2"):
        a, b = getattr(plain, name), getattr(regularized, name)
        assert int(b.num_batches_tracked) == 1
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert not torch.equal(b.running_mean, torch.zeros_like(b.running_mean))


def test_no_grad_and_eval_forwards_record_nothing():
    net = make_net()
    x, y = make_batch()
    x2, _ = make_batch(seed=2)
    penalty = L1GradPenalty(net, weight=0.1, activation=0.1)
    loss = F.cross_entropy(net(x), y)
    value = penalty(loss).item()
    with torch.no_grad():
        net(x2)
    with torch.inference_mode():
        net(x2)
    net.eval()
    eval_loss = F.cross_entropy(net(x2), y)
    net.train()
    assert penalty(loss).item() == value  # the recording of the training forward is intact
    with pytest.raises(RuntimeError, match="does not depend on the activations"):
        penalty(eval_loss)

    fresh = make_net().eval()
    with pytest.raises(RuntimeError, match="run a forward pass in train mode with grad enabled"):
        L1GradPenalty(fresh)(F.cross_entropy(fresh(x), y))


def test_new_forward_releases_previous_recording():
    net = make_net()
    x, y = make_batch()
    x2, y2 = make_batch(seed=2)
    penalty = L1GradPenalty(net, weight=0.1, activation=0.1)
    seen = []
    spy = net.fc.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    out = net(x)
    loss = F.cross_entropy(out, y)  # the penalty is not evaluated for this forward (e.g. a warm-up step)
    del out
    gc.collect()
    assert seen[0]() is not None  # held by the penalty (and by loss's graph)
    loss_ref = weakref.ref(loss)
    loss2 = F.cross_entropy(net(x2), y2)
    with pytest.raises(RuntimeError, match="does not depend on the activations"):
        penalty(loss)
    del loss
    gc.collect()
    assert loss_ref() is None
    assert seen[0]() is None, "the first forward's activation must be released by the second forward"
    assert penalty(loss2).item() > 0
    spy.remove()


def test_backward_releases_recording():
    net = make_net()
    x, y = make_batch()
    penalty = L1GradPenalty(net, weight=0.1, activation=0.1)
    seen = []
    spy = net.fc.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    penalty.backward(F.cross_entropy(net(x), y))
    gc.collect()
    assert seen[0]() is None
    with pytest.raises(RuntimeError, match="run a forward pass in train mode"):
        # nothing was recorded since the release (the input of fc does not require grad)
        penalty(F.cross_entropy(net.fc(torch.zeros(5, 36, dtype=DTYPE)), y))
    spy.remove()


def test_submodule_forwards_add_to_one_recording():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    x, y = torch.randn(8, 4, dtype=DTYPE), torch.randint(0, 3, (8,))
    penalty = L1GradPenalty(model, weight=0.2, activation=0.5)
    whole = penalty(F.cross_entropy(model(x), y)).item()

    h = model[1](model[0](x))  # the root hook does not fire for these calls
    loss = F.cross_entropy(model[4](model[3](model[2](h))), y)
    assert penalty(loss).item() == pytest.approx(whole, rel=1e-14)

    # evaluating the penalty closed that recording: the next submodule forward starts a new one
    model[0](x).sum()
    loss_b = F.cross_entropy(model[4](model[3](model[2](model[1](model[0](x))))), y)
    with pytest.raises(RuntimeError, match="does not depend on the activations"):
        penalty(loss)
    assert penalty(loss_b).item() == pytest.approx(whole, rel=1e-14)


# ------------------------------------------------------------------------------------------------ errors
def test_errors():
    net = make_net()
    x, y = make_batch()
    before = hook_counts(net)
    with pytest.raises(ValueError, match="has no nn.Conv1d/2d/3d or nn.Linear layers"):
        L1GradPenalty(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="has no nn.Conv1d/2d/3d or nn.Linear layers"):
        OrthogonalityPenalty(nn.Sequential(nn.ReLU()))
    w = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="pass activation=0"):
        L1GradPenalty(nn.Sequential(nn.ReLU()), params=[w])
    assert L1GradPenalty(nn.Sequential(nn.ReLU()), activation=0.0, params=[w]).weight == 0.05
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
            L1GradPenalty(net, weight=bad)
        with pytest.raises(ValueError, match="activation must be a finite number >= 0"):
            L2GradPenalty(net, activation=bad)
        with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
            OrthogonalityPenalty(net, weight=bad)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        L1GradPenalty(net, params=[net.fc.weight * 2])
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        L1GradPenalty(net, params=[torch.ones(3, dtype=DTYPE)])
    with pytest.raises(TypeError, match="single tensor"):
        L1GradPenalty(net, params=net.fc.weight)
    with pytest.raises(ValueError, match="params is empty"):
        L1GradPenalty(net, params=[])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        L1GradPenalty(lambda t: t)
    assert hook_counts(net) == before, "a rejected construction must leave the model unchanged"

    penalty = L1GradPenalty(net)
    out = net(x)
    with pytest.raises(ValueError, match="scalar"):
        penalty(F.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match="does not require grad"):
        penalty(F.cross_entropy(out.detach(), y))
    with pytest.raises(TypeError, match="loss must be a torch.Tensor"):
        penalty(1.0)
    assert penalty(F.cross_entropy(out, y)).item() > 0  # the failed calls did not consume the recording

    penalty.remove()
    penalty.remove()
    for p in (penalty, OrthogonalityPenalty(net)):
        p.remove()
        with pytest.raises(RuntimeError, match="was removed from its model"):
            p(F.cross_entropy(net(x), y))
        with pytest.raises(RuntimeError, match="was removed from its model"):
            p.backward(F.cross_entropy(net(x), y))


@pytest.mark.parametrize("kwargs", [dict(activation=0.0), dict(method="worst-case", activation=0.0), {}])
def test_a_loss_that_reaches_none_of_the_weights_is_an_error(kwargs):
    """A loss from a copy of the model (or from torch.func.functional_call with other tensors) gives no
    gradient to any regularized weight: the weight half would silently be 0."""
    x, y = make_batch()
    net = make_net()
    penalty = L1GradPenalty(net, **kwargs)
    other = copy.deepcopy(net)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    closure = (lambda: F.cross_entropy(other(x), y)) if "method" in kwargs else None
    for use_copy in (True, False):
        if use_copy:
            net(x)  # a recording of activations, for the activation half
            loss = F.cross_entropy(other(x), y)
        else:  # this forward records activations the loss does depend on
            loss = F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)
        with pytest.raises(RuntimeError, match="does not depend on any of the regularized weights"):
            penalty.backward(loss, closure)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("make", [
    lambda net: L1GradPenalty(net), lambda net: L1GradPenalty(net, every=2), lambda net: L2GradPenalty(net),
    lambda net: OrthogonalityPenalty(net),
])
def test_grad_mode_off(make):
    """penalty(loss) under no_grad would return a constant and silently train without the penalty: it raises;
    penalty.backward(loss), like loss.backward(), works in either mode and gives the same gradients."""
    x, y = make_batch()
    grads = []
    for off in (False, True):
        net = make_net()
        penalty = make(net)
        loss = F.cross_entropy(net(x), y)
        if off:
            with torch.no_grad(), pytest.raises(RuntimeError, match="with gradient recording off"):
                penalty(loss)
        with torch.no_grad() if off else contextlib.nullcontext():
            penalty.backward(loss)
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_compiled_models_are_refused_where_the_backward_is_differentiated():
    """torch.compile's backward cannot be differentiated again (AOTAutograd compiles a first-order one): the
    double-backward penalties say so at construction, with the fix, and change nothing; the worst-case mode,
    first-order only, accepts the compiled model."""
    net = make_net()
    compiled = torch.compile(net)  # lazy: compiles at its first call, which never comes here
    holder = nn.Sequential(compiled)
    before = hook_counts(net)
    for model in (compiled, holder):
        for make in (L1GradPenalty, L2GradPenalty):
            with pytest.raises(ValueError, match="compiled with torch.compile.*uncompiled model"):
                make(model)
    assert hook_counts(net) == before
    L1GradPenalty(compiled, method="worst-case").remove()


def test_parametrized_weights_are_refused_and_hook_computed_weights_work():
    """A weight computed by torch.nn.utils.parametrize is a new tensor at every read, which the loss does not
    depend on: the gradient penalties refuse it (its gradient would silently count as zero) unless the
    weights are left out. The older hook-based weight_norm sets ``layer.weight`` at each forward, so the
    exact penalty reads the tensor the forward used, while the worst-case mode, which moves weights in place,
    refuses it."""
    x, y = make_batch()
    for parametrize in (nn.utils.parametrizations.weight_norm, nn.utils.parametrizations.spectral_norm):
        net = make_net()
        parametrize(net.conv1)
        before = hook_counts(net)
        makers = ((L1GradPenalty, {}), (L1GradPenalty, dict(method="worst-case")), (L2GradPenalty, {}))
        for make, kwargs in makers:
            with pytest.raises(ValueError, match="weight of layer 'conv1' is computed by a parametrization"):
                make(net, **kwargs)
        assert hook_counts(net) == before
        L1GradPenalty(net, weight=0.0).remove()
        OrthogonalityPenalty(net).remove()  # differentiates the weight itself: fine

    net = make_net()
    with pytest.warns(FutureWarning):  # torch deprecates the hook-based version
        nn.utils.weight_norm(net.conv1)
    penalty = L1GradPenalty(net, weight=0.1, activation=0.0)
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, [net.conv1.weight, net.conv2.weight, net.fc.weight], retain_graph=True)
    stats = penalty.backward(loss)
    assert stats["weight_l1"] == pytest.approx(float(sum(g.abs().sum() for g in grads)), rel=1e-12)
    assert net.conv1.weight_v.grad is not None
    penalty.remove()
    penalty = L1GradPenalty(net, weight=0.1, activation=0.0, method="worst-case")
    with pytest.raises(RuntimeError, match="weight of layer 'conv1' is computed from other tensors"):
        penalty.backward(F.cross_entropy(net(x), y), lambda: F.cross_entropy(net(x), y))


def test_torch_func_transforms_work_on_a_model_with_the_twins():
    """The twins' autograd Functions have no functorch rules: under torch.func.grad / vmap they run torch's
    ops, so per-sample gradients of an attached model are those of the torch model."""
    from torch.func import functional_call, grad, vmap

    x, y = make_batch()
    net = make_net().eval()
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def per_sample():
        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(net, (p, buffers), (xi[None],)), yi[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    expected = per_sample()
    penalty = L1GradPenalty(net)
    assert type(net.bn1) is not nn.BatchNorm2d and type(net.conv1) is not nn.Conv2d
    got = per_sample()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    penalty.remove()


def test_symbolic_trace_of_a_model_with_the_twins_is_that_of_the_torch_model():
    """torch.fx keeps torch's modules as leaves and traces into other modules: the twins hand it a leaf node
    too (their autograd Functions and input checks cannot take proxies), so the graph is the torch model's and
    running it runs the twins."""
    x, y = make_batch()
    net = make_net()
    expected = torch.fx.symbolic_trace(net).code
    penalty = L1GradPenalty(net)
    traced = torch.fx.symbolic_trace(net)
    assert traced.code == expected
    assert type(traced.get_submodule("bn1")) is type(net.bn1) is not nn.BatchNorm2d
    loss = F.cross_entropy(net(x), y)
    assert torch.equal(F.cross_entropy(traced(x), y), loss)
    penalty.remove()


# -------------------------------------------------------------------------------------------- hooks / copies
def test_state_dict_unchanged():
    net = make_net()
    x, y = make_batch()
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    penalties = [L1GradPenalty(net), L2GradPenalty(net), OrthogonalityPenalty(net)]
    sd = net.state_dict()
    assert list(sd) == list(reference) and all(torch.equal(sd[k], reference[k]) for k in sd)
    out = net(x)  # mid-step
    assert list(net.state_dict()) == list(reference)
    penalties[0].backward(F.cross_entropy(out, y))
    assert list(net.state_dict()) == list(reference)
    net.load_state_dict(reference, strict=True)
    assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("moment", ["before_forward", "after_forward", "after_call", "after_backward"])
def test_deepcopy_and_pickle_at_any_point_of_a_step(moment):
    net = make_net()
    x, y = make_batch()
    x2, y2 = make_batch(seed=2)
    penalty = L1GradPenalty(net, weight=0.1, activation=0.1)
    loss = value = None
    if moment != "before_forward":
        loss = F.cross_entropy(net(x), y)
    if moment in ("after_call", "after_backward"):
        value = penalty(loss).item()
    if moment == "after_backward":
        penalty.backward(loss)

    clone = copy.deepcopy(net)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
        # the copy's inert hooks must not record into (and so release) the original penalty's recording
        F.cross_entropy(other(x2), y2)
    if moment in ("after_forward", "after_call"):
        reg = penalty(loss)
        if value is not None:
            assert reg.item() == value
        penalty.backward(loss)

    # the copies are independent models that accept penalties of their own, with the same values
    loss_net = F.cross_entropy(net(x2), y2)
    expected = penalty(loss_net).item()
    for other in (clone, loaded):
        with L1GradPenalty(other, weight=0.1, activation=0.1) as own:
            assert own(F.cross_entropy(other(x2), y2)).item() == pytest.approx(expected, rel=1e-12)


def test_penalties_refuse_copies_and_a_new_penalty_adopts_copied_twins():
    net = make_net()
    x, y = make_batch()
    penalty = L1GradPenalty(net, weight=0.1, activation=0.1, every=2)
    for make in (L2GradPenalty, OrthogonalityPenalty):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            copy.deepcopy(make(net))
    with pytest.raises(TypeError, match="L1GradPenalty objects are tied to their model"):
        copy.deepcopy(penalty)
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        torch.save(penalty, io.BytesIO())
    penalty.backward(F.cross_entropy(net(x), y))
    net(x)  # the next step is plain: the twins switch to torch's double backward
    clone = copy.deepcopy(net)  # keeps the twin classes and that setting
    penalty.remove()
    twins = [m for m in clone.modules() if "fused_double_backward" in vars(m)]
    assert len(twins) == 3 and not any(m.fused_double_backward for m in twins)  # conv1, bn1, bn2
    own = L1GradPenalty(clone, weight=0.1, activation=0.1)
    assert all(m.fused_double_backward for m in twins)  # adopted, with the fused double backward on
    assert own(F.cross_entropy(clone(x), y)).item() > 0
    own.remove()
    assert all(m.fused_double_backward and "fused_double_backward" not in vars(m) for m in twins)


def test_removing_one_of_two_penalties_leaves_the_twins_to_the_other():
    net = make_net()
    x, y = make_batch()
    first = L1GradPenalty(net, weight=0.1, activation=0)
    second = L1GradPenalty(net, weight=0, activation=0.1, every=2)
    twin_types = (type(net.conv1), type(net.bn1))
    assert twin_types != (nn.Conv2d, nn.BatchNorm2d)
    first.remove()
    assert (type(net.conv1), type(net.bn1)) == twin_types
    second.backward(F.cross_entropy(net(x), y))
    net(x)  # a plain step of every=2 sets the twins' plain-step flag
    second.remove()
    assert (type(net.conv1), type(net.bn1)) == (nn.Conv2d, nn.BatchNorm2d)
    assert not any("fused_double_backward" in vars(m) for m in net.modules())


def test_remove_context_manager_and_garbage_collection_restore_hooks():
    net = make_net()
    x, y = make_batch()
    before = hook_counts(net)
    assert all(c == (0, 0, 0) for c in before)

    penalty = L2GradPenalty(net)
    assert hook_counts(net) != before
    penalty.remove()
    assert hook_counts(net) == before

    with L1GradPenalty(net) as p:
        assert hook_counts(net) != before
        stats = p.backward(F.cross_entropy(net(x), y))
    assert stats["activation_l1"] > 0
    assert hook_counts(net) == before
    with pytest.raises(RuntimeError, match="was removed"):
        p(F.cross_entropy(net(x), y))

    L1GradPenalty(net)  # dropped at once: its hooks go with it
    gc.collect()
    assert hook_counts(net) == before


# --------------------------------------------------------------------------------------------- orthogonality
def test_orthogonality_value_matches_direct_formula_and_svd_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(5, 12), nn.Linear(12, 12), nn.Conv1d(2, 7, 1)).to(
        DTYPE
    )
    with torch.no_grad():
        model[2].weight.copy_(torch.linalg.qr(model[2].weight)[0])  # nearly orthogonal: tests cancellation
        model[2].weight.add_(1e-6 * torch.randn(12, 12, dtype=DTYPE))
    weights = [m.weight for m in model]
    direct, via_svd = 0.0, 0.0
    for w in weights:
        mat = w.reshape(w.shape[0], -1)
        m, n = mat.shape
        direct = direct + (mat.T @ mat - torch.eye(n, dtype=DTYPE)).square().sum()
        s = torch.linalg.svdvals(mat)
        via_svd = via_svd + (s.square() - 1).square().sum() + (n - min(m, n))
    assert direct.item() == pytest.approx(via_svd.item(), rel=1e-12)

    penalty = OrthogonalityPenalty(model, weight=0.3)
    loss = sum(w.sum() for w in weights)
    reg = penalty(loss)
    assert reg.item() == pytest.approx(0.3 * direct.item(), rel=1e-12)
    got = torch.autograd.grad(reg, weights)
    want = torch.autograd.grad(0.3 * direct, weights)
    for g, r in zip(got, want):
        assert rel_err(g, r) <= 1e-10

    # the nearly orthogonal square matrix alone: a tiny value, computed without cancellation
    mat = model[2].weight
    tiny = (mat.T @ mat - torch.eye(12, dtype=DTYPE)).square().sum().item()
    only = OrthogonalityPenalty(model, weight=1.0, params=[mat])
    assert tiny < 1e-9
    assert only(loss).item() == pytest.approx(tiny, rel=1e-6)

    stats = penalty.backward(loss)
    assert set(stats) == {"loss", "penalty", "orthogonality"}
    assert stats["orthogonality"] == pytest.approx(direct.item(), rel=1e-12)
    assert stats["penalty"] == pytest.approx(0.3 * direct.item(), rel=1e-12)
    assert all(c == (0, 0, 0) for c in hook_counts(model)), "OrthogonalityPenalty registers no hooks"
    with pytest.raises(ValueError, match="at least 1 dimension"):
        OrthogonalityPenalty(model, params=[nn.Parameter(torch.tensor(1.0))])


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize(
    "make_penalty,term",
    [
        (lambda m: L1GradPenalty(m, weight=1.0, activation=1.0), ("weight_l1", "activation_l1")),
        (lambda m: L2GradPenalty(m, weight=1.0, activation=1.0), ("weight_l2", "activation_l2")),
        (lambda m: OrthogonalityPenalty(m, weight=1.0), ("orthogonality",)),
    ],
)
def test_penalty_term_decreases_during_training(make_penalty, term):
    net = make_net()
    # the orthogonality term of a wide (m, n) weight never goes below its constant n - m
    floor = 0.0
    if term == ("orthogonality",):
        floor = float(
            sum(
                w[0].numel() - min(w.shape[0], w[0].numel())
                for w in (net.conv1.weight, net.conv2.weight, net.fc.weight)
            )
        )
    x, y = make_batch(n=16)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    penalty = make_penalty(net)
    history = []
    for _ in range(20):
        optimizer.zero_grad()
        stats = penalty.backward(F.cross_entropy(net(x), y))
        history.append(sum(stats[k] for k in term))
        assert math.isfinite(stats["loss"]) and math.isfinite(stats["penalty"])
        optimizer.step()
    assert history[-1] - floor < 0.8 * (history[0] - floor), history
