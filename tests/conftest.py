"""Test-session setup shared by every test file.

Triton kernels can only run on a CPU through Triton's interpreter, and the interpreter has to be selected
before any ``@triton.jit`` function is defined, i.e. before ``qgrad.kernels`` is imported. conftest.py is
imported by pytest ahead of every test module, so this is the one place to decide it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two threads is what CI machines have; more only adds contention between pytest workers and OpenMP.
torch.set_num_threads(min(torch.get_num_threads(), 2))
