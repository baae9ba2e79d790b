"""Exact distributed evaluation: every record of the eval set counted once, on every ZeRO stage.

Rank r takes records r, r+W, r+2W, ... Ranks with one record fewer pad their last batch with a
marked filler, so every rank runs the same number of forward passes: under ZeRO-3 each forward
gathers parameters collectively, and a rank that stops early would leave the others hanging. The
fillers are dropped before metrics (unlike DistributedSampler, whose padding repeats real samples
and would count them twice).

The unit spread over ranks is a row of the tokenized split: a record, or one window of a record
read in chunks (reading.py). Every rank gathers all rows' logits and then pools each record's
windows, so each record is counted once however its windows fell across ranks.

Inside its share, a rank runs its rows longest first, so each batch holds rows of similar length
and little padding; logits are gathered by row index, so results come back in the input order and
do not depend on the sorting. The loss reported with the metrics is the model's own (its
problem_type's, unweighted) over the pooled records, the same number on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as td

from ..core import dist
from ..data import reading
from ..data.masking import IGNORE

FILLER = -1


def eval_index_batches(num_samples: int, world: int, rank: int, batch_size: int, lengths=None) -> list[list[int]]:
    """This rank's record indices in batches, longest first when `lengths` are given; FILLER marks
    padding (at the end). Same batch count on every rank."""
    per_rank = -(-num_samples // world)
    mine = list(range(rank, num_samples, world))
    if lengths is not None:
        mine.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the input order
    mine += [FILLER] * (per_rank - len(mine))
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


@dataclass
class Padding:
    """Real tokens and the tokens computed (padded batches): their ratio is the padding efficiency."""

    real: int = 0
    padded: int = 0

    def add(self, attention_mask) -> None:
        self.real += int(attention_mask.sum())
        self.padded += attention_mask.numel()

    @property
    def efficiency(self) -> float:
        return self.real / max(self.padded, 1)


def to_device(batch: dict, device) -> dict:
    """`batch` on `device`, not waiting for the copies: from pinned memory (training's batches on a
    GPU) they are queued on the stream the forward then runs on, and torch's host allocator keeps
    the pinned block until they are done (copy_kernel_cuda in aten/src/ATen/native/cuda/Copy.cu);
    from pageable memory (evaluation, predict) the driver stages the data first and may wait for the
    stream (CUDA Runtime API, "API synchronization behavior"): safe, at most no gain."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def forward_logits(engine, batch: dict) -> torch.Tensor:
    """The logits of one batch in eval mode (no dropout); the engine's mode is restored after."""
    was_training = engine.training
    engine.eval()
    try:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return engine(**to_device(inputs, engine.device)).logits.float().cpu()
    finally:
        engine.train(was_training)


def predict_logits(engine, split, batch_size: int, by_length: bool = True, progress=None) -> tuple[np.ndarray, Padding]:
    """Logits for every row of `split` (a data.TokenizedSplit), in its order, identical on all ranks,
    and the padding of the batches summed over ranks. `by_length`: each rank's rows longest first.

    Without a process group (`predict`: one process, a plain model as `engine`) this process
    computes every row. `progress` (a dist.Progress) counts the rows of all ranks as batches end."""
    world, rank = (dist.world_size(), dist.rank()) if td.is_initialized() else (1, 0)
    indices, logits, padding = [], [], Padding()
    for batch_indices in eval_index_batches(len(split), world, rank, batch_size, split.lengths if by_length else None):
        keep = [j for j, i in enumerate(batch_indices) if i != FILLER]
        filler = batch_indices[keep[-1]] if keep else 0  # the batch's shortest row: fillers widen nothing
        batch = split.batch([i if i != FILLER else filler for i in batch_indices])
        batch_logits = forward_logits(engine, batch)
        padding.add(batch["attention_mask"][keep])
        indices += [batch_indices[j] for j in keep]
        logits.append(batch_logits[keep].numpy())
        if progress is not None:
            progress.update(min(len(batch_indices) * world, len(split) - progress.count))
    merged, total = {}, Padding()
    mine = (indices, np.concatenate(logits), padding)
    for rank_indices, rank_logits, rank_padding in dist.all_gather_objects(mine) if world > 1 else [mine]:
        merged.update(zip(rank_indices, rank_logits))
        total.real, total.padded = total.real + rank_padding.real, total.padded + rank_padding.padded
    if sorted(merged) != list(range(len(split))):
        raise RuntimeError(f"evaluation covered {len(merged)} of {len(split)} rows")
    return np.stack([merged[i] for i in range(len(split))]), total


def record_logits(engine, split, batch_size: int, by_length: bool = True, progress=None) -> tuple[np.ndarray, Padding]:
    """One row of logits per record of `split`: its windows' rows pooled (`split.pool`) when long
    records are read in chunks; and the batches' padding. Evaluation and `predict` both come through here."""
    logits, padding = predict_logits(engine, split, batch_size, by_length, progress)
    return reading.pool(logits, split.records, split.pool), padding


@torch.no_grad()
def masked_token_loss(engine, split, batch_size: int) -> tuple[float, int]:
    """(cross-entropy summed over every masked token of `split`, the number of masked tokens), over
    all ranks; the split's held-out masking is the same at every evaluation. Filler rows count nothing."""
    world, rank = dist.world_size(), dist.rank()
    # Summed on the device over the masked positions only: the batch's logits (B x L x vocabulary,
    # ~0.7 GB in fp32 at 32 x 256 x 21,128) never leave it, and nothing waits on the GPU until the end.
    totals = torch.zeros(2, dtype=torch.float64, device=engine.device)
    was_training = engine.training
    engine.eval()
    try:
        for batch_indices in eval_index_batches(len(split), world, rank, batch_size):
            batch = split.batch([i if i != FILLER else 0 for i in batch_indices])
            labels = batch.pop("labels")
            labels[[j for j, i in enumerate(batch_indices) if i == FILLER]] = IGNORE
            labels = labels.to(engine.device)
            masked = labels != IGNORE
            logits = engine(**to_device(batch, engine.device)).logits[masked].float()
            loss = torch.nn.functional.cross_entropy(logits, labels[masked], reduction="sum")
            totals += torch.stack([loss.double(), masked.sum().double()])
    finally:
        engine.train(was_training)
    totals = dist.all_reduce_sum(totals).cpu().tolist()
    return totals[0], int(totals[1])


def model_loss(config, logits: np.ndarray, labels: np.ndarray) -> float:
    """The model's own loss (transformers' sequence-classification loss for its problem_type) over all records."""
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    return float(ForSequenceClassificationLoss(torch.from_numpy(labels), torch.from_numpy(logits), config))


def evaluate(
    engine, split, batch_size: int, label_names: list[str], kind, thresholds="", name: str = ""
) -> tuple[dict, np.ndarray]:
    """The task's metrics and per-record predictions over exactly `split`; every rank must call this.

    Windows of one record (long records read in chunks) are pooled into one row of logits first.
    Multi-label: `thresholds` is {label: threshold}, or a --threshold setting fitted on this split's
    probabilities (dev); the thresholds used are in the metrics ("thresholds"). The metrics also hold
    "loss" (the model's own, over every record) and "padding_efficiency" (real / computed tokens)."""
    if kind.pretraining:  # a masked LM: scored by its loss over the held-out masked tokens, no predictions
        return kind.metrics(*masked_token_loss(engine, split, batch_size), label_names, thresholds), None
    with dist.Progress(f"eval {name}", len(split), "rows") as progress:
        logits, padding = record_logits(engine, split, batch_size, progress=progress)
    scores = kind.scores(logits)
    if not isinstance(thresholds, dict):
        thresholds = kind.thresholds(split.record_labels, scores, label_names, thresholds)
    predictions = kind.predict(scores, thresholds)
    metrics = kind.metrics(split.record_labels, predictions, label_names, thresholds)
    loss = model_loss(getattr(engine, "module", engine).config, logits, split.record_labels)
    return {"loss": loss, **metrics, "padding_efficiency": padding.efficiency}, predictions
