"""Distributed data parallel training under ``torchrun``: this process's rank, the process group, the DDP wrapper
and the samplers that split the data between ranks.

One process per GPU (or several on the CPU with gloo); each sees ``1 / world_size`` of every epoch's shuffled order,
as ``DistributedSampler`` splits it, and DDP averages the gradients, so a step equals a single process's step on
the global batch (tests/test_distributed.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = [
    "DistContext",
    "EpochSampler",
    "ShardSampler",
    "all_reduce_sum",
    "setup_distributed",
    "wrap_distributed",
]


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup_distributed(dist_ctx: DistContext, device: torch.device) -> None:
    """Join the ``torchrun`` process group: NCCL between GPUs, gloo on CPU."""
    if dist_ctx.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def wrap_distributed(model: nn.Module, device: torch.device, *, sync_bn: bool) -> nn.Module:
    """DDP-wrap a model. On CUDA, BatchNorm becomes SyncBatchNorm when ``sync_bn`` (statistics over the global
    batch); gloo on CPU cannot run SyncBatchNorm, so there each process normalises with its own batch's
    statistics, as plain DDP does."""
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(values: torch.Tensor, dist_ctx: DistContext) -> torch.Tensor:
    """``values`` summed over all processes, in place (unchanged when not distributed)."""
    if dist_ctx.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class EpochSampler(Sampler[int]):
    """The epoch's shuffled order for this rank (``DistributedSampler``'s split: ``perm[rank::world]``), starting
    at batch ``skip_batches`` so an interrupted epoch resumes where it stopped."""

    def __init__(self, dataset: Dataset, dist_ctx: DistContext, seed: int, batch_size: int) -> None:
        self.inner = DistributedSampler(
            dataset, num_replicas=dist_ctx.world_size, rank=dist_ctx.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[int]:
        indices = list(self.inner)
        return iter(indices[self.skip_batches * self.batch_size :])

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip_batches * self.batch_size)


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks (``range(rank, n, world)``): exact validation under DDP."""

    def __init__(self, size: int, dist_ctx: DistContext) -> None:
        self.indices = list(range(dist_ctx.rank, size, dist_ctx.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
