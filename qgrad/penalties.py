"""Training penalties for quantization robustness: gradient-norm penalties and the orthogonality penalty.

``L1GradPenalty`` is Eq. 3 of Alizadeh et al. (ICLR 2020),

    R = lambda_w * sum_{W} ||dL/dW||_1  +  lambda_y * sum_{y} ||dL/dy||_1,

where ``W`` runs over the weights of the model's ``nn.Conv1d/2d/3d`` and ``nn.Linear`` layers and ``y`` over
the activations that enter those layers. Quantizing a tensor adds a perturbation bounded in every entry by
half a bin (an l_inf ball), and the largest first-order loss change over an l_inf ball of radius ``delta``
is ``delta * ||grad||_1``, so a small l1 gradient norm makes the loss insensitive to every bit-width at
once.
``L2GradPenalty`` is the same construction with the l2 norm (the gradient penalty of Gulrajani et al. 2017
applied to the same gradients), and ``OrthogonalityPenalty`` is the weight-orthogonality term of Defensive
Quantization (Lin et al. 2019); both are the baselines the paper compares against.

Usage::

    penalty = L1GradPenalty(model, weight=0.05, activation=0.05)
    loss = criterion(model(x), target)        # the forward pass records the layer inputs
    stats = penalty.backward(loss)            # (loss + R).backward(); stats["weight_l1"], ...

or ``reg = penalty(loss); (loss + reg).backward()``. The gradient penalties need a double backward (a
backward that builds a graph, then a backward through it) but no extra forward pass; the paper reports
6-10x longer epochs with the penalty on.

Which activations are recorded
    Forward pre-hooks on the Conv/Linear layers record their input (the first positional argument, or the
    ``input`` keyword) when grad mode is enabled, the layer is in training mode and the tensor requires grad.
    The network input therefore is not recorded (it does not require grad), and forwards under
    ``torch.no_grad()``, ``torch.inference_mode()`` or in ``eval()`` record nothing and keep the previous
    recording. A tensor that feeds several layers is recorded once (tensors are identified by object
    identity, so ``h`` and ``h.flatten(1)`` are two activations): its gradient is the total gradient
    through all of its uses, exactly as if it were one variable ``y`` in Eq. 3.

    A forward pre-hook on the model itself marks the start of a new forward pass: the first tensor recorded
    in it releases the previous recording. When a submodule is called on its own (``model.features(x)``,
    then ``model.head(h)``) the model's hook does not fire, so those calls add to the current recording;
    evaluating the penalty, :meth:`backward`, :meth:`clear` or the next forward of the model closes it.
    The activation half therefore covers one forward of the model: for a loss built from several forwards
    of the model, run them as one batched forward.

Hooks, copies and ``state_dict``
    The penalties are plain objects, not modules: they add nothing to ``model.state_dict()``. The hooks
    hold only a weak reference to their penalty (dropping the last reference to a penalty takes its hooks
    off the model), and a deep copy or a pickle of a hook is an inert hook that does nothing. So
    ``copy.deepcopy(model)`` works at any point of a training step, even between forward and backward when
    the penalty holds non-leaf tensors, and the copy never records into the original penalty; the copy
    carries the inert hooks (attach a new penalty to it to regularize it). :meth:`remove` takes every hook
    off the model; the penalties are also context managers that call it on exit.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qgrad.nn.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert_batchnorm, revert_batchnorm
from qgrad.nn.conv import Conv1d, Conv2d, Conv3d, convert_conv, revert_conv
from qgrad.ops.l1_norm import add_scaled_sign, l1_norm_sign, multi_l1_norm
from qgrad.recompute import CAPTURE_REFUSED, RngState, SegmentRecomputation, replayed_rng, rng_state

__all__ = ["L1GradPenalty", "L2GradPenalty", "OrthogonalityPenalty"]

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_LAYER_NAMES = "nn.Conv1d/2d/3d or nn.Linear"
_BATCHNORM_TWINS = (BatchNorm1d, BatchNorm2d, BatchNorm3d)
_CONV_TWINS = (Conv1d, Conv2d, Conv3d)


# --------------------------------------------------------------------------------------------- validation
def _check_coefficient(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_params(params: Iterable[torch.Tensor], min_dim: int = 0) -> List[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be a list of tensors, got a single tensor; pass params=[tensor]")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}") from None
    out, seen = [], set()
    for i, p in enumerate(items):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise ValueError(f"params[{i}] must be a floating-point tensor, got dtype {p.dtype}")
        if not (p.is_leaf and p.requires_grad):
            what = "a non-leaf tensor" if not p.is_leaf else "a tensor that does not require grad"
            raise ValueError(
                f"params[{i}] must be a leaf tensor that requires grad (e.g. a parameter), got {what}"
            )
        if p.dim() < min_dim:
            raise ValueError(
                f"params[{i}] must have at least {min_dim} dimension(s), got shape {tuple(p.shape)}"
            )
        if id(p) not in seen:  # a tensor listed twice (or tied weights) is one variable of the loss
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ValueError(
            "params is empty; pass at least one tensor, or params=None for the model's layer weights"
        )
    return out


def _check_loss(loss: torch.Tensor) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss must be a scalar (one-element) tensor, got shape {tuple(loss.shape)}; "
            "reduce it first, e.g. with .mean()"
        )
    if not loss.is_floating_point():
        raise ValueError(f"loss must be a floating-point tensor, got dtype {loss.dtype}")
    if not loss.requires_grad:
        raise ValueError("loss does not require grad; compute it from a forward pass with grad enabled")


def _layers(model: nn.Module) -> List[nn.Module]:
    """The regularized layers: every Conv1d/2d/3d and Linear module (subclasses included), in module order."""
    return [m for m in model.modules() if isinstance(m, _LAYER_TYPES)]


def _check_plain_weights(model: nn.Module, penalty: str) -> None:
    """A gradient-norm penalty differentiates w.r.t. the tensor ``layer.weight``, read after the forward. A
    weight computed by ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``spectral_norm``,
    ``orthogonal``, ...) is a new tensor at every read, which the loss does not depend on: its gradient would
    silently count as zero."""
    for name, m in model.named_modules():
        if isinstance(m, _LAYER_TYPES) and torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            raise ValueError(
                f"the weight of layer {name or type(model).__name__!r} is computed by a parametrization "
                f"(torch.nn.utils.parametrize), a new tensor at every read, so {penalty} cannot take the "
                "gradient w.r.t. the weight the forward used. Remove the parametrization "
                "(parametrize.remove_parametrizations), or regularize activations only (weight=0)"
            )


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    # norms and Gram matrices of half-precision tensors are reduced in float32: an l1 norm sums millions of
    # terms, which float16 (11-bit mantissa) cannot accumulate without losing the small ones
    return torch.promote_types(t.dtype, torch.float32)


def _sum(terms: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not terms:
        return like.new_zeros((), dtype=_accumulation_dtype(like))
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _values(stats: Dict[str, torch.Tensor], sync: bool) -> Dict[str, Union[float, torch.Tensor]]:
    """The statistics as floats (``sync``: one device-to-host transfer for all of them, in the widest dtype
    among them) or as detached 0-d tensors (no transfer, so the host does not wait for the device)."""
    tensors = [t.detach().reshape(()) for t in stats.values()]
    if not sync:
        return dict(zip(stats, tensors))
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dict(zip(stats, torch.stack([t.to(dtype) for t in tensors]).tolist()))


# --------------------------------------------------------------------------------------------- hooks
# How many attached penalties use each twin module, and which twins a penalty made from torch's classes: the
# last penalty to be removed from a module reverts it, so that removing one of two penalties on a model does not
# take the twins from the other
_TWIN_USERS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_CONVERTED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _InertHook:
    """What a penalty hook becomes in a deep copy or a pickle of the model: a pre-hook that does nothing."""

    __slots__ = ()

    def __call__(self, *args, **kwargs) -> None:
        return None

    def __repr__(self) -> str:
        return "_InertHook()"


class _PenaltyHook:
    """A forward pre-hook that calls back into its penalty through a weak reference.

    Hooks live in the model's hook dicts, so ``copy.deepcopy(model)`` and ``pickle`` reach them. Copying the
    penalty along (as a bound-method hook would) would deep-copy its recorded non-leaf tensors, which torch
    refuses, and would make the copy record into a duplicate penalty; a hook is therefore copied or pickled as
    an :class:`_InertHook`.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: "_Penalty"):
        self._owner = weakref.ref(owner)

    def __deepcopy__(self, memo) -> _InertHook:
        return _InertHook()

    def __reduce__(self):
        return (_InertHook, ())


class _StartHook(_PenaltyHook):
    """Pre-hook on the root model: the next recorded tensor starts a new recording."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        owner = self._owner()
        if owner is not None:
            owner._forward_started()


class _RecordHook(_PenaltyHook):
    """Pre-hook on a Conv/Linear layer: records the layer's input (or, when the penalty returns a replacement,
    hands the layer that tensor instead)."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        owner = self._owner()
        if owner is None:
            return None
        replacement = owner._record(module, args[0] if args else kwargs.get("input"))
        if replacement is None:
            return None
        if args:
            return (replacement, *args[1:]), kwargs
        return args, {**kwargs, "input": replacement}


def _recordable(module: nn.Module, x) -> bool:
    """Whether a layer input counts as an activation of Eq. 3 (see the module docstring)."""
    return (
        torch.is_grad_enabled() and module.training and isinstance(x, torch.Tensor) and x.requires_grad
    )


def _release(handles: List[torch.utils.hooks.RemovableHandle], undo: List[Callable[[], None]]) -> None:
    """Take the hooks off the model and undo the penalty's other changes to it (run once)."""
    for handle in handles:
        handle.remove()
    handles.clear()
    while undo:
        undo.pop()()


# --------------------------------------------------------------------------------------------- base class
class _Penalty:
    """Shared machinery: layer selection, explicit ``params``, activation recording, ``backward``, ``remove``.

    Subclasses implement ``_terms(loss) -> (reg, {stat_name: unweighted term})`` where ``reg`` is the
    weighted, differentiable total.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Optional[Iterable[torch.Tensor]],
        record: bool,
        min_dim: int = 0,
        watch_forward: bool = False,
    ):
        # validate everything before touching the model, so bad arguments leave it unchanged
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        layers = _layers(model)
        if params is None and not layers:
            raise ValueError(
                f"{type(model).__name__} has no {_LAYER_NAMES} layers to regularize; "
                "pass params=[...] explicitly"
            )
        if record and not layers:
            raise ValueError(
                f"the activation penalty records the inputs of {_LAYER_NAMES} layers, but "
                f"{type(model).__name__} has none; pass activation=0"
            )
        self.model = model
        self._layers = layers
        self._params = None if params is None else _check_params(params, min_dim)
        self._records: List[torch.Tensor] = []
        self._record_ids: set = set()
        self._fresh = True
        self._removed = False
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._undo: List[Callable[[], None]] = []  # changes to the model other than hooks, undone by remove()
        if record or watch_forward:
            self._handles.append(model.register_forward_pre_hook(_StartHook(self)))
        if record:
            for layer in layers:
                self._handles.append(layer.register_forward_pre_hook(_RecordHook(self), with_kwargs=True))
        # dropping the last reference to the penalty takes its hooks off the model
        self._finalizer = weakref.finalize(self, _release, self._handles, self._undo)

    # ------------------------------------------------------------------ recording
    def _forward_started(self) -> None:
        self._fresh = True

    def _record(self, module: nn.Module, x) -> Optional[torch.Tensor]:
        if not _recordable(module, x):
            return None
        if self._fresh:  # first tensor of a new forward pass: release the previous recording
            self._records, self._record_ids = [], set()
            self._fresh = False
        if id(x) not in self._record_ids:  # ids are stable while the list holds the tensors
            self._record_ids.add(id(x))
            self._records.append(x)
        return None

    def clear(self) -> None:
        """Release the recorded activations; the next recorded layer input starts a new recording."""
        self._records, self._record_ids = [], set()
        self._fresh = True

    def _weights(self) -> List[torch.Tensor]:
        """The regularized weights, read at call time (so lazily created or replaced weights are current)."""
        if self._params is not None:
            return self._params
        out, seen = [], set()
        for layer in self._layers:
            w = layer.weight
            # frozen weights cannot be differentiated; tied weights are one variable
            if isinstance(w, torch.Tensor) and w.requires_grad and id(w) not in seen:
                seen.add(id(w))
                out.append(w)
        return out

    # ------------------------------------------------------------------ public API
    def _check_usable(self) -> None:
        if self._removed:
            raise RuntimeError(
                f"this {type(self).__name__} was removed from its model; "
                "create a new one to regularize it again"
            )

    def _check_grad_enabled(self) -> None:
        # under no_grad the term would come back as a constant, and a training loop adding it to the loss would
        # silently train without the penalty
        if not torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(self).__name__}(loss) was called with gradient recording off (torch.no_grad() or "
                "inference mode), where the term it returns cannot be differentiable; call it with grad "
                "enabled, or use penalty.backward(loss), which works in either mode"
            )

    def _terms(self, loss: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """The weighted penalty for ``loss``: a differentiable 0-d tensor to add to the loss (grad mode must be
        on, as for any term that is to be backpropagated)."""
        self._check_usable()
        self._check_grad_enabled()
        _check_loss(loss)
        return self._terms(loss)[0]

    @torch.enable_grad()
    def backward(self, loss: torch.Tensor, sync: bool = True) -> Dict[str, Union[float, torch.Tensor]]:
        """``(loss + penalty).backward()`` in one call; releases the recorded activations afterwards.

        Returns floats ``loss``, ``penalty`` (the weighted total) and the unweighted terms (see the class);
        with ``sync=False`` detached 0-d tensors instead, so that the call does not wait for the device
        (what a CUDA graph needs, see :class:`qgrad.cuda_graph.GraphedStep`). No forward pass is run, so
        BatchNorm running statistics are updated once per step, by the caller's forward.
        """
        self._check_usable()
        _check_loss(loss)
        reg, terms = self._terms(loss)
        try:
            (loss + reg).backward()
        finally:
            self.clear()
        return _values({"loss": loss, "penalty": reg, **terms}, sync)

    def remove(self) -> None:
        """Take every hook of this penalty off the model, undo its other changes to the model (see the
        subclass) and release the recording. Idempotent; afterwards the penalty can no longer be evaluated."""
        self._finalizer()
        self.clear()
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __reduce_ex__(self, protocol):
        # a copy would hold the same model without hooks of its own, and so would never record anything
        raise TypeError(
            f"{type(self).__name__} objects are tied to their model through hooks and cannot be copied or "
            "pickled; copy or save the model (its state_dict), then create a new penalty for it"
        )

    def __deepcopy__(self, memo):
        self.__reduce_ex__(None)


# --------------------------------------------------------------------------------------------- gradient norms
class _GradNormPenalty(_Penalty):
    """``weight * sum_W ||dL/dW||_p + activation * sum_y ||dL/dy||_p`` for ``p = self._ord``.

    The norm is taken per tensor and the norms are summed, as in Eq. 3 of Alizadeh et al. Both halves come
    from one ``torch.autograd.grad`` call with ``create_graph=True``; a half whose coefficient is 0 is not
    computed, and ``activation=0`` registers no hooks. Tensors the loss does not depend on count as zero
    gradients, but a loss that reaches none of a half's tensors raises ``RuntimeError`` (it was computed by
    another model, e.g. a copy).
    """

    _ord: float
    _suffix: str

    def __init__(
        self,
        model: nn.Module,
        weight: float = 0.05,
        activation: float = 0.05,
        params: Optional[Iterable[torch.Tensor]] = None,
        watch_forward: bool = False,
        double_backward: bool = True,
    ):
        weight = _check_coefficient("weight", weight)
        activation = _check_coefficient("activation", activation)
        if double_backward:
            _check_twice_differentiable(model, type(self).__name__)
        if weight > 0 and params is None and isinstance(model, nn.Module):
            _check_plain_weights(model, type(self).__name__)
        super().__init__(model, params, record=activation > 0, watch_forward=watch_forward)
        self._weight = weight
        self._activation = activation

    @property
    def weight(self) -> float:
        """``lambda_w``, the coefficient of the weight-gradient norms (fixed at construction)."""
        return self._weight

    @property
    def activation(self) -> float:
        """``lambda_y``, the coefficient of the activation-gradient norms (fixed at construction)."""
        return self._activation

    def _selected(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The weights and recorded activations of the halves whose coefficient is > 0."""
        weights = self._weights() if self._weight > 0 else []
        acts = list(self._records) if self._activation > 0 else []
        if self._activation > 0 and not acts:
            raise RuntimeError(
                f"{type(self).__name__} has no recorded activations: run a forward pass in train mode "
                "with grad enabled before calling the penalty (or construct it with activation=0)"
            )
        return weights, acts

    @staticmethod
    def _check_reached(weights: Sequence[torch.Tensor], w_grads: Sequence[Optional[object]],
                       acts: Sequence[torch.Tensor], a_grads: Sequence[Optional[object]]) -> None:
        """Raise when a half has tensors but the loss reached none of them (single unused tensors count as
        zero gradients; a whole half unused means the loss came from somewhere else)."""
        if weights and all(g is None for g in w_grads):
            raise RuntimeError(
                "the loss does not depend on any of the regularized weights; compute it with the model this "
                "penalty was created for (not a copy of it, nor torch.func.functional_call with other "
                "parameter tensors), or pass the tensors it does use as params="
            )
        if acts and all(g is None for g in a_grads):
            raise RuntimeError(
                "the loss does not depend on the activations recorded in the last forward pass; run a "
                "forward pass in train mode with grad enabled before calling the penalty, and compute the "
                "loss from its output"
            )

    def _norms(
        self,
        w_grads: Sequence[Optional[torch.Tensor]],
        a_grads: Sequence[Optional[torch.Tensor]],
        like: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(sum_W ||g_W||_p, sum_y ||g_y||_p)``, differentiable; ``None`` gradients count as zero."""
        # vector_norm's derivative is sign(g) for ord=1 and g/||g|| for ord=2, both taken as 0 at g = 0
        # (no eps needed: an all-zero gradient gets a zero subgradient rather than NaN)
        def total(grads):
            norms = [
                torch.linalg.vector_norm(g, ord=self._ord, dtype=_accumulation_dtype(g))
                for g in grads
                if g is not None
            ]
            return _sum(norms, like)

        return total(w_grads), total(a_grads)

    def _combine(self, w_norm: torch.Tensor, a_norm: torch.Tensor, weights, acts) -> torch.Tensor:
        if weights and acts:
            return self._weight * w_norm + self._activation * a_norm
        if weights:
            return self._weight * w_norm
        return self._activation * a_norm

    def _first_backward(self):
        """The context of the first backward (``create_graph=True``)."""
        return contextlib.nullcontext()

    def _terms(self, loss: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        weights, acts = self._selected()
        zero = loss.new_zeros((), dtype=_accumulation_dtype(loss))
        if not weights and not acts:
            return zero, {f"weight_{self._suffix}": zero, f"activation_{self._suffix}": zero}
        with self._first_backward():
            grads = torch.autograd.grad(loss, weights + acts, create_graph=True, allow_unused=True)
        w_grads, a_grads = grads[: len(weights)], grads[len(weights) :]
        self._check_reached(weights, w_grads, acts, a_grads)
        w_norm, a_norm = self._norms(w_grads, a_grads, loss)
        w_norm = w_norm if weights else zero
        a_norm = a_norm if acts else zero
        reg = self._combine(w_norm, a_norm, weights, acts)
        self._fresh = True  # the recording is consumed: a later recorded tensor starts a new one
        return reg, {f"weight_{self._suffix}": w_norm, f"activation_{self._suffix}": a_norm}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weight={self._weight}, activation={self._activation}, "
            f"layers={len(self._layers)}{', removed' if self._removed else ''})"
        )


# --------------------------------------------------------------------------------------------- l1: modes
def check_penalty_state(state: Dict[str, Any]) -> Tuple[int, Dict[str, torch.Tensor]]:
    """Validate an :meth:`L1GradPenalty.state_dict`; returns ``(calls, last_stats)``."""
    if not isinstance(state, dict) or set(state) != {"calls", "last_stats"}:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"a penalty state is a dict with keys 'calls' and 'last_stats', got {found}")
    calls, last = state["calls"], state["last_stats"]
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
        raise ValueError(f"the penalty state's 'calls' must be an int >= 0, got {calls!r}")
    if not isinstance(last, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.dim() == 0 for k, v in last.items()
    ):
        raise ValueError("the penalty state's 'last_stats' must map names to 0-d tensors")
    return calls, last


_METHODS = ("exact", "worst-case")
_DEFAULT_H = 1e-3


def _check_every(every: int) -> int:
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    return int(every)


def _check_method(
    method: str, h: Optional[float], bits: Optional[int]
) -> Tuple[str, Optional[float], Optional[int]]:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method == "exact":
        if h is not None or bits is not None:
            raise ValueError(
                "h and bits set the perturbation of method='worst-case'; leave them None for method='exact'"
            )
        return method, None, None
    if h is not None and bits is not None:
        raise ValueError(f"give h or bits, not both (got h={h!r}, bits={bits!r})")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 16:
            raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
        return method, None, int(bits)
    if h is None:
        h = _DEFAULT_H
    if isinstance(h, bool) or not isinstance(h, numbers.Real) or not math.isfinite(h) or h <= 0:
        raise ValueError(f"h must be a finite number > 0, got {h!r}")
    return method, float(h), None


def _half_bin(t: torch.Tensor, bits: int, allow_unsigned: bool) -> torch.Tensor:
    """Half the bin width of a per-tensor ``bits``-bit grid covering ``t`` (0-d tensor, at least float32; no
    host synchronization).

    Symmetric signed grid ``scale = max|t| / (2^(bits-1) - 1)``; with ``allow_unsigned`` a non-negative
    tensor (e.g. a ReLU output) gets the unsigned grid ``scale = max(t) / (2^bits - 1)`` instead, the choice
    :class:`qgrad.nn.FakeQuant` makes with ``signed=None``.
    """
    # one pass over t (an activation at ImageNet size is ~100 MB) for both ends; max|t| = max(max t, -min t)
    lo, hi = t.detach().aminmax()
    amax = torch.maximum(hi, -lo).to(_accumulation_dtype(t))
    signed = amax / (2 ** (bits - 1) - 1)
    if not allow_unsigned:
        return signed / 2
    return torch.where(lo >= 0, amax / (2**bits - 1), signed) / 2


def _check_twice_differentiable(model: nn.Module, penalty: str) -> None:
    """A gradient-norm penalty differentiates the model's backward pass. Two kinds of module cannot be:

    * ``torch.compile``'d ones: AOTAutograd compiles a first-order backward only;
    * ``nn.SyncBatchNorm`` across processes: its statistics are reduced with collectives that autograd does
      not record.
    """
    if not isinstance(model, nn.Module):  # the base class reports it
        return
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    # without torch._dynamo imported nothing can have been compiled (importing it here would cost a second)
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", ())
    for name, m in model.named_modules():
        where = f"module {name or type(model).__name__!r}"
        if compiled and isinstance(m, compiled):
            raise ValueError(
                f"{where} is compiled with torch.compile, whose backward cannot be differentiated again, as "
                f"{penalty} must. Give the penalty the uncompiled model (the compiled one's _orig_mod)"
                + (", or use method='worst-case', which takes no second derivative" if penalty == "L1GradPenalty"
                   else "")
            )
        if distributed and isinstance(m, nn.SyncBatchNorm):
            group = m.process_group or torch.distributed.group.WORLD
            if torch.distributed.get_world_size(group) > 1:
                raise ValueError(
                    f"{where} is an nn.SyncBatchNorm over {torch.distributed.get_world_size(group)} processes: "
                    f"its statistics are reduced across processes outside autograd, so {penalty} cannot "
                    "differentiate its backward. Use per-process BatchNorm (do not convert the model with "
                    "SyncBatchNorm)"
                    + (", or method='worst-case', which takes no second derivative"
                       if penalty == "L1GradPenalty" else "")
                )


def _plain_twin(module: nn.Module, plain: Optional[bool]) -> None:
    """Set (True / False) or remove (None) a twin module's ``fused_double_backward = not plain`` override."""
    if plain is None:
        module.__dict__.pop("fused_double_backward", None)
    else:
        module.fused_double_backward = not plain


def _rng_states(model: nn.Module) -> RngState:
    """The generator states of the CPU and of the CUDA devices that hold the model's parameters."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return rng_state(sorted({p.device.index for p in model.parameters() if cuda and p.is_cuda}))


class _ActivationShift(TorchFunctionMode):
    """Adds ``rho_k * sign(g_k)`` to the activations of the worst-case second forward.

    The ``k``-th new tensor that reaches a regularized layer (under the recording rules) is matched with the
    ``k``-th activation recorded by the first forward; the layer gets ``x + rho_k * sign(g_k)`` and, while
    the mode is active, every later torch call that receives ``x`` (a residual add, a second layer) gets the
    shifted tensor too, so the shift acts on the variable ``y`` of Eq. 3 and not only on one of its uses.
    Uses that run before the first regularized layer consumes ``x`` see the unshifted tensor.
    """

    def __init__(self, shifts: Sequence[Tuple[torch.Size, torch.Tensor, object]]):
        super().__init__()
        self._shifts = shifts
        self.count = 0
        self._swap: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def replace(self, module: nn.Module, x) -> Optional[torch.Tensor]:
        if not _recordable(module, x):
            return None
        hit = self._swap.get(id(x))
        if hit is not None:
            return hit[1]
        if self.count >= len(self._shifts):
            raise RuntimeError(
                f"the closure's forward reached more regularized layer inputs than the {len(self._shifts)} "
                "activations recorded by the first forward; the closure must recompute the same loss"
            )
        shape, sign, rho = self._shifts[self.count]
        if x.shape != shape:
            raise RuntimeError(
                f"activation {self.count} of the closure's forward has shape {tuple(x.shape)}, the first "
                f"forward recorded {tuple(shape)}; the closure must recompute the same loss on the same batch"
            )
        # computed with the mode off: every torch call inside add_scaled_sign would otherwise come back
        # through __torch_function__ (three times the cost of the shift on small tensors)
        with torch._C.DisableTorchFunction():
            shifted = add_scaled_sign(sign, rho, x)
        self._swap[id(x)] = (x, shifted)  # holding x keeps its id unique while the mode is active
        self.count += 1
        return shifted

    def _substitute(self, a):
        if isinstance(a, torch.Tensor):
            hit = self._swap.get(id(a))
            if hit is not None and hit[0] is a:
                return hit[1]
        elif isinstance(a, (list, tuple)):  # torch.cat([...]), torch.stack([...])
            return type(a)(self._substitute(b) for b in a)
        return a

    def _hits(self, values) -> bool:
        swap = self._swap
        for a in values:
            if isinstance(a, torch.Tensor):
                if id(a) in swap:
                    return True
            elif isinstance(a, (list, tuple)) and self._hits(a):
                return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the mode sees every torch call of the forward, Tensor methods and properties included (~150 in a
        # ResNet-18 forward), each at a host cost on top of the call itself: arguments are only scanned (no
        # pytree map, no new tuple) unless one of them is to be substituted
        if kwargs is None:
            kwargs = {}
        if self._swap and (self._hits(args) or (kwargs and self._hits(kwargs.values()))):
            args = tuple(self._substitute(a) for a in args)
            kwargs = {k: self._substitute(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _GradientInjection(torch.autograd.Function):
    """Returns ``value`` unchanged; its backward hands precomputed gradients to ``targets``, scaled by the
    incoming gradient (handed over as they are when ``value`` is None: the caller backpropagates 1)."""

    @staticmethod
    def forward(ctx, value, grads, *targets):
        ctx.grads = grads
        ctx.unit = value is None
        return targets[0].new_zeros(()) if value is None else value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.unit:
            # the caller's list is emptied: holding no other reference, the gradient accumulators take the
            # tensors as the new .grad instead of copying them
            grads = list(ctx.grads)
            ctx.grads.clear()
        else:
            grads = [None if g is None else g * grad.to(g.dtype) for g in ctx.grads]
        return (None, None, *grads)


def _accumulate(targets: Sequence[torch.Tensor], grads: List[Optional[torch.Tensor]]) -> None:
    """Add ``grads[i]`` into ``targets[i].grad`` (None: nothing); empties ``grads``.

    When something may act on the accumulation -- a process group is initialized (DistributedDataParallel
    averages gradients in hooks on the parameters' gradient accumulators), or a target has
    post-accumulate-grad hooks -- through one autograd backward of a single node that feeds the
    accumulators, so that those hooks run as after any backward. Otherwise with fused in-place adds, the same
    sums without the engine's one add (one kernel launch on a GPU) per tensor.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed or any(getattr(t, "_post_accumulate_grad_hooks", None) for t in targets):
        if any(g is not None for g in grads):
            _GradientInjection.apply(None, grads, *targets).backward()  # its backward empties grads
        grads.clear()
        return
    with torch.no_grad():
        have = [i for i, g in enumerate(grads) if g is not None and targets[i].grad is not None]
        if have:
            torch._foreach_add_([targets[i].grad for i in have], [grads[i] for i in have])
        for t, g in zip(targets, grads):
            if g is not None and t.grad is None:
                t.grad = g
    grads.clear()


def _store_into(slots: list, i: int):
    def hook(g: torch.Tensor) -> None:
        slots[i] = g

    return hook


def _reduce(g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(||g||_1, sign(g) as int8)``."""
    norms, signs = l1_norm_sign([g], keep_sign=True)
    return norms[0], signs[0]


def _reduce_into(slots: list, i: int):
    # reduces an activation gradient as soon as the backward produces it, so that it is not kept alive to
    # the end of the backward (it would add the size of every recorded activation to the peak memory)
    def hook(g: torch.Tensor) -> None:
        slots[i] = _reduce(g)

    return hook


def _total(norms: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not norms:
        return like.new_zeros((), dtype=_accumulation_dtype(like))
    dtype = norms[0].dtype
    for n in norms[1:]:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.stack([n.to(dtype) for n in norms]).sum()


def _same_kind_groups(tensors: Sequence[torch.Tensor]) -> Iterable[List[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): the lists on which torch's ``_foreach`` ops take
    their fused path (one multi-tensor kernel per group on a GPU instead of one launch per tensor)."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups.values()


def _copy_all(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every ``i`` (same shapes and dtypes), a fused copy per (device, dtype)."""
    for idx in _same_kind_groups(dst):
        torch._foreach_copy_([dst[i] for i in idx], [src[i] for i in idx])


def _snapshot(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Copies of ``tensors`` (bit for bit), made with :func:`_copy_all`."""
    copies = [torch.empty_like(t) for t in tensors]
    _copy_all(copies, tensors)
    return copies


def _unique(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    out, seen = [], set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class L1GradPenalty(_GradNormPenalty):
    """The gradient-l1 penalty of Alizadeh et al. (ICLR 2020), Eq. 3, with an exact fast path and two
    cheaper modes.

    ``R = weight * sum_W ||dL/dW||_1 + activation * sum_y ||dL/dy||_1``

    Args:
        model: the network. Its ``nn.Conv1d/2d/3d`` and ``nn.Linear`` layers (subclasses included, e.g.
            qgrad's quantized layers) supply the weights ``W`` and, through forward pre-hooks, the
            activations ``y`` (their inputs; see the module docstring for the recording rules).
        weight: ``lambda_w >= 0``. 0 skips the weight gradients entirely.
        activation: ``lambda_y >= 0``. 0 skips the activation gradients and registers no layer hooks.
            Both belong to the model and the data: the paper used 0.05 on CIFAR-10, regularizing the last
            epochs of a run; ``qgrad demo`` fine-tunes its small VGG-like on ``digits`` with 0.005 at a
            learning rate of 0.01. Switched on from the first step, or with a much larger coefficient or
            learning rate, the penalty can wreck the float accuracy (measured: that model trained from scratch
            with 0.05 or 0.005 at a learning rate of 0.05 was at chance, 10-11%, after three epochs), so
            train first and regularize the last epochs or a fine-tune, as the paper does.
        params: explicit tensors (leaf, requiring grad) to use as ``W`` instead of the layer weights. A layer
            weight computed by ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ...) is a
            new tensor at every read, not the one the forward used, and is refused with ``weight > 0``.
        every: apply the penalty gradient on one call in ``every`` (see *Cheaper modes*); 1 = every call.
        method: ``"exact"`` (default) or ``"worst-case"`` (see *Cheaper modes*).
        h: ``"worst-case"`` only: the perturbation radius (default 1e-3).
        bits: ``"worst-case"`` only, instead of ``h``: per-tensor radius of half a ``bits``-bit bin.
        fused_batchnorm: swap the model's BatchNorms for qgrad's twins with a fused double backward
            (see below). ``False`` leaves them as they are.
        fused_conv: likewise for the model's ``nn.Conv1d/2d/3d`` (twins with a direct double backward).
        recompute: exact method only: segments of the model whose saved tensors are dropped in the forward and
            recomputed when a backward needs them (see *Lower memory*): a list of modules, or of lists of
            modules called one after the other. qgrad's models give theirs with ``model.recompute_segments()``
            (ResNet-18: the stem and each residual block; VGG-like: each Conv-BN-ReLU unit).

    ``penalty(loss)`` returns ``R`` (0-d, differentiable); ``penalty.backward(loss)`` runs
    ``(loss + R).backward()`` and returns floats ``loss``, ``penalty``, ``weight_l1``, ``activation_l1`` (the
    unweighted sums of norms; 0.0 for a half whose coefficient is 0). ``remove()`` detaches the hooks.

    Exact method
        ``R`` is differentiated by autograd's double backward. The per-tensor l1 norms of all weight and
        activation gradients are reduced by one call of :func:`qgrad.ops.l1_norm.multi_l1_norm`, which keeps
        ``sign(g)`` as int8 and hands ``lambda * sign(g)`` back in one pass per tensor, each when the node
        that made ``g`` runs. Peak memory of a step (width 0.25, batch 32, CPU): 2.15x (VGG-like) and 2.13x
        (ResNet-18) a plain step's, against 3.3x and 3.5x for the same penalty written with plain PyTorch
        ops; on an H100 (full width, batch 128, float32, measured before the seeds of residual adds waited
        for their node) 1.9x against 2.3x and 2.6x. The double backward keeps the BatchNorm input gradient of
        every layer on top of the forward's tensors (the convolutions recompute theirs from it), and then
        accumulates gradients for the forward's tensors: about 2x is the floor without recomputing the
        forward (see ``benchmarks/PROFILE.md``).

    Lower memory (``recompute=segments``)
        The forward keeps, of each segment, only its input; the tensors autograd saves inside it are dropped
        and recomputed, one segment at a time, by running the segment again whenever the first backward or
        either half of the double backward needs them (:class:`qgrad.recompute.SegmentRecomputation`). The
        recomputation replays the forward's random numbers (dropout) and autocast setting, and puts the
        segment's buffers back, so the gradients and running statistics are bit for bit those of the step
        without it (the tests check this). Activations are then recorded as gradient edges, not tensors.
        Measured (CPU, width 0.25, batch 32, one thread): peak memory 1.55x a plain step for ResNet-18
        (2.13x without) and 1.74x for VGG-like (2.15x), whose Conv-BN-ReLU units keep half of the saved
        tensors as segment inputs; step time (interleaved medians of two runs) 4.3-4.6x a plain step against
        3.1-3.3x for ResNet-18, 4.2x against 2.8x for VGG-like (about three more forwards of each segment per
        step). Only penalized steps recompute (the plain steps of ``every > 1`` keep their tensors). A
        backward after a later forward with grad enabled (the segments' inputs are then gone), a chain whose
        modules do not run one right after the other, and a segment that saves other tensors when run again
        raise ``RuntimeError``; CUDA graph capture is refused.

    Fused BatchNorm and convolutions (``fused_batchnorm=True``, ``fused_conv=True``)
        Construction calls :func:`qgrad.nn.batch_norm.convert_batchnorm` and
        :func:`qgrad.nn.conv.convert_conv` on the model: every module of type exactly
        ``nn.BatchNorm1d/2d/3d`` or ``nn.Conv1d/2d/3d`` changes class, in place, to qgrad's subclass of the
        same name. The module objects, their parameters, buffers and hooks, ``state_dict`` keys and values,
        outputs, first gradients and running statistics stay what they were; only the double backward runs
        through qgrad's formulas (BatchNorm: a fused closed form; convolutions: regular input/weight-gradient
        kernels instead of PyTorch's batch-as-channel convolution). :meth:`remove` (and dropping the
        penalty) reverts the modules this penalty converted. A deep copy of the model taken meanwhile holds
        the qgrad classes; they behave as torch's (PTQ and ``torch.func`` included), and a penalty attached
        to the copy uses them as its own (its :meth:`remove` leaves their class). Subclasses (e.g. qgrad's
        quantized layers) keep theirs. A penalty itself cannot be copied or pickled.
        ``method="worst-case"`` never differentiates twice and so swaps nothing.

    Cheaper modes
        ``every=k`` (any method): the calls of ``penalty(loss)`` and ``penalty.backward(loss)`` are counted
        together; calls ``0, k, 2k, ...`` (the first one included) apply the penalty with its weight
        multiplied by ``k`` -- ``penalty(loss)`` returns ``k * R`` and ``backward`` adds ``k * dR/dtheta`` --
        and the calls in between are plain steps: ``penalty(loss)`` returns a constant zero (no gradient
        work) and ``backward(loss)`` is ``loss.backward()``. Over ``k`` steps the penalty gradient has the
        same total weight, at an amortized cost of ``1 + (r - 1) / k`` plain steps for a penalized step
        costing ``r`` (the forwards of plain steps run torch's own BatchNorm and convolution: the model's
        forward pre-hook sets the twins' ``fused_double_backward`` from the call counter). A penalized step
        is ``k`` times stronger than one of ``every=1``; with a large ``lambda`` or learning rate that can
        destabilize training (see the README's mode comparison). ``backward`` returns the same keys on every
        call: ``loss`` of the step, ``penalty_scale``, the factor the penalty gradient got on this call (``k``
        or 0.0; it averages to 1 over ``k`` calls), and ``penalty``, ``weight_l1``, ``activation_l1`` as
        measured on the last penalized call: a plain step computes no gradient statistics (reducing every
        activation gradient to its norm in a hook cost a plain ResNet-18 step 2% more on a CPU at batch 32,
        and 27% more where the host is the bottleneck, as on a GPU at batch 128), so it repeats them, and an
        average over steps is an average over the penalized ones. A plain step does not check that the
        recorded activations belong to the loss; the next penalized step does. The counter and those
        statistics are the penalty's :meth:`state_dict`: save it with a checkpoint and :meth:`load_state_dict`
        it into the resumed run's penalty, which then penalizes the same steps as an uninterrupted run (a new
        penalty starts at a penalized call). Python picks each call's kind, which a
        CUDA graph's replay cannot, so ``every > 1`` refuses to be captured; :class:`qgrad.GraphedStep`
        shows the same steps as two graphs.

        ``method="worst-case"``: one extra forward/backward at the worst-case l_inf perturbation of the
        first-order model, instead of a double backward. With ``g`` the gradients at the current point
        ``theta``, ``lam = max(lambda_w, lambda_y)`` and radii ``rho_W = h * lambda_w / lam``,
        ``rho_y = h * lambda_y / lam``, the penalty is the loss increase

            R_wc = (lam / h) * (L(W + rho_W sign(g_W); y + rho_y sign(g_y)) - L(W; y)),

        the signs held fixed (they are piecewise constant), so
        ``dR_wc/dtheta = (lam / h) * (grad L(theta + Delta) - grad L(theta))`` for every parameter of the
        model (BatchNorm and biases included; tensors outside the model get their plain gradient only). To
        first order in ``h``, ``R_wc = lambda_w ||g_W||_1 + lambda_y ||g_y||_1`` (Eq. 2 of the paper), the
        exact penalty with the same meaning of ``lambda``, and for a twice-differentiable network its
        gradient tends to the exact one (a finite difference of ``H @ (lambda * sign(g))``; measured cosine
        > 0.99 with tanh or GELU at ``h = 1e-4`` in float64 and at ``h = 1e-3`` in float32; the test
        suite checks this). **For ReLU networks the worst-case mode is a different objective, not an
        approximation of the exact gradient**: the exact gradient sees only ReLU's linear pieces (its second
        derivative is zero almost everywhere), whereas the perturbed forward moves units across their
        kinks, and those crossings dominate the difference quotient. Measured at initialization on random
        CIFAR-sized batches (width 0.25, batch 32, ``lambda = 0.05``), the cosine similarity between the
        worst-case and the exact penalty gradient was 0.03-0.25 for ResNet-18 and -0.34-0.17 for VGG-like,
        over ``h`` from 1e-4 to 1e-1 and ``bits`` 8 and 4; the two agree only when ``h`` is so small that no
        unit changes side. The worst-case gradient is the gradient of the actual loss increase under the
        worst first-order l_inf perturbation -- the kind of change quantization makes -- at the cost of one
        forward and one backward.

        ``bits=b`` ties the radius to a target bit-width: each weight tensor is moved by half a bin of a
        symmetric ``b``-bit per-tensor grid, ``rho_W = (lambda_w / lam) * max|W| / (2^(b-1) - 1) / 2``, and
        each activation by half a bin of its own grid from the recorded tensor (``max|y| / (2^b - 1) / 2``
        when ``y >= 0``, as after a ReLU, else the symmetric grid). The loss increase is divided by ``h`` =
        the mean of the half-bins over the perturbed tensors, so that to first order
        ``R_wc = sum_t lambda_t (halfbin_t / h) ||g_t||_1``: ``lambda`` keeps its scale and each tensor's
        term is weighted by its bin width relative to the mean.

        In float16 or bfloat16 (autocast, or a half-precision model) a fixed ``h`` of 1e-3 is below the
        resolution of values of order 1 (bfloat16 keeps 8 significant bits, spacing ~0.008 near 1), so the
        difference quotient is mostly rounding: on a small tanh/GELU network under bfloat16 autocast the
        worst-case penalty came out 0.48 against an exact 7.1, and its gradient's cosine to the exact one was
        0.6 (0.998 in float32). A second forward in those dtypes with ``h`` below 8 times the dtype's
        epsilon warns once; use a larger ``h`` or ``bits=`` there (half-bin radii, which suffer less: with
        ``bits=8`` the same network's penalty was 1.5 under bfloat16 against 2.3 in float32).

        The second forward needs the loss recomputed: pass ``closure`` (no arguments, returns the loss of
        the same batch, e.g. ``lambda: criterion(model(x), y)``) to ``penalty(loss, closure)`` or
        ``penalty.backward(loss, closure)``. During it the weights are moved in place and restored bit for
        bit from a saved copy afterwards; the activation shifts are added by the layer pre-hooks, and a torch
        function mode hands the shifted tensor to every later use of the same activation (a residual add);
        uses that run before the first regularized layer reads it see the unshifted value. The model's
        buffers are restored afterwards (BatchNorm running statistics, ``num_batches_tracked``), so running
        statistics are updated once per step, by the caller's forward; and the random
        number generator is replayed from the state the first forward started from (same dropout masks)
        and then restored, so the step consumes no random numbers of its own. That state is taken at the
        start of the model's last forward with grad enabled: a forward under ``torch.no_grad()`` in between
        (validation, logging) does not change it. ``backward`` frees the first
        graph and the first forward's activations before the second forward; what remains on top of a plain
        step is the shifted copy of each recorded activation (the unshifted one stays saved by the layer that
        produced it), the int8 signs and copies of the parameters and their gradients -- measured 1.7x (VGG-
        like) and 1.9x (ResNet-18) a plain step's peak at width 0.25, batch 32 on a CPU, 1.4x and 1.6x on an
        H100 at full width, batch 128. ``penalty(loss,
        closure)`` must keep the first graph for the caller's ``(loss + R).backward()`` and so costs one
        more backward. ``backward`` adds the penalty gradient ``dR_wc/dtheta`` to ``.grad`` in place; when a
        process group is initialized or a parameter has post-accumulate-grad hooks, through a second backward
        of a single node instead, so that the hooks see it: ``DistributedDataParallel`` averages it over
        processes like the first gradient (the closure must call the wrapped model), and post-accumulate-grad
        hooks fire once per backward, twice per step. Stats as above; ``penalty`` is ``R_wc``.

    Loss scaling
        For ``S * L`` (``S > 0``) every mode gives ``S * R`` and ``S * dR/dtheta``: the gradient norms are
        positively homogeneous and the signs do not change. So with a ``GradScaler`` pass
        ``scaler.scale(loss)`` (and, for ``"worst-case"``, a closure returning the scaled loss); the
        statistics returned are then scaled by ``S``.

    Compiled models
        The exact method differentiates the backward pass, which a ``torch.compile``'d module cannot have
        differentiated again: construction raises ``ValueError`` for a model that is or contains one.
        ``"worst-case"`` accepts it.

    Several processes
        With ``DistributedDataParallel``, give the penalty the wrapped model (or the inner one: the hooks are
        on the same layers). Each process penalizes the gradients of its own batch, and every mode ends the
        step with the gradients averaged over the processes, as for a plain loss. The exact method raises
        ``ValueError`` for ``nn.SyncBatchNorm`` across processes (its statistics are reduced outside
        autograd, so its backward cannot be differentiated).
    """

    _ord = 1.0
    _suffix = "l1"

    def __init__(
        self,
        model: nn.Module,
        weight: float = 0.05,
        activation: float = 0.05,
        params: Optional[Iterable[torch.Tensor]] = None,
        *,
        every: int = 1,
        method: str = "exact",
        h: Optional[float] = None,
        bits: Optional[int] = None,
        fused_batchnorm: bool = True,
        fused_conv: bool = True,
        recompute: Optional[Iterable] = None,
    ):
        every = _check_every(every)
        method, h, bits = _check_method(method, h, bits)
        if recompute is not None and method != "exact":
            raise ValueError("recompute lowers the memory of the exact method's double backward; "
                             f"method={method!r} takes none (leave recompute=None)")
        for name, flag in (("fused_batchnorm", fused_batchnorm), ("fused_conv", fused_conv)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        # the start hook also tells the twins, under every > 1, whether the coming step is penalized
        watch = method == "worst-case" or every > 1 or recompute is not None
        super().__init__(
            model, weight, activation, params, watch_forward=watch, double_backward=method == "exact"
        )
        self._every = every
        self._method = method
        self._h = h
        self._bits = bits
        self._calls = 0
        self._last_stats: Dict[str, torch.Tensor] = {}  # every > 1: the statistics of the last penalized call
        self._second_forward: Optional[object] = None  # set while the worst-case closure runs
        self._rng = None
        self._warned_resolution = False
        self._plain_depth = 0  # > 0 inside plain_steps()
        self._twins: List[nn.Module] = []
        # the twins change only second derivatives, which the worst-case method never takes
        if fused_batchnorm and method == "exact":
            self._convert(convert_batchnorm, revert_batchnorm, _BATCHNORM_TWINS)
        if fused_conv and method == "exact":
            self._convert(convert_conv, revert_conv, _CONV_TWINS)
        self._segments: Optional[SegmentRecomputation] = None
        if recompute is not None:
            self._segments = SegmentRecomputation(model, recompute)
            self._undo.append(self._segments.remove)

    # ------------------------------------------------------------------ module swaps
    def _convert(self, convert: Callable[[nn.Module], nn.Module], revert: Callable[[nn.Module], nn.Module],
                 kinds: tuple):
        """Apply an in-place class swap to the model; the last attached penalty to be removed reverts the
        modules that a penalty converted.

        Twins of ``kinds`` already in the model (``qgrad.nn`` modules, those of another attached penalty, or
        a copy taken while a penalty was attached, which may carry its plain-step setting) become this
        penalty's too: their setting is cleared. :meth:`remove` leaves the class of the twins that no penalty
        made, and of every twin while another attached penalty still uses it.
        """
        before = {id(m): type(m) for m in self.model.modules()}
        convert(self.model)
        twins = [m for m in self.model.modules() if type(m) in kinds]
        for m in twins:
            _plain_twin(m, None)
            _TWIN_USERS[m] = _TWIN_USERS.get(m, 0) + 1
            if type(m) is not before[id(m)]:
                _CONVERTED.add(m)
        self._twins += twins

        def undo():
            for m in twins:
                _plain_twin(m, None)
                users = _TWIN_USERS.pop(m, 1) - 1
                if users:
                    _TWIN_USERS[m] = users
                elif m in _CONVERTED:
                    _CONVERTED.discard(m)
                    revert(m)

        if twins:
            self._undo.append(undo)

    def _check_resolution(self) -> None:
        """Warn once when the worst-case radius ``h`` is lost to the rounding of a half-precision forward."""
        if self._bits is not None or self._warned_resolution:
            return
        param = next(self.model.parameters(), None)
        if param is None:
            return
        device = param.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else param.dtype
        if dtype in (torch.float16, torch.bfloat16) and self._h < 8 * torch.finfo(dtype).eps:
            self._warned_resolution = True
            warnings.warn(
                f"method='worst-case' with h={self._h:g} runs its second forward in {dtype}, whose spacing "
                f"near 1 is {torch.finfo(dtype).eps:g}: the perturbation is mostly rounded away and the "
                "penalty is biased (see the L1GradPenalty docstring). Use bits=<target bit-width> or a "
                "larger h",
                stacklevel=4,
            )

    # ------------------------------------------------------------------ recording
    def _forward_started(self) -> None:
        if self._second_forward is not None:  # the worst-case closure: keep the first forward's recording
            self._check_resolution()
            return
        self._fresh = True
        if self._method == "worst-case":
            if torch.is_grad_enabled():  # no_grad: no loss to penalize
                self._rng = _rng_states(self.model)
            return
        # a forward whose step will be plain runs torch's own BatchNorm and convolution: the twins' autograd
        # Functions cost Python time and buy nothing without a double backward (if the guess is wrong, e.g. a
        # forward without a penalty call, a penalized step still gets the exact gradient, through torch's
        # double backward); nor does it recompute segments
        plain = self._plain_depth > 0 or self._calls % self._every != 0
        if self._every > 1:
            for m in self._twins:
                _plain_twin(m, plain)
        if self._segments is not None and torch.is_grad_enabled():  # a no_grad forward leaves the step be
            self._segments.reset()
            self._segments.active = not plain

    def _record(self, module: nn.Module, x) -> Optional[torch.Tensor]:
        if isinstance(self._second_forward, _ActivationShift):
            return self._second_forward.replace(module, x)
        if self._second_forward is not None or self._plain_depth > 0:
            return None
        segments = self._segments
        if segments is not None and segments.active:
            # the recording must not keep the activations alive (they are what recomputation drops): their
            # gradient edges are recorded instead, which torch.autograd.grad takes as inputs
            if segments.recomputing or not _recordable(module, x):
                return None
            if self._fresh:
                self._records, self._record_ids = [], set()
                self._fresh = False
            edge = torch.autograd.graph.get_gradient_edge(x)
            key = (id(edge.node), edge.output_nr)  # the edge holds its node, so the id stays unique
            if key not in self._record_ids:
                self._record_ids.add(key)
                self._records.append(edge)
            return None
        return super()._record(module, x)

    def _first_backward(self):
        return contextlib.nullcontext() if self._segments is None else self._segments.first_backward()

    def clear(self) -> None:
        super().clear()
        if self._segments is not None:
            self._segments.reset()

    @contextlib.contextmanager
    def plain_steps(self):
        """A context for steps that do not call the penalty (``loss.backward()`` alone): forwards inside it
        run torch's own BatchNorm and convolution instead of the twins' autograd Functions (same outputs and
        gradients, to float rounding, without the twins' cost) and record no activations, so the penalty
        cannot be called on them. ``every > 1`` does this by itself on its plain calls; the context is for
        steps kept apart from the penalized ones, as the plain graph of the two-graph recipe of
        :class:`qgrad.GraphedStep`, captured inside it. It nests; after it, forwards run as they would have
        without it."""
        self._check_usable()
        self._plain_depth += 1
        for m in self._twins:
            _plain_twin(m, True)
        try:
            yield self
        finally:
            self._plain_depth -= 1
            if not self._plain_depth:
                for m in self._twins:
                    _plain_twin(m, None)

    # ------------------------------------------------------------------ properties
    @property
    def every(self) -> int:
        """The penalty is applied on one call in ``every`` (1: on every call)."""
        return self._every

    @property
    def method(self) -> str:
        """``"exact"`` or ``"worst-case"``."""
        return self._method

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to continue ``every > 1`` where it stopped: ``{"calls": int, "last_stats":
        {name: 0-d CPU tensor}}``, the number of calls so far and the statistics of the last penalized call
        (which plain calls repeat). The settings (coefficients, ``every``, ``method``) are not part of it."""
        last = {k: v.detach().cpu() for k, v in self._last_stats.items()}
        return {"calls": self._calls, "last_stats": last}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from ``state``, a :meth:`state_dict` (the statistics move to the model's device)."""
        self._calls, last = check_penalty_state(state)
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self._last_stats = {k: v.to(device) for k, v in last.items()}

    def _norms(self, w_grads, a_grads, like):
        # one fused call for all tensors; its backward is lambda * sign(g) from the int8 signs it kept
        w = [g for g in w_grads if g is not None]
        a = [g for g in a_grads if g is not None]
        if not w and not a:
            zero = like.new_zeros((), dtype=_accumulation_dtype(like))
            return zero, zero
        norms = multi_l1_norm(w + a)
        zero = norms.new_zeros(())
        return (norms[: len(w)].sum() if w else zero), (norms[len(w) :].sum() if a else zero)

    # ------------------------------------------------------------------ public API
    def _check_call(self, loss: torch.Tensor, closure) -> bool:
        """Validate a call; return whether it applies the penalty (the step counter is not advanced)."""
        self._check_usable()
        _check_loss(loss)
        if self._every > 1 and loss.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"L1GradPenalty(every={self._every}) alternates penalized and plain steps, which one CUDA "
                "graph cannot: its replays would repeat the kind of step that was captured. Capture "
                "L1GradPenalty with every * the coefficients and every=1, and a plain step, as two graphs "
                "(see qgrad.GraphedStep)"
            )
        if self._segments is not None and loss.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(CAPTURE_REFUSED)
        applied = self._calls % self._every == 0
        if applied and self._method == "worst-case" and not callable(closure):
            raise TypeError(
                "method='worst-case' recomputes the loss at the perturbed point: pass a closure, e.g. "
                "penalty.backward(loss, lambda: criterion(model(x), y))"
                + ("" if closure is None else f"; got a {type(closure).__name__}, which is not callable")
            )
        return applied

    def __call__(
        self, loss: torch.Tensor, closure: Optional[Callable[[], torch.Tensor]] = None
    ) -> torch.Tensor:
        """The penalty term for ``loss``: a differentiable 0-d tensor to add to the loss.

        ``R`` (exact), ``R_wc`` (worst-case; needs ``closure``), times ``every`` on penalized calls; a
        constant zero on the plain calls of ``every > 1``. See the class docstring.
        """
        self._check_grad_enabled()
        applied = self._check_call(loss, closure)
        if not applied:
            self._selected()
            self._fresh = True
            self._calls += 1
            return loss.new_zeros((), dtype=_accumulation_dtype(loss))
        if self._method == "exact":
            reg, terms = self._terms(loss)
            stats = {"penalty": reg, **terms}
            reg = reg if self._every == 1 else reg * float(self._every)
        else:
            reg, stats = self._worst_case(loss, closure, into_grad=False)
        if self._every > 1:
            self._keep_stats(stats)
        self._calls += 1
        return reg

    @torch.enable_grad()
    def backward(
        self, loss: torch.Tensor, closure: Optional[Callable[[], torch.Tensor]] = None, sync: bool = True
    ) -> Dict[str, Union[float, torch.Tensor]]:
        """``(loss + penalty(loss)).backward()`` in one call (for ``"worst-case"`` without keeping the first
        graph); releases the recorded activations afterwards.

        Returns floats ``loss``, ``penalty``, ``weight_l1``, ``activation_l1``, and ``penalty_scale`` when
        ``every > 1`` (see the class docstring); with ``sync=False`` detached 0-d tensors instead, so that
        the call does not wait for the device (what a CUDA graph needs, see
        :class:`qgrad.cuda_graph.GraphedStep`). BatchNorm running statistics are updated once per step, by
        the caller's forward.
        """
        applied = self._check_call(loss, closure)
        try:
            if not applied:
                self._selected()
                loss.backward()
                stats = {"loss": loss, **self._last_stats}
            elif self._method == "exact":
                reg, terms = self._terms(loss)
                (loss + (reg if self._every == 1 else reg * float(self._every))).backward()
                stats = {"loss": loss, "penalty": reg, **terms}
            else:
                stats = self._worst_case(loss, closure, into_grad=True)[1]
        finally:
            self.clear()
        if applied and self._every > 1:
            self._keep_stats(stats)
        self._calls += 1
        if self._every > 1:
            stats["penalty_scale"] = loss.new_full((), float(self._every) if applied else 0.0)
        return _values(stats, sync)

    # ------------------------------------------------------------------ statistics of every > 1
    def _keep_stats(self, stats: Dict[str, torch.Tensor]) -> None:
        """Keep the gradient statistics of a penalized call (detached 0-d tensors) for the plain calls."""
        self._last_stats = {k: v.detach() for k, v in stats.items() if k != "loss"}

    # ------------------------------------------------------------------ worst-case
    def _capture_backward(
        self, loss: torch.Tensor, kept: Sequence[torch.Tensor], reduced: Sequence[torch.Tensor]
    ) -> Tuple[List[Optional[torch.Tensor]], List[Optional[Tuple[torch.Tensor, torch.Tensor]]]]:
        """``loss.backward()``, returning the gradient that reached each tensor of ``kept`` and ``(l1 norm,
        int8 sign)`` of the gradient of each tensor of ``reduced`` (None where no gradient came)."""
        g_kept: List[Optional[torch.Tensor]] = [None] * len(kept)
        g_reduced: list = [None] * len(reduced)
        handles = [t.register_hook(_store_into(g_kept, i)) for i, t in enumerate(kept)]
        handles += [t.register_hook(_reduce_into(g_reduced, i)) for i, t in enumerate(reduced)]
        try:
            loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        return g_kept, g_reduced

    def _l1_values(self, w_grads, a_reduced, like) -> Dict[str, torch.Tensor]:
        with torch.no_grad():
            w = [g for g in w_grads if g is not None]
            w_norm = multi_l1_norm(w).sum() if w else _total([], like)
            a_norm = _total([r[0] for r in a_reduced if r is not None], like)
        return {"weight_l1": w_norm, "activation_l1": a_norm}

    def _radii(self, weights, acts):
        """Per-tensor radii (floats or 0-d tensors) and the normalizing ``h`` of the worst-case penalty."""
        lam = max(self._weight, self._activation)
        fw, fa = self._weight / lam, self._activation / lam
        if self._bits is None:
            return [self._h * fw] * len(weights), [self._h * fa] * len(acts), self._h
        halves_w = [_half_bin(w, self._bits, allow_unsigned=False) for w in weights]
        halves_a = [_half_bin(a, self._bits, allow_unsigned=True) for a in acts]
        h = torch.stack(halves_w + halves_a).mean()
        return [fw * r for r in halves_w], [fa * r for r in halves_a], h

    def _worst_case(self, loss: torch.Tensor, closure, into_grad: bool):
        weights, acts = self._selected()
        if any(not w.is_leaf for w in weights):
            # e.g. torch.nn.utils.weight_norm / spectral_norm: the second forward's pre-hook would recompute
            # the weight and drop the move
            names = [n for n, m in self.model.named_modules() if isinstance(m, _LAYER_TYPES)
                     and any(m.weight is w for w in weights if not w.is_leaf)]
            raise RuntimeError(
                "method='worst-case' moves the weights in place, but "
                + (f"the weight of layer {names[0]!r} is" if names else "a regularized weight is")
                + " computed from other tensors (recomputed at every forward by a weight_norm or "
                "spectral_norm hook?); use method='exact', or weight=0"
            )
        targets = _unique([p for p in self.model.parameters() if p.requires_grad] + weights)
        position = {id(t): i for i, t in enumerate(targets)}
        # pass 1: the gradients at theta. backward() accumulates them into .grad right away (hooks read
        # them on the way); penalty(loss, closure) keeps the graph for the caller's backward
        if into_grad:
            g1, a_reduced = self._capture_backward(loss, targets, acts)
        else:
            grads = torch.autograd.grad(loss, targets + acts, retain_graph=True, allow_unused=True)
            g1 = list(grads[: len(targets)])
            a_reduced = [None if g is None else _reduce(g) for g in grads[len(targets) :]]
            del grads
        w_grads = [g1[position[id(w)]] for w in weights]
        self._check_reached(weights, w_grads, acts, a_reduced)
        terms = self._l1_values(w_grads, a_reduced, loss)
        lam = max(self._weight, self._activation)
        if not weights and not acts:  # nothing to perturb (both coefficients 0, or every weight frozen)
            zero = loss.new_zeros((), dtype=_accumulation_dtype(loss))
            return zero, {"loss": loss, "penalty": zero, **terms}
        with torch.no_grad():
            rho_w, rho_a, h = self._radii(weights, acts)
            shifts = []
            for a, red, r in zip(acts, a_reduced, rho_a):  # an activation no gradient reached is not moved
                sign = torch.zeros(a.shape, dtype=torch.int8, device=a.device) if red is None else red[1]
                shifts.append((a.shape, sign, r))
            moves = [(w, g, r) for w, g, r in zip(weights, w_grads, rho_w) if g is not None]
        # the first forward's activations and gradients are not needed any more: release them before the
        # second forward (backward() has freed the first graph, so this lowers the peak by their size)
        del a_reduced, w_grads, acts
        self._records, self._record_ids = [], set()
        loss2, g2 = self._second_pass(closure, moves, shifts, targets)
        with torch.no_grad():
            if isinstance(h, torch.Tensor):  # bits: all half-bins 0 only for all-zero tensors, where g2 == g1
                inv_h = torch.where(h > 0, 1 / h.clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))
            else:
                inv_h = 1 / h
            coef = lam * inv_h * float(self._every)
            # (g2 - g1) * coef for every target, fused over the targets that got a gradient in both passes
            diffs: List[Optional[torch.Tensor]] = [None] * len(targets)
            both = [i for i, (a, b) in enumerate(zip(g1, g2)) if a is not None and b is not None]
            if both:
                fused = list(torch._foreach_sub([g2[i] for i in both], [g1[i] for i in both]))
                torch._foreach_mul_(fused, coef)
                for i in reversed(both):
                    diffs[i] = fused.pop()
            for i, (a, b) in enumerate(zip(g1, g2)):
                if (a is None) != (b is None):
                    diffs[i] = b * coef if a is None else a * -coef
            reg = (loss2.detach() - loss.detach()).to(_accumulation_dtype(loss)) * (lam * inv_h)
        if into_grad:
            # under DistributedDataParallel the first backward has averaged g1 over the processes, and the
            # closure's forward has prepared the next averaging, which the accumulation must trigger: each
            # process's difference would otherwise stay its own (see _accumulate)
            _accumulate(targets, diffs)
        self._fresh = True
        stats = {"loss": loss, "penalty": reg, **terms}
        if not into_grad:  # the value scaled like the gradients, which already carry the factor `every`
            reg = _GradientInjection.apply(reg * float(self._every), diffs, *targets)
        return reg, stats

    def _second_pass(self, closure, moves, shifts, targets):
        """Run ``closure`` at the perturbed point and return ``(loss2, grad of loss2 w.r.t. targets)``; the
        weights, the buffers and the random number generator are restored before returning."""
        moved = [w.data for w, _, _ in moves]
        saved = _snapshot(moved)
        buffers = [b.data for b in self.model.buffers()]
        saved_buffers = _snapshot(buffers)
        shift = _ActivationShift(shifts) if shifts else None
        rng = self._rng
        # DistributedDataParallel broadcasts the buffers at the start of every forward, in place: in the
        # second forward that bumps version counters which the first forward's graph may check (with torch
        # 2.11, penalty(loss, closure) then failed "modified by an inplace operation"), and the buffers are
        # restored below anyway
        ddp = self.model if isinstance(self.model, nn.parallel.DistributedDataParallel) else None
        if ddp is not None:
            broadcast, ddp.broadcast_buffers = ddp.broadcast_buffers, False
        try:
            # .data: the move and the restore must not bump the weights' version counters, so that a graph
            # that saved them (the first forward's, kept by penalty(loss, closure)) stays usable; the restore
            # copies the saved values back bit for bit
            if moves:
                with torch.no_grad():
                    steps = torch._foreach_sign([g for _, g, _ in moves])
                    torch._foreach_mul_(steps, [r for _, _, r in moves])
                    # added in the weight's dtype (a gradient may come in another one)
                    torch._foreach_add_(moved, [d.to(w.dtype) for w, d in zip(moved, steps)])
                    del steps
            self._second_forward = shift if shift is not None else True
            with replayed_rng(rng) if rng is not None else contextlib.nullcontext():
                with torch.enable_grad(), (shift if shift is not None else contextlib.nullcontext()):
                    loss2 = closure()
            if not isinstance(loss2, torch.Tensor) or loss2.numel() != 1 or not loss2.requires_grad:
                got = type(loss2).__name__
                if isinstance(loss2, torch.Tensor):
                    got = f"shape {tuple(loss2.shape)}, requires_grad={loss2.requires_grad}"
                raise TypeError(
                    f"closure must return the loss as a one-element tensor that requires grad, got {got}"
                )
            if shift is not None and shift.count != len(shifts):
                raise RuntimeError(
                    f"the closure's forward reached {shift.count} regularized layer inputs, the first "
                    f"forward recorded {len(shifts)}; the closure must recompute the same loss on the same "
                    "batch"
                )
            g2 = torch.autograd.grad(loss2, targets, allow_unused=True)
        finally:
            self._second_forward = None
            if ddp is not None:
                ddp.broadcast_buffers = broadcast
            with torch.no_grad():
                _copy_all(moved, saved)
                # every buffer is put back: BatchNorm's kernel updates the running statistics without bumping
                # their version counters, so a change cannot be detected cheaply; .data keeps the counters,
                # as a graph that saved an eval-mode BatchNorm's statistics checks them
                _copy_all(buffers, saved_buffers)
        return loss2, g2

    def __repr__(self) -> str:
        mode = "" if self._method == "exact" else (
            ", method='worst-case', " + (f"bits={self._bits}" if self._bits is not None else f"h={self._h}")
        )
        return (
            f"{type(self).__name__}(weight={self._weight}, activation={self._activation}"
            f"{'' if self._every == 1 else f', every={self._every}'}{mode}, "
            f"layers={len(self._layers)}{', removed' if self._removed else ''})"
        )


class L2GradPenalty(_GradNormPenalty):
    """The gradient-l2 baseline: Eq. 3 with the l2 norm (Gulrajani et al. 2017, on the same gradients).

    ``R = weight * sum_W ||dL/dW||_2 + activation * sum_y ||dL/dy||_2``, the l2 norm taken per tensor and
    summed (not the l2 norm of all gradients concatenated), mirroring Eq. 3. Arguments and behaviour are
    those of :class:`L1GradPenalty`; the statistics are ``weight_l2`` and ``activation_l2``.
    """

    _ord = 2.0
    _suffix = "l2"


# --------------------------------------------------------------------------------------------- orthogonality
def _orthogonality(w: torch.Tensor) -> torch.Tensor:
    """``||M^T M - I_n||_F^2`` for ``M = w.reshape(m, n)``, ``m = w.shape[0]``, via the smaller Gram matrix.

    With singular values ``s`` of ``M``, ``||M^T M - I_n||^2 = sum s^4 - 2 sum s^2 + n`` and
    ``||M M^T - I_m||^2 = sum s^4 - 2 sum s^2 + m``: the two differ by the constant ``n - m`` only. A conv
    weight reshaped to (out, in*k*k) is usually wide, so ``M M^T`` (m x m) plus ``n - m`` costs ``m^2 n``
    instead of ``n^2 m``. The residual ``G - I`` is formed explicitly rather than expanded to
    ``||G||^2 - 2 tr G + k``, which would cancel catastrophically near orthogonality.
    """
    m = w.shape[0]
    mat = w.reshape(m, -1).to(_accumulation_dtype(w))
    n = mat.shape[1]
    gram = mat @ mat.T if m <= n else mat.T @ mat
    k = gram.shape[0]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    return (gram - eye).square().sum() + float(n - k)


class OrthogonalityPenalty(_Penalty):
    """The weight-orthogonality penalty of Defensive Quantization (Lin et al. 2019).

    ``R = weight * sum_W ||W^T W - I||_F^2`` with each ``W`` reshaped to 2-D ``(out, -1)`` = ``(m, n)``; in
    terms of the ``min(m, n)`` singular values ``s`` of ``W`` one term is ``sum (s^2 - 1)^2 + n - min(m, n)``,
    a fourth-power pull of every singular value towards 1. It is computed through the smaller Gram matrix
    (see ``_orthogonality``); the reported value is that of the formula above, including its constant.

    Args:
        model: the network; the weights of its ``nn.Conv1d/2d/3d`` and ``nn.Linear`` layers are regularized.
        weight: coefficient ``>= 0``. Lin et al. tune it per model; the default 1e-4 is only a starting
            point for a search.
        params: explicit tensors (leaf, requiring grad, at least 1-D) to regularize instead of the layer
            weights.

    ``penalty(loss)`` returns ``R`` (the loss is only validated, its graph is not used);
    ``penalty.backward(loss)`` runs ``(loss + R).backward()`` and returns floats ``loss``, ``penalty`` and
    ``orthogonality`` (the unweighted sum). No hooks are registered.
    """

    def __init__(
        self, model: nn.Module, weight: float = 1e-4, params: Optional[Iterable[torch.Tensor]] = None
    ):
        weight = _check_coefficient("weight", weight)
        super().__init__(model, params, record=False, min_dim=1)
        self._weight = weight

    @property
    def weight(self) -> float:
        """The coefficient of the orthogonality term (fixed at construction)."""
        return self._weight

    def _terms(self, loss: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        weights = self._weights()
        total = _sum([_orthogonality(w) for w in weights], loss)
        return self._weight * total, {"orthogonality": total}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weight={self._weight}, layers={len(self._layers)}"
            f"{', removed' if self._removed else ''})"
        )
