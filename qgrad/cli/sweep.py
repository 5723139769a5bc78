"""``qgrad sweep``: post-training quantization of a trained model at several (weight, activation) bits."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from qgrad.nn.fake_quant import MAX_BITS, MIN_BITS

Config = Tuple[Optional[int], Optional[int]]

FLOAT_NAMES = ("f", "fp", "float", "none")
DEFAULT_CONFIGS = ((8, 4), (6, 4), (4, 4))  # the paper's CIFAR-10 columns: 4-bit activations, weights 8 -> 4


def parse_config(text: str) -> Config:
    """``"W,A"`` -> ``(W, A)``; each side an int in [2, 16], or ``f``/``fp``/``float``/``none`` (-> None)."""
    parts = text.split(",")
    usage = (
        f"expected W,A with each side an int in [{MIN_BITS}, {MAX_BITS}] or f/none for float "
        "(e.g. 8,4 or f,4)"
    )
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"bad config {text!r}: {usage}")
    out = []
    for part in parts:
        part = part.strip().lower()
        if part in FLOAT_NAMES:
            out.append(None)
            continue
        try:
            bits = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad config {text!r}: {part!r} is not a bit-width; {usage}"
            ) from None
        if not MIN_BITS <= bits <= MAX_BITS:
            raise argparse.ArgumentTypeError(f"bad config {text!r}: {bits} bits is out of range; {usage}")
        out.append(bits)
    return out[0], out[1]


def with_float_first(configs: Sequence[Config]) -> List[Config]:
    """``configs`` without duplicates, preceded by the float row ``(None, None)``."""
    out: List[Config] = [(None, None)]
    for c in configs:
        if c not in out:
            out.append(c)
    return out


def add_parser(sub, parents) -> None:
    p = sub.add_parser(
        "sweep",
        parents=parents,
        help="accuracy of a trained model after post-training quantization",
        description=(
            "Rebuild a model trained by 'qgrad train', quantize it (symmetric uniform, weights per tensor) "
            "at each (weight bits, activation bits) configuration and evaluate it on the dataset's test "
            "split. Prints a markdown table (float row first) and writes the rows as JSON."
        ),
        epilog="example: qgrad sweep runs/vgg_l1 --configs 8,4 6,4 4,4 f,4",
    )
    p.add_argument("source", metavar="RUN_DIR_OR_CKPT", help="run directory, model.pt or checkpoint.pt")
    p.add_argument(
        "--configs",
        nargs="+",
        type=parse_config,
        default=list(DEFAULT_CONFIGS),
        metavar="W,A",
        help="bit-width pairs; f or none keeps that side in float (default: 8,4 6,4 4,4)",
    )
    p.add_argument(
        "--act-range",
        choices=("bn", "minmax", "percentile"),
        default="bn",
        help="activation ranges: from the BatchNorm parameters (data-free, the paper's choice), or "
        "calibrated on training batches by min/max or percentile (default: bn)",
    )
    p.add_argument(
        "--calib-batches",
        type=int,
        default=8,
        metavar="N",
        help="training batches used to calibrate minmax/percentile ranges (default: 8)",
    )
    p.add_argument("--dataset", default=None, help="evaluate on this dataset instead of the one trained on")
    p.add_argument("--data-root", default=None, help="dataset folder, if different from the stored one")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default: 256)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="imagenet only: image-decoding processes (default: the usable cores, 1 to 8)",
    )
    p.add_argument(
        "--out", default=None, metavar="FILE", help="JSON output (default: sweep.json next to the model)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def calibration_batches(dataset, batch_size: int, num_batches: int, device, workers=None) -> list:
    """``num_batches`` shuffled, un-augmented training batches (seed 0): calibration data for PTQ ranges.

    ``dataset`` is a :class:`qgrad.data.ArrayDataset` or :class:`qgrad.data.FolderDataset` (ImageNet: the
    evaluation views of training images)."""
    loader = dataset.loader("train", batch_size, shuffle=True, seed=0, device=device, workers=workers)
    return list(itertools.islice(loader, num_batches))


def run_sweep(
    model,
    dataset,
    configs,
    act_range="bn",
    calib_batches=8,
    batch_size=256,
    device=None,
    progress=False,
    workers=None,
) -> list:
    """Evaluate ``model`` on ``dataset``'s test split, float first, then quantized at each of ``configs``.

    ``workers``: image-decoding processes for an image-folder dataset (see :class:`qgrad.data.FolderLoader`).
    """
    from qgrad.quantization import sweep

    test = dataset.loader("test", batch_size, device=device, workers=workers)
    calib = None
    if act_range != "bn":
        calib = calibration_batches(dataset, batch_size, calib_batches, device, workers)
    return sweep(
        model,
        test,
        configs=with_float_first(configs),
        act_range=act_range,
        calib=calib,
        device=device,
        progress=progress,
    )


def run(args: argparse.Namespace) -> int:
    from qgrad.data import load
    from qgrad.quantization import format_table
    from qgrad.training import find_checkpoint, load_model, resolve_device

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.act_range != "bn" and args.calib_batches < 1:
        raise ValueError(
            f"--calib-batches must be >= 1 with --act-range {args.act_range}, got {args.calib_batches}"
        )
    device = resolve_device(args.device)
    file = find_checkpoint(args.source)
    model, config = load_model(file, device=device)
    name = args.dataset or config["dataset"]
    if args.workers is not None and name != "imagenet":
        raise ValueError(f"--workers applies to image folders (--dataset imagenet), not to {name!r}")
    root, image_size = args.data_root, None
    if name == config["dataset"]:
        root = config.get("data_root") if root is None else root
        image_size = config.get("image_size")  # the size the model was trained at
    try:
        dataset = load(name, root=root, image_size=image_size)
    except FileNotFoundError as exc:
        if args.data_root is not None:
            raise
        hint = "the folder stored with the run; give --data-root if the data moved"
        raise FileNotFoundError(f"{exc} ({hint})") from exc
    for key, value in (("in_channels", dataset.in_channels), ("num_classes", dataset.num_classes)):
        if config.get(key) not in (None, value):
            raise ValueError(
                f"{file} holds a model for {config['dataset']} ({key} {config[key]}), which does not fit "
                f"{name} ({key} {value}); sweep it on its own dataset"
            )
    rows = run_sweep(
        model,
        dataset,
        args.configs,
        act_range=args.act_range,
        calib_batches=args.calib_batches,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress and sys.stderr.isatty(),  # a log file gets no bar redraws
        workers=args.workers,
    )
    print(format_table(rows))
    out = Path(args.out) if args.out else file.parent / "sweep.json"
    result = {
        "source": str(file),
        "model": config["model"],
        "width": config["width"],
        "dataset": name,
        "act_range": args.act_range,
        "calib_batches": args.calib_batches if args.act_range != "bn" else 0,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}; draw it (next to other runs' sweeps) with: qgrad plot {out}")
    return 0
