"""Evaluate a model at several post-training (weight bits, activation bits) configurations: :func:`sweep`."""
from __future__ import annotations

import copy
import numbers
from collections.abc import Iterator
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from qgrad.quantization._common import check_bits, model_device
from qgrad.quantization.ptq import check_act_range, quantize_model

__all__ = ["sweep", "format_table", "config_label", "DEFAULT_CONFIGS"]

#: The CIFAR-10 setting of Alizadeh et al. 2020: float, then 4-bit activations with 8, 6 and 4-bit weights.
DEFAULT_CONFIGS = ((None, None), (8, 4), (6, 4), (4, 4))

Config = Tuple[Optional[int], Optional[int]]


def _check_configs(configs) -> List[Config]:
    if isinstance(configs, (str, bytes)) or not isinstance(configs, Sequence):
        raise TypeError(f"configs must be a list of (weight_bits, act_bits) pairs, got {type(configs).__name__}")
    out = []
    for c in configs:
        if not isinstance(c, (tuple, list)) or len(c) != 2:
            raise ValueError(f"each config must be a (weight_bits, act_bits) pair of ints or None, got {c!r}")
        for v in c:
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise ValueError(f"each config must be a (weight_bits, act_bits) pair of ints or None, got {c!r}")
        out.append((check_bits(c[0], "weight_bits"), check_bits(c[1], "act_bits")))
    return out


def _split(batch) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError("data must yield (inputs, targets) batches")
    return batch[0], batch[1]


@torch.no_grad()
def sweep(
    model: nn.Module,
    data,
    configs: Sequence[Config] = DEFAULT_CONFIGS,
    act_range: str = "bn",
    calib=None,
    device=None,
    progress: bool = False,
) -> List[Dict]:
    """Accuracy, loss and KL to the float model for each post-training quantization config.

    The float model is evaluated first (its row is always the first, whether or not ``(None, None)`` is among
    ``configs``); every other ``(weight_bits, act_bits)`` is evaluated on ``quantize_model(model, weight_bits,
    act_bits, act_range=act_range, calib=calib)``. Everything runs in eval mode under ``torch.no_grad()`` on
    copies; ``model`` itself is not modified.

    Args:
        model: a classifier returning logits ``(N, num_classes)``.
        data: an iterable of ``(inputs, targets)`` batches (DataLoader, list, ``qgrad.data.DeviceLoader``). It is
            iterated once per config and must yield the same batches each time (no shuffling); this is checked
            on the targets. A one-shot iterator is materialized into a list first.
        configs: ``(weight_bits, act_bits)`` pairs, each an int in [2, 16] or ``None`` (float).
        act_range, calib: passed to :func:`~qgrad.quantization.ptq.quantize_model` (a one-shot ``calib``
            iterator is materialized into a list first).
        device: where to evaluate (default: the model's device); batches are moved there.
        progress: show a tqdm progress bar over the configs.

    Returns:
        One dict per config: ``weight_bits``, ``act_bits`` (``None`` = float), ``accuracy`` (percent of samples
        whose arg-max logit is the target), ``loss`` (mean cross-entropy over samples), ``kl`` (mean over batches
        of the batch-mean ``KL(p_float || p_quant)``, ``p = softmax(logits)``, computed in float64 and clamped at
        0 against rounding; exactly 0 for the float row) and ``samples``.
    """
    configs = _check_configs(configs)
    for _, a_bits in configs:  # before the float pass, which may take long
        check_act_range(act_range, a_bits, calib)
    device = torch.device(device) if device is not None else model_device(model)
    if isinstance(data, Iterator):  # one-shot: keep its batches for the later passes
        data = list(data)
    if isinstance(calib, Iterator):  # likewise: every config calibrates on it
        calib = list(calib)

    float_model = copy.deepcopy(model).to(device).eval()
    float_logp: List[torch.Tensor] = []
    float_targets: List[torch.Tensor] = []
    rows = []
    quant_configs = [c for c in configs if c != (None, None)]

    def evaluate(net: nn.Module, first_pass: bool) -> Dict:
        correct, loss_sum, kl_sum, n, batches = 0, 0.0, 0.0, 0, 0
        for i, batch in enumerate(data):
            x, y = _split(batch)
            x, y = x.to(device), y.to(device)
            if not first_pass and (i >= len(float_targets) or not torch.equal(y, float_targets[i])):
                raise ValueError("data yielded different batches on a second pass; sweep needs the same batches "
                                 "in the same order every time (use shuffle=False)")
            logits = net(x)
            logp = F.log_softmax(logits.double(), dim=1)
            if first_pass:
                float_logp.append(logp)
                float_targets.append(y)
            else:
                ref = float_logp[i]
                kl = (ref.exp() * (ref - logp)).sum(dim=1).mean()
                kl_sum += max(float(kl), 0.0)
            loss_sum += float(F.nll_loss(logp, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            n += y.numel()
            batches += 1
        if n == 0:
            raise ValueError("data yielded no samples")
        if not first_pass and batches != len(float_targets):
            raise ValueError("data yielded a different number of batches on a second pass; sweep needs the same "
                             "batches every time")
        return {"accuracy": 100.0 * correct / n, "loss": loss_sum / n, "kl": kl_sum / batches if not first_pass
                else 0.0, "samples": n}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=1 + len(quant_configs), desc="sweep", unit="config")
    try:
        rows.append({"weight_bits": None, "act_bits": None, **evaluate(float_model, True)})
        if bar is not None:
            bar.update(1)
        for w_bits, a_bits in quant_configs:
            if bar is not None:
                bar.set_postfix_str(f"W{w_bits or 'float'} A{a_bits or 'float'}")
            qmodel = quantize_model(model, w_bits, a_bits, act_range=act_range, calib=calib).to(device)
            rows.append({"weight_bits": w_bits, "act_bits": a_bits, **evaluate(qmodel, False)})
            del qmodel
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def config_label(config: Tuple[Optional[int], Optional[int]]) -> str:
    """``(8, 4)`` -> ``"8,4"``, ``(None, 4)`` -> ``"f,4"``, ``(None, None)`` -> ``"float"``."""
    if config == (None, None):
        return "float"
    return ",".join("f" if b is None else str(b) for b in config)


def format_table(rows: Sequence[Dict]) -> str:
    """A markdown table of :func:`sweep` rows: W bits, A bits ("float" for ``None``), accuracy (%), loss, KL."""
    lines = ["| W bits | A bits | accuracy (%) | loss | KL |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        w = "float" if r["weight_bits"] is None else str(r["weight_bits"])
        a = "float" if r["act_bits"] is None else str(r["act_bits"])
        lines.append(f"| {w} | {a} | {r['accuracy']:.2f} | {r['loss']:.4f} | {r['kl']:.4g} |")
    return "\n".join(lines)
