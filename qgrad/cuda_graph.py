"""``GraphedStep``: the forward and backward of a training step captured once as a CUDA graph, then replayed.

Why: a penalized step runs a forward, a backward that builds a graph and a backward through that graph --
about 1,500 kernel launches for a ResNet-18, each preceded by Python, the autograd engine and the launch
itself on the host. At CIFAR sizes a fast GPU finishes the kernels long before the host has issued them (an
H100 at batch 128: 25 ms of kernels in a 49 ms exact step). A CUDA graph records the kernels of one step
and replays them with a single launch, so a replayed step costs its kernels only.

How: the first ``warmup`` calls run ``fn`` as usual (on a side stream, so that lazy initialization such as
cuDNN's algorithm search stays out of the graph; qgrad's kernels launch there as they will in the graph, so
that the capture compiles nothing). The next call captures ``fn`` on copies of its inputs ("static"
inputs; in ``thread_local`` mode, so that other threads, e.g. a DataLoader pinning memory, may go on using
CUDA meanwhile), then replays the graph; every later call copies its inputs into the static ones and
replays. What ``fn`` returns is returned by every call as the same tensors, overwritten by the next call.
The gradients ``fn``'s backward writes are allocated by the capture and overwritten in place by every replay;
after each call ``p.grad`` is (again) that tensor for every parameter ``p`` the step differentiates, so the
usual ``optimizer.zero_grad(set_to_none=True)`` / ``optimizer.step()`` around the call keep working.

What must hold for ``fn`` (CUDA's rules for graphs, in practice):

* the same kernels on every call: no Python control flow on tensor values, no ``.item()``, ``.tolist()``,
  ``print(tensor)`` or other host synchronizations, no host-to-device copies of fresh CPU tensors;
* it computes gradients from scratch: every call *replaces* ``.grad`` (no accumulation across calls);
* the optimizer step stays outside (learning-rate schedules change Python floats that a graph would freeze).

:class:`qgrad.L1GradPenalty` with ``every=1`` (exact or worst-case) satisfies these when called with
``sync=False``. With ``every > 1`` it decides in Python which kind of step comes next, which a replay cannot
do, and it refuses to be captured; :class:`GraphedStep` shows how to get the same steps from two graphs. A
call whose inputs differ in shape, dtype or device from the captured ones (the last, smaller batch of an
epoch) runs ``fn`` eagerly instead.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["GraphedStep", "graph_safe_launches"]

# GraphedStep calls in their warm-up or capture: kernels then launch as they will inside the graph, so that
# the capture finds every kernel already compiled (Triton compiles and loads a kernel at its first launch for
# each specialization; a capture during which that happened failed on an H100)
_preparing = 0


def graph_safe_launches() -> bool:
    """Whether a CUDA op should launch in a form a CUDA graph can record (no host-to-device copy of a table
    made on the host): while a graph is captured, and during a :class:`GraphedStep`'s warm-up calls."""
    return _preparing > 0 or torch.cuda.is_current_stream_capturing()


def _signature(inputs: Tuple[torch.Tensor, ...]) -> Tuple:
    return tuple((t.shape, t.dtype, t.device, t.stride()) for t in inputs)


class _Variant:
    """One kind of step of a :class:`GraphedStep`: its function, calls so far, and once captured its graph,
    static inputs, outputs and gradients."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.signature: Optional[Tuple] = None
        self.static_inputs: Tuple[torch.Tensor, ...] = ()
        self.outputs: Any = None
        self.grads: List[Tuple[torch.Tensor, torch.Tensor]] = []


class GraphedStep:
    """Calls ``fn(*inputs)`` through a CUDA graph captured at the ``warmup + 1``-th call.

    Args:
        fn: the step's forward and backward, ``fn(*inputs) -> outputs`` (a tensor, or a tuple / list / dict
            of tensors, e.g. the statistics of ``penalty.backward(loss, sync=False)``). See the module
            docstring for what it may do. A list of functions makes one graph per function (the kinds of
            step of a training loop that alternates them); ``variant=i`` picks ``fn[i]`` at each call.
        params: the tensors whose ``.grad`` the step writes (e.g. ``model.parameters()``).
        warmup: eager calls of each function before its capture (at least 1: cuDNN, cuBLAS and Triton
            initialize lazily, and their first calls must not be recorded).

    Every input must be a CUDA tensor. Example::

        penalty = L1GradPenalty(model, 0.05, 0.05)

        def compute(x, y):
            return penalty.backward(F.cross_entropy(model(x), y), sync=False)

        step = GraphedStep(compute, model.parameters())
        for x, y in loader:
            stats = step(x, y)         # forward, penalty, backward; p.grad is set
            optimizer.step()

    ``L1GradPenalty(every=k)`` decides in Python which kind of step comes next, which a replay cannot; the
    same steps come from ``L1GradPenalty(model, k * weight, k * activation)`` on every k-th step and a plain
    ``loss.backward()`` in between, as two functions; the plain one runs inside ``penalty.plain_steps()``,
    so that its graph holds torch's own BatchNorm and convolution kernels, as the plain calls of
    ``every=k`` run, and not those of the penalty's twins::

        penalty = L1GradPenalty(model, k * 0.05, k * 0.05)

        def penalized(x, y):
            return penalty.backward(F.cross_entropy(model(x), y), sync=False)

        def plain(x, y):
            with penalty.plain_steps():
                F.cross_entropy(model(x), y).backward()

        step = GraphedStep([penalized, plain], model.parameters())
        for i, (x, y) in enumerate(loader):
            step(x, y, variant=0 if i % k == 0 else 1)
            optimizer.step()
    """

    def __init__(
        self,
        fn: Union[Callable[..., Any], Sequence[Callable[..., Any]]],
        params: Iterable[torch.Tensor],
        warmup: int = 3,
    ):
        fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
        if not fns:
            raise ValueError("fn must be a function or a non-empty list of functions")
        for f in fns:
            if not callable(f):
                raise TypeError(f"fn must be callable (or a list of callables), got {type(f).__name__}")
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, got a single tensor; pass [tensor]")
        self._params: List[torch.Tensor] = list(params)
        if not all(isinstance(p, torch.Tensor) for p in self._params):
            raise TypeError("params must be an iterable of tensors")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self._variants = [_Variant(f) for f in fns]
        self._warmup = warmup

    @property
    def graphs(self) -> List[Optional[torch.cuda.CUDAGraph]]:
        """The graph of each function, None until it is captured."""
        return [v.graph for v in self._variants]

    @property
    def captured(self) -> bool:
        """Whether every function's graph has been captured (later calls with those input shapes replay)."""
        return all(v.graph is not None for v in self._variants)

    def _clear_grads(self) -> None:
        for p in self._params:
            p.grad = None

    def _eager(self, v: _Variant, inputs: Tuple[torch.Tensor, ...], side_stream: bool) -> Any:
        self._clear_grads()
        if not side_stream:
            return v.fn(*inputs)
        stream = torch.cuda.Stream(inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(stream):
            out = v.fn(*inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(stream)
        return out

    def _capture(self, v: _Variant, inputs: Tuple[torch.Tensor, ...]) -> None:
        v.static_inputs = tuple(t.detach().clone() for t in inputs)
        self._clear_grads()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread allocating pinned memory during the capture would
        # invalidate it in the default "global" mode; what this thread runs is restricted as before
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                v.outputs = v.fn(*v.static_inputs)
        except Exception as exc:
            self._clear_grads()  # gradients of a failed capture hold nothing
            raise RuntimeError(
                f"capturing the step as a CUDA graph failed ({type(exc).__name__}: {exc}). The step must "
                "launch the same kernels at every call, without host synchronizations (.item(), .tolist(), "
                "printing a tensor) or copies of CPU tensors to the GPU; see qgrad.cuda_graph"
            ) from exc
        v.grads = [(p, p.grad) for p in self._params if p.grad is not None]
        v.graph = graph
        v.signature = _signature(inputs)

    def __call__(self, *inputs: torch.Tensor, variant: int = 0) -> Any:
        global _preparing
        count = len(self._variants)
        if isinstance(variant, bool) or not isinstance(variant, int) or not 0 <= variant < count:
            raise ValueError(f"variant must be an int in [0, {count}), got {variant!r}")
        if not inputs:
            raise ValueError("GraphedStep needs at least one input tensor")
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"input {i} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_cuda:
                raise ValueError(
                    f"input {i} is on {t.device}; GraphedStep replays CUDA graphs, on CUDA tensors"
                )
        v = self._variants[variant]
        v.calls += 1
        if v.graph is None:
            _preparing += 1
            try:
                if v.calls <= self._warmup:
                    return self._eager(v, inputs, side_stream=True)
                self._capture(v, inputs)
            finally:
                _preparing -= 1
        elif _signature(inputs) != v.signature:
            return self._eager(v, inputs, side_stream=False)
        else:
            for static, t in zip(v.static_inputs, inputs):
                static.copy_(t, non_blocking=True)
        v.graph.replay()
        for p, g in v.grads:
            p.grad = g
        return v.outputs
