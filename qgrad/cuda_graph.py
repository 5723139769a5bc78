"""``GraphedStep``: the forward and backward of a training step captured once as a CUDA graph, then replayed.

Why: a penalized step runs a forward, a backward that builds a graph and a backward through that graph --
about 1,500 kernel launches for a ResNet-18, each preceded by Python, the autograd engine and the launch
itself on the host. At CIFAR sizes a fast GPU finishes the kernels long before the host has issued them (an
H100 at batch 128: 25 ms of kernels in a 48 ms exact step). A CUDA graph records the kernels of one step
and replays them with a single launch, so a replayed step costs its kernels only.

How: the first ``warmup`` calls run ``fn`` as usual (on a side stream, so that lazy initialization such as
cuDNN's algorithm search stays out of the graph). The next call captures ``fn`` on copies of its inputs
("static" inputs), then replays the graph; every later call copies its inputs into the static ones and
replays. What ``fn`` returns is returned by every call as the same tensors, overwritten by the next call.
The gradients ``fn``'s backward writes are allocated by the capture and overwritten in place by every replay;
after each call ``p.grad`` is (again) that tensor for every parameter ``p`` the step differentiates, so the
usual ``optimizer.zero_grad(set_to_none=True)`` / ``optimizer.step()`` around the call keep working.

What must hold for ``fn`` (CUDA's rules for graphs, in practice):

* the same kernels on every call: no Python control flow on tensor values, no ``.item()``, ``.tolist()``,
  ``print(tensor)`` or other host synchronizations, no host-to-device copies of fresh CPU tensors;
* it computes gradients from scratch: every call *replaces* ``.grad`` (no accumulation across calls);
* the optimizer step stays outside (learning-rate schedules change Python floats that a graph would freeze).

:class:`qgrad.L1GradPenalty` in its exact mode with ``every=1`` satisfies these when called with
``sync=False``; ``every > 1`` alternates two kinds of step and is refused under capture. A call whose
inputs differ in shape, dtype or device from the captured ones (the last, smaller batch of an epoch) runs
``fn`` eagerly instead.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch

__all__ = ["GraphedStep", "graph_safe_launches"]

# GraphedStep calls in their warm-up or capture: kernels then launch as they will inside the graph, so that
# the capture finds every kernel already compiled (Triton compiles a kernel at its first launch for each
# specialization, which a capture cannot record)
_preparing = 0


def graph_safe_launches() -> bool:
    """Whether a CUDA op should launch in a form a CUDA graph can record (no host-to-device copy of a table
    made on the host): while a graph is captured, and during a :class:`GraphedStep`'s warm-up calls."""
    return _preparing > 0 or torch.cuda.is_current_stream_capturing()


def _signature(inputs: Tuple[torch.Tensor, ...]) -> Tuple:
    return tuple((t.shape, t.dtype, t.device, t.stride()) for t in inputs)


class GraphedStep:
    """Calls ``fn(*inputs)`` through a CUDA graph captured at the ``warmup + 1``-th call.

    Args:
        fn: the step's forward and backward, ``fn(*inputs) -> outputs`` (a tensor, or a tuple / list / dict
            of tensors, e.g. the statistics of ``penalty.backward(loss, sync=False)``). See the module
            docstring for what it may do.
        params: the tensors whose ``.grad`` the step writes (e.g. ``model.parameters()``).
        warmup: eager calls before the capture (at least 1: cuDNN, cuBLAS and Triton initialize lazily, and
            their first calls must not be recorded).

    Every input must be a CUDA tensor. Example::

        penalty = L1GradPenalty(model, 0.05, 0.05)

        def compute(x, y):
            return penalty.backward(F.cross_entropy(model(x), y), sync=False)

        step = GraphedStep(compute, model.parameters())
        for x, y in loader:
            stats = step(x, y)         # forward, penalty, backward; p.grad is set
            optimizer.step()
    """

    def __init__(self, fn: Callable[..., Any], params: Iterable[torch.Tensor], warmup: int = 3):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, got a single tensor; pass [tensor]")
        self._params: List[torch.Tensor] = list(params)
        if not all(isinstance(p, torch.Tensor) for p in self._params):
            raise TypeError("params must be an iterable of tensors")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self._fn = fn
        self._warmup = warmup
        self._calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._signature: Optional[Tuple] = None
        self._static_inputs: Tuple[torch.Tensor, ...] = ()
        self._outputs: Any = None
        self._grads: List[Tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def captured(self) -> bool:
        """Whether the graph has been captured (later calls with the same input shapes replay it)."""
        return self.graph is not None

    def _clear_grads(self) -> None:
        for p in self._params:
            p.grad = None

    def _eager(self, inputs: Tuple[torch.Tensor, ...], side_stream: bool) -> Any:
        self._clear_grads()
        if not side_stream:
            return self._fn(*inputs)
        stream = torch.cuda.Stream(inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(stream):
            out = self._fn(*inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(stream)
        return out

    def _capture(self, inputs: Tuple[torch.Tensor, ...]) -> None:
        self._static_inputs = tuple(t.detach().clone() for t in inputs)
        self._clear_grads()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._outputs = self._fn(*self._static_inputs)
        self._grads = [(p, p.grad) for p in self._params if p.grad is not None]
        self.graph = graph
        self._signature = _signature(inputs)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        global _preparing
        if not inputs:
            raise ValueError("GraphedStep needs at least one input tensor")
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"input {i} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_cuda:
                raise ValueError(
                    f"input {i} is on {t.device}; GraphedStep replays CUDA graphs, on CUDA tensors"
                )
        self._calls += 1
        if self.graph is None:
            _preparing += 1
            try:
                if self._calls <= self._warmup:
                    return self._eager(inputs, side_stream=True)
                self._capture(inputs)
            finally:
                _preparing -= 1
        elif _signature(inputs) != self._signature:
            return self._eager(inputs, side_stream=False)
        else:
            for static, t in zip(self._static_inputs, inputs):
                static.copy_(t, non_blocking=True)
        self.graph.replay()
        for p, g in self._grads:
            p.grad = g
        return self._outputs
