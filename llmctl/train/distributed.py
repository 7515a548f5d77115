"""Multi-process training under torch.distributed.run (torchrun): the environment it sets, DDP,
and the command line that re-launches `llmctl` through it. There is no launcher of our own."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # the processes on this node
    # started by torchrun: one process there still joins a process group and trains under DDP,
    # so `torchrun --nproc-per-node=1` runs the NCCL path N GPUs would (tests/test_cuda.py does)
    launched: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes events, checkpoints and registry rows."""
        return self.rank == 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def dist_env() -> DistEnv:
    if not under_torchrun():
        return DistEnv()
    return DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        launched=True,
    )


def seed_per_rank(seed: int, env: DistEnv) -> None:
    """Seed Python's, NumPy's and torch's generators with a stream per rank, so that dropout masks
    differ between ranks. Weights are made before this, from `seed` alone, to match on every rank."""
    random.seed(seed + env.rank)
    np.random.seed(seed + env.rank)
    torch.manual_seed(seed + env.rank)


def init_process_group(env: DistEnv, device: torch.device) -> None:
    if env.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def backend() -> str | None:
    """The process group's backend ('nccl', 'gloo'), None when the run has none."""
    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def wrap_ddp(model: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    if not env.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce(values: Sequence[float], env: DistEnv, device: torch.device, op: str = "sum") -> list[float]:
    """Element-wise sum or max of a few numbers over ranks (one collective for all of them)."""
    if not env.enabled:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def gather_objects(obj: object, env: DistEnv) -> list[object]:
    if not env.enabled:
        return [obj]
    gathered: list[object] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def torchrun_command(
    llmctl_args: Sequence[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    """`python -m torch.distributed.run ... -m llmctl ARGS`; one node uses torchrun's standalone
    rendezvous (a free local port), several nodes meet at the c10d endpoint."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        command += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
        ]
    else:
        command.append("--standalone")
    return [*command, "-m", "llmctl", *llmctl_args]
