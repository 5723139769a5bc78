"""Training loop: outputs of a run, exact resume, fine-tuning from init, and the error paths.

All runs use scikit-learn's digits and a VGG-like at width 1/16, so each epoch takes well under a second.
"""

import dataclasses
import json
import os
import shutil
import signal

import pytest
import torch
from torch import nn

import qgrad.data
import qgrad.models
import qgrad.training
from qgrad.data import DeviceLoader
from qgrad.training import (
    CheckpointError,
    TrainConfig,
    TrainingError,
    load_checkpoint,
    load_model,
    train,
)

TINY = dict(model="vgg_like", dataset="digits", width=0.0625, batch_size=128, lr=0.05, seed=0, device="cpu")
LAM = 1e-3


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _params(state):
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-epoch run with the l1 penalty in its last epoch, and the same run stopped after epoch 1."""
    root = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(epochs=2, penalty="l1", lam=LAM, penalty_epochs=1, **TINY)
    full = train(TrainConfig(**{**cfg.to_dict(), "out": str(root / "full")}), progress=False)
    stopped = train(
        TrainConfig(**{**cfg.to_dict(), "out": str(root / "stopped")}), progress=False, stop_after=1
    )
    return {
        "root": root,
        "full": root / "full",
        "stopped": root / "stopped",
        "result": full,
        "stopped_result": stopped,
        "config": cfg,
    }


def _copy_stopped(runs, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(runs["stopped"], dst)
    return dst


def test_run_writes_loadable_checkpoint_and_metrics(runs):
    run_dir = runs["full"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "model.pt"):  # as open() would create them
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "epoch", "rng", "config", "best", "last"}
    assert ckpt["config"]["penalty"] == "l1" and ckpt["config"]["num_classes"] == 10
    model_file = torch.load(run_dir / "model.pt", weights_only=True)
    for k, v in ckpt["model"].items():
        assert torch.equal(model_file["model"][k], v), k
    assert json.loads((run_dir / "config.json").read_text()) == ckpt["config"]

    rows = _metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[1]["test_acc"] > 50.0  # chance is 10%
    # cosine schedule stepped per batch: epoch 2 starts half-way, at lr/2
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[1]["lr"] == pytest.approx(0.025)
    # the penalty is only on in the last epoch, and its value is lam * (sum of the two unweighted terms)
    assert rows[0]["penalty"] is None
    terms = rows[1]["penalty_terms"]
    assert set(terms) == {"weight_l1", "activation_l1"}
    assert rows[1]["penalty"] == pytest.approx(LAM * (terms["weight_l1"] + terms["activation_l1"]), rel=1e-5)
    assert runs["result"]["finished"] and runs["result"]["epoch"] == 2


def test_load_model_reproduces_the_recorded_test_accuracy(runs):
    model, config = load_model(runs["full"])
    assert not model.training and config["width"] == TINY["width"]
    data = qgrad.data.load("digits")
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x in data.test_x.split(100)])
    acc = 100.0 * (pred == data.test_y).double().mean().item()
    assert acc == pytest.approx(_metrics(runs["full"])[-1]["test_acc"], abs=1e-9)


def test_resume_is_bit_identical_and_drops_stale_metric_lines(runs, tmp_path):
    run_dir = _copy_stopped(runs, tmp_path)
    assert not runs["stopped_result"]["finished"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # a line for epoch 2 written just before an interrupted checkpoint save must not survive the resume
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": -1.0}) + "\n")
    cfg = TrainConfig(**{**runs["config"].to_dict(), "out": str(run_dir)})
    result = train(cfg, progress=False, resume=True)
    assert result["finished"]

    a = torch.load(runs["full"] / "checkpoint.pt", weights_only=True)
    b = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]

    ra, rb = _metrics(runs["full"]), _metrics(run_dir)
    assert [r["epoch"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        x.pop("seconds"), y.pop("seconds")
        assert x == y


def _same_run(a, b):
    """Two run directories hold the same parameters, optimizer state and metrics (but the epoch times)."""
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    assert "within_epoch" not in cb
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for k, state in ca["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], cb["optimizer"]["state"][k]["momentum_buffer"])
    assert ca["scheduler"]["last_epoch"] == cb["scheduler"]["last_epoch"]
    ra, rb = _metrics(a), _metrics(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        x.pop("seconds"), y.pop("seconds")
        assert x == y


def test_resume_continues_the_every_k_cycle(runs, tmp_path):
    # 11 steps per epoch and every=2: the second epoch starts on a plain step, also when resumed
    steps = len(qgrad.data.load("digits").train_y) // TINY["batch_size"]
    assert steps % 2 == 1
    cfg = TrainConfig(**TINY, epochs=2, penalty="l1", lam=0.02, every=2, init=str(runs["full"] / "model.pt"))
    train(dataclasses.replace(cfg, out=str(tmp_path / "full")), progress=False)
    train(dataclasses.replace(cfg, out=str(tmp_path / "resumed")), progress=False, stop_after=1)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["penalty"]
    assert state["calls"] == steps
    train(dataclasses.replace(cfg, out=str(tmp_path / "resumed")), progress=False, resume=True)
    _same_run(tmp_path / "full", tmp_path / "resumed")


def at_steps(monkeypatch, calls, action):
    """Make the trainer's steps run ``action()`` at the start of their calls numbered ``calls`` (from 1)."""
    real_step_fn = qgrad.training._step_fn
    count = [0]

    def step_fn(net, penalty):
        step = real_step_fn(net, penalty)

        def acting(x, y):
            count[0] += 1
            if count[0] in calls:
                action()
            return step(x, y)

        return acting

    monkeypatch.setattr(qgrad.training, "_step_fn", step_fn)


def send(signum, times=1):
    """An action for :func:`at_steps`: send ``signum`` to this process ``times`` times."""
    return lambda: [os.kill(os.getpid(), signum) for _ in range(times)]


class Crash(Exception):
    pass


def crash():
    raise Crash


def test_a_crash_inside_an_epoch_resumes_from_the_last_checkpoint_in_it(runs, tmp_path, monkeypatch):
    steps = len(qgrad.data.load("digits").train_y) // TINY["batch_size"]
    cfg = TrainConfig(**{**runs["config"].to_dict(), "every": 3, "out": None})
    train(dataclasses.replace(cfg, out=str(tmp_path / "full")), progress=False)

    run_dir = tmp_path / "crashed"
    at_steps(monkeypatch, {steps + 9}, crash)  # the 9th batch of epoch 2
    with pytest.raises(Crash):
        train(dataclasses.replace(cfg, out=str(run_dir), checkpoint_every=5), progress=False)
    monkeypatch.undo()
    # steps 5 and 10 of the run fell in epoch 1, 15 in epoch 2 (its 4th batch); model.pt and metrics.jsonl
    # are those of epoch 1
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["scheduler"]["last_epoch"] == 15
    within = ckpt["within_epoch"]
    assert within["batch"] == 15 - steps and within["count"] == within["batch"] * TINY["batch_size"]
    assert set(within["terms"]) == {"penalty", "weight_l1", "activation_l1", "penalty_scale"}
    assert ckpt["penalty"]["calls"] == within["batch"]
    assert [r["epoch"] for r in _metrics(run_dir)] == [1]
    assert torch.load(run_dir / "model.pt", weights_only=True)["model"].keys() == ckpt["model"].keys()
    epoch_1 = torch.load(runs["stopped"] / "model.pt", weights_only=True)["model"]
    model_file = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(model_file[k], epoch_1[k]) for k in epoch_1)

    # resumed without checkpoints inside epochs (a setting a resume may change): the same run
    result = train(dataclasses.replace(cfg, out=str(run_dir)), progress=False, resume=True)
    assert result["finished"]
    _same_run(tmp_path / "full", run_dir)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_with_a_checkpoint_and_resume_ends_the_same(runs, tmp_path, monkeypatch,
                                                                             signum):
    steps = len(qgrad.data.load("digits").train_y) // TINY["batch_size"]
    cfg = TrainConfig(**{**runs["config"].to_dict(), "every": 3, "out": None})
    train(dataclasses.replace(cfg, out=str(tmp_path / "full")), progress=False)
    before = signal.getsignal(signum)
    at_steps(monkeypatch, {steps + 5}, send(signum))
    run_dir = tmp_path / "stopped"
    result = train(dataclasses.replace(cfg, out=str(run_dir)), progress=False)
    monkeypatch.undo()
    assert signal.getsignal(signum) is before
    assert result["interrupted"] == signal.Signals(signum).name and not result["finished"]
    assert result["epoch"] == 1  # the last finished epoch's row
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["within_epoch"]["batch"] == 5  # the step that got the signal ended
    assert [r["epoch"] for r in _metrics(run_dir)] == [1]
    result = train(dataclasses.replace(cfg, out=str(run_dir)), progress=False, resume=True)
    assert result["finished"] and result["interrupted"] is None
    _same_run(tmp_path / "full", run_dir)


def test_sigterm_after_sigint_is_the_same_request(runs, tmp_path, monkeypatch):
    # a scheduler may follow a user's Ctrl-C with its own SIGTERM
    def both():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)

    at_steps(monkeypatch, {3}, both)
    result = train(dataclasses.replace(runs["config"], out=str(tmp_path / "run")), progress=False)
    assert result["interrupted"] == "SIGINT"
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["within_epoch"]["batch"] == 3


def test_a_signal_in_the_last_step_ends_the_epoch_and_a_second_acts_as_usual(runs, tmp_path, monkeypatch):
    steps = len(qgrad.data.load("digits").train_y) // TINY["batch_size"]
    cfg = TrainConfig(**{**runs["config"].to_dict(), "out": str(tmp_path / "last")})
    at_steps(monkeypatch, {steps}, send(signal.SIGTERM))
    result = train(cfg, progress=False)
    assert result["interrupted"] == "SIGTERM" and result["epoch"] == 1 and not result["finished"]
    ckpt = torch.load(tmp_path / "last" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and "within_epoch" not in ckpt

    at_steps(monkeypatch, {2}, send(signal.SIGINT, times=2))
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(cfg, out=str(tmp_path / "twice")), progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_checkpoint_inside_an_epoch_that_does_not_fit_the_run_is_refused(runs, tmp_path):
    run_dir = _copy_stopped(runs, tmp_path)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    steps = len(qgrad.data.load("digits").train_y) // TINY["batch_size"]
    good = {"batch": 3, "lr": 0.02, "loss_sum": 1.0, "correct": 1, "count": 384, "terms": {}}
    cfg = TrainConfig(**{**runs["config"].to_dict(), "out": str(run_dir)})
    for within in ({**good, "batch": steps}, {**good, "batch": 0}, {"batch": 3}, [3]):
        torch.save({**ckpt, "within_epoch": within}, run_dir / "checkpoint.pt")
        with pytest.raises(CheckpointError, match="inside an epoch that does not fit"):
            train(cfg, progress=False, resume=True)


def test_a_run_stored_before_a_setting_existed_resumes_with_its_default(runs, tmp_path):
    """A checkpoint written before ``channels_last`` existed lacks it; the run was trained with the default,
    so resuming it with the default is no change of settings."""
    run_dir = _copy_stopped(runs, tmp_path)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del state["config"]["channels_last"]
    torch.save(state, run_dir / "checkpoint.pt")
    cfg = TrainConfig(**{**runs["config"].to_dict(), "out": str(run_dir)})
    assert train(cfg, progress=False, resume=True)["finished"]
    with pytest.raises(TrainingError, match="channels_last: stored False, now True"):
        train(dataclasses.replace(cfg, channels_last=True, epochs=3), progress=False, resume=True)


def test_resuming_a_finished_run_only_reads_it(runs, tmp_path):
    run_dir = tmp_path / "done"
    shutil.copytree(runs["full"], run_dir)
    files = sorted(run_dir.iterdir())
    stamps = [(p.name, p.stat().st_mtime_ns, p.read_bytes()) for p in files]
    run_dir.chmod(0o555)  # read-only, as a finished run on a shared disk (root ignores it; the stamps do not)
    try:
        cfg = TrainConfig(**{**runs["config"].to_dict(), "out": str(run_dir), "device": "cpu"})
        result = train(cfg, progress=False, resume=True)
    finally:
        run_dir.chmod(0o755)
    assert result["finished"] and result["test_acc"] == runs["result"]["test_acc"]
    assert [(p.name, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run_dir.iterdir())] == stamps


def test_resume_with_other_settings_or_without_checkpoint_fails(runs, tmp_path):
    run_dir = _copy_stopped(runs, tmp_path)
    before = (run_dir / "checkpoint.pt").read_bytes()
    cfg = TrainConfig(**{**runs["config"].to_dict(), "out": str(run_dir), "lr": 0.1})
    with pytest.raises(TrainingError, match=r"lr: stored 0.05, now 0.1"):
        train(cfg, progress=False, resume=True)
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(TrainConfig(epochs=1, out=str(tmp_path / "empty"), **TINY), progress=False, resume=True)


def test_refuses_to_overwrite_a_run(runs):
    before = (runs["full"] / "metrics.jsonl").read_text()
    cfg = TrainConfig(**{**runs["config"].to_dict(), "out": str(runs["full"])})
    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        train(cfg, progress=False)
    assert (runs["full"] / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "penalty, terms", [("l2", {"weight_l2", "activation_l2"}), ("dq", {"orthogonality"})]
)
def test_finetune_from_init_regularizes_throughout(runs, tmp_path, penalty, terms):
    # lr 1e-9 keeps the weights where init put them, which shows init was loaded (a fresh model differs).
    init = runs["full"] / "model.pt"
    cfg = TrainConfig(
        **{**TINY, "lr": 1e-9},
        epochs=1,
        penalty=penalty,
        lam=LAM,
        penalty_epochs=0,
        init=str(init),
        out=str(tmp_path / penalty),
    )
    result = train(cfg, progress=False)
    assert result["penalty"] is not None and set(result["penalty_terms"]) == terms
    assert result["penalty"] == pytest.approx(LAM * sum(result["penalty_terms"].values()), rel=1e-5)
    config = json.loads((tmp_path / penalty / "config.json").read_text())
    assert config["weight_decay"] == 1e-4  # the fine-tuning default
    start = _params(torch.load(init, weights_only=True)["model"])
    end = _params(torch.load(tmp_path / penalty / "model.pt", weights_only=True)["model"])
    for k in start:
        torch.testing.assert_close(end[k], start[k], rtol=0, atol=1e-6)
    fresh = _params(qgrad.models.get("vgg_like", 10, TINY["width"], 1).state_dict())
    assert any(not torch.allclose(fresh[k], start[k]) for k in start)


def test_learning_rate_defaults_to_a_fine_tuning_rate_with_init(runs, tmp_path):
    tiny = {k: v for k, v in TINY.items() if k != "lr"}
    train(TrainConfig(**tiny, epochs=1, out=str(tmp_path / "scratch")), progress=False)
    train(TrainConfig(**tiny, epochs=1, init=str(runs["full"]), out=str(tmp_path / "tuned")), progress=False)
    for run, lr in (("scratch", 0.05), ("tuned", 0.01)):
        assert json.loads((tmp_path / run / "config.json").read_text())["lr"] == lr
        assert _metrics(tmp_path / run)[0]["lr"] == pytest.approx(lr)


@pytest.mark.parametrize(
    "mode", [dict(every=2), dict(method="worst-case"), dict(method="worst-case", bits=4)]
)
def test_l1_modes_train_and_differ_from_the_exact_run(runs, tmp_path, mode):
    init = runs["full"] / "model.pt"
    common = dict(**TINY, epochs=1, penalty="l1", lam=0.05, penalty_epochs=0, init=str(init))
    train(TrainConfig(**common, out=str(tmp_path / "exact")), progress=False)
    result = train(TrainConfig(**common, **mode, out=str(tmp_path / "mode")), progress=False)
    config = json.loads((tmp_path / "mode" / "config.json").read_text())
    assert {k: config[k] for k in mode} == mode
    if "every" in mode:
        # penalized on steps 0, 2, 4, ... with the weight doubled: the scale averages 2 * ceil(n / 2) / n
        steps = len(qgrad.data.load("digits").train_y) // TINY["batch_size"]
        assert result["penalty_terms"]["penalty_scale"] == pytest.approx(2 * ((steps + 1) // 2) / steps)
    else:
        assert "penalty_scale" not in result["penalty_terms"]
    assert result["penalty"] > 0
    end_exact = torch.load(tmp_path / "exact" / "model.pt", weights_only=True)["model"]
    end_mode = torch.load(tmp_path / "mode" / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(end_exact[k], end_mode[k]) for k in _params(end_exact))


def test_unreadable_init_checkpoint_names_the_file(runs, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.pt"
    blob = (runs["full"] / "model.pt").read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    for path in (garbage, truncated, tmp_path / "missing.pt"):
        cfg = TrainConfig(epochs=1, init=str(path), out=str(tmp_path / "out"), **TINY)
        with pytest.raises(CheckpointError, match=str(path)):
            train(cfg, progress=False)
        with pytest.raises(CheckpointError, match=str(path)):
            load_model(path)
    assert not (tmp_path / "out").exists()
    assert set(load_checkpoint(runs["full"] / "checkpoint.pt")) >= {"model", "config"}


def test_missing_cifar10_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    cfg = TrainConfig(dataset="cifar10", data_root=str(missing), epochs=1, out=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_relative_data_root_is_stored_absolute(tmp_path, monkeypatch):
    from test_data import write_cifar

    write_cifar(tmp_path / "data" / "cifar")
    monkeypatch.chdir(tmp_path / "data")
    cfg = TrainConfig(**{**TINY, "dataset": "cifar10", "batch_size": 10}, data_root="cifar", epochs=1,
                      out=str(tmp_path / "run"))
    train(cfg, progress=False)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["data_root"]
    assert stored == str(tmp_path / "data" / "cifar")
    monkeypatch.chdir(tmp_path)  # the run's data is still found from elsewhere
    model, config = load_model(tmp_path / "run")
    assert qgrad.data.load(config["dataset"], root=config["data_root"]).num_classes == 10


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(runs, tmp_path, monkeypatch):
    run_dir = _copy_stopped(runs, tmp_path)
    before = (run_dir / "checkpoint.pt").read_bytes()
    real_load = qgrad.data.load

    def load_with_nan(name, root=None, image_size=None):
        data = real_load(name, root, image_size)
        x = data.train_x.clone()
        x[::7] = float("nan")
        return dataclasses.replace(data, train_x=x)

    monkeypatch.setattr(qgrad.data, "load", load_with_nan)
    cfg = TrainConfig(**{**runs["config"].to_dict(), "out": str(run_dir)})
    with pytest.raises(TrainingError, match="non-finite"):
        train(cfg, progress=False, resume=True)
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert [r["epoch"] for r in _metrics(run_dir)] == [1]


@pytest.mark.parametrize("penalty, lam", [("l1", 0.005), ("l2", 0.05), ("dq", 1e-4)])
def test_lambda_defaults_to_the_papers_except_l1_on_digits_and_dq(tmp_path, penalty, lam, monkeypatch):
    cfg = TrainConfig(**TINY, epochs=1, penalty=penalty, penalty_epochs=1, out=str(tmp_path / penalty))
    assert cfg.lam is None
    warned = []  # the command line's logging setup may keep records from pytest's handlers
    monkeypatch.setattr(qgrad.training.logger, "warning", lambda msg, *args: warned.append(msg % args))
    result = train(cfg, progress=False)
    # one epoch, penalized: there was no plain training first
    assert len(warned) == 1 and "on from the first epoch (penalty_epochs 1 >= epochs 1)" in warned[0]
    assert json.loads((tmp_path / penalty / "config.json").read_text())["lam"] == lam
    assert result["penalty"] == pytest.approx(lam * sum(result["penalty_terms"].values()), rel=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="penalty must be one of"):
        train(TrainConfig(penalty="l3", out="x"))
    with pytest.raises(ValueError, match="never regularizes"):
        train(TrainConfig(penalty="l1", penalty_epochs=0, out="x"))
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        train(TrainConfig(epochs=0, out="x"))
    with pytest.raises(ValueError, match="every must be a positive int"):
        train(TrainConfig(penalty="l1", every=0, out="x"))
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="checkpoint_every must be a positive int or None"):
            train(TrainConfig(checkpoint_every=bad, out="x"))
    with pytest.raises(ValueError, match="method must be one of"):
        train(TrainConfig(penalty="l1", method="fast", out="x"))
    with pytest.raises(ValueError, match="every and method are options of penalty 'l1'; penalty 'l2' takes"):
        train(TrainConfig(penalty="l2", every=2, out="x"))
    with pytest.raises(ValueError, match="bits sets the perturbation of method 'worst-case'; leave it unset"):
        train(TrainConfig(penalty="l1", bits=4, out="x"))
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 16\]"):
        train(TrainConfig(penalty="l1", method="worst-case", bits=1, out="x"))
    with pytest.raises(ValueError, match="lam must be a non-negative number"):
        train(TrainConfig(penalty="l1", lam=float("nan"), out="x"))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        train(TrainConfig(momentum=1.0, out="x"))
    with pytest.raises(ValueError, match="workers applies to image folders .* dataset 'digits' is held in"):
        train(TrainConfig(dataset="digits", workers=2, out="x"))
    with pytest.raises(ValueError, match="image_size applies to image folders"):
        train(TrainConfig(dataset="cifar10", image_size=64, out="x"))
    with pytest.raises(ValueError, match="image_size must be an int >= 8 or None"):
        train(TrainConfig(dataset="imagenet", image_size=4, out="x"))
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.1})


def test_evaluate_matches_a_direct_computation():
    from qgrad.training import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(10, 1, 3, 4), torch.randint(0, 3, (10,))
    loss, acc = evaluate(model, DeviceLoader(x, y, 4))
    logits = model(x)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert acc == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
    assert model.training


@pytest.mark.parametrize("progress", [False, True])
def test_epoch_e_trains_on_the_loaders_epoch_e(tmp_path, monkeypatch, progress):
    """The documented data order: epoch e of a run is epoch e of its training loader, started once."""
    started = []
    real_iter = DeviceLoader.__iter__

    def spy(self):
        if self.shuffle:  # the training loader (the test loader does not shuffle)
            started.append(self._next_epoch)
        return real_iter(self)

    monkeypatch.setattr(DeviceLoader, "__iter__", spy)
    train(TrainConfig(**TINY, epochs=2, out=str(tmp_path / "run")), progress=progress)
    assert started == [0, 1]


@pytest.mark.parametrize("model, size, warned", [
    ("resnet18_imagenet", 8, "shrinks 8-pixel images to 2"),
    ("resnet18", 96, "first activations are 9x larger"),
    ("vgg_like", 224, "first activations are 49x larger"),
    ("resnet18", 32, None),
    ("resnet18_imagenet", 224, None),
])
def test_a_model_made_for_another_image_size_is_warned_about(monkeypatch, model, size, warned):
    from qgrad.training import _warn_if_model_misfits

    messages = []
    monkeypatch.setattr(qgrad.training.logger, "warning", lambda msg, *args: messages.append(msg % args))
    _warn_if_model_misfits(model, dataclasses.make_dataclass("D", ["image_size"])(size))
    if warned is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warned in messages[0]
