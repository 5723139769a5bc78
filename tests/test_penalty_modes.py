"""Tests for L1GradPenalty's fast exact path, its fused BatchNorm swap and its cheaper modes.

* The exact penalty (fused BatchNorm double backward, fused l1 norms) is compared with the plain PyTorch
  computation written out here: forward pre-hooks that record the layer inputs, ``torch.autograd.grad`` with
  ``create_graph=True``, ``vector_norm`` per tensor, and autograd's own double backward through torch's
  BatchNorm, on an untouched copy of the model.
* ``every=k`` is checked against that exact penalty (scaled by k) and against plain steps.
* ``method="worst-case"`` is checked against its defining formula, evaluated independently with
  ``torch.func`` on a functional re-statement of the test network (weights moved out of place, activations
  shifted through explicit additive perturbations), and against the exact penalty for smooth activations.
"""

import copy
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qgrad.models
from qgrad.nn.batch_norm import BatchNorm1d, BatchNorm2d, convert_batchnorm
from qgrad.nn.conv import Conv2d
from qgrad.penalties import L1GradPenalty, _ActivationShift

LAYERS = (nn.Conv2d, nn.Linear)


# ----------------------------------------------------------------------------------------------- helpers
def rel_err(a, b, floor=0.0):
    return (a - b).abs().max().item() / max(b.abs().max().item(), floor, 1e-300)


def cosine(a, b):
    return (a @ b / (a.norm() * b.norm())).item()


def flat(grads):
    return torch.cat([g.flatten() for g in grads])


def grads_of(value, params):
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def step_grads(model, loss_fn, run):
    """``.grad`` of every parameter after ``run(loss)`` on a fresh forward (zeros for untouched ones)."""
    model.zero_grad(set_to_none=True)
    run(loss_fn())
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def autograd_penalty(model, x, y, lw, la):
    """The penalty and its gradient w.r.t. every parameter, computed by plain PyTorch: hooks record the
    (grad-requiring) inputs of the Conv/Linear layers, autograd differentiates twice."""
    acts, seen = [], set()

    def record(module, args):
        a = args[0]
        if torch.is_grad_enabled() and module.training and a.requires_grad and id(a) not in seen:
            seen.add(id(a))
            acts.append(a)

    layers = [m for m in model.modules() if isinstance(m, LAYERS)]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        loss = F.cross_entropy(model(x), y)
    finally:
        for h in handles:
            h.remove()
    weights = [m.weight for m in layers] if lw > 0 else []
    acts = acts if la > 0 else []
    grads = torch.autograd.grad(loss, weights + acts, create_graph=True, allow_unused=True)
    terms = [
        (lw if i < len(weights) else la) * torch.linalg.vector_norm(g, 1)
        for i, g in enumerate(grads)
        if g is not None
    ]
    reg = sum(terms)
    return reg, grads_of(reg, list(model.parameters()))


# ----------------------------------------------------------------------------------------------- models
class SmallNet(nn.Module):
    """conv, BN, ReLU, residual (conv, BN), ReLU, max-pool, Linear [, BN1d, ReLU], Linear."""

    def __init__(self, affine=True, functional_relu=True, head_bn=True):
        super().__init__()
        self.functional_relu = functional_relu
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6, affine=affine)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, affine=affine)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(6 * 3 * 3, 10)
        self.head = nn.Sequential(nn.BatchNorm1d(10, affine=affine), nn.ReLU()) if head_bn else nn.ReLU()
        self.fc2 = nn.Linear(10, 4)

    def act(self, t):
        return F.relu(t) if self.functional_relu else self.relu(t)

    def forward(self, x):
        h = self.act(self.bn1(self.conv1(x)))
        h = self.act(h + self.bn2(self.conv2(h)))
        h = F.max_pool2d(h, 2).flatten(1)
        return self.fc2(self.head(self.fc1(h)))


def init_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


SMALL_CASES = {
    # name: (constructor kwargs, batch size, BatchNorm modes)
    "train_affine_functional": (dict(affine=True, functional_relu=True), 6, "train"),
    "train_plain_module_relu": (dict(affine=False, functional_relu=False), 6, "train"),
    "eval_bn_affine": (dict(affine=True, functional_relu=True), 6, "eval"),
    "batch1_bn2d_train": (dict(affine=True, functional_relu=False, head_bn=False), 1, "train"),
}
HALVES = {"weights": (0.3, 0.0), "activations": (0.0, 0.7), "both": (0.3, 0.7)}


def make_small(case, seed=0):
    kwargs, n, bn_mode = SMALL_CASES[case]
    torch.manual_seed(seed)
    model = init_bn(SmallNet(**kwargs)).train()
    if bn_mode == "eval":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def compare_exact(model, x, y, lw, la, tol):
    reference = copy.deepcopy(model)
    ref_value, ref_grads = autograd_penalty(reference, x, y, lw, la)
    penalty = L1GradPenalty(model, weight=lw, activation=la)
    assert any(isinstance(m, (BatchNorm1d, BatchNorm2d)) for m in model.modules()), "BatchNorm not converted"
    value = penalty(F.cross_entropy(model(x), y))
    grads = grads_of(value, list(model.parameters()))
    assert abs(value.item() - ref_value.item()) <= tol * ref_value.item(), (value.item(), ref_value.item())
    scale = max(r.abs().max().item() for r in ref_grads)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        # a gradient that is zero in exact arithmetic (the bias of a layer followed by a training-mode
        # BatchNorm) holds only float32 round-off, below 1e-6 of the largest one, in both computations: such
        # tensors are measured against the largest gradient of the network instead of their own
        zero = r.abs().max().item() <= 1e-6 * scale
        err = rel_err(g, r, floor=scale if zero else 0.0)
        assert err <= tol, f"{name}: relative error {err:.3g}"
    penalty.remove()


# ----------------------------------------------------------------------------------------------- exact
@pytest.mark.parametrize("halves", list(HALVES))
@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_exact_matches_autograd_double_backward_small_models(case, halves):
    model, x, y = make_small(case)
    compare_exact(model, x, y, *HALVES[halves], tol=1e-5)


@pytest.mark.parametrize("halves", list(HALVES))
@pytest.mark.parametrize("name", ["vgg_like", "resnet18", "resnet18_imagenet"])
def test_exact_matches_autograd_double_backward_zoo(name, halves):
    torch.manual_seed(0)
    model = init_bn(qgrad.models.get(name, num_classes=10, width=0.125)).train()
    g = torch.Generator().manual_seed(1)
    size = 16 if name == "resnet18_imagenet" else 8  # its stem (stride 2, max-pool) divides the size by 4
    x, y = torch.randn(3, 3, size, size, generator=g), torch.randint(0, 10, (3,), generator=g)
    compare_exact(model, x, y, *HALVES[halves], tol=1e-5)


# ------------------------------------------------------------------------------------------- batchnorm swap
def bn_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def conv_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_fused_module_swap_keeps_state_dict_and_copies_and_is_undone():
    model, x, y = make_small("train_affine_functional")
    original = bn_types(model)
    assert conv_types(model) == [nn.Conv2d, nn.Conv2d]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]

    penalty = L1GradPenalty(model, weight=0.1, activation=0.1)
    assert bn_types(model) == [BatchNorm2d, BatchNorm2d, BatchNorm1d]
    assert conv_types(model) == [Conv2d, Conv2d]
    assert [id(p) for p in model.parameters()] == params  # same tensors: optimizers keep working
    sd = model.state_dict()
    assert list(sd) == list(state) and all(torch.equal(sd[k], state[k]) for k in sd)
    loss = F.cross_entropy(model(x), y)
    clone = copy.deepcopy(model)  # mid-step
    penalty.backward(loss)
    assert list(model.state_dict()) == list(state)
    assert bn_types(clone) == bn_types(model)
    with L1GradPenalty(clone, weight=0.1, activation=0.1) as own:  # the copy takes a penalty of its own
        assert own.backward(F.cross_entropy(clone(x), y))["penalty"] > 0

    penalty.remove()
    assert bn_types(model) == original and conv_types(model) == [nn.Conv2d, nn.Conv2d]
    L1GradPenalty(model)  # dropped at once: the swap goes with it
    gc.collect()
    assert bn_types(model) == original and conv_types(model) == [nn.Conv2d, nn.Conv2d]

    kept = L1GradPenalty(model, fused_batchnorm=False)
    assert bn_types(model) == original and conv_types(model) == [Conv2d, Conv2d]
    kept.remove()
    kept = L1GradPenalty(model, fused_conv=False)
    assert bn_types(model) != original and conv_types(model) == [nn.Conv2d, nn.Conv2d]
    kept.remove()
    with pytest.raises(TypeError, match="fused_batchnorm must be True or False"):
        L1GradPenalty(model, fused_batchnorm=1)
    with pytest.raises(TypeError, match="fused_conv must be True or False"):
        L1GradPenalty(model, fused_conv=None)
    assert bn_types(model) == original and conv_types(model) == [nn.Conv2d, nn.Conv2d]

    # modules the user converted stay converted after the penalty is removed
    convert_batchnorm(model)
    L1GradPenalty(model).remove()
    assert bn_types(model) == [BatchNorm2d, BatchNorm2d, BatchNorm1d]


# -------------------------------------------------------------------------------------------- running stats
def bn_state(model):
    return [
        (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(fused_batchnorm=False, fused_conv=False),
        dict(every=3),
        dict(method="worst-case", h=1e-2),
        dict(method="worst-case", bits=4),
    ],
    ids=["exact", "exact_unfused", "every", "worst_h", "worst_bits"],
)
def test_running_statistics_match_a_plain_step(kwargs):
    model, x, y = make_small("train_affine_functional")
    plain = copy.deepcopy(model)
    penalty = L1GradPenalty(model, weight=0.1, activation=0.1, **kwargs)
    for step in range(2):  # a penalized step, then (for every=3) a plain one
        F.cross_entropy(plain(x), y).backward()
        penalty.backward(F.cross_entropy(model(x), y), lambda: F.cross_entropy(model(x), y))
        for (m1, v1, n1), (m2, v2, n2) in zip(bn_state(plain), bn_state(model)):
            assert n1 == n2 == step + 1
            assert torch.equal(m1, m2) and torch.equal(v1, v2)


# ----------------------------------------------------------------------------------------------- every=k
def test_every_k_schedule_values_and_gradients():
    k, lw, la = 3, 0.2, 0.5
    model, x, y = make_small("train_affine_functional")
    model, x = model.double(), x.double()
    params = list(model.parameters())
    exact = L1GradPenalty(copy.deepcopy(model), weight=lw, activation=la)

    def loss_fn(m=model):
        return F.cross_entropy(m(x), y)

    plain_grads = step_grads(model, loss_fn, lambda loss: loss.backward())
    exact_reg = exact(loss_fn(exact.model))
    exact_pen = grads_of(exact_reg, list(exact.model.parameters()))
    exact_stats = exact.backward(loss_fn(exact.model))

    penalty = L1GradPenalty(model, weight=lw, activation=la, every=k)
    assert penalty.every == k and "every=3" in repr(penalty)
    for call in range(2 * k + 1):
        applied = call % k == 0
        grads = step_grads(model, loss_fn, penalty.backward)
        # gradient: plain + k * (exact penalty gradient) on penalized calls, plain otherwise
        expected = [p0 + k * e if applied else p0 for p0, e in zip(plain_grads, exact_pen)]
        assert rel_err(flat(grads), flat(expected)) <= 1e-10
    # the counter is shared by __call__ and backward: call 2k+1 is plain, 3k is penalized
    for call in range(2 * k + 1, 3 * k + 1):
        reg = penalty(loss_fn())
        if call % k == 0:
            assert reg.requires_grad
            assert reg.item() == pytest.approx(k * exact_reg.item(), rel=1e-12)
            assert rel_err(flat(grads_of(reg, params)), k * flat(exact_pen)) <= 1e-10
        else:
            assert not reg.requires_grad and reg.item() == 0.0

    # stats on every call: the same keys; the l1 norms and the unscaled penalty of the penalized call
    fresh = L1GradPenalty(copy.deepcopy(model), weight=lw, activation=la, every=k)
    for call in range(k + 1):
        stats = fresh.backward(loss_fn(fresh.model))
        assert set(stats) == {"loss", "penalty", "weight_l1", "activation_l1", "penalty_scale"}
        assert stats["penalty_scale"] == (float(k) if call % k == 0 else 0.0)
        for key in ("loss", "weight_l1", "activation_l1", "penalty"):
            assert stats[key] == pytest.approx(exact_stats[key], rel=1e-12), key
        fresh.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", ["exact", "worst-case"])
@pytest.mark.parametrize("via_call", [False, True])
def test_every_k_plain_calls_repeat_the_last_penalized_statistics(method, via_call):
    # each call on its own batch: plain calls report their own loss and the penalty terms of the last
    # penalized call, and compute no gradient statistics (their gradients are loss.backward()'s, bit for bit)
    k = 3
    model, x, y = make_small("train_affine_functional")
    model, x = model.double(), x.double()
    twin = copy.deepcopy(model)
    penalty = L1GradPenalty(model, weight=0.2, activation=0.5, every=k, method=method)
    reference = L1GradPenalty(twin, weight=0.2, activation=0.5, method=method)
    batches = [(x + 0.3 * i, y.roll(i)) for i in range(2 * k)]
    last = None
    for call, (xb, yb) in enumerate(batches):
        for m in (model, twin):
            m.zero_grad(set_to_none=True)

        def loss_fn(m=model, xb=xb, yb=yb):
            return F.cross_entropy(m(xb), yb)

        if call % k == 0:
            if via_call:  # penalty(loss) on penalized calls, backward(loss) on plain ones
                loss = loss_fn()
                (loss + penalty(loss, loss_fn)).backward()
                last = reference.backward(loss_fn(twin), lambda: loss_fn(twin))
            else:
                stats = penalty.backward(loss_fn(), loss_fn)
                last = reference.backward(loss_fn(twin), lambda: loss_fn(twin))
                assert stats["penalty_scale"] == float(k)
                for key in ("weight_l1", "activation_l1", "penalty"):
                    assert stats[key] == pytest.approx(last[key], rel=1e-10), key
            continue
        stats = penalty.backward(loss_fn())
        plain_loss = loss_fn(twin)
        plain_loss.backward()
        assert stats["penalty_scale"] == 0.0
        assert stats["loss"] == pytest.approx(plain_loss.item(), rel=1e-12)
        for key in ("weight_l1", "activation_l1", "penalty"):
            assert stats[key] == pytest.approx(last[key], rel=1e-10), key
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))


def test_every_k_plain_steps_run_torchs_own_batchnorm_and_conv():
    from qgrad.nn import BatchNorm2d, Conv2d

    k = 3
    model, x, y = make_small("train_affine_functional")
    penalty = L1GradPenalty(model, weight=0.1, activation=0.1, every=k)
    twins = [m for m in model.modules() if isinstance(m, (BatchNorm2d, Conv2d))]
    assert twins
    seen = []
    for call in range(2 * k):
        out = model(x)
        seen.append({m.fused_double_backward for m in twins})
        penalty.backward(F.cross_entropy(out, y))
    assert seen == [{call % k == 0} for call in range(2 * k)]
    penalty.remove()
    assert all("fused_double_backward" not in m.__dict__ for m in twins)
    assert not any(isinstance(m, (BatchNorm2d, Conv2d)) for m in model.modules())


@pytest.mark.parametrize("every", [1, 3])
def test_plain_steps_run_torchs_own_batchnorm_and_conv_and_record_nothing(every):
    from qgrad.nn import BatchNorm2d, Conv2d

    model, x, y = make_small("train_affine_functional")
    model, x = model.double(), x.double()
    twin = copy.deepcopy(model)
    penalty = L1GradPenalty(model, weight=0.1, activation=0.1, every=every)
    twins = [m for m in model.modules() if isinstance(m, (BatchNorm2d, Conv2d))]
    assert twins and all(m.fused_double_backward for m in twins)
    seen = []
    def note(module, args, out):
        seen.append(module.fused_double_backward)

    hooks = [m.register_forward_hook(note) for m in twins]
    with penalty.plain_steps():
        with penalty.plain_steps():  # nested
            pass
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(RuntimeError, match="no recorded activations"):
            penalty(F.cross_entropy(model(x), y))
    assert seen and not any(seen)  # every forward inside ran torch's functionals (every=3: call 0 too)
    F.cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    # afterwards: as without the context (every=1: the twins' path; every=3: call 0 is penalized)
    seen.clear()
    penalty.backward(F.cross_entropy(model(x), y))
    assert seen and all(seen)
    for h in hooks:
        h.remove()


def test_a_twin_running_torchs_functional_still_gives_the_exact_penalty_gradient():
    # what a wrong guess of L1GradPenalty(every=k) costs: speed (torch's double backward), not exactness
    from qgrad.nn import BatchNorm2d, Conv2d

    model, x, y = make_small("train_affine_functional")
    model, x = model.double(), x.double()
    results = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        penalty = L1GradPenalty(m, weight=0.1, activation=0.1)
        for t in m.modules():
            if isinstance(t, (BatchNorm2d, Conv2d)):
                t.fused_double_backward = fused
        results.append(grads_of(penalty(F.cross_entropy(m(x), y)), list(m.parameters())))
    assert rel_err(flat(results[0]), flat(results[1])) <= 1e-12


@pytest.mark.parametrize("method", ["exact", "worst-case"])
def test_every_k_state_dict_resumes_the_cycle_where_it_stopped(method):
    # 7 calls of one penalty == 4 calls, then a new penalty (a resumed run) that loads the first one's state
    k = 3
    model, x, y = make_small("train_affine_functional")
    model, x = model.double(), x.double()
    batches = [(x + 0.3 * i, y.roll(i)) for i in range(7)]

    def run(penalty, calls):
        out = []
        for xb, yb in calls:
            penalty.model.zero_grad(set_to_none=True)

            def loss_fn(xb=xb, yb=yb):
                return F.cross_entropy(penalty.model(xb), yb)

            stats = penalty.backward(loss_fn(), loss_fn)
            out.append((stats, [p.grad.clone() for p in penalty.model.parameters()]))
        return out

    whole = run(L1GradPenalty(copy.deepcopy(model), 0.2, 0.5, every=k, method=method), batches)
    first = L1GradPenalty(copy.deepcopy(model), 0.2, 0.5, every=k, method=method)
    head = run(first, batches[:4])
    state = first.state_dict()
    assert state["calls"] == 4 and set(state["last_stats"]) == {"penalty", "weight_l1", "activation_l1"}
    assert all(v.device.type == "cpu" and v.dim() == 0 for v in state["last_stats"].values())
    first.remove()
    resumed = L1GradPenalty(first.model, 0.2, 0.5, every=k, method=method)
    resumed.load_state_dict(state)
    tail = run(resumed, batches[4:])
    for call, ((stats, grads), (stats_ref, grads_ref)) in enumerate(zip(head + tail, whole)):
        assert stats == stats_ref, call
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref)), call
    # a fresh penalty starts at a penalized call
    assert L1GradPenalty(model, every=k).state_dict() == {"calls": 0, "last_stats": {}}


def test_penalty_state_errors():
    model, _, _ = make_small("train_affine_functional")
    penalty = L1GradPenalty(model, every=2)
    bad = [
        {"calls": 1},
        {"calls": -1, "last_stats": {}},
        {"calls": 1.0, "last_stats": {}},
        {"calls": 1, "last_stats": {"penalty": torch.zeros(2)}},
        [1, {}],
    ]
    for state in bad:
        with pytest.raises(ValueError, match="penalty state"):
            penalty.load_state_dict(state)
    assert penalty.state_dict()["calls"] == 0


def test_every_argument_errors():
    model, _, _ = make_small("train_affine_functional")
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            L1GradPenalty(model, every=bad)
    assert bn_types(model) == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d], "a rejection changed it"


# ----------------------------------------------------------------------------------------------- worst-case
class ResidualNet(nn.Module):
    """conv -> BN -> act -> [h + BN(conv(h))] -> act -> avg-pool -> Linear; ``h`` feeds conv2 and the add."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.act(self.bn1(self.conv1(x)))
        h = self.act(h + self.bn2(self.conv2(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))


WEIGHTS = ("conv1.weight", "conv2.weight", "fc.weight")


def residual_acts(p, eps, x, act):
    """``ResidualNet``'s two recorded activations (the input of conv2, also used by the residual add, and the
    input of fc) in training mode, written with functionals; ``eps`` shifts them."""
    z = F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)
    h = act(F.batch_norm(z, None, None, p["bn1.weight"], p["bn1.bias"], training=True)) + eps[0]
    z = F.conv2d(h, p["conv2.weight"], padding=1)
    r = F.batch_norm(z, None, None, p["bn2.weight"], p["bn2.bias"], training=True)
    return h, F.adaptive_avg_pool2d(act(h + r), 2).flatten(1) + eps[1]


def residual_loss(p, eps, x, y, act):
    a = residual_acts(p, eps, x, act)[1]
    return F.cross_entropy(F.linear(a, p["fc.weight"], p["fc.bias"]), y)


def make_residual(act, dtype=torch.float64, seed=0, n=6):
    torch.manual_seed(seed)
    model = init_bn(ResidualNet(act)).to(dtype).train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64).to(dtype)
    return model, x, torch.randint(0, 3, (n,), generator=g)


def half_bin(t, bits, unsigned_ok):
    if unsigned_ok and t.min() >= 0:
        return t.abs().max() / (2**bits - 1) / 2
    return t.abs().max() / (2 ** (bits - 1) - 1) / 2


def worst_case_reference(model, x, y, act, lw, la, h=None, bits=None):
    """Total gradient ``grad L + (lam/h) (grad L(theta + Delta) - grad L(theta))`` per parameter name."""
    p = {k: v.detach() for k, v in model.named_parameters()}
    n = x.shape[0]
    eps0 = [torch.zeros(n, 4, 6, 6, dtype=x.dtype), torch.zeros(n, 16, dtype=x.dtype)]
    grad = torch.func.grad(residual_loss, argnums=(0, 1))
    g_p, g_e = grad(p, eps0, x, y, act)
    lam = max(lw, la)
    if bits is None:
        rho_w, rho_a, hbar = [h * lw / lam] * 3, [h * la / lam] * 2, h
    else:
        acts = residual_acts(p, eps0, x, act)
        halves_w = [half_bin(p[k], bits, False) for k in WEIGHTS if lw > 0]
        halves_a = [half_bin(a, bits, True) for a in acts if la > 0]
        hbar = torch.stack(halves_w + halves_a).mean()
        rho_w = [lw / lam * r for r in halves_w] if lw > 0 else [0.0] * 3
        rho_a = [la / lam * r for r in halves_a] if la > 0 else [0.0] * 2
    p2 = dict(p)
    for k, r in zip(WEIGHTS, rho_w):
        p2[k] = p[k] + r * torch.sign(g_p[k])
    eps2 = [r * torch.sign(g) for r, g in zip(rho_a, g_e)]
    g2, _ = grad(p2, eps2, x, y, act)
    c = lam / hbar
    value = c * (residual_loss(p2, eps2, x, y, act) - residual_loss(p, eps0, x, y, act))
    return {k: g_p[k] + c * (g2[k] - g_p[k]) for k in p}, value


@pytest.mark.parametrize("act_name", ["relu", "tanh"])
@pytest.mark.parametrize(
    "lw,la,radius",
    [(0.3, 0.3, dict(h=1e-2)), (0.2, 0.5, dict(h=1e-2)), (0.3, 0.0, dict(h=1e-2)), (0.0, 0.4, dict(h=1e-2)),
     (0.3, 0.3, dict(bits=4)), (0.3, 0.0, dict(bits=3))],
)
def test_worst_case_gradient_is_its_defining_formula(act_name, lw, la, radius):
    act = {"relu": F.relu, "tanh": torch.tanh}[act_name]
    model, x, y = make_residual(act)
    expected, value = worst_case_reference(model, x, y, act, lw, la, **radius)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    penalty = L1GradPenalty(model, weight=lw, activation=la, method="worst-case", **radius)
    loss = F.cross_entropy(model(x), y)
    stats = penalty.backward(loss, lambda: F.cross_entropy(model(x), y))
    for name, prm in model.named_parameters():
        err = rel_err(prm.grad, expected[name], floor=1e-6)
        assert err <= 1e-9, f"{name}: relative error {err:.3g}"
    assert stats["penalty"] == pytest.approx(value.item(), rel=1e-9, abs=1e-12)
    # the weights are restored bit for bit; the running statistics are those of one forward
    after = model.state_dict()
    for k, v in before.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(after[k], v), k
    assert all(int(m.num_batches_tracked) == 1 for m in (model.bn1, model.bn2))

    # penalty(loss, closure) is the same objective, kept differentiable for (loss + R).backward()
    fresh, _, _ = make_residual(act)
    other = L1GradPenalty(fresh, weight=lw, activation=la, method="worst-case", **radius)
    loss = F.cross_entropy(fresh(x), y)
    reg = other(loss, lambda: F.cross_entropy(fresh(x), y))
    assert reg.item() == pytest.approx(stats["penalty"], rel=1e-9, abs=1e-12)
    (loss + reg).backward()
    for name, prm in fresh.named_parameters():
        assert rel_err(prm.grad, expected[name], floor=1e-6) <= 1e-9, name


def test_activation_shift_reaches_every_later_use_of_the_shifted_tensor():
    # the worst-case second forward: once a regularized layer has taken x, every torch call that gets x
    # (positionally, as a keyword, inside a list) gets the shifted tensor; other tensors pass unchanged
    x = torch.randn(3, 4, requires_grad=True)
    other = torch.randn(3, 4)
    sign = torch.tensor([[1, -1, 0, 1]] * 3, dtype=torch.int8)
    layer = nn.Linear(4, 2)
    mode = _ActivationShift([(x.shape, sign, 0.25)])
    with mode:
        shifted = mode.replace(layer, x)
        assert mode.replace(layer, x) is shifted  # a second layer reading x gets the same tensor
        plus = torch.add(other, other=x)
        joined = torch.cat([other, x])
        product = x * 2
        untouched = torch.mul(other, 3)
    expected = x.detach() + 0.25 * sign
    assert torch.equal(shifted.detach(), expected)
    assert torch.equal(plus.detach(), other + expected)
    assert torch.equal(joined.detach(), torch.cat([other, expected]))
    assert torch.equal(product.detach(), expected * 2)
    assert torch.equal(untouched, other * 3)
    assert mode.count == 1
    # the shift is constant: the gradient reaches x unchanged through every substituted use
    (plus.sum() + joined.sum() + product.sum()).backward()
    assert torch.equal(x.grad, torch.full_like(x, 4.0))


def penalty_direction(model_fn, x, y, **kwargs):
    """``d(penalty)/dtheta`` of one step: the penalized step's gradient minus the plain step's."""
    model = model_fn()
    penalty = L1GradPenalty(model, weight=0.1, activation=0.1, **kwargs)
    total = step_grads(model, lambda: F.cross_entropy(model(x), y),
                       lambda loss: penalty.backward(loss, lambda: F.cross_entropy(model(x), y)))
    penalty.remove()
    plain = step_grads(model, lambda: F.cross_entropy(model(x), y), lambda loss: loss.backward())
    return flat(total) - flat(plain)


@pytest.mark.parametrize(
    "act_name,dtype,h",
    [("tanh", torch.float64, 1e-4), ("gelu", torch.float64, 1e-4), ("tanh", torch.float32, 1e-3)],
)
def test_worst_case_tends_to_the_exact_gradient_for_smooth_activations(act_name, dtype, h):
    act = {"tanh": torch.tanh, "gelu": F.gelu}[act_name]
    _, x, y = make_residual(act, dtype)

    def model_fn():
        return make_residual(act, dtype)[0]

    exact = penalty_direction(model_fn, x, y)
    worst = penalty_direction(model_fn, x, y, method="worst-case", h=h)
    assert cosine(exact, worst) > 0.99
    assert worst.norm().item() == pytest.approx(exact.norm().item(), rel=0.05)


def test_worst_case_with_relu_runs_and_is_a_different_objective():
    _, x, y = make_residual(F.relu, torch.float32, n=16)

    def model_fn():
        return make_residual(F.relu, torch.float32, n=16)[0]

    exact = penalty_direction(model_fn, x, y)
    worst = penalty_direction(model_fn, x, y, method="worst-case", bits=4)
    assert torch.isfinite(worst).all() and worst.norm() > 0
    assert cosine(exact, worst) < 0.95


def test_worst_case_replays_dropout_and_consumes_no_random_numbers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    penalty = L1GradPenalty(model, weight=0.2, activation=0.2, method="worst-case", h=1e-5)
    torch.manual_seed(5)
    loss = F.cross_entropy(model(x), y)
    stats = penalty.backward(loss, lambda: F.cross_entropy(model(x), y))
    after = torch.rand(3)
    # with the same dropout mask the loss increase is h times the first-order term; a fresh mask would change
    # the loss by O(1), i.e. the penalty by O(lam / h) = O(2e4)
    first_order = 0.2 * stats["weight_l1"] + 0.2 * stats["activation_l1"]
    assert stats["penalty"] == pytest.approx(first_order, rel=1e-3)
    torch.manual_seed(5)
    F.cross_entropy(model(x), y)
    assert torch.equal(torch.rand(3), after)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_worst_case_replay_ignores_a_no_grad_forward_in_between(mode):
    # a validation or logging forward between the step's forward and the penalty draws other dropout masks
    # (train mode) or none (eval); the closure must still replay the masks of the step's forward
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    penalty = L1GradPenalty(model, weight=0.2, activation=0.2, method="worst-case", h=1e-5)

    def step(between):
        model.zero_grad()
        torch.manual_seed(5)
        loss = F.cross_entropy(model(x), y)
        if between:
            model.train(mode == "train")
            with torch.no_grad():
                model(torch.randn(4, 5, dtype=torch.float64))
            model.train()
        stats = penalty.backward(loss, lambda: F.cross_entropy(model(x), y))
        return stats["penalty"], [p.grad.clone() for p in model.parameters()]

    value, grads = step(between=False)
    value_between, grads_between = step(between=True)
    assert value_between == value
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_between))


def test_worst_case_warns_once_when_half_precision_rounds_h_away(recwarn):
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return F.cross_entropy(model(x), y)

    def messages():
        return [w for w in recwarn.list if "mostly rounded away" in str(w.message)]

    for autocast, kwargs, expected in ((False, {}, 0), (True, dict(bits=4), 0), (True, dict(h=0.1), 0),
                                       (True, {}, 1)):
        penalty = L1GradPenalty(model, weight=0.1, activation=0.1, method="worst-case", **kwargs)
        for _ in range(2):
            penalty.backward(closure(), closure)
        assert len(messages()) == expected, (autocast, kwargs)
        penalty.remove()


def test_worst_case_errors_leave_the_model_unchanged():
    model, x, y = make_residual(torch.tanh)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    penalty = L1GradPenalty(model, weight=0.1, activation=0.1, method="worst-case")
    assert penalty.method == "worst-case" and "h=0.001" in repr(penalty)
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(TypeError, match="pass a closure"):
        penalty.backward(loss)
    with pytest.raises(TypeError, match="not callable"):
        penalty(loss, closure=3)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="closure must return the loss"):
        penalty.backward(F.cross_entropy(model(x), y), lambda: 1.0)
    with pytest.raises(RuntimeError, match="closure must recompute the same loss"):
        penalty.backward(F.cross_entropy(model(x), y), lambda: F.cross_entropy(model(x[:3]), y[:3]))
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k
    assert all(int(m.num_batches_tracked) == 3 for m in (model.bn1, model.bn2))  # the three caller forwards

    for kwargs, message in [
        (dict(method="sam"), "method must be one of"),
        (dict(h=0.1), "leave them None for method='exact'"),
        (dict(bits=4), "leave them None for method='exact'"),
        (dict(method="worst-case", h=0.1, bits=4), "give h or bits, not both"),
        (dict(method="worst-case", h=0.0), "h must be a finite number > 0"),
        (dict(method="worst-case", h=math.inf), "h must be a finite number > 0"),
        (dict(method="worst-case", bits=1), r"bits must be an int in \[2, 16\]"),
        (dict(method="worst-case", bits=4.0), r"bits must be an int in \[2, 16\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            L1GradPenalty(model, **kwargs)


# ----------------------------------------------------------------------------------------------- loss scaling
@pytest.mark.parametrize(
    "kwargs", [{}, {"every": 2}, {"method": "worst-case", "h": 1e-2}, {"method": "worst-case", "bits": 4}]
)
def test_a_scaled_loss_scales_the_penalty_and_its_gradient_alike(kwargs):
    """The l1 penalty is positively homogeneous in the loss: for ``S * L`` it is ``S * R`` with gradient
    ``S * dR`` (a power-of-two ``S`` keeps every float the same up to that factor), so a GradScaler works
    as for a plain loss: pass ``scaler.scale(loss)`` (and a closure returning the scaled loss), unscale
    before the step, and the gradients are those of ``L + R``."""
    model, x, y = make_residual(F.relu)
    scaled = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    penalties = L1GradPenalty(model, **kwargs), L1GradPenalty(scaled, **kwargs)
    for _ in range(2):  # every=2: a penalized and a plain call
        model.zero_grad()
        scaled.zero_grad()
        stats = penalties[0].backward(F.cross_entropy(model(x), y), lambda: F.cross_entropy(model(x), y))
        stats_scaled = penalties[1].backward(
            scaler.scale(F.cross_entropy(scaled(x), y)), lambda: scaler.scale(F.cross_entropy(scaled(x), y))
        )
        for key in ("loss", "penalty", "weight_l1", "activation_l1"):
            assert stats_scaled[key] == pytest.approx(2.0**12 * stats[key], rel=1e-12), key
        optimizer = torch.optim.SGD(scaled.parameters(), lr=0.0)
        scaler.unscale_(optimizer)  # divides .grad by the scale, as before optimizer.step()
        scaler.update()
        for (name, p), q in zip(model.named_parameters(), scaled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=0.0, msg=name)


# ----------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("method", ["exact", "worst-case"])
def test_a_channels_last_model_gets_the_gradients_of_the_contiguous_one(method):
    """The fused kernels run channels-last tensors on views of their memory (no copies, results in the same
    layout); the step's gradients are those of the same model in the contiguous layout."""
    torch.manual_seed(0)
    model = qgrad.models.get("resnet18", num_classes=5, width=0.0625).double().train()
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g)
    grads = []
    for net, inputs in ((model, x), (last, x.contiguous(memory_format=torch.channels_last))):
        penalty = L1GradPenalty(net, method=method, **({"h": 1e-2} if method == "worst-case" else {}))
        grads.append(step_grads(net, lambda: F.cross_entropy(net(inputs), y), lambda loss: penalty.backward(
            loss, lambda: F.cross_entropy(net(inputs), y))))
        penalty.remove()
    conv = last.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.grad.stride() == conv.stride()
    # float64; the two layouts run the convolutions' sums in different orders
    for (name, _), a, b in zip(model.named_parameters(), grads[1], grads[0]):
        assert rel_err(a, b) <= 1e-9, (name, rel_err(a, b))


def test_worst_case_backward_runs_post_accumulate_grad_hooks_with_the_final_gradient():
    """A parameter with a post-accumulate-grad hook (an optimizer stepping in backward, say) gets the penalty
    gradient through the autograd engine: the hook runs after each of the step's two accumulations, and the
    second sees the final gradient, equal to the one accumulated without hooks."""
    model, x, y = make_residual(F.relu)
    hooked = copy.deepcopy(model)
    seen = []
    hooked.fc.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    grads = []
    for net in (model, hooked):
        penalty = L1GradPenalty(net, method="worst-case", h=1e-2)
        grads.append(step_grads(net, lambda: F.cross_entropy(net(x), y), lambda loss: penalty.backward(
            loss, lambda: F.cross_entropy(net(x), y))))
    assert len(seen) == 2 and not torch.equal(seen[0], seen[1])
    assert torch.equal(seen[1], hooked.fc.weight.grad)
    for (name, _), a, b in zip(model.named_parameters(), grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=name)
