"""Command line: train/resume/overwrite/errors, sweep, the quick demo, and ``python -m qgrad``."""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import at_steps, send

import qgrad.cli.train
import qgrad.data
import qgrad.training
from qgrad.cli import main
from qgrad.cli.sweep import parse_config

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--dataset",
    "digits",
    "--model",
    "vgg_like",
    "--width",
    "0.0625",
    "--batch-size",
    "128",
    "--device",
    "cpu",
    "--no-progress",
]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-epoch run made as 1 epoch, a stop, and a resume that takes every setting from the stored run."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--stop-after", "1", "--out", str(out)]) == 0
    assert [r["epoch"] for r in _metrics(out)] == [1]
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    return out


def test_python_m_qgrad_help():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "qgrad", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "sweep", "demo"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    "command, option", [("train", "--penalty-epochs"), ("sweep", "--act-range"), ("demo", "--quick")]
)
def test_subcommand_help(capsys, command, option):
    assert main([command, "--help"]) == 0
    assert option in capsys.readouterr().out


def test_train_and_resume(run_dir, capsys):
    rows = _metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["width"] == 0.0625 and ckpt["config"]["epochs"] == 2
    # the lr of epoch 2 continues the cosine schedule of a 2-epoch run
    assert rows[1]["lr"] == pytest.approx(0.025)


def test_init_takes_the_architecture_from_the_run_it_names(run_dir, tmp_path, capsys):
    """A fine-tune that names neither --model nor --width gets those of the init run (the defaults would be
    the full-width VGG-like, which the tiny run's weights do not fit); a given flag still wins, and the
    mismatch it makes is reported."""
    rest = ["--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--no-progress"]
    assert main(["train", *rest, "--init", str(run_dir), "--out", str(tmp_path / "ft")]) == 0
    assert "--model vgg_like --width 0.0625 from the init checkpoint" in capsys.readouterr().err
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert (config["model"], config["width"], config["init"]) == ("vgg_like", 0.0625, str(run_dir))
    narrower = ["--init", str(run_dir), "--width", "0.125", "--out", str(tmp_path / "w")]
    assert main(["train", *rest, *narrower]) == 1
    assert "width 0.0625 vs 0.125" in capsys.readouterr().err


def test_recompute_trains_the_same_weights(tmp_path, capsys):
    """--recompute changes where the step's memory goes, not the step: the same weights, bit for bit."""
    runs = []
    for flags in ([], ["--recompute"]):
        out = tmp_path / ("recompute" if flags else "kept")
        assert main(["train", *TINY, "--epochs", "1", "--penalty", "l1", "--penalty-epochs", "1", *flags,
                     "--out", str(out)]) == 0
        runs.append(torch.load(out / "model.pt", weights_only=True)["model"])
    assert json.loads((tmp_path / "recompute" / "config.json").read_text())["recompute"] is True
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_train_channels_last_and_a_resume_that_keeps_it(tmp_path, capsys):
    out = tmp_path / "nhwc"
    assert main(["train", *TINY, "--epochs", "2", "--stop-after", "1", "--channels-last", "--out", str(out)]) == 0
    assert f"continue with: qgrad train --out {out} --resume" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "continue with" not in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["channels_last"] is True
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["test_acc"] > 0
    # the weights were trained (and saved) channels-last, and a contiguous model loads them
    weights = [t for t in torch.load(out / "model.pt", weights_only=True)["model"].values() if t.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not all(w.is_contiguous() for w in weights)
    model, _ = qgrad.training.load_model(out)
    assert all(p.is_contiguous() for p in model.parameters())


def test_progress_lines_without_a_terminal(tmp_path, capsys, monkeypatch):
    """With output to a file (here pytest's capture) tqdm draws no bar: plain lines report the epoch's
    progress instead, at most every PROGRESS_LINE_SECONDS (0 here: at every check, i.e. every 10 steps)."""
    monkeypatch.setattr(qgrad.training, "PROGRESS_LINE_SECONDS", 0.0)
    argv = ["train", *[a for a in TINY if a != "--no-progress"], "--batch-size", "32", "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": batch " in line]
    assert [line.split(",")[0] for line in lines] == [f"epoch 1/1: batch {b}/44" for b in (10, 20, 30, 40)]
    assert all("train loss" in line for line in lines)
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "quiet")]) == 0
    assert ": batch " not in capsys.readouterr().out


def test_train_refuses_to_overwrite(run_dir, capsys):
    before = (run_dir / "metrics.jsonl").read_text()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "already holds a checkpoint" in err and "--resume" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_a_run_without_checkpoint_and_a_file_are_not_overwritten(run_dir, tmp_path, capsys):
    """A finished run whose checkpoint.pt was deleted (model.pt and metrics kept) is a run too."""
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("model.pt", "metrics.jsonl", "config.json"):
        (kept / name).write_bytes((run_dir / name).read_bytes())
    before = (kept / "model.pt").read_bytes()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(kept)]) == 1
    assert "already holds a run (model.pt, metrics.jsonl) without a checkpoint" in capsys.readouterr().err
    assert (kept / "model.pt").read_bytes() == before
    assert main(["train", *TINY, "--epochs", "1", "--out", str(kept / "model.pt")]) == 1
    assert "is a file; give a directory" in capsys.readouterr().err


def test_a_run_directory_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live process of this machine
    assert main(["train", *TINY, "--epochs", "1", "--out", str(busy)]) == 1
    assert f"is in use by process {os.getpid()} on this machine" in capsys.readouterr().err
    assert not (busy / "metrics.jsonl").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    (busy / ".lock").write_text(f"{int(gone.stdout)} {socket.gethostname()}\n")  # a process that has ended
    assert main(["train", *TINY, "--epochs", "1", "--out", str(busy)]) == 0
    assert (busy / "model.pt").is_file() and not (busy / ".lock").exists()
    # a run that fails before writing anything leaves no directory behind
    (tmp_path / "empty").mkdir()
    assert main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "empty"), "--device", "cpu",
                 "--out", str(tmp_path / "failed")]) == 1
    assert "data_batch_1" in capsys.readouterr().err and not (tmp_path / "failed").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graph_without_cuda_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--cuda-graph", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "cuda_graph" in err and "needs a CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_checkpoint_every_writes_checkpoints_inside_epochs(tmp_path, capsys, monkeypatch):
    saved = []
    real = qgrad.training._save_checkpoint

    def recording(*args):
        saved.append(None if len(args) < 11 else args[10]["batch"])
        real(*args)

    monkeypatch.setattr(qgrad.training, "_save_checkpoint", recording)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--checkpoint-every", "4", "--out", str(out)]) == 0
    assert saved == [4, 8, None]  # 11 batches: after the 4th and the 8th, then the epoch's end
    assert json.loads((out / "config.json").read_text())["checkpoint_every"] == 4
    bad = ["train", *TINY, "--epochs", "1", "--checkpoint-every", "0", "--out", str(tmp_path / "bad")]
    assert main(bad) == 1
    assert "checkpoint_every must be a positive int or None, got 0" in capsys.readouterr().err


def test_sigterm_stops_with_a_checkpoint_and_the_signals_exit_code(tmp_path, capsys, monkeypatch):
    at_steps(monkeypatch, {3}, send(signal.SIGTERM))
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 128 + signal.SIGTERM
    printed = capsys.readouterr().out
    assert "stopped by SIGTERM with 0/2 epochs done" in printed
    assert f"qgrad train --out {out} --resume" in printed
    assert torch.load(out / "checkpoint.pt", weights_only=True)["within_epoch"]["batch"] == 3
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]


def test_resume_with_a_changed_setting_is_refused(run_dir, capsys):
    assert main(["train", "--out", str(run_dir), "--resume", "--lr", "0.2", "--no-progress"]) == 1
    assert "lr: stored 0.05, now 0.2" in capsys.readouterr().err


def test_missing_data_dir_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "cifar"
    argv = ["train", "--dataset", "cifar10", "--data-root", str(missing), "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["--debug", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("QGRAD_DEBUG", "1")
    assert main(argv) == 1
    assert "FileNotFoundError" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["train", "--penalty", "l3", "--out", str(tmp_path)]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["train"]) == 2  # --out is required
    assert main([]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "cifar10"], "dataset 'cifar10' needs --data-root DIR (the folder with the python batches"),
    (["--dataset", "digits", "--bits", "4"], "--bits sets the perturbation of --method worst-case"),
    (["--dataset", "digits", "--every", "4"], "--every and --method are options of --penalty l1; --penalty"),
    (["--dataset", "digits", "--penalty", "l2", "--method", "worst-case"], "--penalty l2 takes neither"),
    (["--dataset", "digits", "--lam", "0.1"], "--lam sets the penalty, but the run has none (--penalty none"),
    (["--dataset", "digits", "--penalty-epochs", "3"], "--penalty-epochs sets the penalty, but the run has"),
    (["--dataset", "digits", "--penalty", "l1", "--method", "worst-case", "--recompute"],
     "--recompute lowers the memory of --penalty l1 with --method exact; --penalty l1 with --method"),
])
def test_setting_errors_name_the_flags(tmp_path, capsys, flags, message):
    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sweep_prints_table_and_writes_json(run_dir, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert (
        main(["sweep", str(run_dir), "--configs", "8,8", "4,4", "f,4", "--out", str(out), "--no-progress"])
        == 0
    )
    text = capsys.readouterr().out
    assert text.count("\n|") >= 5  # header, separator, float row and three configs
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["weight_bits"], r["act_bits"]) for r in rows] == [(None, None), (8, 8), (4, 4), (None, 4)]
    # the float row is the model the run evaluated last
    assert rows[0]["accuracy"] == pytest.approx(_metrics(run_dir)[-1]["test_acc"], abs=1e-9)
    assert rows[0]["kl"] == 0.0
    n_test = len(qgrad.data.load("digits").test_y)
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 100.0 and r["kl"] >= 0.0 and r["samples"] == n_test
    # without --out, the JSON goes next to the model file
    assert main(["sweep", str(run_dir / "checkpoint.pt"), "--configs", "8,8", "--no-progress"]) == 0
    assert json.loads((run_dir / "sweep.json").read_text())["source"].endswith("checkpoint.pt")


@pytest.mark.parametrize("bad", ["9x", "8", "8,4,4", "8,1", "17,4", "a,b"])
def test_sweep_rejects_bad_configs(run_dir, capsys, bad):
    assert main(["sweep", str(run_dir), "--configs", bad]) == 2
    assert "bad config" in capsys.readouterr().err


def test_parse_config():
    assert parse_config("8,4") == (8, 4)
    assert parse_config("f,4") == (None, 4)
    assert parse_config("None, FLOAT") == (None, None)
    with pytest.raises(argparse.ArgumentTypeError, match=r"\[2, 16\]"):
        parse_config("1,4")


def test_sweep_on_a_dataset_the_model_does_not_fit_is_a_one_line_error(run_dir, tmp_path, capsys):
    from test_data import write_cifar

    write_cifar(tmp_path / "cifar")
    argv = ["sweep", str(run_dir), "--dataset", "cifar10", "--data-root", str(tmp_path / "cifar")]
    assert main(argv + ["--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "model for digits (in_channels 1), which does not fit cifar10 (in_channels 3)" in err


def test_sweep_option_errors(run_dir, tmp_path, capsys):
    assert main(["sweep", str(run_dir), "--workers", "2", "--no-progress"]) == 1
    assert "--workers applies to image folders" in capsys.readouterr().err
    # a run whose data folder moved away: the error says where the folder came from
    from test_data import write_cifar

    moved = tmp_path / "run"
    write_cifar(tmp_path / "cifar")
    cfg = ["--dataset", "cifar10", "--data-root", str(tmp_path / "cifar"), "--batch-size", "10"]
    assert main(["train", *TINY, *cfg, "--epochs", "1", "--out", str(moved)]) == 0
    (tmp_path / "cifar").rename(tmp_path / "cifar_moved")
    assert main(["sweep", str(moved), "--no-progress"]) == 1
    assert "stored with the run; give --data-root if the data moved" in capsys.readouterr().err
    assert main(["sweep", str(moved), "--data-root", str(tmp_path / "cifar_moved"), "--no-progress"]) == 0


def test_sweep_of_a_missing_run_is_a_runtime_error(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nothing")]) == 1
    assert f"no run directory or checkpoint file at {tmp_path / 'nothing'}" in capsys.readouterr().err


def test_quick_demo_with_several_penalty_modes(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--width", "0.0625", "--out", str(out), "--no-progress"]
    assert main(argv + ["--configs", "4,4", "--modes", "every=2", "worst-case:bits=4", "every=2"]) == 0
    text = capsys.readouterr().out
    header = (
        "| config (W,A) | baseline acc | l1 every=2 acc | l1 worst-case:bits=4 acc | baseline KL | "
        "l1 every=2 KL | l1 worst-case:bits=4 KL |"
    )
    assert header in text
    result = json.loads((out / "demo.json").read_text())
    assert result["modes"] == {"l1_every2": "every=2", "l1_worst_case_bits4": "worst-case:bits=4"}
    assert "l1" not in result and not (out / "finetune_l1").exists()
    runs = (("l1_every2", dict(every=2)), ("l1_worst_case_bits4", dict(method="worst-case", bits=4)))
    for key, settings in runs:
        config = json.loads((out / f"finetune_{key}" / "config.json").read_text())
        assert {k: config[k] for k in settings} == settings
        assert result[key][1]["accuracy"] != result[key][0]["accuracy"] or result[key][1]["kl"] > 0
        assert _metrics(out / f"finetune_{key}")[0]["penalty"] is not None
    # an earlier demo's mode folders count as results to overwrite
    assert main(argv + ["--modes", "exact"]) == 1
    assert "finetune_l1_every2" in capsys.readouterr().err


def test_a_second_ctrl_c_says_whether_there_is_a_checkpoint_to_resume(run_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):  # what a second Ctrl-C does: a KeyboardInterrupt out of the step
        raise KeyboardInterrupt

    monkeypatch.setattr(qgrad.cli.train, "train", interrupted)
    assert main(["train", *TINY, "--out", str(tmp_path / "new")]) == 130
    assert "interrupted; no checkpoint was written yet: start the run again" in capsys.readouterr().err
    assert main(["train", "--out", str(run_dir), "--resume"]) == 130
    assert "interrupted; --resume continues from the last checkpoint" in capsys.readouterr().err


def test_the_command_lines_warnings_are_one_line(monkeypatch):
    import warnings

    import qgrad.cli

    monkeypatch.setattr(qgrad.cli, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(qgrad.cli, "main", lambda: 0)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    assert qgrad.cli.entry() == 0
    line = warnings.formatwarning("qgrad: no fused kernels", RuntimeWarning, "/x/function.py", 625, "code")
    assert line == "RuntimeWarning: qgrad: no fused kernels\n"


def test_ctrl_c_stops_the_demo(tmp_path, capsys, monkeypatch):
    at_steps(monkeypatch, {2}, send(signal.SIGINT))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--width", "0.0625", "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "qgrad demo: interrupted; a demo does not resume: run it again with --overwrite" in err
    assert not (out / "finetune").exists()  # the first stage stopped, and nothing ran after it


@pytest.mark.parametrize("mode", ["every=0", "worst-case:bits=1", "fast", "every=two"])
def test_demo_rejects_unknown_penalty_modes(mode, capsys):
    assert main(["demo", "--modes", mode]) == 2
    assert "unknown penalty mode" in capsys.readouterr().err


def test_quick_demo(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "qgrad-demo-quick"  # its own default folder: a quick check leaves qgrad-demo to the demo
    argv = ["demo", "--quick", "--width", "0.0625", "--no-progress"]
    assert main(argv) == 0
    assert not (tmp_path / "qgrad-demo").exists()
    text = capsys.readouterr().out
    assert "| config (W,A) | baseline acc | l1 acc | baseline KL | l1 KL |" in text
    result = json.loads((out / "demo.json").read_text())
    assert [tuple(c) for c in result["configs"]] == [(None, None), (8, 4), (4, 4), (3, 3)]
    for key in ("baseline", "l1"):
        assert len(result[key]) == 4
    table_rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and "acc" not in line and "---" not in line
    ]
    assert len(table_rows) == 4
    # both fine-tunes start from the baseline and run the same number of epochs
    for sub, key in (("finetune", "baseline"), ("finetune_l1", "l1")):
        rows = _metrics(out / sub)
        assert [r["epoch"] for r in rows] == [1]
        assert result[key][0]["accuracy"] == pytest.approx(rows[-1]["test_acc"], abs=1e-9)
    assert _metrics(out / "finetune_l1")[0]["penalty"] is not None
    assert _metrics(out / "finetune")[0]["penalty"] is None
    # a second demo into the same folder needs --overwrite
    assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_train_and_sweep_on_an_image_folder(tmp_path, capsys):
    """ImageNet's layout end to end: the ImageNet ResNet-18 trained from train/ (one plain epoch, then one
    with the l1 penalty after a stop and resume), swept on val/ with calibrated ranges, then fine-tuned from
    a torchvision-style weights file."""
    Image = pytest.importorskip("PIL.Image")
    rng = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for label, name in enumerate(("n01", "n02")):
            for i in range(per_class):
                # class n02 is brighter, so the tiny model has something to learn
                pixels = torch.randint(0, 128, (20, 24, 3), generator=rng, dtype=torch.uint8) + 100 * label
                folder = tmp_path / "folder" / split / name
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.JPEG")
    out = tmp_path / "run"
    args = [
        "train", "--dataset", "imagenet", "--data-root", str(tmp_path / "folder"), "--model",
        "resnet18_imagenet", "--width", "0.0625", "--image-size", "16", "--workers", "0", "--batch-size", "4",
        "--epochs", "2", "--penalty", "l1", "--penalty-epochs", "1", "--device", "cpu", "--no-progress",
        "--out", str(out),
    ]
    assert main([*args, "--stop-after", "1"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--workers", "1", "--no-progress"]) == 0
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["penalty"] is None and rows[1]["penalty"] > 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_classes"], config["in_channels"], config["image_size"]) == (2, 3, 16)
    capsys.readouterr()
    assert main(["sweep", str(out), "--configs", "8,8", "--act-range", "minmax", "--calib-batches", "1",
                 "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    assert [(r["weight_bits"], r["act_bits"], r["samples"]) for r in result["rows"]] == [
        (None, None, 4), (8, 8, 4)
    ]
    assert result["dataset"] == "imagenet" and "| 8 " in printed

    # fine-tuning from a torchvision-style weights file (a bare state_dict, shortcuts named "downsample")
    trained = torch.load(out / "model.pt", weights_only=True)["model"]
    theirs = {k.replace(".shortcut.", ".downsample."): v for k, v in trained.items()}
    torch.save(theirs, tmp_path / "torchvision.pth")
    tuned = tmp_path / "tuned"
    init = ["--init", str(tmp_path / "torchvision.pth"), "--epochs", "1", "--out", str(tuned)]
    assert main([*args[:args.index("--epochs")], "--penalty", "l1", *init, "--no-progress"]) == 0
    assert _metrics(tuned)[0]["penalty"] > 0
