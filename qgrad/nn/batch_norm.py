"""BatchNorm modules with a fused double backward, and the in-place swap for a model's torch BatchNorms.

:class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` subclass their ``torch.nn`` namesakes and
change only the function the forward calls (:func:`qgrad.ops.batch_norm.batch_norm` instead of
``torch.nn.functional.batch_norm``). Everything else is torch's: constructor arguments, parameters and buffers
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), ``state_dict`` keys,
``load_state_dict`` in both directions, ``repr``, input-dimension checks, ``momentum=None`` (cumulative
average), ``track_running_stats=False`` and eval mode. Outputs, first gradients and running statistics are
bit-identical to torch's module; only the second derivative (what the gradient-norm penalties of
:mod:`qgrad.penalties` differentiate) runs through the fused closed form. Setting a module's
``fused_double_backward`` attribute to False makes it call ``torch.nn.functional.batch_norm`` instead (same
outputs and first gradients, torch's double backward); :class:`qgrad.penalties.L1GradPenalty` does so for the
forwards of the plain steps of ``every > 1``. Under a ``torch.func`` transform (``grad``, ``vmap``), whose
rules qgrad's autograd Functions lack, the modules call torch's function too.

:func:`convert_batchnorm` turns the torch BatchNorms of an existing model into these classes in place, by
changing the class of each module object: the modules, their parameters and buffers (the same tensor objects,
so optimizers built before keep working), their hooks and the model's ``state_dict`` are untouched.
:func:`revert_batchnorm` is the inverse. Only modules whose type is exactly ``nn.BatchNorm1d/2d/3d`` are
converted; subclasses (``SyncBatchNorm``, user classes, the lazy variants) are left as they are.

``torch.fx.symbolic_trace`` records a converted module as one ``call_module`` node, as it does torch's own
(:func:`qgrad.nn._swap.traced_as_leaf`).
"""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from qgrad.nn._swap import functorch_active, swap_classes, traced_as_leaf
from qgrad.ops.batch_norm import batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert_batchnorm", "revert_batchnorm"]


def _forward(self: nn.modules.batchnorm._BatchNorm, input: Tensor) -> Tensor:
    """The forward of torch's ``_BatchNorm`` (same statistics bookkeeping), calling qgrad's ``batch_norm``."""
    leaf = traced_as_leaf(self, input)
    if leaf is not None:
        return leaf
    self._check_input_dim(input)
    momentum = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average over the batches seen so far
            momentum = 1.0 / float(self.num_batches_tracked)
    # batch statistics in training mode, and in eval mode for a module that keeps no running statistics
    use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
    # the buffers are passed only where they are read (eval) or updated (training with tracking)
    pass_buffers = not self.training or self.track_running_stats
    function = batch_norm if self.fused_double_backward and not functorch_active() else F.batch_norm
    return function(
        input,
        self.running_mean if pass_buffers else None,
        self.running_var if pass_buffers else None,
        self.weight,
        self.bias,
        use_batch_stats,
        momentum,
        self.eps,
    )


class BatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (inputs (N, C) or (N, C, L)) with qgrad's fused double backward.

    Same arguments, state and behaviour as the torch module; see :mod:`qgrad.nn.batch_norm`.
    """

    forward = _forward
    fused_double_backward = True


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (inputs (N, C, H, W)) with qgrad's fused double backward.

    Same arguments, state and behaviour as the torch module; see :mod:`qgrad.nn.batch_norm`.
    """

    forward = _forward
    fused_double_backward = True


class BatchNorm3d(nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (inputs (N, C, D, H, W)) with qgrad's fused double backward.

    Same arguments, state and behaviour as the torch module; see :mod:`qgrad.nn.batch_norm`.
    """

    forward = _forward
    fused_double_backward = True


_TWINS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_ORIGINALS = {v: k for k, v in _TWINS.items()}


def convert_batchnorm(model: nn.Module) -> nn.Module:
    """Make every ``nn.BatchNorm1d/2d/3d`` of ``model`` (``model`` itself included) qgrad's twin, in place.

    The module objects stay (their class changes), so parameters, buffers, hooks, ``state_dict`` keys and
    values, and references held elsewhere (optimizers, penalties) are unchanged. Modules of other types,
    subclasses of the torch BatchNorms included, are left alone; converting twice is harmless.

    Returns:
        ``model`` (the same object).
    """
    return swap_classes(model, _TWINS)


def revert_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_batchnorm` in place: qgrad's BatchNorm modules become torch's again.

    Returns:
        ``model`` (the same object).
    """
    return swap_classes(model, _ORIGINALS)
