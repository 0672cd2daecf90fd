"""Length-bucketed shuffling: less padding in training, deterministic per epoch; a training
loader that a mid-epoch checkpoint continues from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Sampler


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


class OffsetBatchSampler(BatchSampler):
    """A BatchSampler whose next pass starts at batch `start` (then 0 again): a resumed epoch."""

    start = 0

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        return islice(super().__iter__(), start, None)


class ResumableLoader(DataLoader):
    """Training batches that a mid-epoch checkpoint continues from.

    Lightning's stateful-loader protocol: the fit loop stores `state_dict()` (the epoch and how many
    of its batches this loader has handed out) in every checkpoint and gives it back to
    `load_state_dict` on resume; the next pass over that same epoch then starts after those
    batches. The order is fixed by (seed, epoch) (`BucketShuffleSampler`) and `StepSeed` reseeds
    every step, so a run resumed mid-epoch trains on exactly the batches, with exactly the
    randomness, of the uninterrupted run. Batches are counted as this loader hands them out, after
    any worker processes, so the position is exact with `data.num_workers` > 0 too. Where Lightning
    does not hand the state back, `modules.callbacks.LoaderPosition` does.
    """

    epoch = 0
    handed_out = 0
    resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # DataLoader's iterator, counted
        # A generator: this body runs at the first batch, not at iter(). Lightning calls iter() when it
        # sets the loader up, before it sets the sampler's epoch and before a resume's position is given.
        batches = self.batch_sampler
        assert isinstance(batches, OffsetBatchSampler) and isinstance(batches.sampler, BucketShuffleSampler)
        self.epoch = batches.sampler.epoch  # Lightning sets it before each pass
        resume, self.resume = self.resume, None
        self.handed_out = resume[1] if resume is not None and resume[0] == self.epoch else 0
        batches.start = self.handed_out
        for batch in super().__iter__():
            self.handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume = (int(state["epoch"]), int(state["batches"]))
