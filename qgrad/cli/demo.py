"""``qgrad demo``: the gradient-l1 penalty against plain fine-tuning on scikit-learn's digits, in minutes.

Steps (all deterministic under ``--seed``):

1. train a baseline VGG-like (narrow) on digits without a penalty;
2. continue the baseline for F epochs of plain fine-tuning, and separately fine-tune it for the same F
   epochs with the gradient-l1 penalty -- once per penalty mode of ``--modes`` (``exact``, ``every=K``,
   ``worst-case``, ``worst-case:bits=B``) -- so every model has seen the same number of epochs;
3. quantize them after training (symmetric uniform, activation ranges from BatchNorm) at falling bit-widths
   and evaluate them on the test split: accuracy and KL(p_float || p_quant).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from qgrad.cli.sweep import parse_config, run_sweep, with_float_first
from qgrad.quantization.sweep import config_label

# (W, A) from the common 8/8 and the paper's 4-bit activations down to where a plain model breaks.
CONFIGS = ((8, 8), (8, 4), (6, 4), (4, 4), (4, 3), (3, 3), (3, 2), (2, 2))
QUICK_CONFIGS = ((8, 4), (4, 4), (3, 3))
MODES = ("exact",)
RESULT_FILE = "demo.json"
OUT, QUICK_OUT = "qgrad-demo", "qgrad-demo-quick"

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
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"output folder (default: {OUT}, or {QUICK_OUT} with --quick, so that a quick check does not "
        "stand in the way of the full demo)",
    )
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
    p.add_argument(
        "--modes",
        nargs="+",
        type=parse_mode,
        default=None,
        metavar="MODE",
        help="penalty modes to fine-tune with, one run each: exact, every=K, worst-case, worst-case:bits=B "
        "(default: exact)",
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


def parse_mode(text: str) -> dict:
    """``"exact"``, ``"every=K"``, ``"worst-case"`` or ``"worst-case:bits=B"`` -> the l1 settings of
    :class:`qgrad.training.TrainConfig` (``every``, ``method``, ``bits``) plus the mode's ``name`` (its
    label and the suffix of its run directory)."""
    t = text.strip().lower()
    try:
        if t == "exact":
            return {"name": "exact", "every": 1, "method": "exact", "bits": None}
        if t.startswith("every="):
            k = int(t[len("every="):])
            if k >= 1:
                return {"name": f"every={k}", "every": k, "method": "exact", "bits": None}
        if t == "worst-case":
            return {"name": "worst-case", "every": 1, "method": "worst-case", "bits": None}
        if t.startswith("worst-case:bits="):
            b = int(t[len("worst-case:bits="):])
            if 2 <= b <= 16:
                return {"name": f"worst-case:bits={b}", "every": 1, "method": "worst-case", "bits": b}
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"unknown penalty mode {text!r}: use exact, every=K (K >= 1), worst-case or worst-case:bits=B "
        "(B in [2, 16])"
    )


def _run_key(mode: dict) -> str:
    """``l1`` for the exact mode (the demo's default), else ``l1_every4``, ``l1_worst_case``, ..."""
    if mode["name"] == "exact":
        return "l1"
    slug = mode["name"].replace("worst-case", "worst_case").replace(":bits=", "_bits").replace("=", "")
    return f"l1_{slug}"


def _prepare_out(out: Path, overwrite: bool) -> None:
    known = [p.name for p in out.glob("finetune_l1*")] if out.is_dir() else []
    existing = [out / name for name in ("baseline", "finetune", *known, RESULT_FILE) if (out / name).exists()]
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


def markdown_table(configs, base_rows, runs) -> str:
    """One row per configuration: accuracies (percent) and KL(p_float || p_quant) of the baseline and of each
    penalized run. ``runs``: ``[(label, rows)]`` in column order."""
    labels = ["baseline"] + [label for label, _ in runs]
    columns = [base_rows] + [rows for _, rows in runs]
    head = " | ".join([f"{label} acc" for label in labels] + [f"{label} KL" for label in labels])
    lines = [f"| config (W,A) | {head} |", "| --- |" + " ---: |" * (2 * len(labels))]
    for i, config in enumerate(configs):
        accs = [f"{rows[i]['accuracy']:.2f}" for rows in columns]
        kls = ["-" if config == (None, None) else f"{rows[i]['kl']:.4f}" for rows in columns]
        lines.append(f"| {config_label(config)} | " + " | ".join(accs + kls) + " |")
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
    out = Path(args.out if args.out is not None else (QUICK_OUT if args.quick else OUT))
    _prepare_out(out, args.overwrite)
    train_log = logging.getLogger("qgrad.training")
    level = train_log.level
    if not args.verbose:
        train_log.setLevel(logging.WARNING)
    try:
        return _run(args, out, device, epochs, ft_epochs, configs)
    finally:
        train_log.setLevel(level)


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _run(args, out: Path, device, epochs: int, ft_epochs: int, configs) -> int:
    from qgrad.data import load
    from qgrad.training import TrainConfig, load_model, train

    progress = not args.no_progress
    t_start = time.perf_counter()

    dataset = load(DATASET)
    print(
        f"qgrad demo: {MODEL} (width {args.width}) on {DATASET} ({len(dataset.train_y)} train / "
        f"{len(dataset.test_y)} test images), seed {args.seed}, device {device}",
        flush=True,  # progress lines reach a log file as they happen
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
            f"train the baseline for {_epochs(epochs)}",
            TrainConfig(epochs=epochs, lr=LR, out=str(out / "baseline"), **common),
        ),
        (
            "finetune",
            f"fine-tune it {_epochs(ft_epochs)} more without penalty",
            TrainConfig(
                epochs=ft_epochs,
                lr=FINETUNE_LR,
                init=str(out / "baseline" / "model.pt"),
                out=str(out / "finetune"),
                **common,
            ),
        ),
    ]
    # in the order given, each once
    modes = list({m["name"]: m for m in (args.modes or [parse_mode(m) for m in MODES])}.values())
    for mode in modes:
        key = _run_key(mode)
        detail = "" if mode["name"] == "exact" else f", {mode['name']}"
        stages.append(
            (
                key,
                f"fine-tune it {_epochs(ft_epochs)} more with the l1 penalty (lambda {args.lam:g}{detail})",
                TrainConfig(
                    epochs=ft_epochs,
                    lr=FINETUNE_LR,
                    penalty="l1",
                    lam=args.lam,
                    every=mode["every"],
                    method=mode["method"],
                    bits=mode["bits"],
                    init=str(out / "baseline" / "model.pt"),
                    out=str(out / f"finetune_{key}"),
                    **common,
                ),
            )
        )
    total = len(stages) + 1
    summary = {}
    for i, (key, text, config) in enumerate(stages, 1):
        t0 = time.perf_counter()
        result = train(config, progress=progress)
        if result["interrupted"]:  # Ctrl-C ended the stage with a checkpoint: the demo stops there
            raise KeyboardInterrupt
        summary[key] = {"test_acc": result["test_acc"], "seconds": time.perf_counter() - t0}
        seconds = summary[key]["seconds"]
        print(f"[{i}/{total}] {text}: test acc {result['test_acc']:.2f}% ({seconds:.0f} s)", flush=True)

    t0 = time.perf_counter()
    rows = {}
    for key, _, config in stages[1:]:
        model, _ = load_model(config.out, device=device)
        rows[key] = run_sweep(model, dataset, configs[1:], device=device, progress=False)
    labels = " ".join(config_label(c) for c in configs[1:])
    print(
        f"[{total}/{total}] quantize the fine-tuned models after training (BatchNorm ranges) at {labels} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print()
    runs = [("l1" if m["name"] == "exact" else f"l1 {m['name']}", rows[_run_key(m)]) for m in modes]
    print(markdown_table(configs, rows["finetune"], runs))
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
        "modes": {_run_key(m): m["name"] for m in modes},
        "act_range": "bn",
        "runs": summary,
        "configs": [list(c) for c in configs],
        "baseline": rows["finetune"],
        **{_run_key(m): rows[_run_key(m)] for m in modes},
        "seconds": time.perf_counter() - t_start,
    }
    path = out / RESULT_FILE
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        "baseline = plain fine-tuning of the same length; KL = mean KL(p_float || p_quant) over test batches"
    )
    print(f"wrote {path} ({result['seconds']:.0f} s in total); draw it with: qgrad plot {path}")
    return 0
