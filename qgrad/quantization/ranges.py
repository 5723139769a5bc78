"""Activation ranges for the inputs of conv/linear layers.

Two sources:

* :func:`bn_input_ranges` -- data-free, from the BatchNorm parameters (Nagel et al. 2019, "Data-free quantization
  through weight equalization and bias correction"). A BatchNorm output channel with scale ``gamma`` and shift
  ``beta`` is taken to lie in ``beta +- n*|gamma|`` (``0 +- n`` without affine parameters), and these per-channel
  intervals are pushed through the ``torch.fx`` graph of the *unfolded* model by the rules of
  :func:`propagate_intervals`.
* :func:`calibration_ranges` -- from data: the min/max (or a percentile pair) of each layer's input over
  calibration batches.

Both return ``{layer name: (lo, hi)}`` with 0-d float tensors: one range per layer input (per-tensor), which is
what the activation grid of :class:`~qgrad.nn.fake_quant.FakeQuant` is fitted to.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from qgrad.quantization._common import first_tensor, iter_batches, model_device, quantizable_layers

__all__ = ["Interval", "propagate_intervals", "bn_input_ranges", "calibration_ranges", "MAX_QUANTILE_SAMPLES"]

#: Values per layer kept for percentile ranges (``torch.quantile`` refuses inputs above 2**24 elements).
MAX_QUANTILE_SAMPLES = 2**20


@dataclass(frozen=True)
class Interval:
    """Bounds ``lo <= x <= hi`` of a tensor's values: per channel (1-d, channel = dim 1 of the tensor, i.e. the
    last dim of an ``(N, C)`` tensor) or per tensor (0-d). float64."""

    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def per_channel(self) -> bool:
        return self.lo.dim() == 1

    def collapse(self) -> "Interval":
        """The per-tensor interval ``[min lo, max hi]``."""
        return Interval(self.lo.min(), self.hi.max())

    def union(self, other: "Interval") -> "Interval":
        a, b = _aligned(self, other)
        return Interval(torch.minimum(a.lo, b.lo), torch.maximum(a.hi, b.hi))


def _aligned(a: Interval, b: Interval) -> Tuple[Interval, Interval]:
    """Make two intervals broadcast: per-channel with per-tensor is fine; two different channel counts cannot be
    paired channel by channel, so both are collapsed (a wider, still valid bound)."""
    if a.per_channel and b.per_channel and a.lo.numel() != b.lo.numel():
        return a.collapse(), b.collapse()
    return a, b


def _add(a: Interval, b: Interval) -> Interval:
    a, b = _aligned(a, b)
    return Interval(a.lo + b.lo, a.hi + b.hi)


def _neg(a: Interval) -> Interval:
    return Interval(-a.hi, -a.lo)


def _scale(a: Interval, c: float) -> Interval:
    lo, hi = a.lo * c, a.hi * c
    return Interval(torch.minimum(lo, hi), torch.maximum(lo, hi))


def _const(c: float) -> Interval:
    t = torch.tensor(float(c), dtype=torch.float64)
    return Interval(t, t)


# Elementwise functions that are non-decreasing in their first argument (for fixed other arguments), so
# f([lo, hi]) = [f(lo), f(hi)]. Clipping activations (ReLU: both ends clamped at 0, ReLU6, hardtanh, clamp)
# are the ones that matter; the squashing ones come for free.
_MONOTONE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid)
_MONOTONE_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh,
    F.tanh, F.hardsigmoid,
    torch.clamp, torch.clip, F.leaky_relu,
}
_MONOTONE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "clip", "clip_"}

# Ops whose output values are a subset of their input values per channel (pooling, selection) or equal to them.
_KEEP_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)
_KEEP_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clone,
}
_KEEP_METHODS = {"contiguous", "clone", "detach"}
# Averages with possible zero padding: the interval must also contain 0.
_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_AVG_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
# Reshapes lose the channel position: the interval becomes per-tensor.
_COLLAPSE_MODULES = (nn.Flatten,)
# Indexing returns a subset of the values, so the collapsed interval also bounds it.
_COLLAPSE_FUNCTIONS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                       operator.getitem}
_COLLAPSE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "view_as",
                     "reshape_as", "t"}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def _apply_monotone(fn: Callable, a: Interval, rest: tuple, kwargs: dict) -> Optional[Interval]:
    if any(isinstance(v, torch.fx.Node) for v in list(rest) + list(kwargs.values())):
        return None  # e.g. clamp with tensor-valued bounds from the graph
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    return Interval(fn(a.lo.clone(), *rest, **kwargs), fn(a.hi.clone(), *rest, **kwargs))


def _mean_like(a: Interval, args: tuple, kwargs: dict) -> Interval:
    """``x.mean(dims)`` / ``amax`` / ``amin``: per-channel intervals survive a reduction that keeps dim 1."""
    dims = args[0] if args else kwargs.get("dim")
    if isinstance(dims, int):
        dims = (dims,)
    if isinstance(dims, (tuple, list)) and dims and all(isinstance(d, int) and d >= 2 for d in dims):
        return a
    return a.collapse()


def _cat(parts: List[Optional[Interval]], dim) -> Optional[Interval]:
    """Concatenation: along dim 1 the channel intervals are concatenated; along another non-negative dim every
    output channel mixes the same channel of each input (union); otherwise the union of collapsed intervals."""
    if not parts or any(p is None for p in parts):
        return None
    if dim == 1 and all(p.per_channel for p in parts):
        return Interval(torch.cat([p.lo for p in parts]), torch.cat([p.hi for p in parts]))
    out = parts[0] if (isinstance(dim, int) and dim >= 2) else parts[0].collapse()
    for p in parts[1:]:
        out = out.union(p if (isinstance(dim, int) and dim >= 2) else p.collapse())
    return out


def _bn_interval(bn: nn.modules.batchnorm._BatchNorm, n: float) -> Interval:
    c = bn.num_features
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
    beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(c, dtype=torch.float64)
    return Interval(beta - n * gamma.abs(), beta + n * gamma.abs())


def propagate_intervals(graph: torch.fx.Graph, model: nn.Module, n: float = 6.0) -> Dict[torch.fx.Node, Interval]:
    """Per-node value intervals of ``graph`` (traced from ``model``) seeded by its BatchNorms.

    Rules (a node without a rule, or with an input of unknown interval, is unknown; the graph inputs are unknown):

    * BatchNorm (any ``_BatchNorm``): channel ``c`` in ``beta[c] +- n*|gamma[c]|`` (non-affine: ``0 +- n``),
      whatever its input. The bound is a modelling assumption (the pre-activation is roughly Gaussian with the
      BN's learned mean and std), not a guarantee.
    * Non-decreasing elementwise ops -- ReLU (both ends clamped at 0), ReLU6, hardtanh, clamp/clip with constant
      bounds, leaky ReLU, sigmoid, tanh, hardsigmoid (modules, functions and tensor methods): ``[f(lo), f(hi)]``.
    * Residual ``add``: ``[lo1 + lo2, hi1 + hi2]`` per channel. This is the worst case; the true range of a sum
      of two correlated branches is usually narrower, so ``bn`` ranges after residual adds are wide.
      ``sub``: ``[lo1 - hi2, hi1 - lo2]``; adding or multiplying by a number shifts or scales.
    * Max/adaptive pooling, dropout, identity, ``contiguous``/``clone``/``detach``: unchanged. Average pooling:
      unchanged, widened to contain 0 when it zero-pads (``count_include_pad`` with ``padding > 0``).
      ``x.mean(dims)``/``amax``/``amin`` over spatial dims keep the channel intervals.
    * Flatten, view, reshape, permute, transpose, (un)squeeze, indexing: the channel position is lost (or, for
      indexing, some values are dropped), so the interval becomes per-tensor ``[min lo, max hi]``.
    * ``torch.cat``: concatenated along dim 1, otherwise the union.

    Returns ``{node: Interval}`` for the nodes with a known interval.
    """
    iv: Dict[torch.fx.Node, Interval] = {}

    def get(a) -> Optional[Interval]:
        if isinstance(a, torch.fx.Node):
            return iv.get(a)
        if isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a):
            return _const(a)
        return None

    for node in graph.nodes:
        args, kwargs = node.args, node.kwargs
        first = get(args[0]) if args and isinstance(args[0], torch.fx.Node) else None
        out: Optional[Interval] = None
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                out = _bn_interval(m, n)
            elif first is None or (isinstance(m, nn.LeakyReLU) and m.negative_slope < 0):
                out = None
            elif isinstance(m, _MONOTONE_MODULES + (nn.LeakyReLU,)):
                out = Interval(m(first.lo.clone()), m(first.hi.clone()))
            elif isinstance(m, _KEEP_MODULES):
                out = first
            elif isinstance(m, _AVG_MODULES):
                out = _avg_pool(first, m.padding, m.count_include_pad, m.divisor_override)
            elif isinstance(m, _COLLAPSE_MODULES):
                out = first.collapse()
        elif node.op in ("call_function", "call_method"):
            t = node.target
            is_fn = node.op == "call_function"
            if (is_fn and t in _ADD) or (not is_fn and t in ("add", "add_")):
                a, b = get(args[0]), get(args[1]) if len(args) > 1 else None
                if a is not None and b is not None and kwargs.get("alpha", 1) == 1:
                    out = _add(a, b)
            elif (is_fn and t in _SUB) or (not is_fn and t in ("sub", "sub_")):
                a, b = get(args[0]), get(args[1]) if len(args) > 1 else None
                if a is not None and b is not None and kwargs.get("alpha", 1) == 1:
                    out = _add(a, _neg(b))
            elif (is_fn and t in _MUL) or (not is_fn and t in ("mul", "mul_")):
                a, b = (args + (None, None))[:2]
                if isinstance(b, torch.fx.Node) and isinstance(a, (int, float)):
                    a, b = b, a
                if get(a) is not None and isinstance(b, (int, float)) and not isinstance(b, bool):
                    out = _scale(get(a), float(b))
            elif is_fn and t in _CAT:
                parts = args[0] if args else kwargs.get("tensors", ())
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                out = _cat([get(p) for p in parts], dim)
            elif first is None:
                out = None
            elif (is_fn and t in _MONOTONE_FUNCTIONS) or (not is_fn and t in _MONOTONE_METHODS):
                fn = t if is_fn else (lambda x, *a, _name=t, **k: getattr(x, _name)(*a, **k))
                if not (t is F.leaky_relu and _leaky_slope(args, kwargs) < 0):
                    out = _apply_monotone(fn, first, tuple(args[1:]), dict(kwargs))
            elif (is_fn and t in _KEEP_FUNCTIONS) or (not is_fn and t in _KEEP_METHODS):
                out = first
            elif is_fn and t in _AVG_FUNCTIONS:
                pad = args[3] if len(args) > 3 else kwargs.get("padding", 0)
                cip = args[5] if len(args) > 5 else kwargs.get("count_include_pad", True)
                div = args[6] if len(args) > 6 else kwargs.get("divisor_override", None)
                out = _avg_pool(first, pad, cip, div)
            elif (is_fn and t in _COLLAPSE_FUNCTIONS) or (not is_fn and t in _COLLAPSE_METHODS):
                out = first.collapse()
            elif (not is_fn and t in ("mean", "amax", "amin")) or (is_fn and t in (torch.mean, torch.amax, torch.amin)):
                out = _mean_like(first, tuple(args[1:]), dict(kwargs))
        if out is not None:
            iv[node] = out
    return iv


def _leaky_slope(args: tuple, kwargs: dict) -> float:
    slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
    return slope if isinstance(slope, (int, float)) else -1.0


def _avg_pool(a: Interval, padding, count_include_pad: bool, divisor_override) -> Optional[Interval]:
    if divisor_override:
        return None  # the sum is divided by a user constant: not an average any more
    pads = padding if isinstance(padding, (tuple, list)) else (padding,)
    if count_include_pad and any(p > 0 for p in pads):
        zero = torch.zeros_like(a.lo)
        return Interval(torch.minimum(a.lo, zero), torch.maximum(a.hi, zero))
    return a


def bn_input_ranges(
    model: nn.Module, graph: torch.fx.Graph, n: float = 6.0
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-tensor input ranges of the conv/linear layers of ``model`` derived from its BatchNorms.

    ``graph`` is the fx graph of the *unfolded* ``model`` (the BatchNorm parameters are read from it). A layer's
    input interval (see :func:`propagate_intervals`) is collapsed to ``(min lo, max hi)``; a layer called several
    times gets the union. Layers whose input interval is unknown (the network input, or the output of an op
    without a rule, e.g. a conv not followed by BatchNorm) are absent from the result.

    Returns ``{layer name: (lo, hi)}``, 0-d float64 CPU tensors.
    """
    layers = quantizable_layers(model)
    iv = propagate_intervals(graph, model, n)
    ranges: Dict[str, Interval] = {}
    unknown = set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in layers:
            continue
        src = node.args[0] if node.args else None
        a = iv.get(src) if isinstance(src, torch.fx.Node) else None
        if a is None:
            unknown.add(node.target)
            continue
        a = a.collapse()
        ranges[node.target] = ranges[node.target].union(a) if node.target in ranges else a
    return {k: (v.lo, v.hi) for k, v in ranges.items() if k not in unknown}


def _quantile_pool(pool: Optional[Tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, gen: torch.Generator,
                   cap: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bottom-k sampling: every value gets an i.i.d. uniform key and the ``cap`` values with the smallest keys are
    kept, which is a uniform sample without replacement of everything seen, independent of the batch split.
    While fewer than ``cap`` values were seen, all of them are kept (the quantile is then exact)."""
    v = x.detach().reshape(-1).double()
    keys = torch.rand(v.numel(), generator=gen, dtype=torch.float64, device="cpu").to(v.device)
    if pool is not None:
        v, keys = torch.cat([pool[0], v]), torch.cat([pool[1], keys])
    if v.numel() > cap:
        keys, idx = torch.topk(keys, cap, largest=False, sorted=False)
        v = v[idx]
    return v, keys


@torch.no_grad()
def calibration_ranges(
    model: nn.Module,
    calib,
    names: Optional[Iterable[str]] = None,
    method: str = "minmax",
    percentile: float = 99.99,
    seed: int = 0,
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per-tensor input ranges of conv/linear layers measured on calibration data.

    ``calib`` (a tensor batch or an iterable of batches; ``(inputs, targets)`` batches contribute ``inputs``) is run
    through ``model`` as it is (call it on the folded float model, in eval mode) with forward pre-hooks on the
    layers named in ``names`` (default: all conv/linear layers). ``method="minmax"`` records the min and max over
    all batches; ``"percentile"`` the ``(100 - percentile)``-th and ``percentile``-th percentiles (linear
    interpolation, ``torch.quantile``) of all input values, computed on a uniform random subsample of at most
    :data:`MAX_QUANTILE_SAMPLES` values per layer drawn with a generator seeded by ``seed`` (exact below that).
    Layers that the data never reaches are absent from the result.

    Returns ``{layer name: (lo, hi)}``, 0-d float64 tensors on the model's device.
    """
    if method not in ("minmax", "percentile"):
        raise ValueError(f"method must be 'minmax' or 'percentile', got {method!r}")
    layers = quantizable_layers(model)
    names = list(layers) if names is None else list(names)
    device = model_device(model)
    stats: Dict[str, object] = {}
    gens: Dict[str, torch.Generator] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            if method == "minmax":
                lo, hi = x.detach().amin().double(), x.detach().amax().double()
                old = stats.get(name)
                stats[name] = (lo, hi) if old is None else (torch.minimum(old[0], lo), torch.maximum(old[1], hi))
            else:
                if name not in gens:
                    gens[name] = torch.Generator().manual_seed(seed)
                stats[name] = _quantile_pool(stats.get(name), x, gens[name], MAX_QUANTILE_SAMPLES)

        return hook

    seen = set()
    try:
        for name in names:
            m = model.get_submodule(name)
            if id(m) in seen:
                continue  # a shared layer is hooked once; its stats cover every call
            seen.add(id(m))
            handles.append(m.register_forward_pre_hook(make_hook(name)))
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        count = 0
        for batch in iter_batches(calib):
            x = first_tensor(batch)
            if not x.is_floating_point() or (dtype is not None and x.dtype != dtype):
                raise TypeError(
                    f"calibration batch {count} has dtype {x.dtype}, the model's parameters "
                    f"{dtype if dtype is not None else 'are floating point'}: pass inputs of that dtype, "
                    "preprocessed as for the model's training (e.g. x.to(torch.float32))"
                )
            model(x.to(device))
            count += 1
        if count == 0:
            raise ValueError("calibration data is empty")
    finally:
        for h in handles:
            h.remove()

    # names sharing one module share its stats
    by_module = {id(model.get_submodule(n)): n for n in stats}
    out = {}
    for name in names:
        key = by_module.get(id(model.get_submodule(name)))
        if key is None:
            continue
        if method == "minmax":
            out[name] = stats[key]
        else:
            v = stats[key][0]
            q = torch.tensor([(100 - percentile) / 100, percentile / 100], dtype=v.dtype, device=v.device)
            lo, hi = torch.quantile(v, q)
            out[name] = (lo, hi)
    return out
