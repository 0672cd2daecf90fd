"""BucketShuffleSampler: every example once per epoch, an order fixed by (seed, epoch), batches of
similar length, and under DDP disjoint shards of equal batch counts; ResumableLoader continuing an
epoch from a checkpoint's position."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils.data import BatchSampler

from tokenprune.data.sampler import BucketShuffleSampler, OffsetBatchSampler, ResumableLoader

BATCH = 8


def lengths(count: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 200, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@contextlib.contextmanager
def ddp_rank(rank: int, world: int):
    """This process as rank `rank` of a `world`-process group (torch's in-process fake backend:
    get_rank / get_world_size answer as they would under DDP; no collectives run)."""
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_each_epoch_covers_every_example_exactly_once_in_batch_sized_chunks():
    sizes = lengths(103)
    sampler = BucketShuffleSampler(sizes, BATCH, seed=3, pool_batches=4)  # 4 pools of up to 32
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(103)) and len(sampler) == 103
        batches = list(BatchSampler(sampler, BATCH, drop_last=False))
        assert batches == sampler.batches(), "a plain BatchSampler cuts exactly the sampler's batches"
        assert [len(b) for b in batches] == [BATCH] * 12 + [7], "one short batch, last"


def padding(sizes: torch.Tensor, batches) -> int:
    """Padding tokens when each batch is padded to its longest example."""
    return sum(int(sizes[b].max()) * len(b) - int(sizes[b].sum()) for b in batches)


def test_batches_group_similar_lengths():
    """One pool holding the whole split: the batches are the split sorted by length, cut into
    batches (length ranges never interleave); pools of 4 batches: far less padding than random."""
    sizes = torch.tensor(lengths(256))
    one_pool = BucketShuffleSampler(sizes.tolist(), BATCH, pool_batches=32).batches()
    spans = sorted((int(sizes[b].min()), int(sizes[b].max())) for b in one_pool)
    assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:], strict=False))
    pooled = BucketShuffleSampler(sizes.tolist(), BATCH, pool_batches=4).batches()
    shuffled = torch.randperm(256, generator=torch.Generator().manual_seed(9)).view(-1, BATCH)
    assert padding(sizes, pooled) < padding(sizes, shuffled) / 2


def test_order_is_fixed_by_seed_and_epoch():
    sizes = lengths(103)

    def order(seed: int, epoch: int) -> list[int]:
        sampler = BucketShuffleSampler(sizes, BATCH, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(1, 0) and order(1, 4) == order(1, 4), "a resumed run sees the same batches"
    epochs = [order(1, epoch) for epoch in range(4)]
    assert len({tuple(o) for o in epochs}) == 4, "every epoch its own order"
    assert order(2, 0) != order(1, 0)


@pytest.mark.parametrize(("count", "world"), [(103, 2), (103, 3), (103, 4), (95, 2)])
def test_ddp_ranks_take_disjoint_shards_of_equal_batch_counts(count, world):
    """Rank r takes batches r, r + world, ... of the unsharded order, cut to a multiple of world
    batches: disjoint, the same number of batches (steps) on every rank. 103 examples: 12 full
    batches + one short, which is dropped when 13 does not divide; 95: 11 + 1 short, all 12 used."""
    sizes = lengths(count)
    sampler = BucketShuffleSampler(sizes, BATCH, seed=5)
    sampler.set_epoch(2)
    whole = sampler.batches()
    shards = []
    for rank in range(world):
        with ddp_rank(rank, world):
            shards.append(sampler.batches())
            assert list(sampler) == [index for batch in shards[-1] for index in batch]
            unsharded = BucketShuffleSampler(sizes, BATCH, seed=5, shard=False)
            unsharded.set_epoch(2)
            assert unsharded.batches() == whole, "shard=False: the whole split in every process"
    usable = len(whole) // world * world
    assert [len(shard) for shard in shards] == [usable // world] * world
    for rank, shard in enumerate(shards):
        assert shard == whole[rank:usable:world]
    taken = [index for shard in shards for batch in shard for index in batch]
    assert len(taken) == len(set(taken)), "an example on two ranks"
    assert sorted(taken) == sorted(index for batch in whole[:usable] for index in batch)
    expected_examples = usable * BATCH if usable < len(whole) else count
    assert len(taken) == expected_examples


def resumable_loader(sizes: list[int], workers: int = 0) -> ResumableLoader:
    order = BucketShuffleSampler(sizes, BATCH, seed=4)
    batches = OffsetBatchSampler(order, BATCH, drop_last=False)
    return ResumableLoader(list(range(len(sizes))), batch_sampler=batches, num_workers=workers)


def epoch_batches(loader: ResumableLoader, epoch: int) -> list[list[int]]:
    loader.batch_sampler.sampler.set_epoch(epoch)  # what Lightning does before each pass
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
def test_resumable_loader_continues_an_epoch_after_the_batches_it_had_handed_out(workers):
    """Workers load batches ahead; the position counts only those handed out."""
    sizes = lengths(103)
    whole = epoch_batches(resumable_loader(sizes), 2)
    killed = resumable_loader(sizes, workers)
    killed.batch_sampler.sampler.set_epoch(2)
    stream = iter(killed)
    taken = [next(stream).tolist() for _ in range(5)]
    state = killed.state_dict()
    assert state == {"epoch": 2, "batches": 5} and taken == whole[:5]
    resumed = resumable_loader(sizes)
    resumed.load_state_dict(state)
    assert epoch_batches(resumed, 2) == whole[5:], "the rest of the epoch, nothing twice"
    assert resumed.state_dict() == {"epoch": 2, "batches": len(whole)}
    assert epoch_batches(resumed, 3) == epoch_batches(resumable_loader(sizes), 3), "the next epoch whole"


def test_resumable_loader_state_of_a_finished_epoch_leaves_the_next_epoch_whole():
    sizes = lengths(40)
    loader = resumable_loader(sizes)
    epoch_batches(loader, 0)
    later = resumable_loader(sizes)
    later.load_state_dict(loader.state_dict())  # an epoch-end checkpoint: epoch 0, every batch
    assert epoch_batches(later, 1) == epoch_batches(resumable_loader(sizes), 1)
