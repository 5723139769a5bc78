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

import math
import numbers
import weakref
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["L1GradPenalty", "L2GradPenalty", "OrthogonalityPenalty"]

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_LAYER_NAMES = "nn.Conv1d/2d/3d or nn.Linear"


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


def _floats(tensors: Sequence[torch.Tensor]) -> List[float]:
    # one device-to-host transfer for all statistics, in the widest dtype among them
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.stack([t.detach().reshape(()).to(dtype) for t in tensors]).tolist()


# --------------------------------------------------------------------------------------------- hooks
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
            owner._fresh = True


class _RecordHook(_PenaltyHook):
    """Pre-hook on a Conv/Linear layer: records the layer's input."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        owner = self._owner()
        if owner is not None:
            owner._record(module, args[0] if args else kwargs.get("input"))


def _remove_handles(handles: List[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


# --------------------------------------------------------------------------------------------- base class
class _Penalty:
    """Shared machinery: layer selection, explicit ``params``, activation recording, ``backward``, ``remove``.

    Subclasses implement ``_terms(loss) -> (reg, {stat_name: unweighted term})`` where ``reg`` is the
    weighted, differentiable total.
    """

    def __init__(
        self, model: nn.Module, params: Optional[Iterable[torch.Tensor]], record: bool, min_dim: int = 0
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
        if record:
            self._handles.append(model.register_forward_pre_hook(_StartHook(self)))
            for layer in layers:
                self._handles.append(layer.register_forward_pre_hook(_RecordHook(self), with_kwargs=True))
        # dropping the last reference to the penalty takes its hooks off the model
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)

    # ------------------------------------------------------------------ recording
    def _record(self, module: nn.Module, x) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return
        if not isinstance(x, torch.Tensor) or not x.requires_grad:
            return
        if self._fresh:  # first tensor of a new forward pass: release the previous recording
            self._records, self._record_ids = [], set()
            self._fresh = False
        if id(x) not in self._record_ids:  # ids are stable while the list holds the tensors
            self._record_ids.add(id(x))
            self._records.append(x)

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

    def _terms(self, loss: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """The weighted penalty for ``loss``: a differentiable 0-d tensor to add to the loss."""
        self._check_usable()
        _check_loss(loss)
        return self._terms(loss)[0]

    def backward(self, loss: torch.Tensor) -> Dict[str, float]:
        """``(loss + penalty).backward()`` in one call; releases the recorded activations afterwards.

        Returns floats ``loss``, ``penalty`` (the weighted total) and the unweighted terms (see the class).
        No forward pass is run, so BatchNorm running statistics are updated once per step, by the caller's
        forward.
        """
        self._check_usable()
        _check_loss(loss)
        reg, terms = self._terms(loss)
        try:
            (loss + reg).backward()
        finally:
            self.clear()
        values = _floats([loss, reg, *terms.values()])
        return dict(zip(["loss", "penalty", *terms.keys()], values))

    def remove(self) -> None:
        """Take every hook of this penalty off the model and release the recording. Idempotent; afterwards the
        penalty can no longer be evaluated."""
        self._finalizer()
        self.clear()
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# --------------------------------------------------------------------------------------------- gradient norms
class _GradNormPenalty(_Penalty):
    """``weight * sum_W ||dL/dW||_p + activation * sum_y ||dL/dy||_p`` for ``p = self._ord``.

    The norm is taken per tensor and the norms are summed, as in Eq. 3 of Alizadeh et al. Both halves come
    from one ``torch.autograd.grad`` call with ``create_graph=True``; a half whose coefficient is 0 is not
    computed, and ``activation=0`` registers no hooks. Tensors the loss does not depend on count as zero
    gradients.
    """

    _ord: float
    _suffix: str

    def __init__(
        self,
        model: nn.Module,
        weight: float = 0.05,
        activation: float = 0.05,
        params: Optional[Iterable[torch.Tensor]] = None,
    ):
        weight = _check_coefficient("weight", weight)
        activation = _check_coefficient("activation", activation)
        super().__init__(model, params, record=activation > 0)
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

    def _norms(self, grads: Sequence[Optional[torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
        # vector_norm's derivative is sign(g) for ord=1 and g/||g|| for ord=2, both taken as 0 at g = 0
        # (no eps needed: an all-zero gradient gets a zero subgradient rather than NaN)
        norms = [
            torch.linalg.vector_norm(g, ord=self._ord, dtype=_accumulation_dtype(g))
            for g in grads
            if g is not None
        ]
        return _sum(norms, like)

    def _terms(self, loss: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        weights = self._weights() if self._weight > 0 else []
        acts = list(self._records) if self._activation > 0 else []
        if self._activation > 0 and not acts:
            raise RuntimeError(
                f"{type(self).__name__} has no recorded activations: run a forward pass in train mode "
                "with grad enabled before calling the penalty (or construct it with activation=0)"
            )
        zero = loss.new_zeros((), dtype=_accumulation_dtype(loss))
        if not weights and not acts:
            return zero, {f"weight_{self._suffix}": zero, f"activation_{self._suffix}": zero}
        grads = torch.autograd.grad(loss, weights + acts, create_graph=True, allow_unused=True)
        w_grads, a_grads = grads[: len(weights)], grads[len(weights) :]
        if acts and all(g is None for g in a_grads):
            raise RuntimeError(
                "the loss does not depend on the activations recorded in the last forward pass; run a "
                "forward pass in train mode with grad enabled before calling the penalty, and compute the "
                "loss from its output"
            )
        w_norm = self._norms(w_grads, loss) if weights else zero
        a_norm = self._norms(a_grads, loss) if acts else zero
        if weights and acts:
            reg = self._weight * w_norm + self._activation * a_norm
        elif weights:
            reg = self._weight * w_norm
        else:
            reg = self._activation * a_norm
        self._fresh = True  # the recording is consumed: a later recorded tensor starts a new one
        return reg, {f"weight_{self._suffix}": w_norm, f"activation_{self._suffix}": a_norm}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weight={self._weight}, activation={self._activation}, "
            f"layers={len(self._layers)}{', removed' if self._removed else ''})"
        )


class L1GradPenalty(_GradNormPenalty):
    """The gradient-l1 penalty of Alizadeh et al. (ICLR 2020), Eq. 3.

    ``R = weight * sum_W ||dL/dW||_1 + activation * sum_y ||dL/dy||_1``

    Args:
        model: the network. Its ``nn.Conv1d/2d/3d`` and ``nn.Linear`` layers (subclasses included, e.g.
            qgrad's quantized layers) supply the weights ``W`` and, through forward pre-hooks, the
            activations ``y`` (their inputs; see the module docstring for the recording rules).
        weight: ``lambda_w >= 0``. 0 skips the weight gradients entirely.
        activation: ``lambda_y >= 0``. 0 skips the activation gradients and registers no hooks.
        params: explicit tensors (leaf, requiring grad) to use as ``W`` instead of the layer weights.

    ``penalty(loss)`` returns ``R`` (0-d, differentiable); ``penalty.backward(loss)`` runs
    ``(loss + R).backward()`` and returns floats ``loss``, ``penalty``, ``weight_l1``, ``activation_l1`` (the
    unweighted sums of norms; 0.0 for a half whose coefficient is 0). ``remove()`` detaches the hooks.
    """

    _ord = 1.0
    _suffix = "l1"


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
