"""``qgrad train``: one training run (from scratch, a fine-tune from ``--init``, or resumed)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from qgrad import data, models
from qgrad.data.datasets import check_root
from qgrad.training import (
    CHECKPOINT,
    METHODS,
    PENALTIES,
    TrainConfig,
    check_penalty_options,
    find_checkpoint,
    load_checkpoint,
    train,
)

DEFAULTS = TrainConfig()

# (flag, TrainConfig field, type, help); every default is None, so --resume can tell which options were given.
_OPTIONS = (
    ("--model", "model", str, "architecture, from qgrad.models.names()"),
    ("--dataset", "dataset", str, "dataset: cifar10 or imagenet (both need --data-root), or digits"),
    (
        "--data-root",
        "data_root",
        str,
        "folder with the dataset files (CIFAR-10: the python batches; ImageNet: the folder holding train/ "
        "and val/, one sub-folder per class in each)",
    ),
    ("--image-size", "image_size", int, "imagenet only: side of the square input crops (default: 224)"),
    (
        "--workers",
        "workers",
        int,
        "imagenet only: image-decoding processes per training process (default: the usable cores shared "
        "among the training processes of the machine, 1 to 8)",
    ),
    ("--width", "width", float, "channel multiplier of the model"),
    ("--epochs", "epochs", int, "epochs of the run; the cosine learning-rate schedule spans all of them"),
    ("--batch-size", "batch_size", int, "training batch size (of all processes together under torchrun)"),
    (
        "--lr",
        "lr",
        float,
        "initial SGD learning rate, cosine decay to 0 stepped per batch (default: 0.05 from scratch, 0.01 "
        "with --init)",
    ),
    ("--momentum", "momentum", float, "SGD momentum"),
    (
        "--weight-decay",
        "weight_decay",
        float,
        "SGD weight decay (default: 5e-4 from scratch, 1e-4 with --init)",
    ),
    ("--penalty", "penalty", str, "gradient penalty: l1 (the paper's), l2, dq (orthogonality), none"),
    (
        "--lam",
        "lam",
        float,
        (
            "penalty strength lambda (l1/l2: both the weight and the activation term) (default: 0.05, the "
            "paper's, for l1 and l2; 0.005 for l1 on digits; 1e-4 for dq)"
        ),
    ),
    ("--every", "every", int, "l1 only: penalize every N-th step, weighted by N (plain steps between)"),
    ("--method", "method", str, "l1 only: exact (double backward) or worst-case (extra forward/backward)"),
    ("--bits", "bits", int, "worst-case only: perturb each tensor by half a bin of a BITS-bit grid"),
    (
        "--penalty-epochs",
        "penalty_epochs",
        int,
        "regularize only in the last N epochs (with --init the whole run is regularized)",
    ),
    (
        "--init",
        "init",
        str,
        "start from the weights of this model.pt/checkpoint.pt or run directory (a qgrad run's --model and "
        "--width are taken from it unless given)",
    ),
    ("--seed", "seed", int, "seed of the initialization and the data order/augmentation"),
    (
        "--device",
        "device",
        str,
        "auto (CUDA when available), cpu, cuda, cuda:N; under torchrun auto/cuda use the GPU of LOCAL_RANK",
    ),
    ("--eval-every", "eval_every", int, "evaluate on the test split every N epochs (and after the last)"),
    (
        "--checkpoint-every",
        "checkpoint_every",
        int,
        "also write checkpoint.pt every N training steps inside epochs, so that a crash loses at most N "
        "steps (--resume continues from the next batch)",
    ),
    ("--channels-last", "channels_last", bool, "weights and image batches in channels-last (NHWC) memory layout"),
    (
        "--recompute",
        "recompute",
        bool,
        "exact l1 only: recompute the forward's tensors of each residual block / Conv-BN-ReLU unit in the "
        "backward instead of keeping them (the same steps with less memory and more time)",
    ),
    (
        "--cuda-graph",
        "cuda_graph",
        bool,
        "replay each step's forward and backward as a CUDA graph (the same steps without the host's cost of "
        "launching each kernel; one GPU)",
    ),
)


def add_parser(sub, parents) -> None:
    p = sub.add_parser(
        "train",
        parents=parents,
        help="train a model, optionally with a gradient penalty",
        description=(
            "Train a model with SGD and a cosine schedule. With --penalty the penalty is switched on for the "
            "last --penalty-epochs epochs, or for the whole run when fine-tuning from --init. RUN_DIR "
            "receives config.json, metrics.jsonl (one line per epoch), checkpoint.pt (to --resume) and "
            "model.pt. Started by torchrun, the processes train data-parallel (DistributedDataParallel), "
            "each on its part of every batch."
        ),
        epilog=(
            "example: qgrad train --model vgg_like --dataset cifar10 --data-root data/cifar-10-batches-py "
            "--epochs 100 --penalty l1 --lam 0.05 --penalty-epochs 15 --out runs/vgg_l1; on 4 GPUs: "
            "torchrun --nproc_per_node 4 -m qgrad train ... (same options)"
        ),
    )
    for flag, field, kind, text in _OPTIONS:
        default = getattr(DEFAULTS, field)
        extra = {}
        if field == "penalty":
            extra["choices"] = PENALTIES
        elif field == "method":
            extra["choices"] = METHODS
        elif field == "model":
            extra["choices"] = models.names()
        elif field == "dataset":
            extra["choices"] = data.names()
        if kind is bool:  # a switch; None when absent, so that --resume keeps the stored setting
            p.add_argument(flag, dest=field, action="store_true", default=None, help=text)
            continue
        # no "(default: ...)" where the default depends on other options or there is none
        unshown = (
            "weight_decay", "lam", "data_root", "init", "bits", "image_size", "workers", "lr",
            "checkpoint_every",
        )
        shown = "" if field in unshown else f" (default: {default})"
        p.add_argument(flag, dest=field, type=kind, default=None, help=text + shown, **extra)
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (created if needed)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the stopped run in RUN_DIR exactly; options not given are taken from the stored run",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N epochs of this invocation (the schedule still spans --epochs); "
        "continue with --resume",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-batch progress bar")
    p.set_defaults(run=run)


def _flag(field: str, value=None) -> str:
    return f"--{field.replace('_', '-')}" + ("" if value is None else f" {value}")


def _check_flags(settings: dict, given: dict) -> None:
    """The setting errors that TrainConfig and the data loader would report by their argument names, reported
    by the flags (before the run directory is made), and penalty flags ``given`` for a run without one (which
    TrainConfig cannot tell from its defaults)."""
    def value(field):
        return settings.get(field, getattr(DEFAULTS, field))

    unused = [_flag(f) for f in ("lam", "penalty_epochs") if f in given]
    if value("penalty") == "none" and unused:
        raise ValueError(
            f"{' and '.join(unused)} {'sets' if len(unused) == 1 else 'set'} the penalty, but the run has "
            "none (--penalty none, the default); "
            "give --penalty l1, l2 or dq"
        )

    check_root(value("dataset"), value("data_root"), argument="--data-root DIR")
    check_penalty_options(
        value("penalty"), value("every"), value("method"), value("bits"), value("recompute"), spell=_flag
    )


# what a fine-tune takes from its init checkpoint when the command line does not say
_ARCHITECTURE = ("model", "width")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: the given options over the defaults, or over the stored settings (--resume)."""
    given = {field: getattr(args, field) for _, field, _, _ in _OPTIONS if getattr(args, field) is not None}
    given["out"] = args.out
    if args.resume:
        ckpt = Path(args.out) / CHECKPOINT
        if not ckpt.is_file():
            raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist")
        stored = load_checkpoint(ckpt).get("config")
        if not isinstance(stored, dict):
            raise ValueError(f"{ckpt} holds no run settings; it was not written by qgrad train")
        _check_flags({**stored, **given}, given)
        return TrainConfig.from_dict({**stored, **given})
    _check_flags(given, given)
    if "init" in given and not all(f in given for f in _ARCHITECTURE):
        given.update(_architecture_of(given["init"], given))
    return TrainConfig(**given)


def _architecture_of(init: str, given: dict) -> dict:
    """The ``--model``/``--width`` of the qgrad run that wrote ``init``, for those not in ``given`` (nothing
    for a bare state_dict, such as torchvision's weights file)."""
    stored = load_checkpoint(find_checkpoint(init)).get("config")
    if not isinstance(stored, dict):
        return {}
    taken = {f: stored[f] for f in _ARCHITECTURE if f not in given and stored.get(f) is not None}
    if taken:
        flags = " ".join(_flag(f, v) for f, v in taken.items())
        print(f"qgrad train: {flags} from the init checkpoint {init}", file=sys.stderr)
    return taken


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = train(config, progress=not args.no_progress, resume=args.resume, stop_after=args.stop_after)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun the first process reports for all
    acc = result.get("test_acc")
    best = result.get("best_test_acc")
    if result["finished"]:
        state = "finished"
    elif result["interrupted"]:
        done = result.get("epoch", 0)
        state = f"stopped by {result['interrupted']} with {done}/{config.epochs} epochs done"
    else:
        state = f"stopped after epoch {result['epoch']}/{config.epochs}"
    parts = [state if "train_loss" not in result else f"{state}: train loss {result['train_loss']:.4f}"]
    if acc is not None:
        parts.append(f"test acc {acc:.2f}%")
    if best is not None:
        parts.append(f"best {best:.2f}% (epoch {result['best_epoch']})")
    print(", ".join(parts) + f"; run directory {result['run_dir']}")
    if not result["finished"]:
        print(f"continue with: qgrad train --out {result['run_dir']} --resume")
    if result["interrupted"] and not result["finished"]:
        # the shell's code for a process ended by a signal
        return 128 + signal.Signals.__members__.get(result["interrupted"], signal.SIGTERM)
    return 0
