"""Differentiable ops: autograd wiring and public functionals (the math references live in qgrad.reference)."""
from qgrad.ops.fake_quant import fake_quant

__all__ = ["fake_quant"]
