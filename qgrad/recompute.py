"""Segment recomputation for the exact penalty's double backward: the forward's saved tensors of chosen
segments are dropped and recomputed when a backward needs them.

The exact gradient of a gradient-norm penalty keeps the forward's saved tensors alive through a first backward
(``create_graph=True``), which saves more of them, and a double backward, which meanwhile accumulates a
gradient for each of them: about 2x a plain step's peak memory. :class:`SegmentRecomputation` lowers that with
saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``):

* **forward**: while a segment runs (a module, or a chain of modules each called on the previous one's
  output), every tensor that autograd saves and that is at least ``min_numel`` elements, not a parameter and
  not one of the segment's inputs becomes a handle ``(call, k)``: the ``k``-th tensor saved in that call of
  the segment. The segment's inputs (its boundary), the random number generator states and the autocast
  setting are kept.
* **unpacking a handle** (in any backward) runs the segment again from its boundary, with grad enabled (so
  that autograd saves the same tensors in the same order; they are captured instead of kept), the same
  random numbers (dropout masks), the same autocast setting, and the segment's buffers put back afterwards
  (BatchNorm running statistics are updated once, by the real forward). The recomputed tensors of one
  segment are cached: the backward visits a segment's nodes one after the other, so each pass over the model
  recomputes each segment once.
* **first backward**: its nodes save some of the forward's tensors again (qgrad's convolution and BatchNorm
  backward keep their inputs for the double backward). :meth:`SegmentRecomputation.first_backward` is the
  context to run it in: a tensor that is a recomputed one (same memory, shape, strides, dtype) is saved as its
  handle again instead of being kept.

The recomputed tensors are bit for bit the originals for deterministic kernels (the same ops on the same
inputs), so the gradients are those of the step without recomputation. The cost is one forward of every
segment in each of the three passes over the model that read saved tensors (first backward, and both halves of
the double backward): about +1.0-1.4x a plain step. Measured on ResNet-18 (width 0.25, batch 32, CPU, its
eight residual blocks as segments): see :class:`qgrad.penalties.L1GradPenalty` (``recompute``).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["SegmentRecomputation"]

CAPTURE_REFUSED = (
    "L1GradPenalty(recompute=...) recomputes segments in Python hooks during the backward, which a CUDA "
    "graph's replay would not run; capture the penalty without recompute"
)
_MIN_NUMEL = 4096  # smaller saved tensors (statistics, tiny maps) are kept: dropping them would save little


class _Handle:
    """A saved tensor that was dropped: the ``index``-th tensor saved in call ``call`` of a segment in the
    forward numbered ``forward``."""

    __slots__ = ("forward", "call", "index")

    def __init__(self, forward: int, call: int, index: int):
        self.forward, self.call, self.index = forward, call, index


class _Call:
    """What running one segment again needs: its chain, inputs, random number states and autocast setting."""

    __slots__ = ("chain", "args", "kwargs", "rng", "autocast", "output", "saved")

    def __init__(self, chain, args, kwargs, rng, autocast):
        self.chain, self.args, self.kwargs, self.rng, self.autocast = chain, args, kwargs, rng, autocast
        self.output: Optional[weakref.ref] = None  # the segment's output, while something else holds it
        self.saved: List[Optional[tuple]] = []  # (shape, dtype) of each dropped tensor, None for kept ones


def _key(t: torch.Tensor) -> Tuple[int, Tuple[int, ...], Tuple[int, ...], torch.dtype]:
    return t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype


def _detached(a):
    if isinstance(a, torch.Tensor):
        return a.detach().requires_grad_(a.requires_grad)
    return a


RngState = Tuple[torch.Tensor, Dict[int, torch.Tensor]]


def rng_state(cuda_devices: Iterable[int]) -> RngState:
    """The CPU generator's state and that of each CUDA device in ``cuda_devices`` (by index)."""
    return torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices}


@contextlib.contextmanager
def replayed_rng(state: RngState):
    """Run the block with the generators set to ``state`` (:func:`rng_state`), then put back what they were:
    the same random numbers (dropout masks) as when the state was taken, and none consumed."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=list(cuda)):
        torch.set_rng_state(cpu)
        for index, s in cuda.items():
            torch.cuda.set_rng_state(s, index)
        yield


def _check_chains(model: nn.Module, segments: Iterable) -> List[Tuple[nn.Module, ...]]:
    if isinstance(segments, nn.Module):
        raise TypeError("recompute must be a list of modules (or of chains of modules), got a single module; "
                        "pass [module]")
    try:
        items = list(segments)
    except TypeError:
        raise TypeError(f"recompute must be a list of modules, got {type(segments).__name__}") from None
    if not items:
        raise ValueError("recompute is empty; give at least one module (or None for no recomputation)")
    names = {id(m): n or type(model).__name__ for n, m in model.named_modules()}
    chains, seen = [], set()
    for item in items:
        chain = (item,) if isinstance(item, nn.Module) else None
        if isinstance(item, (list, tuple)):
            chain = tuple(item)
        if not chain or not all(isinstance(m, nn.Module) for m in chain):
            raise TypeError(
                "each entry of recompute must be a module or a non-empty list of modules called one after "
                f"the other, got {item!r}"
            )
        for m in chain:
            if id(m) not in names:
                raise ValueError(f"recompute names a {type(m).__name__} that is not a submodule of the model")
            if id(m) in seen:
                raise ValueError(f"recompute names module {names[id(m)]!r} twice")
            seen.add(id(m))
        chains.append(chain)
    # a module inside another segment would open a segment within a segment
    for chain in chains:
        for m in chain:
            for inner in m.modules():
                if inner is not m and id(inner) in seen:
                    raise ValueError(
                        f"recompute names {names[id(inner)]!r}, which is inside {names[id(m)]!r}, also "
                        "named; segments cannot nest"
                    )
    return chains


class SegmentRecomputation:
    """Drops the large saved tensors of the given segments in the forward and recomputes them on demand.

    Args:
        model: the network (the segments must be its submodules; its parameters are never dropped).
        segments: modules, or lists of modules called one after the other (each on the previous one's
            output, the first on the segment's inputs), whose forwards are recomputed. Every call of a
            segment in a forward is recomputed on its own, so a module that runs twice is fine. Segments
            cannot nest.
        min_numel: saved tensors with fewer elements are kept.

    It acts only while :attr:`active` is True (the penalty sets it for the forwards of penalized steps) and
    grad mode is on. :meth:`reset` releases everything of a step (boundaries, the cache); :meth:`remove`
    takes the hooks off.
    """

    def __init__(self, model: nn.Module, segments: Iterable, min_numel: int = _MIN_NUMEL):
        self._chains = _check_chains(model, segments)
        self._model = model
        self._min_numel = min_numel
        self.active = False
        self.recomputing = False
        self._handles = []
        for chain in self._chains:
            self._handles.append(chain[0].register_forward_pre_hook(self._opener(chain), with_kwargs=True))
            for i, m in enumerate(chain):
                if i:
                    self._handles.append(m.register_forward_pre_hook(self._linker(chain, i)))
                self._handles.append(m.register_forward_hook(self._closer(chain, i), always_call=True))
        self._handles.append(model.register_forward_hook(self._at_end, always_call=True))
        self.reset()

    # ------------------------------------------------------------------ step state
    def reset(self) -> None:
        """Release the step's boundaries, recomputed tensors and handles (the next forward starts anew)."""
        if getattr(self, "_open", None) is not None:  # a forward that raised inside a segment
            self._close()
        self._forward = getattr(self, "_forward", -1) + 1
        self._calls: List[_Call] = []
        self._kept: set = set()  # data pointers saved as themselves: parameters and segment inputs
        self._cache: Optional[Tuple[int, List[Optional[torch.Tensor]]]] = None
        self._alias: Dict[tuple, _Handle] = {}
        self._open: Optional[Tuple[Tuple[nn.Module, ...], Any]] = None  # the running segment, its context
        self._last: Optional[torch.Tensor] = None  # output of the running chain's latest module

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    # ------------------------------------------------------------------ forward hooks
    def _opener(self, chain):
        def hook(module, args, kwargs):
            if not self.active or self.recomputing or self._open is not None or not torch.is_grad_enabled():
                return None
            if not self._calls:
                self._kept = {p.data_ptr() for p in self._model.parameters()}
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(CAPTURE_REFUSED)
            self._kept.update(t.data_ptr() for t in tensors)
            devices = sorted({t.device.index for t in tensors if t.is_cuda})
            device = tensors[0].device.type if tensors else "cpu"
            autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            self._calls.append(_Call(chain, args, kwargs, rng_state(devices), autocast))
            context = saved_tensors_hooks(self._pack, self._unpack)
            context.__enter__()
            self._open = (chain, context)
            return None

        return hook

    def _linker(self, chain, i):
        def hook(module, args):
            if self._open is None or self._open[0] is not chain:
                return None
            if len(args) != 1 or args[0] is not self._last:
                self._close()
                raise RuntimeError(
                    f"recompute: module {i} of a chain ({type(module).__name__}) did not get the output of "
                    f"module {i - 1} as its only input; a chain must be modules called one after the other"
                )
            return None

        return hook

    def _closer(self, chain, i):
        # always_call: also after a forward that raised, so that the saved-tensor hooks never stay on
        def hook(module, args, output):
            if self._open is None or self._open[0] is not chain:
                return None
            if i == len(chain) - 1 or not isinstance(output, torch.Tensor):
                if isinstance(output, torch.Tensor):
                    self._calls[-1].output = weakref.ref(output)
                self._close()
            else:
                self._last = output
            return None

        return hook

    def _at_end(self, module, args, output):
        # a chain whose later modules did not run would take in the rest of the forward, which running the
        # chain again cannot reproduce
        if self._open is not None:
            names = [type(m).__name__ for m in self._open[0]]
            self._close()
            raise RuntimeError(
                f"recompute: the chain {names} was still open at the end of the model's forward: its modules "
                "must run one right after the other, each on the previous one's output"
            )

    def _close(self) -> None:
        _, context = self._open
        self._open, self._last = None, None
        context.__exit__(None, None, None)

    # ------------------------------------------------------------------ saved tensors
    def _droppable(self, t: torch.Tensor) -> bool:
        return (t.numel() >= self._min_numel and not isinstance(t, nn.Parameter)
                and t.data_ptr() not in self._kept)

    def _pack(self, t: torch.Tensor):
        call = self._calls[-1]
        k = len(call.saved)  # the position of t among the tensors this call saves
        if not self._droppable(t):
            call.saved.append(None)
            return t
        call.saved.append((t.shape, t.dtype))
        return _Handle(self._forward, len(self._calls) - 1, k)

    def _unpack(self, saved):
        if not isinstance(saved, _Handle):
            return saved
        if saved.forward != self._forward:
            raise RuntimeError(
                "recompute: this backward needs tensors of a forward whose segments were released (a new "
                "forward with grad enabled, penalty.clear() or penalty.backward() came in between)"
            )
        return self._recomputed(saved.call)[saved.index]

    def _repack(self, t: torch.Tensor):
        return self._alias.get(_key(t), t) if self._alias else t

    @contextlib.contextmanager
    def first_backward(self):
        """The context of the first backward (``create_graph=True``): forward tensors that it saves again are
        saved as their handles."""
        with saved_tensors_hooks(self._repack, self._unpack):
            yield

    # ------------------------------------------------------------------ recomputation
    def _recomputed(self, i: int) -> List[Optional[torch.Tensor]]:
        if self._cache is not None and self._cache[0] == i:
            return self._cache[1]
        self._cache, self._alias = None, {}  # one segment at a time: release the previous one first
        call = self._calls[i]
        captured: List[Optional[torch.Tensor]] = []

        def capture(t):
            captured.append(t.detach() if self._droppable(t) else None)

        def refuse(_):
            raise RuntimeError("the recomputation's own graph is not differentiated")

        buffers = [b for m in call.chain for b in m.buffers()]
        saved = [b.detach().clone() for b in buffers]
        device, enabled, dtype = call.autocast
        self.recomputing = True
        try:
            with replayed_rng(call.rng):
                with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled), \
                        saved_tensors_hooks(capture, refuse):
                    out = call.chain[0](*[_detached(a) for a in call.args],
                                        **{k: _detached(v) for k, v in call.kwargs.items()})
                    for m in call.chain[1:]:
                        out = m(out)
                # the output is usually the next segment's input, kept anyway: its recomputed copy (saved by
                # the segment's last op, a ReLU say) is replaced by the original
                original = call.output() if call.output is not None else None
                if (isinstance(out, torch.Tensor) and original is not None
                        and _key(original)[1:] == _key(out)[1:]):
                    ptr = out.data_ptr()
                    captured = [original if t is not None and t.data_ptr() == ptr else t for t in captured]
                else:
                    original = None
                del out
        finally:
            self.recomputing = False
            with torch.no_grad():
                # .data: the restore must not bump version counters that the step's graph may check
                for b, s in zip(buffers, saved):
                    b.data.copy_(s)
        if [None if t is None else (t.shape, t.dtype) for t in captured] != call.saved:
            raise RuntimeError(
                f"recompute: running segment {[type(m).__name__ for m in call.chain]} again saved other "
                "tensors than its forward did; a segment's forward must do the same on the same input (no "
                "data-dependent branches), and a chain's modules must run one right after the other"
            )
        # the original output is not aliased: a first-backward node that saves it keeps it (alive anyway)
        self._alias = {
            _key(t): _Handle(self._forward, i, k)
            for k, t in enumerate(captured)
            if t is not None and t is not original
        }
        self._cache = (i, captured)
        return captured
