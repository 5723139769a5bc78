"""In-place class swaps between torch modules and qgrad's twins (same state, different autograd)."""
import torch
from torch import nn

#: Whether a torch.func transform (grad, vmap, jacrev, ...) is running. The twins' autograd Functions have no
#: functorch rules, so under a transform the twins call torch's own ops (same forward, same first gradient).
functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def swap_classes(model: nn.Module, table: dict) -> nn.Module:
    """Give every module of ``model`` whose exact type is a key of ``table`` the class ``table[type]``.

    Only valid between classes that share all state and ``__init__`` logic (a twin overrides methods only), so
    that changing ``__class__`` is a complete conversion: parameters, buffers, hooks and outside references stay.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        twin = table.get(type(m))
        if twin is not None:
            m.__class__ = twin
    return model
