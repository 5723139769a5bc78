"""L1GradPenalty under DistributedDataParallel: every process must end a step with the same gradients, the
average over processes of what each would get alone on its own batch (what DDP does for a plain loss).

Two CPU processes with the gloo backend, rendezvous through a file. Each process builds the same model,
keeps an undistributed copy as the reference, and compares gradients for every mode; an exception in a
worker fails the test through ``torch.multiprocessing.spawn``. The exact method refuses a model with
``nn.SyncBatchNorm`` across processes (its backward cannot be differentiated).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from qgrad import L1GradPenalty

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2
MODES = [
    ("exact", {}, "backward"),
    ("exact, penalty(loss)", {}, "call"),
    ("every=2", {"every": 2}, "backward"),
    ("exact, recompute", {"recompute": True}, "backward"),
    ("worst-case", {"method": "worst-case", "h": 1e-2}, "backward"),
    ("worst-case, penalty(loss, closure)", {"method": "worst-case", "h": 1e-2}, "call"),
    ("worst-case, bits=4", {"method": "worst-case", "bits": 4}, "backward"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    ).double()


def _step(model, penalty, x, y, via):
    def closure():
        return F.cross_entropy(model(x), y)

    loss = closure()
    if via == "backward":
        penalty.backward(loss, closure)
    else:
        (loss + penalty(loss, closure)).backward()


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        generator = torch.Generator().manual_seed(100 + rank)  # each process its own batch
        batches = [
            (torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64),
             torch.randint(0, 5, (4,), generator=generator))
            for _ in range(2)
        ]
        for name, kwargs, via in MODES:
            alone, model = _model(), _model()
            ddp = nn.parallel.DistributedDataParallel(model)
            def options(inner):  # recompute: the model's two Conv-BN-ReLU units
                if "recompute" not in kwargs:
                    return kwargs
                return {**kwargs, "recompute": [list(inner[:3]), list(inner[3:6])]}

            penalties = (L1GradPenalty(alone, **options(alone)), L1GradPenalty(ddp, **options(model)))
            # two steps: every=2 takes a penalized and a plain one
            for x, y in batches:
                alone.zero_grad()
                ddp.zero_grad()
                _step(alone, penalties[0], x, y, via)
                _step(ddp, penalties[1], x, y, via)
                for (pname, p_alone), p in zip(alone.named_parameters(), model.parameters()):
                    expected = p_alone.grad.clone()
                    dist.all_reduce(expected)
                    expected /= WORLD
                    torch.testing.assert_close(
                        p.grad, expected, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}, {pname}: {m}"
                    )
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(_model())
        with pytest.raises(ValueError, match="SyncBatchNorm over 2 processes"):
            L1GradPenalty(synced)
        L1GradPenalty(synced, method="worst-case")  # no second derivative: allowed
    finally:
        dist.destroy_process_group()


def _signal_worker(rank: int, init_file: str, out: str) -> None:
    """Train in two processes; process 1 alone gets SIGTERM during its 3rd step."""
    import signal

    import qgrad.training
    from qgrad.training import TrainConfig, train

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        real_step_fn, calls = qgrad.training._step_fn, []

        def signalling_step_fn(net, penalty):
            step = real_step_fn(net, penalty)

            def signalling(x, y):
                calls.append(1)
                if rank == 1 and len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                return step(x, y)

            return signalling

        qgrad.training._step_fn = signalling_step_fn
        cfg = TrainConfig(dataset="digits", model="vgg_like", width=0.0625, batch_size=64, device="cpu",
                          epochs=2, out=out)
        result = train(cfg, progress=False)
        # both stop after step 10, where the processes compare notes
        assert result["interrupted"] == ("SIGTERM" if rank == 1 else "signal"), result
        assert len(calls) == 10 and not result["finished"]
    finally:
        dist.destroy_process_group()


def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    mp.spawn(_signal_worker, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["within_epoch"]["batch"] == 10
    assert ckpt["within_epoch"]["count"] == 10 * 64  # the samples of both processes


def test_distributed_data_parallel_averages_the_penalized_gradients_and_sync_batchnorm_is_refused(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)


def test_torchrun_trains_data_parallel_and_a_single_process_resumes(tmp_path):
    """``torchrun -m qgrad train`` with two CPU processes: one process reports, the run directory is written
    once per epoch (and checkpoint.pt inside it), and a single process resumes the run (the global batches
    do not depend on the number of processes)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    options = ["--dataset", "digits", "--model", "vgg_like", "--width", "0.0625", "--batch-size", "64",
               "--device", "cpu", "--no-progress", "--epochs", "2", "--penalty", "l1", "--penalty-epochs", "1",
               "--out", str(out)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    proc = subprocess.run(
        # checkpoints inside the epoch too (22 steps; after the 7th, 14th, 21st): every process takes part
        [*torchrun, "-m", "qgrad", "train", *options, "--stop-after", "1", "--checkpoint-every", "7"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stopped after epoch 1/2") == 1, proc.stdout  # the first process reports
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["penalty"] is None
    assert 0 < rows[0]["train_loss"] < 3 and rows[0]["test_acc"] is not None

    proc = subprocess.run(
        [sys.executable, "-m", "qgrad", "train", "--out", str(out), "--resume", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["penalty"] is not None
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
