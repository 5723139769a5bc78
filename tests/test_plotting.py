"""``qgrad.plotting`` and ``qgrad plot``: reading sweep / demo results and drawing them."""
import json
import math
import sys

import pytest

from qgrad.cli import main

matplotlib = pytest.importorskip("matplotlib", reason="plotting needs matplotlib (the test extra installs it)")
from qgrad.plotting import load_series, plot_sweeps  # noqa: E402

CONFIGS = [(None, None), (8, 4), (4, 4), (2, 2)]


def rows(accuracies, kls):
    return [
        {"weight_bits": w, "act_bits": a, "accuracy": acc, "loss": 1.0 + i, "kl": kl, "samples": 10}
        for i, ((w, a), acc, kl) in enumerate(zip(CONFIGS, accuracies, kls))
    ]


BASE = rows([99.0, 98.0, 90.0, 10.0], [0.0, 0.01, 0.1, 5.0])
L1 = rows([98.5, 98.2, 95.0, 12.0], [0.0, 0.005, 0.05, 3.0])


def test_lines_hold_the_rows_and_the_file_is_written(tmp_path):
    out = tmp_path / "sweep.png"
    fig = plot_sweeps({"baseline": BASE, "l1": L1}, out, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc, kl = fig.axes
    assert [t.get_text() for t in acc.get_xticklabels()] == ["float", "8,4", "4,4", "2,2"]
    assert [line.get_label() for line in acc.lines] == ["baseline", "l1"]
    assert list(acc.lines[1].get_ydata()) == [98.5, 98.2, 95.0, 12.0]
    # KL on a log scale: the float row's 0 has no place there and is a gap
    assert kl.get_yscale() == "log"
    y = list(kl.lines[0].get_ydata())
    assert math.isnan(y[0]) and y[1:] == [0.01, 0.1, 5.0]


def test_a_missing_configuration_is_a_gap_and_float_comes_first():
    partial = [r for r in L1 if r["weight_bits"] != 8][::-1]  # other order, without 8,4
    fig = plot_sweeps({"baseline": BASE, "partial": partial}, metrics=["accuracy"])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["float", "8,4", "4,4", "2,2"]
    y = list(ax.lines[1].get_ydata())
    assert math.isnan(y[1]) and y[0] == 98.5 and y[2:] == [95.0, 12.0]


def test_configurations_are_ordered_by_bits_whichever_series_comes_first():
    coarse = [{"weight_bits": w, "act_bits": a, "accuracy": 50.0} for w, a in ((4, 4), (None, None), (3, 2))]
    fine = [{"weight_bits": w, "act_bits": a, "accuracy": 90.0} for w, a in ((8, 8), (None, 4), (4, 3), (8, 4))]
    fig = plot_sweeps({"coarse": coarse, "fine": fine}, metrics=["accuracy"])
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["float", "f,4", "8,8", "8,4", "4,4", "4,3", "3,2"]


def test_plot_errors():
    with pytest.raises(ValueError, match="series is empty"):
        plot_sweeps({})
    with pytest.raises(ValueError, match="metrics must be"):
        plot_sweeps({"a": BASE}, metrics=["top5"])
    with pytest.raises(ValueError, match="needs weight_bits and act_bits"):
        plot_sweeps({"a": [{"accuracy": 1.0}]})


def write_sweep(path, rows_, source):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": str(source), "model": "vgg_like", "rows": rows_}))
    return path


def write_demo(path):
    demo = {"modes": {"l1": "exact", "l1_every4": "every=4"}, "baseline": BASE, "l1": L1, "l1_every4": L1}
    path.write_text(json.dumps(demo))
    return path


def test_load_series_reads_sweeps_demos_and_run_directories(tmp_path):
    run = tmp_path / "runs" / "vgg_l1"
    sweep = write_sweep(run / "sweep.json", L1, run / "model.pt")
    assert load_series(sweep) == {"vgg_l1": L1}
    assert load_series(run, label="mine") == {"mine": L1}
    demo = write_demo(tmp_path / "demo.json")
    assert list(load_series(demo)) == ["baseline", "l1", "l1 every=4"]
    assert list(load_series(demo, label="s1")) == ["s1 baseline", "s1 l1", "s1 l1 every=4"]


def test_load_series_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such result file"):
        load_series(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="holds no sweep.json"):
        load_series(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON result file"):
        load_series(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"accuracy": 3}))
    with pytest.raises(ValueError, match="holds neither"):
        load_series(other)


def test_plot_command(tmp_path, capsys):
    demo = write_demo(tmp_path / "demo.json")
    assert main(["plot", str(demo)]) == 0
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert "3 models: baseline, l1, l1 every=4" in capsys.readouterr().out
    a = write_sweep(tmp_path / "a" / "sweep.json", BASE, tmp_path / "a" / "model.pt")
    b = write_sweep(tmp_path / "b" / "sweep.json", L1, tmp_path / "b" / "model.pt")
    out = tmp_path / "figs" / "ab.svg"
    assert main(["plot", str(a.parent), str(b), "--metrics", "accuracy", "--out", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml")
    # the same name twice, and a label count that does not fit, are refused with a message
    assert main(["plot", str(a), str(a)]) == 1
    assert "tell them apart with --labels" in capsys.readouterr().err
    assert main(["plot", str(a), str(b), "--labels", "one"]) == 1
    assert "--labels got 1 names for 2 results" in capsys.readouterr().err


def test_without_matplotlib_the_command_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["plot", str(write_demo(tmp_path / "demo.json"))]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "demo.png").exists()
