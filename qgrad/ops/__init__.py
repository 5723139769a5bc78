"""Differentiable ops: autograd wiring, public functionals and backend dispatch (the math references live in
qgrad.reference)."""
from qgrad.ops.dispatch import backends, use_backend
from qgrad.ops.fake_quant import fake_quant

__all__ = ["backends", "fake_quant", "use_backend"]
