"""Triton kernels of qgrad (installed as ``qgrad.kernels``): ``@triton.jit`` kernels and their launchers only.

The launchers take already-validated arguments of the public ops in ``qgrad.ops`` and reproduce
:mod:`qgrad.reference` (bit for bit where the result is not a float sum). Importing this package never
fails when Triton is missing; :func:`is_available` then says why, and the launchers raise ``ImportError``.
"""
from __future__ import annotations

import functools
import os
from typing import Tuple

__all__ = [
    "is_available",
    "add_scaled_sign",
    "fake_quant_fwd",
    "fake_quant_bwd",
    "l1_norm_sign",
    "batch_norm_double_backward",
]

try:
    from .batch_norm import batch_norm_double_backward
    from .fake_quant import fake_quant_bwd, fake_quant_fwd
    from .l1_norm import add_scaled_sign, l1_norm_sign
except ImportError as exc:  # triton (or a piece of it) is not installed
    _IMPORT_ERROR: "ImportError | None" = exc
else:
    _IMPORT_ERROR = None


@functools.lru_cache(maxsize=None)
def is_available() -> Tuple[bool, str]:
    """``(ok, reason)``: whether the Triton kernels can run here, and a one-line explanation.

    They can when Triton imports and either the kernels were built for the interpreter (``TRITON_INTERPRET=1``
    was set when this package was imported; they then run on CPU tensors, for testing, not speed) or a CUDA
    device is present. Neither can change within a process, so the answer is computed once: the ops ask
    before every launch.
    """
    if _IMPORT_ERROR is not None:
        return False, f"triton could not be imported: {_IMPORT_ERROR}"
    import torch
    import triton

    from .fake_quant import _INTERPRETED

    if _INTERPRETED:
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1 was set only after qgrad.kernels was imported; set it before"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set"


def __getattr__(name: str):
    if name in __all__ and _IMPORT_ERROR is not None:  # a launcher whose import failed
        raise ImportError(f"qgrad.kernels.{name} needs triton, which could not be imported: {_IMPORT_ERROR}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
