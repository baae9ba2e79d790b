"""Exact distributed evaluation: every record on exactly one rank, the same number of forwards on each."""

import pytest

from pipeline.evaluate import FILLER, eval_index_batches


@pytest.mark.parametrize("n, world, batch", [(37, 2, 8), (5, 4, 2), (3, 8, 4), (100, 3, 7), (16, 2, 8)])
def test_eval_shards_cover_every_record_once_with_equal_batch_counts(n, world, batch):
    shards = [eval_index_batches(n, world, rank, batch) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forward passes on every rank (ZeRO-3)
    real = [i for s in shards for b in s for i in b if i != FILLER]
    assert sorted(real) == list(range(n))
    fillers = sum(i == FILLER for s in shards for b in s for i in b)
    assert fillers == -(-n // world) * world - n
