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

from ..core import dist
from ..data import reading

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
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return engine(**to_device(inputs, engine.device)).logits.float().cpu()


def probe_logits(engine, batch: dict) -> torch.Tensor:
    """The live weights' logits of a checkpoint's probe records in eval mode (no dropout), as the
    export and a resumed engine compute them."""
    was_training = engine.training
    engine.eval()
    logits = forward_logits(engine, batch)
    engine.train(was_training)
    return logits


def predict_logits(engine, split, batch_size: int) -> np.ndarray:
    """Logits for every row of `split` (a data.TokenizedSplit), in its order, identical on all ranks."""
    was_training = engine.training
    engine.eval()
    indices, logits = [], []
    for batch_indices in eval_index_batches(len(split), dist.world_size(), dist.rank(), batch_size):
        real = [i if i != FILLER else 0 for i in batch_indices]
        batch_logits = forward_logits(engine, split.batch(real))
        keep = [j for j, i in enumerate(batch_indices) if i != FILLER]
        indices += [batch_indices[j] for j in keep]
        logits.append(batch_logits[keep].numpy())
    engine.train(was_training)
    merged = {}
    for rank_indices, rank_logits in dist.all_gather_objects((indices, np.concatenate(logits))):
        merged.update(zip(rank_indices, rank_logits))
    if sorted(merged) != list(range(len(split))):
        raise RuntimeError(f"evaluation covered {len(merged)} of {len(split)} rows")
    return np.stack([merged[i] for i in range(len(split))])


def evaluate(engine, split, batch_size: int, label_names: list[str], kind, thresholds="") -> tuple[dict, np.ndarray]:
    """The task's metrics and per-record predictions over exactly `split`; every rank must call this.

    Windows of one record (long records read in chunks) are pooled into one row of logits first.
    Multi-label: `thresholds` is {label: threshold}, or a --threshold setting fitted on this split's
    probabilities (dev); the thresholds used are in the metrics ("thresholds")."""
    logits = reading.pool(predict_logits(engine, split, batch_size), split.records, split.pool)
    probabilities = kind.probabilities(logits)
    if not isinstance(thresholds, dict):
        thresholds = kind.thresholds(split.record_labels, probabilities, label_names, thresholds)
    predictions = kind.predict(probabilities, thresholds)
    return kind.metrics(split.record_labels, predictions, label_names, thresholds), predictions
