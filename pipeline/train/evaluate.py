"""Exact distributed evaluation: every record of the eval set counted once, on every ZeRO stage.

Rank r takes records r, r+W, r+2W, ... Ranks with one record fewer pad their last batch with a
marked filler, so every rank runs the same number of forward passes: under ZeRO-3 each forward
gathers parameters collectively, and a rank that stops early would leave the others hanging. The
fillers are dropped before metrics (unlike DistributedSampler, whose padding repeats real samples
and would count them twice).

The unit spread over ranks is a row of the tokenized split: a record, or one window of a record
read in chunks (reading.py). Every rank gathers all rows' logits and then pools each record's
windows, so each record is counted once however its windows fell across ranks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as td

from ..core import dist
from ..data import reading
from ..data.masking import IGNORE

FILLER = -1


def eval_index_batches(num_samples: int, world: int, rank: int, batch_size: int) -> list[list[int]]:
    """This rank's record indices in batches; FILLER marks padding. Same batch count on every rank."""
    per_rank = -(-num_samples // world)
    mine = list(range(rank, num_samples, world))
    mine += [FILLER] * (per_rank - len(mine))
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


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


def predict_logits(engine, split, batch_size: int) -> np.ndarray:
    """Logits for every row of `split` (a data.TokenizedSplit), in its order, identical on all ranks.

    Without a process group (`predict`: one process, a plain model as `engine`) this process
    computes every row."""
    world, rank = (dist.world_size(), dist.rank()) if td.is_initialized() else (1, 0)
    indices, logits = [], []
    for batch_indices in eval_index_batches(len(split), world, rank, batch_size):
        real = [i if i != FILLER else 0 for i in batch_indices]
        batch_logits = forward_logits(engine, split.batch(real))
        keep = [j for j, i in enumerate(batch_indices) if i != FILLER]
        indices += [batch_indices[j] for j in keep]
        logits.append(batch_logits[keep].numpy())
    merged = {}
    mine = (indices, np.concatenate(logits))
    for rank_indices, rank_logits in dist.all_gather_objects(mine) if world > 1 else [mine]:
        merged.update(zip(rank_indices, rank_logits))
    if sorted(merged) != list(range(len(split))):
        raise RuntimeError(f"evaluation covered {len(merged)} of {len(split)} rows")
    return np.stack([merged[i] for i in range(len(split))])


def record_logits(engine, split, batch_size: int) -> np.ndarray:
    """One row of logits per record of `split`: its windows' rows pooled (`split.pool`) when long
    records are read in chunks. Evaluation and `predict` both come through here."""
    return reading.pool(predict_logits(engine, split, batch_size), split.records, split.pool)


@torch.no_grad()
def masked_token_loss(engine, split, batch_size: int) -> tuple[float, int]:
    """(cross-entropy summed over every masked token of `split`, the number of masked tokens), over
    all ranks; the split's held-out masking is the same at every evaluation. Filler rows count nothing."""
    world, rank = dist.world_size(), dist.rank()
    totals = torch.zeros(2, dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    try:
        for batch_indices in eval_index_batches(len(split), world, rank, batch_size):
            batch = split.batch([i if i != FILLER else 0 for i in batch_indices])
            labels = batch.pop("labels")
            labels[[j for j, i in enumerate(batch_indices) if i == FILLER]] = IGNORE
            logits = engine(**to_device(batch, engine.device)).logits.float().cpu()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
            totals += torch.tensor([loss.item(), (labels != IGNORE).sum().item()], dtype=torch.float64)
    finally:
        engine.train(was_training)
    totals = dist.all_reduce_sum(totals.to(engine.device)).cpu().tolist()
    return totals[0], int(totals[1])


def evaluate(engine, split, batch_size: int, label_names: list[str], kind, thresholds="") -> tuple[dict, np.ndarray]:
    """The task's metrics and per-record predictions over exactly `split`; every rank must call this.

    Windows of one record (long records read in chunks) are pooled into one row of logits first.
    Multi-label: `thresholds` is {label: threshold}, or a --threshold setting fitted on this split's
    probabilities (dev); the thresholds used are in the metrics ("thresholds")."""
    if kind.pretraining:  # a masked LM: scored by its loss over the held-out masked tokens, no predictions
        return kind.metrics(*masked_token_loss(engine, split, batch_size), label_names, thresholds), None
    scores = kind.scores(record_logits(engine, split, batch_size))
    if not isinstance(thresholds, dict):
        thresholds = kind.thresholds(split.record_labels, scores, label_names, thresholds)
    predictions = kind.predict(scores, thresholds)
    return kind.metrics(split.record_labels, predictions, label_names, thresholds), predictions
