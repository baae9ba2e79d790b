"""Batch order: each epoch a seeded permutation of the whole training set, cut into global batches.

Each global batch holds micro x accumulation x world size samples, and each rank takes its share
of every global batch. Which samples make up optimizer step k therefore does not depend on how
many ranks share the work.

The last incomplete global batch of each epoch is dropped. DeepSpeed divides every micro-batch
loss by the accumulation steps, so a short window would be under-weighted (or, padded with repeats,
some samples would count twice); dropping it keeps every optimizer step an equal-weight average of
exactly one global batch. The permutation changes every epoch, so different samples are left out
each time (at most global batch - 1 per epoch).

With `group_by_length` (Hugging Face's `group_by_length` scheme, transformers' trainer_pt_utils
`get_length_grouped_indices`) the same permutation is cut into mega-batches of up to 50 global
batches, each sorted by length (longest first) and cut into global batches again; the global batch
holding the epoch's longest sample goes first, so running out of memory shows at the first step.
Within a global batch, consecutive sorted samples form each micro-step's micro-batches on all
ranks, so no rank waits on another's long batch. Every micro-batch still holds exactly `micro`
samples and the samples of optimizer step k still do not depend on the world size: accumulation
stays exact. The order is a function of the seed, the epoch and the lengths alone, so a resume
mid-epoch continues it exactly.
"""

from __future__ import annotations

import numpy as np

from ..core.ds_config import steps_per_epoch

MEGA_BATCH = 50  # global batches sorted together (Hugging Face's mega_batch_mult)


def epoch_global_batches(num_samples: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, global_batch) sample indices: a seeded permutation of the epoch, remainder dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    steps = steps_per_epoch(num_samples, global_batch)
    return order[: steps * global_batch].reshape(steps, global_batch)


def length_grouped(batches: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """`batches` (steps, global batch) regrouped by length: each mega-batch of MEGA_BATCH global batches
    (fewer for a small set: at least 4 mega-batches, as Hugging Face does) sorted longest first and cut
    again, the global batch with the longest sample moved to the front."""
    steps = len(batches)
    mega = max(1, min(MEGA_BATCH, steps // 4))
    grouped = []
    for start in range(0, steps, mega):
        samples = batches[start : start + mega].ravel()
        ranked = samples[np.argsort(-lengths[samples], kind="stable")]  # ties keep the seeded order
        grouped.append(ranked.reshape(-1, batches.shape[1]))
    grouped = np.concatenate(grouped)
    longest = int(np.argmax(lengths[grouped[:, 0]]))
    grouped[[0, longest]] = grouped[[longest, 0]]
    return grouped


def rank_major(batches: np.ndarray, micro: int, accum: int, world: int) -> np.ndarray:
    """Reorder each global batch so that micro-step j's micro-batches on every rank are consecutive
    samples of it (similar lengths when sorted): position (micro-step, rank, sample) becomes the
    (rank, micro-step, sample) layout RankMicroBatches reads."""
    steps = len(batches)
    return batches.reshape(steps, accum, world, micro).transpose(0, 2, 1, 3).reshape(steps, -1)


class RankMicroBatches:
    """This rank's micro-batches of each global batch, in step order.

    Global batch g is split into `world` contiguous shares; share r is cut into `accum`
    micro-batches. Every micro-batch has exactly `micro` samples.
    """

    def __init__(
        self,
        num_samples: int,
        micro: int,
        accum: int,
        world: int,
        rank: int,
        seed: int,
        epoch: int,
        start_step: int = 0,
        lengths: np.ndarray | None = None,
    ):
        """`lengths` (each sample's tokens): group the epoch's batches by length (module docstring)."""
        batches = epoch_global_batches(num_samples, micro * accum * world, seed, epoch)
        if lengths is not None and len(batches):
            batches = rank_major(length_grouped(batches, lengths), micro, accum, world)
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


def train_batches(
    split, micro: int, accum: int, world: int, rank: int, seed: int, epoch: int, start_step: int = 0, group_by_length=False
):
    """This rank's padded micro-batches of one epoch, from optimizer step `start_step` on (masked
    as this epoch's, for pretraining)."""
    lengths = split.lengths if group_by_length else None
    for indices in RankMicroBatches(len(split), micro, accum, world, rank, seed, epoch, start_step, lengths):
        yield split.batch(indices, epoch)


def pins_memory(device) -> bool:
    """Whether batches for `device` are built in pinned (page-locked) memory: only for a CUDA device.

    From pinned memory a `.to(device, non_blocking=True)` is one cudaMemcpyAsync on the stream;
    from pageable memory torch copies with memcpy_and_sync, which waits for everything queued on
    the GPU (the previous micro-batch's backward) before each batch (aten/src/ATen/native/cuda/
    Copy.cu, copy_kernel_cuda; c10/cuda/CUDAFunctions.h:79-109). On the CPU there is no copy to
    overlap, and torch's DataLoader drops pin_memory without an accelerator (dataloader.py:656-665)."""
    import torch

    return torch.device(device).type == "cuda"


def pinned_for(device, batches):
    """`batches` (dicts of tensors) in pinned memory where `device` gains from it, else as they are."""
    if not pins_memory(device):
        return batches
    return ({key: value.pin_memory() for key, value in batch.items()} for batch in batches)
