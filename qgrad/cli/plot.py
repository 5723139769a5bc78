"""``qgrad plot``: accuracy and KL per bit-width from ``qgrad sweep`` / ``qgrad demo`` results, as a picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from qgrad.plotting import METRICS


def add_parser(sub, parents) -> None:
    p = sub.add_parser(
        "plot",
        parents=parents,
        help="draw the accuracy and KL per bit-width of sweep or demo results",
        description=(
            "Draw one panel per metric with the (weight, activation) bit-widths along x and one line per model: "
            "the sweep of a run (its sweep.json, or the run directory holding it) or every model of a demo "
            "(demo.json: the baseline and each penalty mode). Needs matplotlib (pip install matplotlib)."
        ),
        epilog="example: qgrad plot runs/vgg_plain runs/vgg_l1 --out vgg.png; qgrad plot qgrad-demo/demo.json",
    )
    p.add_argument("sources", nargs="+", metavar="RESULT", help="sweep.json, demo.json, or a run directory")
    p.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="NAME",
        help="one name per RESULT (default: the run directory's name; for a demo, put in front of its models)",
    )
    p.add_argument(
        "--metrics",
        nargs="+",
        default=["accuracy", "kl"],
        choices=list(METRICS),
        help="panels to draw (default: accuracy kl)",
    )
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="image file; .png, .pdf or .svg (default: the first RESULT's file name with .png)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qgrad.plotting import load_series, plot_sweeps

    if args.labels is not None and len(args.labels) != len(args.sources):
        raise ValueError(f"--labels got {len(args.labels)} names for {len(args.sources)} results; give one each")
    series = {}
    for i, source in enumerate(args.sources):
        for name, rows in load_series(source, None if args.labels is None else args.labels[i]).items():
            if name in series:
                raise ValueError(f"two results are both named {name!r}; tell them apart with --labels")
            series[name] = rows
    first = Path(args.sources[0])
    out = Path(args.out) if args.out else (first / "sweep.png" if first.is_dir() else first.with_suffix(".png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = plot_sweeps(series, out, metrics=args.metrics, title=args.title)
    import matplotlib.pyplot as plt

    plt.close(figure)
    noun = "model" if len(series) == 1 else "models"
    print(f"wrote {out} ({len(series)} {noun}: {', '.join(series)})")
    return 0
