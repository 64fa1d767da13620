"""Process groups: one setup for trainers, evaluation and extraction under `deepspeed`, `torchrun` or plain
`python`, and the few collectives they share (no-ops without a process group)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """This process's place in the job: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this machine now (a fixed port can collide with a job still shutting down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", always: bool = False) -> DistInfo:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPU) and pick this rank's device.

    Under `deepspeed` or `torchrun` (RANK / WORLD_SIZE in the environment) the group is initialised; under plain
    `python` a one-process group is set up when `always` (DeepSpeed needs one), else none. On CPU the process runs
    `cpu_threads()` threads.

    Args:
        device: "auto" (CUDA when available), "cuda" or "cpu".
        always: set up a one-process group when no launcher did.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available")
    if always and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        torch.set_num_threads(cpu_threads())
    rank, world = rank_and_world()
    return DistInfo(rank, world, local_rank, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank_zero() -> bool:
    """True in rank 0 of the process group, and in a process without one."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(value: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce when a process group of several ranks exists; returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=op)
    return value


def all_gather_objects(items: list[Any]) -> list[Any]:
    """Every rank's `items` concatenated in rank order (the list itself without a process group)."""
    rank, world = rank_and_world()
    if world == 1:
        return items
    parts: list[list[Any] | None] = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def unlink_deepspeed_shm() -> None:
    """Remove the name of this rank's shared-memory buffer of DeepSpeed's CPU all-reduce, once every rank has mapped
    its peers' (call it on every rank after `deepspeed.initialize`; it waits for them all).

    With every rank of a job on one machine (the `deepspeed` launcher's LOCAL_SIZE equal to the world size), DeepSpeed's
    CPU backend maps a 66 MB file per rank, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>,
    and never removes it: each CPU run would leave its world size of them in memory until the machine restarts. A
    removed name keeps its mappings; only a process opening it afterwards would miss it, and each rank opens its
    peers' while DeepSpeed sets up its backend.
    """
    if not dist.is_initialized():
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def shutdown() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def cpu_threads() -> int:
    """A CPU process's threads: an explicit OMP_NUM_THREADS (e.g. to leave cores to another job on a shared machine;
    torchrun sets it to 1 for several processes a node unless it is set), else the cores this process may run on
    split between this job's processes on the machine (oversubscribed OpenMP threads stall each other)."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {explicit!r}")
        return int(explicit)
    return max(1, _cores() // processes_on_node())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def processes_on_node() -> int:
    """Processes of this job on this machine: torchrun's LOCAL_WORLD_SIZE or DeepSpeed's LOCAL_SIZE, else
    WORLD_SIZE, else 1."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def default_num_workers(cap: int = 8) -> int:
    """DataLoader workers per process by default: this process's share of the machine's cores (at most `cap`)."""
    return max(0, min(cap, _cores() // max(1, processes_on_node())))


def setup_logging(info: DistInfo) -> None:
    """INFO on rank 0, WARNING elsewhere, every line tagged with its rank; DeepSpeed's chatter quieted."""
    level = logging.INFO if info.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{info.rank}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
