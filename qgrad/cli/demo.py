"""``qgrad demo``: the gradient-l1 penalty against plain fine-tuning on scikit-learn's digits, in minutes.

Steps (all deterministic under ``--seed``):

1. train a baseline VGG-like (narrow) on digits without a penalty;
2. continue the baseline for F epochs of plain fine-tuning, and separately fine-tune it for the same F
   epochs with the gradient-l1 penalty, so both models have seen the same number of epochs;
3. quantize both after training (symmetric uniform, activation ranges from BatchNorm) at falling bit-widths
   and evaluate them on the test split: accuracy and KL(p_float || p_quant).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from qgrad.cli.sweep import config_label, parse_config, run_sweep, with_float_first

# (W, A) from the common 8/8 and the paper's 4-bit activations down to where a plain model breaks.
CONFIGS = ((8, 8), (8, 4), (6, 4), (4, 4), (4, 3), (3, 3), (3, 2), (2, 2))
QUICK_CONFIGS = ((8, 4), (4, 4), (3, 3))
SUBDIRS = ("baseline", "finetune", "finetune_l1")
RESULT_FILE = "demo.json"

MODEL, DATASET = "vgg_like", "digits"
WIDTH, BATCH_SIZE = 0.25, 64
EPOCHS, FINETUNE_EPOCHS = 30, 10
LR, FINETUNE_LR = 0.05, 0.01
# lambda was picked once, on seed 0, from {0.001, 0.003, 0.005, 0.007, 0.01, 0.02, 0.05} by the paper's
# criterion that the float accuracy must not drop: 0.005 keeps it within one test image (0.3 points) of the
# plain fine-tune, while 0.01 and above cost 10 or more points on this small model.
LAM = 0.005


def add_parser(sub, parents) -> None:
    p = sub.add_parser(
        "demo",
        parents=parents,
        help="plain vs gradient-l1 fine-tuning under quantization, on digits (about a CPU minute)",
        description=(
            "Train a narrow VGG-like on scikit-learn's digits, then fine-tune it for the same number of "
            "epochs twice: without a penalty (the baseline) and with the gradient-l1 penalty. Quantize both "
            "after training (symmetric uniform, activation ranges from BatchNorm) at falling bit-widths and "
            "print their test accuracy and KL(p_float || p_quant) side by side. Deterministic under --seed; "
            "writes DIR/demo.json and the three run directories."
        ),
    )
    p.add_argument("--out", default="qgrad-demo", metavar="DIR", help="output folder (default: qgrad-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help=f"baseline epochs (default: {EPOCHS})")
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=None,
        help=f"epochs of each fine-tuning run (default: {FINETUNE_EPOCHS})",
    )
    p.add_argument("--lam", type=float, default=LAM, help=f"lambda of the l1 penalty (default: {LAM})")
    p.add_argument(
        "--width", type=float, default=WIDTH, help=f"channel multiplier of vgg_like (default: {WIDTH})"
    )
    p.add_argument(
        "--configs",
        nargs="+",
        type=parse_config,
        default=None,
        metavar="W,A",
        help="bit-width pairs to sweep (default: " + " ".join(config_label(c) for c in CONFIGS) + ")",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a much smaller run (3+1 epochs, 3 configurations) to check the installation",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --out")
    p.add_argument("--verbose", action="store_true", help="print one line per training epoch")
    p.add_argument("--no-progress", action="store_true", help="no per-batch progress bars")
    p.set_defaults(run=run)


def _prepare_out(out: Path, overwrite: bool) -> None:
    existing = [out / name for name in (*SUBDIRS, RESULT_FILE) if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds demo results ({', '.join(p.name for p in existing)}); "
            "pass --overwrite to replace them or choose another --out"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def markdown_table(configs, base_rows, l1_rows) -> str:
    """One row per configuration: accuracies (percent) and KL(p_float || p_quant) of both models."""
    lines = [
        "| config (W,A) | baseline acc | l1 acc | baseline KL | l1 KL |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for config, b, r in zip(configs, base_rows, l1_rows):
        kl = "-" if config == (None, None) else None
        lines.append(
            f"| {config_label(config)} | {b['accuracy']:.2f} | {r['accuracy']:.2f} | "
            f"{kl or format(b['kl'], '.4f')} | {kl or format(r['kl'], '.4f')} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from qgrad.training import resolve_device

    epochs = args.epochs if args.epochs is not None else (3 if args.quick else EPOCHS)
    ft_epochs = (
        args.finetune_epochs if args.finetune_epochs is not None else (1 if args.quick else FINETUNE_EPOCHS)
    )
    configs = with_float_first(args.configs or (QUICK_CONFIGS if args.quick else CONFIGS))
    for name, value in (("--epochs", epochs), ("--finetune-epochs", ft_epochs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    device = resolve_device(args.device)
    out = Path(args.out)
    _prepare_out(out, args.overwrite)
    train_log = logging.getLogger("qgrad.training")
    level = train_log.level
    if not args.verbose:
        train_log.setLevel(logging.WARNING)
    try:
        return _run(args, out, device, epochs, ft_epochs, configs)
    finally:
        train_log.setLevel(level)


def _run(args, out: Path, device, epochs: int, ft_epochs: int, configs) -> int:
    from qgrad.data import load
    from qgrad.training import TrainConfig, load_model, train

    progress = not args.no_progress
    t_start = time.perf_counter()

    dataset = load(DATASET)
    print(
        f"qgrad demo: {MODEL} (width {args.width}) on {DATASET} ({len(dataset.train_y)} train / "
        f"{len(dataset.test_y)} test images), seed {args.seed}, device {device}"
    )
    common = dict(
        model=MODEL,
        dataset=DATASET,
        width=args.width,
        batch_size=BATCH_SIZE,
        seed=args.seed,
        device=str(device),
    )
    stages = [
        (
            "baseline",
            f"train the baseline for {epochs} epochs",
            TrainConfig(epochs=epochs, lr=LR, out=str(out / "baseline"), **common),
        ),
        (
            "finetune",
            f"fine-tune it {ft_epochs} more epochs without penalty",
            TrainConfig(
                epochs=ft_epochs,
                lr=FINETUNE_LR,
                init=str(out / "baseline" / "model.pt"),
                out=str(out / "finetune"),
                **common,
            ),
        ),
        (
            "finetune_l1",
            f"fine-tune it {ft_epochs} more epochs with the l1 penalty (lambda {args.lam:g})",
            TrainConfig(
                epochs=ft_epochs,
                lr=FINETUNE_LR,
                penalty="l1",
                lam=args.lam,
                init=str(out / "baseline" / "model.pt"),
                out=str(out / "finetune_l1"),
                **common,
            ),
        ),
    ]
    summary = {}
    for i, (key, text, config) in enumerate(stages, 1):
        t0 = time.perf_counter()
        result = train(config, progress=progress)
        summary[key] = {"test_acc": result["test_acc"], "seconds": time.perf_counter() - t0}
        print(f"[{i}/4] {text}: test acc {result['test_acc']:.2f}% ({summary[key]['seconds']:.0f} s)")

    t0 = time.perf_counter()
    rows = {}
    for key in ("finetune", "finetune_l1"):
        model, _ = load_model(out / key, device=device)
        rows[key] = run_sweep(model, dataset, configs[1:], device=device, progress=False)
    labels = " ".join(config_label(c) for c in configs[1:])
    print(
        f"[4/4] quantize both after training (BatchNorm ranges) at {labels} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print()
    print(markdown_table(configs, rows["finetune"], rows["finetune_l1"]))
    print()

    result = {
        "model": MODEL,
        "width": args.width,
        "dataset": DATASET,
        "seed": args.seed,
        "device": str(device),
        "epochs": epochs,
        "finetune_epochs": ft_epochs,
        "lam": args.lam,
        "act_range": "bn",
        "runs": summary,
        "configs": [list(c) for c in configs],
        "baseline": rows["finetune"],
        "l1": rows["finetune_l1"],
        "seconds": time.perf_counter() - t_start,
    }
    path = out / RESULT_FILE
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        "baseline = plain fine-tuning of the same length; KL = mean KL(p_float || p_quant) over test batches"
    )
    print(f"wrote {path} ({result['seconds']:.0f} s in total)")
    return 0
