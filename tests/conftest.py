"""Test-session setup shared by every test file.

Triton kernels can only run on a CPU through Triton's interpreter, and the interpreter has to be selected
before any ``@triton.jit`` function is defined, i.e. before ``qgrad.kernels`` is imported. conftest.py is
imported by pytest ahead of every test module, so this is the one place to decide it.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two threads is what CI machines have; more only adds contention between pytest workers and OpenMP.
torch.set_num_threads(min(torch.get_num_threads(), 2))


def select_cpu_implementation(kernel: str, implementation: str, monkeypatch) -> str:
    """For tests run once per implementation of an op on CPU tensors: ``"torch"`` forces the PyTorch ops
    (``QGRAD_BACKEND=torch``); ``"cpp"`` needs ``qgrad._C.<kernel>`` and skips the test without it;
    ``"triton"`` runs the Triton kernel under the interpreter (``QGRAD_BACKEND=triton``), skipped where Triton
    cannot run and on machines with CUDA, where the interpreter is off and the ``gpu`` tests run the Triton
    kernels on CUDA tensors instead."""
    from qgrad import kernels
    from qgrad.ops.dispatch import cpu_kernel

    if implementation == "triton" and torch.cuda.is_available():
        pytest.skip("with CUDA the Triton kernels run CUDA tensors, not CPU ones; the gpu tests cover them")
    if implementation in ("torch", "triton"):
        monkeypatch.setenv("QGRAD_BACKEND", implementation)
        if implementation == "triton" and not kernels.is_available()[0]:
            pytest.skip(f"Triton cannot run here: {kernels.is_available()[1]}")
    elif cpu_kernel(kernel) is None:
        pytest.skip(f"qgrad._C is not built with {kernel} (pip install --no-build-isolation .)")
    return implementation


def recording_tensor_arguments(received: list, kernel):
    """``kernel`` wrapped so that each call first appends its tensor arguments (lists flattened) to
    ``received``: for tests of what the ops hand to a kernel (e.g. contiguous views instead of copies)."""

    def run(*args):
        received.extend(t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor))
        return kernel(*args)

    return run
