"""Data-parallel helpers for the stages that sample: shard prompts across ranks, gather results.

They act only once a process group exists (Lightning creates it at the first ``trainer.fit`` and
keeps it for the rest of the process); before that, or in a single process, they are no-ops. Every
rank ends with the same gathered results. Sampled (not greedy) results depend on the world size,
since each rank draws its own random numbers: the store key does not hold the world size, as it
does not hold the device either.
"""

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch.distributed as dist

Item = TypeVar("Item")
Result = TypeVar("Result")


RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def is_rank_zero() -> bool:
    """False in any process that torchrun (RANK), SLURM (SLURM_PROCID) or Lightning's DDP launcher
    (LOCAL_RANK, NODE_RANK) marked as another rank; True in a plain single process.

    Read from the environment because Lightning's launcher starts the other ranks only at the
    first ``trainer.fit``, as fresh runs of the same command, long before any process group exists;
    the one test every stage uses, before and after the group exists.
    """
    return all(int(os.environ.get(name, "0")) == 0 for name in RANK_VARIABLES)


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n_items: int, rank: int, world_size: int) -> range:
    """The strided shard of ``n_items`` that ``rank`` handles: every rank gets the same mix of lengths."""
    return range(rank, n_items, world_size)


def map_sharded(items: Sequence[Item], compute: Callable[[list[Item]], list[Result]]) -> list[Result]:
    """``compute(items)`` with each rank computing one shard; every rank gets all results, in order."""
    rank, world_size = world()
    if world_size == 1:
        return compute(list(items))
    local = compute([items[i] for i in shard(len(items), rank, world_size)])
    gathered: list[list[Result] | None] = [None] * world_size
    dist.all_gather_object(gathered, local)
    results: list[Result | None] = [None] * len(items)
    for source_rank, part in enumerate(gathered):
        for index, value in zip(shard(len(items), source_rank, world_size), part, strict=True):
            results[index] = value
    return results


def broadcast_from_rank_zero(value: Item) -> Item:
    """Rank 0's ``value`` on every rank (the others pass a placeholder); identity without a group."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_seed(seed: int) -> int:
    """``seed`` on rank 0 (a single process samples as before), an independent seed on every other
    rank, so that ranks sampling their shards do not repeat each other's random numbers."""
    rank = world()[0]
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
