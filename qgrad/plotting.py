"""Pictures of post-training-quantization sweeps: accuracy and KL divergence per (weight, activation) bit-width,
one line per model, the way the paper compares a regularized model with its baseline.

The input is what :func:`qgrad.sweep` returns (rows with ``weight_bits``, ``act_bits``, ``accuracy``,
``loss``, ``kl``), or the files the commands write: ``qgrad sweep``'s ``sweep.json`` (one model) and ``qgrad
demo``'s ``demo.json`` (the baseline and every penalty mode). Matplotlib is an optional dependency
(``pip install matplotlib``); it is imported only when a figure is drawn, with the backend matplotlib
chooses (``Agg`` on a machine without a display; inline in a notebook).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from qgrad.quantization.sweep import config_label

__all__ = ["METRICS", "load_series", "plot_sweeps"]

# metric -> (axis label, log scale)
METRICS = {
    "accuracy": ("test accuracy (%)", False),
    "kl": ("KL(p_float || p_quant)", True),
    "loss": ("test loss", True),
}

Rows = Sequence[Mapping[str, object]]
Config = Tuple[Optional[int], Optional[int]]


def load_series(path: Union[str, Path], label: Optional[str] = None) -> Dict[str, List[dict]]:
    """The sweep rows in a result file, by series name.

    ``path``: a ``sweep.json`` (one series, named ``label`` or after the run directory of the swept model), a
    ``demo.json`` (``baseline`` and one series per penalty mode, e.g. ``l1``, ``l1 every=4``; ``label`` is
    put in front of their names), or a run directory that holds a ``sweep.json``.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "sweep.json").is_file():
            raise FileNotFoundError(f"{path} holds no sweep.json; run 'qgrad sweep {path}' first")
        path = path / "sweep.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no such result file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON result file of qgrad sweep or qgrad demo: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        name = label or Path(str(data.get("source", path))).parent.name or path.stem
        return {name: data["rows"]}
    if isinstance(data, dict) and isinstance(data.get("baseline"), list) and isinstance(data.get("modes"), dict):
        prefix = f"{label} " if label else ""
        series = {f"{prefix}baseline": data["baseline"]}
        for key, mode in data["modes"].items():
            if isinstance(data.get(key), list):
                series[f"{prefix}l1" + ("" if mode == "exact" else f" {mode}")] = data[key]
        return series
    raise ValueError(
        f"{path} holds neither the 'rows' of qgrad sweep nor the 'baseline' and penalty modes of qgrad demo"
    )


def _value(row: Mapping[str, object], metric: str) -> float:
    value = row.get(metric)
    return float(value) if isinstance(value, (int, float)) else math.nan


def plot_sweeps(
    series: Mapping[str, Rows],
    path: Optional[Union[str, Path]] = None,
    metrics: Sequence[str] = ("accuracy", "kl"),
    title: Optional[str] = None,
):
    """Draw one panel per metric, the configurations along x (float first, then by weight bits and activation
    bits, both descending), one line per series; save it to ``path`` when given (the format follows the
    suffix: .png, .pdf, .svg).

    Args:
        series: name -> sweep rows (each a mapping with ``weight_bits``, ``act_bits`` and the metrics).
        path: where to save the figure, or None.
        metrics: names from :data:`METRICS`. KL and loss use a log scale, where the float row's KL of 0
            has no place and is left out.
        title: the figure's title.

    Returns:
        the matplotlib ``Figure``. A configuration a series lacks is a gap in its line.
    """
    if not series:
        raise ValueError("series is empty: give at least one named list of sweep rows")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty selection of {sorted(METRICS)}, got {list(metrics)}")
    configs: List[Config] = []
    table: Dict[str, Dict[Config, Mapping[str, object]]] = {}
    for name, rows in series.items():
        table[name] = {}
        for row in rows:
            try:
                config = (row["weight_bits"], row["act_bits"])
            except (KeyError, TypeError):
                raise ValueError(f"series {name!r}: every row needs weight_bits and act_bits, got {row!r}") from None
            table[name][config] = row
            if config not in configs:
                configs.append(config)
    # float first, then from the finest grid to the coarsest, as sweeps list them (a side kept float ranks
    # above every bit-width): the x axis runs the same way whichever series named a configuration first
    configs.sort(key=lambda c: tuple(math.inf if b is None else b for b in c), reverse=True)

    try:
        import matplotlib.pyplot as plt  # on a machine without a display matplotlib itself picks Agg
    except ImportError as e:
        raise ImportError(f"plotting needs matplotlib ({e}); pip install matplotlib") from None

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False)
    x = list(range(len(configs)))
    for ax, metric in zip(axes[0], metrics):
        label, log = METRICS[metric]
        for name in series:
            y = [_value(table[name][c], metric) if c in table[name] else math.nan for c in configs]
            if log:
                y = [v if v > 0 else math.nan for v in y]
            ax.plot(x, y, marker="o", label=name)
        ax.set_xticks(x)
        ax.set_xticklabels([config_label(c) for c in configs])
        ax.set_xlabel("bits (weights, activations)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    # one legend for all panels, below them, where it covers no line
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    if title:
        fig.suptitle(title)
    rows = math.ceil(len(labels) / 5)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * rows, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig
