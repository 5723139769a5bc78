"""The processes of a training run: one, or several started by ``torchrun`` (one per GPU, or CPU processes).

:func:`join` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous
variables), initializes the default process group when there are several processes and nobody has yet
(NCCL for CUDA devices, gloo for CPU), and picks this process's device. :class:`Processes` carries the
few collectives the training loop needs; with one process they are no-ops, so the loop reads the same
either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

__all__ = ["Processes", "join"]


@dataclass
class Processes:
    """``rank`` of ``world_size`` processes; ``owns_group``: :func:`join` created the process group, and
    :meth:`close` destroys it."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """The process that writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, values: List[float], device: torch.device) -> List[float]:
        """The sums of ``values`` over the processes (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` (picklable), on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def _world_from_env() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an int, got {raw!r}") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    return world


def join(device: torch.device) -> "tuple[Processes, torch.device]":
    """``(processes, device)`` of this process.

    Several processes (an initialized default group, or ``WORLD_SIZE > 1`` from torchrun): a CUDA ``device``
    without an index becomes ``cuda:LOCAL_RANK`` (made current before the group is initialized), so each
    process drives its own GPU; a CUDA device with an index is refused, as every process would share it. A
    CPU device stays the CPU.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else _world_from_env()
    if world > 1 and device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"device {device} with {world} processes: every process would use that one GPU; give "
                "'cuda' or 'auto', and each process takes the GPU of its LOCAL_RANK"
            )
        rank = dist.get_rank() if initialized else int(os.environ.get("RANK", "0"))
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    if initialized or world == 1:
        return Processes(dist.get_rank() if initialized else 0, world, False), device
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={world} asks for several processes, but torch.distributed is not available in this "
            "PyTorch build"
        )
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world, True), device
