"""In-place class swaps between torch modules and qgrad's twins (same state, different autograd)."""
from typing import Optional

import torch
import torch.fx
from torch import nn

#: Whether a torch.func transform (grad, vmap, jacrev, ...) is running. The twins' autograd Functions have no
#: functorch rules, so under a transform the twins call torch's own ops (same forward, same first gradient).
functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def traced_as_leaf(module: nn.Module, input) -> Optional[torch.fx.Proxy]:
    """The graph node of a call of ``module`` when ``input`` is a ``torch.fx`` proxy, else None.

    fx's default tracer keeps the modules defined in ``torch.nn`` as leaves (one ``call_module`` node) and
    traces into all others, so it would trace into a twin, whose autograd Function and input checks a proxy
    cannot pass. A twin's forward returns this node instead: a converted model traces to the graph of the
    torch model, and the graph's module calls run the twins.
    """
    if not isinstance(input, torch.fx.Proxy):
        return None
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


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
