"""Training loop with optional gradient penalties, exact resume, and weights-only checkpoints.

The recipe follows Alizadeh et al. (ICLR 2020, §4.1): train with SGD and cross-entropy, and switch the
gradient penalty on only for the last ``penalty_epochs`` epochs, or run a whole fine-tuning phase with it
from a trained model (``init``). One ``λ`` sets both terms of the ℓ1/ℓ2 penalties (``λ_w = λ_y = λ``).

A run directory holds::

    config.json      the resolved TrainConfig
    metrics.jsonl    one JSON object per finished epoch (epoch, lr, train_loss, train_acc, penalty terms,
                     test_loss, test_acc in percent, seconds)
    checkpoint.pt    everything needed to continue the run bit-exactly (see ``train(..., resume=True)``),
                     written after every epoch and, with ``checkpoint_every``, inside epochs too
    model.pt         {"model": state_dict, "config": dict}: the latest weights, for ``load_model``/deployment

Both ``.pt`` files contain only tensors and plain Python containers/scalars, so they load with
``torch.load(path, weights_only=True)``; they are replaced atomically (temp file, fsync, ``os.replace``), so
an interrupted run always leaves the last finished epoch (or the last checkpoint inside an epoch) on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import signal
import socket
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from qgrad._processes import join
from qgrad.cuda_graph import GraphedStep
from qgrad.penalties import L1GradPenalty, L2GradPenalty, OrthogonalityPenalty, check_penalty_state

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainingError",
    "evaluate",
    "find_checkpoint",
    "load_checkpoint",
    "load_model",
    "train",
]

logger = logging.getLogger(__name__)
#: Without a terminal for the progress bar (output to a file, a cluster's log), a plain line with the epoch's
#: progress is logged at most this often, so that a long epoch does not pass in silence.
PROGRESS_LINE_SECONDS = 60.0

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.pt"
LOCK_FILE = ".lock"  # "PID HOST" of the process training in a run directory
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"

PENALTIES = ("none", "l1", "l2", "dq")
METHODS = ("exact", "worst-case")
# Weight decay when TrainConfig.weight_decay is None: 5e-4 is the usual value for training VGG/ResNet on
# CIFAR-10 from scratch; 1e-4 is the fixed value the paper uses for its fine-tuning runs (§4.1).
DEFAULT_WEIGHT_DECAY = 5e-4
DEFAULT_FINETUNE_WEIGHT_DECAY = 1e-4
# Learning rate when TrainConfig.lr is None: 0.05 from scratch; 0.01 to fine-tune from init, qgrad demo's
# fine-tuning rate (a fine-tune at the from-scratch rate can undo much of what the model learned)
DEFAULT_LR = 0.05
DEFAULT_FINETUNE_LR = 0.01
# lambda when TrainConfig.lam is None: the paper's 0.05 (CIFAR-10), except the l1 penalty on digits, where
# 0.05 took the small VGG-like of qgrad demo to near chance (its 10-epoch l1 fine-tune: 21% test accuracy,
# against 99.7% with 0.005, the value the demo's grid search kept)
DEFAULT_LAM = 0.05
DEFAULT_L1_LAM = {"digits": 0.005}
# dq's coefficient weighs a fourth-power term of the weights' singular values, on another scale than the
# gradient norms: OrthogonalityPenalty's own starting value (with 0.05 the term was hundreds of times the loss
# of the demo's small VGG-like on digits)
DEFAULT_DQ_LAM = 1e-4
# Fields that may differ between a stopped run and the command that resumes it: none of them changes the
# sequence of parameter updates.
RESUME_MUTABLE = (
    "data_root", "device", "out", "eval_every", "checkpoint_every", "workers", "cuda_graph", "recompute"
)


class TrainingError(RuntimeError):
    """A run cannot start or continue (existing run directory, non-finite loss, mismatched resume)."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not in a format qgrad wrote."""


@dataclass
class TrainConfig:
    """Settings of one training run; stored as ``config.json`` and inside every checkpoint.

    Attributes:
        model: a name from ``qgrad.models.names()``.
        dataset: ``"cifar10"`` or ``"imagenet"`` (both need ``data_root``), or ``"digits"``.
        data_root: dataset directory, ``None`` for datasets that need none.
        image_size: ``"imagenet"`` only: side of the square input crops; ``None`` picks 224.
        workers: ``"imagenet"`` only: processes that decode images for each training process; ``None``
            picks the usable CPU cores divided among the machine's training processes, at least 1 and at most
            8 (:func:`qgrad.data.folder.default_workers`). The batches do not depend on it.
        width: channel multiplier passed to ``qgrad.models.get``.
        epochs: length of the run; the cosine learning-rate schedule spans all of it (stepped once per batch,
            from ``lr`` down to 0).
        batch_size: training batch size (the last incomplete batch of an epoch is dropped so BatchNorm never
            sees a tiny batch).
        lr: initial SGD learning rate; ``None`` picks 0.05 from scratch and 0.01 when fine-tuning from
            ``init`` (a fine-tune at the from-scratch rate can undo what the model learned).
        momentum: SGD momentum.
        weight_decay: SGD weight decay; ``None`` picks 5e-4 when training from scratch and 1e-4 when
            fine-tuning from ``init`` (the value of the paper's fine-tuning runs).
        penalty: ``"none"``, ``"l1"`` (gradient ℓ1, the paper's Eq. 3), ``"l2"`` (gradient ℓ2) or ``"dq"``
            (the orthogonality regularizer of Defensive Quantization).
        lam: ``λ``; the ℓ1/ℓ2 penalties use it for both the weight and the activation term, ``dq`` as its
            weight. ``None`` picks the paper's 0.05, except for ``"l1"`` on ``digits``: 0.005 (with 0.05 the
            VGG-like of ``qgrad demo`` ended its fine-tune at 21% test accuracy instead of 99.7%), and for
            ``"dq"``: 1e-4, :class:`qgrad.penalties.OrthogonalityPenalty`'s starting value.
        every: ``"l1"`` only: apply the penalty on every ``every``-th step with its weight multiplied by
            ``every`` and take plain steps in between (:class:`qgrad.penalties.L1GradPenalty`'s ``every``).
        method: ``"l1"`` only: ``"exact"`` (double backward) or ``"worst-case"`` (one extra forward/backward
            at the worst-case perturbation; a different objective for ReLU networks, see
            :class:`qgrad.penalties.L1GradPenalty`).
        bits: ``"worst-case"`` only: tie the perturbation radius to half a bin of a ``bits``-bit grid per
            tensor; ``None`` uses the penalty's default radius ``h``.
        penalty_epochs: regularize only in the last ``penalty_epochs`` epochs. Ignored when ``init`` is given:
            a run from ``init`` is a fine-tuning phase and regularizes throughout.
        init: a ``checkpoint.pt`` or ``model.pt``, or a run directory (its ``model.pt``), to start from
            (weights only; fresh optimizer and schedule).
        out: the run directory.
        seed: seeds the model initialization and the data order/augmentation.
        device: ``"auto"`` (CUDA when available, else CPU), or any ``torch.device`` string.
        eval_every: evaluate on the test split every this many epochs (always after the last one).
        checkpoint_every: also write ``checkpoint.pt`` inside epochs, after every this many training steps
            (counted from the start of the run), so that a crash loses at most that many steps of a long
            epoch; ``resume`` continues from the next batch and gives the same run as an uninterrupted one.
            ``None``: at the end of each epoch only. ``model.pt`` and ``metrics.jsonl`` are written at the
            end of each epoch either way.
        channels_last: keep the weights and the input batches of image models in channels-last memory layout
            (NHWC), usually the faster one for convolutions on CPUs and GPUs, penalized steps included; results
            differ from the default layout by float rounding only.
        recompute: ``"l1"`` with the exact method only: drop the forward's saved tensors of the model's
            segments (``model.recompute_segments()``: ResNet-18's residual blocks, VGG-like's Conv-BN-ReLU
            units) and recompute them in the backward (:class:`qgrad.penalties.L1GradPenalty`'s
            ``recompute``): the same steps bit for bit, with less memory (ResNet-18: 1.55x a plain step's peak
            instead of 2.13x on a CPU) and more time (4.3-4.6x a plain step instead of 3.1-3.3x). Not with
            ``cuda_graph``.
        cuda_graph: run the forward and backward of every training step as a replayed CUDA graph
            (:class:`qgrad.cuda_graph.GraphedStep`; with ``every > 1`` one graph for the penalized steps and
            one for the plain ones): the same steps without the host's cost of launching each kernel, which
            bounds small-image steps on fast GPUs. CUDA only, one process.
        num_classes, in_channels: taken from the dataset when ``None``.
    """

    model: str = "vgg_like"
    dataset: str = "cifar10"
    data_root: Optional[str] = None
    image_size: Optional[int] = None
    workers: Optional[int] = None
    width: float = 1.0
    epochs: int = 100
    batch_size: int = 128
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    penalty: str = "none"
    lam: Optional[float] = None
    every: int = 1
    method: str = "exact"
    bits: Optional[int] = None
    penalty_epochs: int = 15
    init: Optional[str] = None
    out: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    checkpoint_every: Optional[int] = None
    channels_last: bool = False
    cuda_graph: bool = False
    recompute: bool = False
    num_classes: Optional[int] = None
    in_channels: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known fields are {sorted(names)}")
        return cls(**d)


def _setting(field: str, value: Any = None) -> str:
    return field if value is None else f"{field} {value!r}"


def check_penalty_options(
    penalty: str, every: int, method: str, bits: Optional[int], recompute: bool = False,
    spell: Callable[..., str] = _setting,
) -> None:
    """Raise ``ValueError`` where a setting does not apply: ``bits`` outside ``method="worst-case"``,
    ``every`` or ``method`` outside ``penalty="l1"``, ``recompute`` outside the exact ``"l1"``.
    ``spell(field[, value])`` names a setting in the message (the command line names its flags)."""
    if recompute and (penalty != "l1" or method != "exact"):
        raise ValueError(
            f"{spell('recompute')} lowers the memory of {spell('penalty', 'l1')} with "
            f"{spell('method', 'exact')}; {spell('penalty', penalty)} with {spell('method', method)} "
            "does not differentiate twice"
        )
    if bits is not None and method != "worst-case":
        raise ValueError(
            f"{spell('bits')} sets the perturbation of {spell('method', 'worst-case')}; leave it unset for "
            "the exact method"
        )
    if (every != 1 or method != "exact") and penalty != "l1":
        raise ValueError(
            f"{spell('every')} and {spell('method')} are options of {spell('penalty', 'l1')}; "
            f"{spell('penalty', penalty)} takes neither"
        )


def _check_config(cfg: TrainConfig) -> None:
    def positive_int(name):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")

    for name in ("epochs", "batch_size", "eval_every"):
        positive_int(name)
    every = cfg.checkpoint_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"checkpoint_every must be a positive int or None, got {every!r}")
    if cfg.image_size is not None and (
        isinstance(cfg.image_size, bool) or not isinstance(cfg.image_size, int) or cfg.image_size < 8
    ):
        raise ValueError(f"image_size must be an int >= 8 or None, got {cfg.image_size!r}")
    if cfg.workers is not None and (
        isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0
    ):
        raise ValueError(f"workers must be an int >= 0 or None, got {cfg.workers!r}")
    for name in ("image_size", "workers"):
        if getattr(cfg, name) is not None and cfg.dataset != "imagenet":
            raise ValueError(
                f"{name} applies to image folders (dataset 'imagenet'); dataset {cfg.dataset!r} is held in "
                f"memory at its own size, got {name}={getattr(cfg, name)!r}"
            )
    for name in ("channels_last", "cuda_graph", "recompute"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}")
    if cfg.penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {cfg.penalty!r}")
    for name in ("lr", "width"):
        v = getattr(cfg, name)
        if name == "lr" and v is None:
            continue
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    for name in ("momentum", "lam"):
        v = getattr(cfg, name)
        if name == "lam" and v is None:
            continue
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a non-negative number, got {v!r}")
    if cfg.momentum >= 1:  # SGD's velocity then grows without bound
        raise ValueError(f"momentum must be in [0, 1), got {cfg.momentum!r}")
    if cfg.weight_decay is not None and (not math.isfinite(cfg.weight_decay) or cfg.weight_decay < 0):
        raise ValueError(f"weight_decay must be a non-negative number or None, got {cfg.weight_decay!r}")
    if (
        isinstance(cfg.penalty_epochs, bool)
        or not isinstance(cfg.penalty_epochs, int)
        or cfg.penalty_epochs < 0
    ):
        raise ValueError(f"penalty_epochs must be a non-negative int, got {cfg.penalty_epochs!r}")
    if isinstance(cfg.every, bool) or not isinstance(cfg.every, int) or cfg.every < 1:
        raise ValueError(f"every must be a positive int, got {cfg.every!r}")
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.bits is not None and (
        isinstance(cfg.bits, bool) or not isinstance(cfg.bits, int) or not 2 <= cfg.bits <= 16
    ):
        raise ValueError(f"bits must be an int in [2, 16] or None, got {cfg.bits!r}")
    check_penalty_options(cfg.penalty, cfg.every, cfg.method, cfg.bits, cfg.recompute)
    if cfg.recompute and cfg.cuda_graph:
        raise ValueError(
            "recompute is not supported with cuda_graph (its recomputation runs in Python hooks)"
        )
    if cfg.penalty != "none" and cfg.init is None and cfg.penalty_epochs == 0:
        raise ValueError(
            f"penalty {cfg.penalty!r} with penalty_epochs=0 never regularizes; "
            "set penalty_epochs >= 1, give init for a fine-tuning run, or use penalty 'none'"
        )
    if not cfg.out:
        raise ValueError("out (the run directory) must be given")


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened this way on Windows.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` via a temp file in the same directory, fsync, ``os.replace``: readers see the old or the
    new file, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file owner-only (0600); give it the mode open() would (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _save_torch(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def _save_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a qgrad ``checkpoint.pt``/``model.pt`` (or a bare state_dict) with ``weights_only=True``, on CPU.

    Returns a dict with at least ``"model"`` (a state_dict); ``"config"`` when the file holds one.
    Raises :class:`CheckpointError` naming the file when it is missing, truncated/corrupt, or not such a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first.startswith("Weights only load failed"):  # torch's advice to unpickle anything does not apply
            first = "not a file of tensors (torch.load with weights_only=True refused it)"
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first} "
            "(expected a file written by qgrad train: checkpoint.pt or model.pt)"
        ) from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise CheckpointError(
        f"checkpoint {path} holds a {type(obj).__name__} without a 'model' state_dict; "
        "expected a file written by qgrad train (checkpoint.pt or model.pt) or a plain state_dict"
    )


def find_checkpoint(path: Union[str, os.PathLike]) -> Path:
    """The model file behind ``path``: a run directory -> its ``model.pt`` (else ``checkpoint.pt``); a file ->
    itself."""
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, CHECKPOINT):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"run directory {path} holds neither {MODEL_FILE} nor {CHECKPOINT}")
    if not path.exists():
        raise CheckpointError(f"no run directory or checkpoint file at {path}")
    return path


def _build_model(cfg: Dict[str, Any]) -> nn.Module:
    from qgrad import models

    return models.get(
        cfg["model"],
        num_classes=int(cfg["num_classes"]),
        width=float(cfg["width"]),
        in_channels=int(cfg["in_channels"]),
    )


def load_model(
    path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
) -> Tuple[nn.Module, dict]:
    """Rebuild a trained model from a run directory, ``model.pt`` or ``checkpoint.pt``.

    The architecture comes from the stored config (``model``, ``width``, ``num_classes``, ``in_channels``) via
    ``qgrad.models.get``. Returns ``(model in eval mode on device, config dict)``.
    """
    file = find_checkpoint(path)
    state = load_checkpoint(file)
    cfg = state.get("config")
    needed = ("model", "width", "num_classes", "in_channels")
    if not isinstance(cfg, dict) or any(cfg.get(k) is None for k in needed):
        raise CheckpointError(
            f"checkpoint {file} has no model config (needs {', '.join(needed)}); "
            "only files written by qgrad train can be rebuilt this way"
        )
    model = _build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {file} does not match a {cfg['model']} model: {e}") from e
    return model.to(resolve_device(device)).eval(), dict(cfg)


def _read_metrics(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TrainingError(f"{path} line {i} is not valid JSON: {e}") from e
    return rows


def _append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def _make_penalty(model: nn.Module, cfg: TrainConfig):
    if cfg.penalty == "l1":
        every, lam = cfg.every, cfg.lam
        if cfg.cuda_graph:  # every > 1 runs as two graphs (_EveryKGraphs): the penalty applies at every call
            every, lam = 1, cfg.lam * cfg.every
        # the segments are the model's own modules (under DistributedDataParallel, those of the wrapped one)
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        segments = inner.recompute_segments() if cfg.recompute else None
        return L1GradPenalty(
            model, weight=lam, activation=lam, every=every, method=cfg.method, bits=cfg.bits,
            recompute=segments,
        )
    if cfg.penalty == "l2":
        return L2GradPenalty(model, weight=cfg.lam, activation=cfg.lam)
    return OrthogonalityPenalty(model, weight=cfg.lam)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of ``model`` in eval mode over ``(inputs, targets)`` batches.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for x, y in batches:
            out = model(x)
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate got no batches")
    return loss_sum / count, 100.0 * correct / count


def _resolve(cfg: TrainConfig, data) -> TrainConfig:
    """Fill the fields that default from the dataset or the run kind; check the explicit ones against data."""
    for name in ("num_classes", "in_channels"):
        have, want = getattr(cfg, name), int(getattr(data, name))
        if have is not None and have != want:
            raise ValueError(f"{name}={have} does not match dataset {cfg.dataset!r}, which has {name}={want}")
    wd = cfg.weight_decay
    if wd is None:
        wd = DEFAULT_FINETUNE_WEIGHT_DECAY if cfg.init else DEFAULT_WEIGHT_DECAY
    lam = cfg.lam
    if lam is None:
        lam = DEFAULT_L1_LAM.get(cfg.dataset, DEFAULT_LAM) if cfg.penalty == "l1" else DEFAULT_LAM
        lam = DEFAULT_DQ_LAM if cfg.penalty == "dq" else lam
    return dataclasses.replace(
        cfg,
        image_size=getattr(data, "image_size", None),
        num_classes=int(data.num_classes),
        in_channels=int(data.in_channels),
        weight_decay=float(wd),
        width=float(cfg.width),
        lr=float(cfg.lr if cfg.lr is not None else DEFAULT_FINETUNE_LR if cfg.init else DEFAULT_LR),
        momentum=float(cfg.momentum),
        lam=float(lam),
    )


def _check_resume(stored: Dict[str, Any], cfg: TrainConfig, path: Path) -> None:
    current = cfg.to_dict()
    # a setting added after the run was stored has its default there (how the run was trained)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    diffs = [
        f"{k}: stored {stored.get(k, defaults[k])!r}, now {v!r}"
        for k, v in current.items()
        if k not in RESUME_MUTABLE and stored.get(k, defaults[k]) != v
    ]
    if diffs:
        raise TrainingError(
            f"cannot resume {path}: the settings differ from the stopped run ({'; '.join(diffs)}); "
            "resume with the stored settings or start a new run directory"
        )


def _init_weights(model: nn.Module, cfg: TrainConfig, state: Dict[str, Any]) -> None:
    """Load the weights of ``state`` (read from ``cfg.init``) after checking it holds this architecture."""
    src = state.get("config")
    if isinstance(src, dict):
        mismatch = [
            f"{k} {src.get(k)!r} vs {getattr(cfg, k)!r}"
            for k in ("model", "width", "num_classes", "in_channels")
            if src.get(k) is not None and src.get(k) != getattr(cfg, k)
        ]
        if mismatch:
            raise TrainingError(
                f"init checkpoint {cfg.init} holds a different model than this run asks for "
                f"({', '.join(mismatch)} (checkpoint vs run))"
            )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"init checkpoint {cfg.init} does not fit model {cfg.model!r}: {e}") from e


def _warn_if_model_misfits(model: str, data) -> None:
    """Log a warning when the model's stem is made for another image size than the data's."""
    size = data.image_size if hasattr(data, "image_size") else min(data.train_x.shape[-2:])
    if model == "resnet18_imagenet" and size < 64:
        logger.warning(
            "resnet18_imagenet's stem (stride 2 and a max-pool) shrinks %d-pixel images to %d before its "
            "first stage; resnet18 is the variant for small images",
            size, -(-size // 4),
        )
    elif model in ("resnet18", "vgg_like") and size > 64:
        logger.warning(
            "%s keeps %d-pixel images at full size in its first stage (it is made for 32x32): its first "
            "activations are %.0fx larger than at 32x32; resnet18_imagenet has the ImageNet stem",
            model, size, (size / 32) ** 2,
        )


def _fmt_epoch(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.4g}", f"loss {row['train_loss']:.4f}"]
    if row.get("penalty") is not None:
        terms = ", ".join(f"{k} {v:.4g}" for k, v in row.get("penalty_terms", {}).items())
        parts.append(f"penalty {row['penalty']:.4g}" + (f" ({terms})" if terms else ""))
    parts.append(f"train {row['train_acc']:.2f}%")
    if row.get("test_acc") is not None:
        parts.append(f"test {row['test_acc']:.2f}%")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)


def _step_fn(net: nn.Module, penalty) -> Callable[[torch.Tensor, torch.Tensor], Dict[str, torch.Tensor]]:
    """The forward and backward of one training step: ``(x, y) -> {loss, correct, penalty terms...}`` as 0-d
    tensors, without waiting for the device (so that it can also be replayed as a CUDA graph)."""

    def step(x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = net(x)
        loss = nn.functional.cross_entropy(out, y)
        if penalty is None:
            loss.backward()
            stats = {"loss": loss.detach()}
        elif getattr(penalty, "method", "exact") == "worst-case":  # recomputes the loss at a moved point
            stats = penalty.backward(loss, lambda: nn.functional.cross_entropy(net(x), y), sync=False)
        else:
            stats = penalty.backward(loss, sync=False)
        stats["correct"] = (out.detach().argmax(1) == y).sum()
        return stats

    return step


class _EveryKGraphs:
    """``L1GradPenalty(every=k)``'s steps as two CUDA graphs: ``penalty`` (made with ``k`` times the
    coefficients and ``every=1``) on calls 0, k, 2k, ..., a plain backward on the others, with the statistics
    ``L1GradPenalty(every=k)`` reports (the unscaled penalty, ``penalty_scale``, and on plain steps those of
    the last penalized one)."""

    def __init__(self, net: nn.Module, model: nn.Module, penalty, every: int):
        plain = _step_fn(net, None)

        def plain_step(x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
            with penalty.plain_steps():  # captured with torch's own BatchNorm and convolution
                return plain(x, y)

        self._graphs = GraphedStep([_step_fn(net, penalty), plain_step], model.parameters())
        self._every = every
        self._calls = 0
        self._last: Dict[str, torch.Tensor] = {}
        self._device = next(model.parameters()).device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        applied = self._calls % self._every == 0
        self._calls += 1
        stats = dict(self._graphs(x, y, variant=0 if applied else 1))
        if applied:
            stats["penalty"] = stats["penalty"] / self._every
            # copies: the graph's outputs are overwritten by its next replay
            self._last = {k: v.clone() for k, v in stats.items() if k not in ("loss", "correct")}
        else:
            stats.update(self._last)
        stats["penalty_scale"] = stats["loss"].new_full((), float(self._every) if applied else 0.0)
        return stats

    def state_dict(self) -> Dict[str, Any]:
        """The position in the cycle of ``k`` steps, as :meth:`qgrad.L1GradPenalty.state_dict` gives it."""
        return {"calls": self._calls, "last_stats": {k: v.cpu() for k, v in self._last.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._calls, last = check_penalty_state(state)
        self._last = {k: v.to(self._device) for k, v in last.items()}


def _every_k_cycle(penalty, step):
    """What counts the steps of the l1 penalty's ``every``-step cycle (the graphed step, else the penalty),
    with ``state_dict``/``load_state_dict``; ``None`` without an l1 penalty."""
    owner = step if isinstance(step, _EveryKGraphs) else penalty
    return owner if isinstance(owner, (L1GradPenalty, _EveryKGraphs)) else None


def _penalty_state(penalty, step) -> Optional[Dict[str, Any]]:
    cycle = _every_k_cycle(penalty, step)
    return None if cycle is None else cycle.state_dict()


def _make_step(net: nn.Module, model: nn.Module, penalty, cfg: TrainConfig):
    """The training step for ``cfg``: :func:`_step_fn`, replayed as CUDA graphs with ``cfg.cuda_graph``."""
    if not cfg.cuda_graph:
        return _step_fn(net, penalty)
    if penalty is not None and cfg.every > 1:
        return _EveryKGraphs(net, model, penalty, cfg.every)
    return GraphedStep(_step_fn(net, penalty), model.parameters())


class _StopRequests:
    """SIGINT and SIGTERM (Ctrl-C, a cluster's notice before it ends a job) while :func:`train` runs: the
    first one asks the run to stop at the next step boundary with a checkpoint; the same signal again acts
    as it would without qgrad (KeyboardInterrupt, termination), the other one is taken as the same request
    (a scheduler may follow a user's Ctrl-C with its own SIGTERM). torchrun hands the signal it receives to
    every process, once. Installed only from the main thread (Python delivers signals there); elsewhere the
    signals keep their handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: Optional[int] = None  # the first signal received
        self.agreed = False  # every process has seen a request (set by :meth:`agree`)
        self._previous: Dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.signal(sig, self._handle)
                # None: a handler installed outside Python, which cannot be put back; the default then
                self._previous[sig] = signal.SIG_DFL if previous is None else previous

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> Optional[str]:
        """The signal that stopped the run: ``"SIGINT"``, ``"SIGTERM"``, ``"signal"`` where only another
        process received one, ``None`` while no stop was agreed."""
        if not self.agreed:
            return None
        return "signal" if self.signal is None else signal.Signals(self.signal).name

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None:
            logger.warning("%s received while stopping: the checkpoint is still written", name)
            return
        self.signal = signum
        signal.signal(signum, self._previous[signum])  # the same signal again gets the usual treatment
        logger.warning(
            "%s received: stopping after this step with a checkpoint (send it again to stop at once)", name
        )

    def agree(self, processes, device) -> bool:
        """Whether any process has received a signal; with several processes a collective, so every
        process must call it at the same step."""
        seen = self.signal is not None
        if processes.distributed:
            seen = processes.sum([float(seen)], device)[0] > 0
        self.agreed = self.agreed or seen
        return self.agreed


class _Interrupted(Exception):
    """Raised inside an epoch after a stop request, once its checkpoint is written."""

    def __init__(self, batch: int):
        super().__init__(batch)
        self.batch = batch


def _totals(loss_sum, correct, count, terms, processes, device) -> Dict[str, Any]:
    """The statistics of the steps so far, over all processes: sums of the loss (times the batch size),
    correct predictions and samples, and per penalty statistic the sum over steps of its mean over the
    processes (every process takes the same steps, on equal parts of each batch)."""
    names = sorted(terms)
    loss_total, correct_total, count_total, *term_totals = processes.sum(
        [float(loss_sum), float(correct), float(count)] + [float(terms[k]) for k in names], device
    )
    return {
        "loss_sum": loss_total,
        "correct": int(correct_total),
        "count": int(count_total),
        "terms": {k: v / processes.world_size for k, v in zip(names, term_totals)},
    }


def _train_epoch(
    model, loader, optimizer, scheduler, step, device, desc, progress, processes, start=None, save=None,
    checkpoint_every=None, stop=None,
) -> dict:
    """One pass over ``loader``, ``step(x, y)`` (:func:`_step_fn`, possibly as a
    :class:`qgrad.cuda_graph.GraphedStep`) then the optimizer on every batch; the scheduler steps after every
    batch. Returns the epoch's mean statistics (over all processes).

    ``start``: resume the epoch after its batch ``start["batch"]`` (the loader is set to it), with the
    :func:`_totals` of the batches before it in the other keys. ``save``: called on every process as
    ``save({"batch": batches done in this epoch, **totals})`` after every ``checkpoint_every``-th step of the
    run (counted by the scheduler) except an epoch's last. ``stop``: a :class:`_StopRequests`, asked after
    every step (with several processes every 10 steps and at the last, to agree without waiting on each
    step); when it agrees inside the epoch, ``save`` is called and :class:`_Interrupted` raised; at the
    epoch's last step the epoch ends as usual.

    Raises TrainingError as soon as a non-finite loss or penalty is seen (checked at every progress update and
    at the end of the epoch, so GPU runs do not synchronize on every step). With several processes each checks
    its own part of the batch; torchrun stops the others when one fails.
    """
    from tqdm.auto import tqdm

    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    terms: Dict[str, torch.Tensor] = {}  # sums of the penalty's statistics, on the device
    count, first = 0, 0
    if start is not None:
        first = start["batch"]
        if processes.main:  # the main process carries the totals of the batches before `first`
            loss_sum += start["loss_sum"]
            correct += start["correct"]
            count = start["count"]
            # scaled so that the division by the number of processes at the end gives them back
            terms = {
                k: torch.tensor(v * processes.world_size, dtype=torch.float64, device=device)
                for k, v in start["terms"].items()
            }
    steps = first
    # iter() starts the loader's next epoch: call it once here. Handed the loader itself, tqdm.auto's class
    # calls iter() in its constructor and again when iterated, so every epoch would train on the next one's
    # order and augmentation.
    batches = iter(loader)
    bar = tqdm(
        batches, total=len(loader), initial=first, desc=desc, leave=False, dynamic_ncols=True,
        disable=None if progress else True,
    )
    lines = progress and bar.disable  # asked for progress, but no terminal to draw the bar on
    last_line = time.monotonic()
    for x, y in bar:
        optimizer.zero_grad(set_to_none=True)
        stats = step(x, y)
        optimizer.step()
        scheduler.step()
        # what step returned is read now: a CUDA graph overwrites it at its next replay
        loss_sum += stats["loss"] * y.numel()
        correct += stats["correct"]
        for k, v in stats.items():
            if k not in ("loss", "correct"):
                terms[k] = v.double() if k not in terms else terms[k] + v
        count += y.numel()
        steps += 1
        if steps % 10 == 0 or steps == len(loader):
            mean = float(loss_sum) / count
            if not math.isfinite(mean):
                raise TrainingError(f"{desc}: the training loss became non-finite at step {steps}")
            penalty_mean = float(terms["penalty"]) / steps if "penalty" in terms else None
            if penalty_mean is not None and not math.isfinite(penalty_mean):
                raise TrainingError(f"{desc}: the penalty became non-finite by step {steps}")
            if not bar.disable:
                post = {"loss": f"{mean:.4f}"}
                if penalty_mean is not None:
                    post["pen"] = f"{penalty_mean:.4g}"
                bar.set_postfix(post, refresh=False)
            elif lines and steps < len(loader) and time.monotonic() - last_line >= PROGRESS_LINE_SECONDS:
                last_line = time.monotonic()
                pen = "" if penalty_mean is None else f", penalty {penalty_mean:.4g}"
                logger.info("%s: batch %d/%d, train loss %.4f%s", desc, steps, len(loader), mean, pen)
        asked = stop is not None and (not processes.distributed or steps % 10 == 0 or steps == len(loader))
        stopping = asked and stop.agree(processes, device)
        due = checkpoint_every is not None and scheduler.last_epoch % checkpoint_every == 0
        if steps < len(loader) and (due or stopping):
            totals = _totals(loss_sum, correct, count, terms, processes, device)
            if not all(math.isfinite(v) for v in [totals["loss_sum"], *totals["terms"].values()]):
                # a checkpoint never keeps a diverged run
                raise TrainingError(f"{desc}: the training loss or penalty became non-finite by step {steps}")
            save({"batch": steps, **totals})
            if stopping:
                bar.close()
                raise _Interrupted(steps)
    bar.close()
    if steps == first:
        raise TrainingError("the training loader produced no batches")
    totals = _totals(loss_sum, correct, count, terms, processes, device)
    mean = totals["loss_sum"] / totals["count"]
    if not math.isfinite(mean):
        raise TrainingError(f"{desc}: the training loss became non-finite")
    row = {
        "train_loss": mean,
        "train_acc": 100.0 * totals["correct"] / totals["count"],
        "penalty": None,
        "penalty_terms": {},
    }
    if totals["terms"]:
        terms = dict(totals["terms"])
        total = terms.pop("penalty", None)
        row["penalty"] = None if total is None else total / steps
        row["penalty_terms"] = {k: v / steps for k, v in terms.items()}
    return row


def train(
    config: TrainConfig, progress: bool = True, resume: bool = False, stop_after: Optional[int] = None
) -> Dict[str, Any]:
    """Train ``config.model`` on ``config.dataset`` and return the metrics of the last finished epoch.

    Args:
        config: the run's settings; ``config.out`` is the run directory (created if needed).
        progress: show a tqdm bar over the batches of each epoch (only on a terminal) with loss and penalty.
        resume: continue the stopped run in ``config.out`` from its ``checkpoint.pt``: model, optimizer,
            scheduler, epoch, the l1 penalty's ``every``-step cycle and RNG states are restored and the loader
            is put at the same epoch (and batch, for a checkpoint written inside an epoch, see
            ``checkpoint_every``), so a run stopped and resumed produces the same parameters and metrics as
            an uninterrupted one (bit-identical on CPU). The settings must equal the stored ones except
            those in ``RESUME_MUTABLE`` (``data_root``, ``device``, ``out``, ``eval_every``,
            ``checkpoint_every``, ``workers``, ``cuda_graph``).
        stop_after: stop after this many epochs of *this call* (the schedule still spans ``config.epochs``);
            continue later with ``resume=True``. ``None`` runs to the end.

    Returns:
        The last finished epoch's metrics row (as written to ``metrics.jsonl``; none when the run stopped in
        its first epoch) plus ``best_test_acc``, ``best_epoch``, ``finished`` (all ``config.epochs`` done),
        ``interrupted`` (see below; ``None`` otherwise) and ``run_dir``.

    SIGINT (Ctrl-C) and SIGTERM (what clusters send before they end or preempt a job) stop the run at the
    next step boundary (with several processes within 10 steps, all at the same one): it writes
    ``checkpoint.pt`` as ``checkpoint_every`` would and returns with ``interrupted`` set to the signal's
    name; ``resume`` continues from the next batch. The same signal a second time acts as usual
    (KeyboardInterrupt, termination). The handlers are installed only when ``train`` runs in the main
    thread.

    Raises:
        TrainingError: ``config.out`` already holds a checkpoint (and ``resume`` is False), the resumed
            settings differ, or the loss became non-finite (the checkpoint of the last good epoch stays).
        CheckpointError: ``init`` or the resumed checkpoint is missing or unreadable.

    Several processes (data-parallel; started by ``torchrun``, or any initialized default process group):
    each process trains a ``DistributedDataParallel`` replica on its part of every batch (``batch_size`` is
    the batch of all processes together and must be divisible by their number), on the GPU of its
    ``LOCAL_RANK`` (``device`` ``"auto"`` or ``"cuda"``) or on the CPU (gloo). The gradients, penalty
    included, are averaged over the processes; BatchNorm normalizes each process's part with its own
    statistics, and the running statistics of the first process (rank 0) are the ones every replica uses
    and the checkpoint keeps. Only rank 0 evaluates, writes the run directory, logs and shows progress;
    every process returns the same metrics. A resumed run may use another number of processes.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_config(config)
    if config.data_root is not None:  # stored in the run: valid for sweep / resume from another directory
        config = dataclasses.replace(config, data_root=os.path.abspath(config.data_root))
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1
    ):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    run_dir = Path(config.out)
    _check_run_dir(run_dir, resume)
    # Read init before the data, so that an unusable file fails fast.
    init_state = None
    if config.init is not None and not resume:
        init_state = load_checkpoint(find_checkpoint(config.init))
    processes, device = join(resolve_device(config.device))
    try:
        with _run_dir_lock(run_dir) if processes.main else contextlib.nullcontext():
            _check_run_dir(run_dir, resume)  # again: another run may have written it meanwhile
            return _run(config, resume, stop_after, init_state, processes, device, progress)
    finally:
        processes.close()


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run needs a directory without a run's files; a resumed one needs its checkpoint."""
    ckpt_path = run_dir / CHECKPOINT
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"--out {run_dir} is a file; give a directory (it is created if needed)")
    if resume:
        if not ckpt_path.is_file():
            raise TrainingError(f"nothing to resume: {ckpt_path} does not exist")
        return
    if ckpt_path.exists():
        raise TrainingError(
            f"{run_dir} already holds a checkpoint ({ckpt_path}); resume it with --resume or choose another "
            "--out"
        )
    metrics = run_dir / METRICS_FILE
    held = [p.name for p in (run_dir / MODEL_FILE, metrics) if p.is_file() and p.stat().st_size > 0]
    if held:
        raise TrainingError(
            f"{run_dir} already holds a run ({', '.join(held)}) without a checkpoint to resume; choose "
            "another --out (or move those files away to start over there)"
        )


def _lock_owner(lock: Path) -> Optional[Tuple[int, str]]:
    try:
        pid, host = lock.read_text(encoding="utf-8").split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path):
    """Hold ``run_dir/.lock`` while training: a second run (or resume) into the same directory is refused
    instead of interleaving its files with this one's. A lock left by a process that is gone (killed) is
    taken over: silently when it was on this machine, with a warning when it names another one, which this
    process cannot check (a cluster job resumed elsewhere after its node failed)."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    host = socket.gethostname()

    def create() -> int:
        return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)

    try:
        fd = create()
    except FileExistsError:
        owner = _lock_owner(lock)
        if owner is not None and owner[1] == host and _alive(owner[0]):
            raise TrainingError(
                f"{run_dir} is in use by process {owner[0]} on this machine (its lock file {lock}); "
                "wait for that run to end, or choose another --out"
            ) from None
        if owner is not None and owner[1] != host:
            logger.warning(
                "%s holds the lock of process %d on host %s, which cannot be checked from here; taking "
                "it over (if that run is still going, stop one of the two)", run_dir, owner[0], owner[1],
            )
        lock.unlink(missing_ok=True)
        try:
            fd = create()
        except FileExistsError:  # another run took it in between
            raise TrainingError(f"cannot take the lock file {lock} of {run_dir}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {host}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(run_dir.iterdir()):  # a run that failed before writing anything
            run_dir.rmdir()


def _run(config, resume, stop_after, init_state, processes, device, progress) -> Dict[str, Any]:
    from qgrad import data as qdata

    run_dir = Path(config.out)
    ckpt_path = run_dir / CHECKPOINT
    main = processes.main
    if config.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph replays CUDA graphs and needs a CUDA device; this run is on {device}")
    if config.cuda_graph and processes.distributed:
        raise ValueError(
            "cuda_graph is not supported with several processes (DistributedDataParallel under CUDA graph "
            "capture is untried); train without it, or in one process"
        )
    data = qdata.load(config.dataset, root=config.data_root, image_size=config.image_size)
    cfg = _resolve(config, data)
    state = None
    if resume:
        state = load_checkpoint(ckpt_path)
        for key in ("optimizer", "scheduler", "epoch", "config"):
            if key not in state:
                raise CheckpointError(
                    f"{ckpt_path} lacks {key!r}; it is not a training checkpoint written by qgrad"
                )
        _check_resume(state["config"], cfg, ckpt_path)

    torch.manual_seed(cfg.seed)
    model = _build_model(cfg.to_dict())
    if init_state is not None:
        _init_weights(model, cfg, init_state)
    if main:
        logger.info(
            "%s: %d training and %d test images, %d classes",
            cfg.dataset, data.num_train, data.num_test, data.num_classes,
        )
        _warn_if_model_misfits(cfg.model, data)
        if cfg.cuda_graph:
            logger.info("training steps run as CUDA graphs, each captured after a few eager steps")
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=layout)

    if data.num_train < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {data.num_train} training examples")
    if cfg.batch_size % processes.world_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} (the batch of all processes together) is not divisible by the "
            f"{processes.world_size} processes"
        )
    train_loader = data.loader(
        "train",
        cfg.batch_size,
        shuffle=True,
        augment=True,
        seed=cfg.seed,
        device=device,
        drop_last=True,
        rank=processes.rank,
        world_size=processes.world_size,
        memory_format=layout,
        workers=cfg.workers,
    )
    test_loader = data.loader(
        "test", max(256, cfg.batch_size), device=device, memory_format=layout, workers=cfg.workers
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)

    start_epoch, best, last = 0, None, None
    within, penalty_state = None, None  # a resumed epoch's start, the penalty's every-k position
    metrics_path = run_dir / METRICS_FILE
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        within = _checkpoint_within_epoch(state, steps_per_epoch, ckpt_path)
        penalty_state = state.get("penalty")
        best, last = state.get("best"), state.get("last")
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
        if main and start_epoch < cfg.epochs:  # a finished run is only read (it may sit on a read-only disk)
            # Lines for epochs after the checkpoint (written just before an interrupted checkpoint save) go.
            kept = [r for r in _read_metrics(metrics_path) if int(r.get("epoch", 0)) <= start_epoch]
            _save_text("".join(json.dumps(r) + "\n" for r in kept), metrics_path)
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _save_text("", metrics_path)
    if main and start_epoch < cfg.epochs:
        _save_text(json.dumps(cfg.to_dict(), indent=2) + "\n", run_dir / CONFIG_FILE)

    if start_epoch >= cfg.epochs:
        if main:
            logger.info("%s: all %d epochs are already done", run_dir, cfg.epochs)
        return {**(last or {}), **_summary(best, start_epoch, cfg, run_dir)}
    if main and within is not None:
        logger.info(
            "resuming epoch %d at batch %d of %d", start_epoch + 1, within["batch"] + 1, steps_per_epoch
        )
    # the module that trains: with several processes, DistributedDataParallel around the model (the files hold
    # the model's own state_dict, without the wrapper's "module." prefix)
    net = model
    if processes.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    penalty_start = 0 if cfg.init is not None else max(0, cfg.epochs - cfg.penalty_epochs)
    if main and cfg.penalty != "none" and cfg.init is None and penalty_start == 0 and start_epoch == 0:
        logger.warning(
            "the %s penalty is on from the first epoch (penalty_epochs %d >= epochs %d), with no plain "
            "training first: a penalty on an untrained model can keep it near chance (see the README). "
            "Lower --penalty-epochs, or fine-tune a trained model with --init",
            cfg.penalty, cfg.penalty_epochs, cfg.epochs,
        )
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    penalty, step = None, None
    done = start_epoch  # finished epochs
    stop = _StopRequests()
    stop.install()
    try:
        for epoch in range(start_epoch, end_epoch):
            if cfg.penalty != "none" and epoch >= penalty_start and penalty is None:
                penalty = _make_penalty(net, cfg)
                step = None
                if main:
                    logger.info("epoch %d: %s penalty on (lambda %g)", epoch + 1, cfg.penalty, cfg.lam)
            if step is None:
                step = _make_step(net, model, penalty, cfg)
            cycle = _every_k_cycle(penalty, step)
            if penalty_state is not None and cycle is not None:  # a resumed run's every-k position
                cycle.load_state_dict(penalty_state)
                penalty_state = None
            start, within = within, None
            train_loader.set_epoch(epoch, first_batch=0 if start is None else start["batch"])

            lr = optimizer.param_groups[0]["lr"] if start is None else start["lr"]  # the epoch's first

            def save_within(partial, epoch=epoch, lr=lr):
                if main:
                    _save_checkpoint(run_dir, model, optimizer, scheduler, epoch, cfg, best, last, device,
                                     _penalty_state(penalty, step), {**partial, "lr": lr})

            t0 = time.perf_counter()
            row = {"epoch": epoch + 1, "lr": lr}
            try:
                row.update(
                    _train_epoch(
                        net,
                        train_loader,
                        optimizer,
                        scheduler,
                        step,
                        device,
                        f"epoch {epoch + 1}/{cfg.epochs}",
                        progress and main,
                        processes,
                        start,
                        save_within,
                        cfg.checkpoint_every,
                        stop,
                    )
                )
            except _Interrupted as e:
                if main:
                    logger.info(
                        "%s: stopped in epoch %d/%d after batch %d of %d; checkpoint.pt holds the run so far "
                        "(continue with resume)", stop.name, epoch + 1, cfg.epochs, e.batch, steps_per_epoch,
                    )
                break
            row["test_loss"], row["test_acc"] = None, None
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                # the main process's model: its BatchNorm statistics are the ones DistributedDataParallel
                # hands to every process at the next forward, and the ones the checkpoint keeps
                if main:
                    row["test_loss"], row["test_acc"] = evaluate(model, test_loader)
                row["test_loss"], row["test_acc"] = processes.broadcast((row["test_loss"], row["test_acc"]))
            row["seconds"] = time.perf_counter() - t0
            last = row
            if row["test_acc"] is not None and (best is None or row["test_acc"] > best["test_acc"]):
                best = row
            if main:
                # metrics first, checkpoint second: a crash in between leaves an extra line that resume drops.
                _append_metrics(metrics_path, row)
                _save_checkpoint(run_dir, model, optimizer, scheduler, epoch + 1, cfg, best, last, device,
                                 _penalty_state(penalty, step))
                logger.info("%s", _fmt_epoch(row, cfg.epochs))
            done = epoch + 1
            if stop.agree(processes, device):  # a signal during the epoch's last step or its evaluation
                if main and done < cfg.epochs:
                    logger.info(
                        "%s: stopped after epoch %d/%d (continue with resume)", stop.name, done, cfg.epochs
                    )
                break
    finally:
        stop.uninstall()
        if penalty is not None:
            penalty.remove()
    return {**(last or {}), **_summary(best, done, cfg, run_dir, stop.name)}


def _summary(best, epoch, cfg, run_dir, interrupted=None) -> dict:
    return {
        "best_test_acc": None if best is None else best["test_acc"],
        "best_epoch": None if best is None else best["epoch"],
        "finished": epoch >= cfg.epochs,
        "interrupted": interrupted,
        "run_dir": str(run_dir),
    }


def _save_checkpoint(
    run_dir, model, optimizer, scheduler, epoch, cfg, best, last, device, penalty_state, within=None
) -> None:
    """Write ``checkpoint.pt`` after ``epoch`` finished epochs and, ``within`` an epoch, the next one's
    batches done, first learning rate and :func:`_totals` so far; at the end of an epoch (``within`` None)
    ``model.pt`` too."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    config = cfg.to_dict()
    model_state = model.state_dict()
    state = {
        "format": "qgrad.checkpoint",
        "version": 1,
        "model": model_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "rng": rng,
        "config": config,
        "best": best,
        "last": last,
    }
    if penalty_state is not None:
        state["penalty"] = penalty_state
    if within is not None:
        state["within_epoch"] = within
    _save_torch(state, run_dir / CHECKPOINT)
    if within is None:
        _save_torch({"model": model_state, "config": config}, run_dir / MODEL_FILE)


def _checkpoint_within_epoch(state: Dict[str, Any], steps_per_epoch: int, path: Path) -> Optional[dict]:
    """The ``within_epoch`` entry of a training checkpoint, checked against this run (None at an epoch's
    end)."""
    within = state.get("within_epoch")
    if within is None:
        return None
    keys = {"batch", "lr", "loss_sum", "correct", "count", "terms"}
    batch = within.get("batch") if isinstance(within, dict) else None
    if (
        not isinstance(within, dict)
        or set(within) != keys
        or isinstance(batch, bool)
        or not isinstance(batch, int)
        or not 0 < batch < steps_per_epoch
    ):
        raise CheckpointError(
            f"{path} holds a checkpoint inside an epoch that does not fit this run (an epoch has "
            f"{steps_per_epoch} batches); it was not written by qgrad train for these settings"
        )
    return within
