"""Length-bucketed shuffling: less padding in training, deterministic per epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class BucketShuffleSampler(Sampler[int]):
    """Index order whose consecutive `batch_size` chunks are batches of similar length.

    Shuffle, cut into pools of `pool_batches` batches, sort each pool by length, split into
    batches, shuffle the full batches (the one short batch stays last so that a plain
    `BatchSampler(this, batch_size)` cuts exactly these batches). Padding shrinks while every
    epoch still sees a random order.

    The order depends only on (seed, epoch); Lightning calls `set_epoch` on a batch sampler's
    `sampler` before each epoch, so a resumed run sees exactly the batches of the uninterrupted
    one. Under DDP each rank takes every world_size-th batch, equal counts per rank (training sets
    the Trainer's `use_distributed_sampler=False`), unless `shard` is false (a pass over the whole
    split in one process); a split with fewer batches than ranks is refused.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, pool_batches: int = 50, shard: bool = True
    ) -> None:
        self.lengths = torch.as_tensor(list(lengths))
        self.batch_size = batch_size
        self.seed = seed
        self.pool_batches = pool_batches
        self.shard = shard
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        pool = self.batch_size * self.pool_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches.extend(chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + short
        if self.shard and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            usable = len(batches) // world * world
            if usable == 0:
                raise ValueError(
                    f"the training split has {len(batches)} batch(es) of data.batch_size={self.batch_size} for "
                    f"{world} DDP processes (trainer.devices x trainer.num_nodes): every process needs one; "
                    "lower data.batch_size or the number of devices"
                )
            batches = batches[:usable][dist.get_rank() :: world]
        return batches

    def __iter__(self) -> Iterator[int]:
        return (index for batch in self.batches() for index in batch)

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches())
