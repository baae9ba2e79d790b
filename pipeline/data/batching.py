"""Batch order: each epoch a seeded permutation of the whole training set, cut into global batches.

Each global batch holds micro x accumulation x world size samples, and each rank takes its share
of every global batch. Which samples make up optimizer step k therefore does not depend on how
many ranks share the work.

The last incomplete global batch of each epoch is dropped. DeepSpeed divides every micro-batch
loss by the accumulation steps, so a short window would be under-weighted (or, padded with repeats,
some samples would count twice); dropping it keeps every optimizer step an equal-weight average of
exactly one global batch. The permutation changes every epoch, so different samples are left out
each time (at most global batch - 1 per epoch).
"""

from __future__ import annotations

import numpy as np

from ..core.ds_config import steps_per_epoch


def epoch_global_batches(num_samples: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, global_batch) sample indices: a seeded permutation of the epoch, remainder dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    steps = steps_per_epoch(num_samples, global_batch)
    return order[: steps * global_batch].reshape(steps, global_batch)


class RankMicroBatches:
    """This rank's micro-batches of each global batch, in step order.

    Global batch g is split into `world` contiguous shares; share r is cut into `accum`
    micro-batches. Every micro-batch has exactly `micro` samples.
    """

    def __init__(
        self, num_samples: int, micro: int, accum: int, world: int, rank: int, seed: int, epoch: int, start_step: int = 0
    ):
        batches = epoch_global_batches(num_samples, micro * accum * world, seed, epoch)
        if not 0 <= start_step < len(batches):  # an empty epoch would leave the training loop spinning
            raise ValueError(f"start step {start_step} is outside the epoch's {len(batches)} optimizer steps")
        self.batches = batches[start_step:]
        self.micro, self.world, self.rank = micro, world, rank

    def __len__(self) -> int:
        return len(self.batches) * (self.batches.shape[1] // self.world // self.micro)

    def __iter__(self):
        for global_batch in self.batches:
            share = global_batch.reshape(self.world, -1)[self.rank]
            for micro_batch in share.reshape(-1, self.micro):
                yield micro_batch.tolist()


def train_batches(split, micro: int, accum: int, world: int, rank: int, seed: int, epoch: int, start_step: int = 0):
    """This rank's padded micro-batches of one epoch, from optimizer step `start_step` on (masked
    as this epoch's, for pretraining)."""
    for indices in RankMicroBatches(len(split), micro, accum, world, rank, seed, epoch, start_step):
        yield split.batch(indices, epoch)
