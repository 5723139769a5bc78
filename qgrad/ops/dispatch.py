"""Backend dispatch for the fake-quantization kernels.

Backends (``qgrad.backends()`` lists which can run here and why not):

* ``torch``: the pure-PyTorch reference (:mod:`qgrad.reference`); every device, every float dtype.
* ``cpp``: the OpenMP C++ kernels of the compiled extension ``qgrad._C`` (CPU tensors).
* ``cuda``: the CUDA kernels of ``qgrad._C`` when it was compiled with CUDA (CUDA tensors).
* ``triton``: the Triton kernels of ``qgrad.kernels`` (CUDA tensors; on a CPU only under
  ``TRITON_INTERPRET=1`` and only when asked for by name, as the interpreter is a test vehicle).

Choice, first match wins: :func:`use_backend` (a context manager, per thread), the environment variable
``QGRAD_BACKEND=auto|torch|cpp|cuda|triton``, then ``auto``. A backend asked for by name that cannot run the
given tensor raises ``RuntimeError`` with the reason and the fix. ``auto`` times the backends that can run on
the tensor's device once per process (a 1M-element forward + backward each) and keeps the fastest; when no
compiled backend is available there it falls back to ``torch`` with one warning. float64 inputs always run the
reference, which exists for ``gradcheck``.

Every backend provides the same two functions (validated arguments, float32 ``scale``/``zero_point``, ``axis``
``None`` or non-negative, ``grad_scale`` a float)::

    fwd(x, scale, zero_point, quant_min, quant_max, axis) -> y
    bwd(dy, x, scale, zero_point, quant_min, quant_max, axis, grad_scale, need_dscale, need_dzp)
        -> (dx, dscale or None, dzp or None)
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import torch

from qgrad.ops.layout import dense_order, inverse_order
from qgrad.reference import fake_quant_backward_ref, fake_quant_ref

__all__ = ["backends", "use_backend", "select_backend", "requested_backend", "Backend", "BACKEND_NAMES"]

BACKEND_NAMES = ("torch", "cpp", "cuda", "triton")
_ENV = "QGRAD_BACKEND"
_BUILD_HINT = "build it with `pip install --no-build-isolation .` in an environment where torch is installed"


class Backend(NamedTuple):
    name: str
    fwd: Callable
    bwd: Callable


# ----------------------------------------------------------------------------------------------- backends
def _torch_fwd(x, scale, zero_point, quant_min, quant_max, axis):
    return fake_quant_ref(x, scale, zero_point, quant_min, quant_max, axis)


def _torch_bwd(dy, x, scale, zero_point, quant_min, quant_max, axis, grad_scale, need_dscale, need_dzp):
    dx, ds, dz = fake_quant_backward_ref(dy, x, scale, zero_point, quant_min, quant_max, axis, grad_scale)
    return dx, (ds if need_dscale else None), (dz if need_dzp else None)


def _load_ext():
    try:
        from qgrad import _C
    except ImportError as exc:
        package = Path(__file__).resolve().parents[1]
        if (package.parent / "setup.py").is_file():
            # python -m qgrad or a script in the root of a checkout imports the checkout, not the installed copy
            return None, (
                f"qgrad was imported from the source tree {package.parent}, which holds no compiled extension "
                f"qgrad._C ({exc}); run from another directory to use an installed qgrad, or build the "
                "extension inside the checkout with `pip install --no-build-isolation -e .`"
            )
        return None, f"the compiled extension qgrad._C is not installed ({exc}); {_BUILD_HINT}"
    return _C, ""


def _ext_axis(axis: Optional[int], order: Optional[Tuple[int, ...]] = None) -> int:
    """The extension's channel axis: -1 for per-tensor; on the permuted view ``x.permute(order)``, where
    ``axis`` went."""
    if axis is None:
        return -1
    return axis if order is None else order.index(axis)


def _ext_backend(name: str) -> Tuple[Optional[Backend], str]:
    ext, why = _load_ext()
    if ext is None:
        return None, why
    if name == "cuda" and not getattr(ext, "with_cuda", False):
        return None, (
            "qgrad._C was compiled without CUDA kernels; rebuild it with a CUDA-enabled torch and the CUDA "
            "toolkit (CUDA_HOME) present: `pip install --no-build-isolation .`"
        )

    # the kernels read contiguous arrays: a dense x in another layout (channels-last, a transpose) runs on
    # its contiguous permuted view, and y / dx come back in x's layout, as from the other backends
    def fwd(x, scale, zero_point, quant_min, quant_max, axis):
        order = dense_order(x)
        if order is None:
            return ext.fake_quant_fwd(x, scale, zero_point, quant_min, quant_max, _ext_axis(axis))
        y = ext.fake_quant_fwd(
            x.permute(order), scale, zero_point, quant_min, quant_max, _ext_axis(axis, order)
        )
        return y.permute(inverse_order(order))

    def bwd(dy, x, scale, zero_point, quant_min, quant_max, axis, grad_scale, need_dscale, need_dzp):
        order = dense_order(x)
        if order is None:
            return ext.fake_quant_bwd(
                dy, x, scale, zero_point, quant_min, quant_max, _ext_axis(axis),
                grad_scale, need_dscale, need_dzp,
            )
        dx, dscale, dzp = ext.fake_quant_bwd(
            dy.permute(order), x.permute(order), scale, zero_point, quant_min, quant_max,
            _ext_axis(axis, order), grad_scale, need_dscale, need_dzp,
        )
        return dx.permute(inverse_order(order)), dscale, dzp

    return Backend(name, fwd, bwd), ""


def _triton_backend() -> Tuple[Optional[Backend], str]:
    try:
        from qgrad import kernels
    except ImportError as exc:
        return None, f"qgrad.kernels could not be imported ({exc}); reinstall qgrad"
    ok, why = kernels.is_available()
    if not ok:
        return None, why
    return Backend("triton", kernels.fake_quant_fwd, kernels.fake_quant_bwd), ""


_LOADED: Dict[str, Tuple[Optional[Backend], str]] = {}
_LOCK = threading.Lock()


def _load(name: str) -> Tuple[Optional[Backend], str]:
    with _LOCK:
        if name not in _LOADED:
            if name == "torch":
                _LOADED[name] = (Backend("torch", _torch_fwd, _torch_bwd), "")
            elif name in ("cpp", "cuda"):
                _LOADED[name] = _ext_backend(name)
            else:
                _LOADED[name] = _triton_backend()
        return _LOADED[name]


def device_problem(name: str, device: torch.device) -> str:
    """Why backend ``name`` cannot run tensors on ``device`` ('' when it can)."""
    if name == "cpp" and device.type != "cpu":
        return f"the cpp backend runs CPU tensors, got a tensor on {device}; use QGRAD_BACKEND=cuda or triton"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, got a tensor on {device}; use QGRAD_BACKEND=cpp"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"the triton backend runs CUDA tensors, got a tensor on {device} (on a CPU it only runs under "
            "TRITON_INTERPRET=1, set before qgrad is imported)"
        )
    return ""


def backends() -> Dict[str, Dict[str, object]]:
    """Which backends can run in this process: ``{name: {"available": bool, "reason": str}}``."""
    out = {}
    for name in BACKEND_NAMES:
        backend, why = _load(name)
        if backend is not None and name in ("cuda", "triton") and not torch.cuda.is_available():
            if name == "cuda" or os.environ.get("TRITON_INTERPRET") != "1":
                why = "no CUDA device is visible"
        out[name] = {"available": backend is not None and not why, "reason": why}
    return out


# ----------------------------------------------------------------------------------------------- choice
_override = threading.local()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the fake-quantization ops inside the ``with`` block on backend ``name`` (or ``"auto"``).

    Takes precedence over ``QGRAD_BACKEND``; applies to the current thread.
    """
    _check_name(name)
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def _check_name(name: str) -> None:
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"unknown qgrad backend {name!r}; choose one of auto, {', '.join(BACKEND_NAMES)}")


def requested_backend() -> str:
    """The backend name in force for this thread: use_backend(), else QGRAD_BACKEND, else "auto"."""
    name = getattr(_override, "name", None) or os.environ.get(_ENV, "auto").strip().lower() or "auto"
    _check_name(name)
    return name


_CPU_KERNELS: Dict[str, Tuple[Optional[Callable], str]] = {}


def cpu_kernel(name: str) -> Optional[Callable]:
    """``qgrad._C.<name>``, a CPU kernel of an op outside fake quantization (BatchNorm's double backward, the
    multi-tensor l1 norm), or None when the op should compute with PyTorch ops instead: the extension is not
    installed or predates the kernel, or the backend in force is ``torch``. Asking for ``cpp`` explicitly
    (``QGRAD_BACKEND=cpp`` / ``use_backend("cpp")``) when the kernel is missing raises."""
    requested = requested_backend()
    if requested == "torch":
        return None
    with _LOCK:
        if name not in _CPU_KERNELS:
            ext, why = _load_ext()
            kernel = getattr(ext, name, None) if ext is not None else None
            if ext is not None and kernel is None:
                why = f"the installed qgrad._C predates {name}; {_BUILD_HINT}"
            _CPU_KERNELS[name] = (kernel, why)
    kernel, why = _CPU_KERNELS[name]
    if kernel is None and requested == "cpp":
        raise RuntimeError(f"backend 'cpp' was requested but {why}")
    return kernel


def triton_kernel(name: str, device: torch.device) -> Optional[Callable]:
    """``qgrad.kernels.<name>``, the Triton launcher of an op outside fake quantization, for tensors on
    ``device``: used for CUDA tensors unless the backend in force is ``torch``, and for CPU tensors only when
    ``triton`` is requested explicitly (it then runs under Triton's interpreter). None where it is not used
    or Triton cannot run (the caller then uses :func:`cpu_kernel` or PyTorch ops); asking for ``triton``
    explicitly when it cannot run raises."""
    requested = requested_backend()
    if requested == "torch" or (device.type != "cuda" and requested != "triton"):
        return None
    from qgrad import kernels

    ok, why = kernels.is_available()
    if ok and device.type != "cuda":
        why = device_problem("triton", device)
        ok = not why
    if not ok:
        if requested == "triton":
            raise RuntimeError(f"backend 'triton' was requested but {why}")
        return None
    return getattr(kernels, name)


_AUTO: Dict[Tuple[str, Optional[int]], Backend] = {}
_WARNED: set = set()


def _time_backend(backend: Backend, device: torch.device) -> float:
    x = torch.randn(1 << 20, device=device)
    scale = torch.tensor(0.02, device=device)
    zp = torch.zeros((), device=device)
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        y = backend.fwd(x, scale, zp, -127, 127, None)
        backend.bwd(y, x, scale, zp, -127, 127, None, 1.0, True, False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _auto(device: torch.device) -> Backend:
    key = (device.type, device.index)
    if key in _AUTO:
        return _AUTO[key]
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    usable, reasons = [], []
    for name in candidates:
        backend, why = _load(name)
        why = why or device_problem(name, device)
        if backend is None or why:
            reasons.append(f"{name}: {why}")
        else:
            usable.append(backend)
    if usable:
        timings = {}
        for backend in usable + [_load("torch")[0]]:
            try:
                timings[backend.name] = _time_backend(backend, device)
            except Exception as exc:  # a backend that fails to run here is not a candidate
                reasons.append(f"{backend.name}: failed a trial run ({exc})")
        chosen = min(timings, key=timings.get) if timings else "torch"
        choice = _load(chosen)[0]
    else:
        choice = _load("torch")[0]
        if device.type not in _WARNED:
            _WARNED.add(device.type)
            warnings.warn(
                f"qgrad: no fused fake-quant kernels for {device.type} tensors ({'; '.join(reasons)}); "
                "falling back to the PyTorch reference implementation",
                RuntimeWarning,
                stacklevel=4,
            )
    _AUTO[key] = choice
    return choice


def select_backend(x: torch.Tensor) -> Backend:
    """The backend that runs fake-quantization of ``x`` (see the module docstring for the rules)."""
    name = requested_backend()
    if x.dtype == torch.float64:
        return _load("torch")[0]
    if name == "auto":
        return _auto(x.device)
    backend, why = _load(name)
    why = why or device_problem(name, x.device)
    if backend is None or why:
        raise RuntimeError(f"qgrad backend {name!r} was requested but cannot run here: {why}")
    return backend
