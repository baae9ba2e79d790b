"""Exact distributed evaluation: every record of the eval set counted once, on every ZeRO stage.

Rank r takes records r, r+W, r+2W, ... Ranks with one record fewer pad their last batch with a
marked filler, so every rank runs the same number of forward passes: under ZeRO-3 each forward
gathers parameters collectively, and a rank that stops early would leave the others hanging. The
fillers are dropped before metrics (unlike DistributedSampler, whose padding repeats real samples
and would count them twice).
"""
from __future__ import annotations

import numpy as np
import torch

from . import dist

FILLER = -1


def eval_index_batches(num_samples: int, world: int, rank: int, batch_size: int) -> list[list[int]]:
    """This rank's record indices in batches; FILLER marks padding. Same batch count on every rank."""
    per_rank = -(-num_samples // world)
    mine = list(range(rank, num_samples, world))
    mine += [FILLER] * (per_rank - len(mine))
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def forward_logits(engine, batch: dict) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return engine(**to_device(inputs, engine.device)).logits.float().cpu()


def predict_logits(engine, split, batch_size: int) -> np.ndarray:
    """Logits for every record of `split` (a data.TokenizedSplit), in its order, identical on all ranks."""
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
        raise RuntimeError(f"evaluation covered {len(merged)} of {len(split)} records")
    return np.stack([merged[i] for i in range(len(split))])


def compute_metrics(labels, predictions, label_names: list[str]) -> dict:
    """Accuracy, macro/weighted F1 and per-class precision/recall/F1/support (scikit-learn).

    Macro-F1 averages over the classes present in the reference labels: a training class missing
    from the eval set has no F1 to measure, and counting it as 0 would punish perfect predictions
    (one absent class of three gave 0.667). Such classes are listed in `absent_from_reference`.
    A record wrongly predicted as an absent class still lowers its true class's recall and F1.
    """
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    ids = list(range(len(label_names)))
    present = np.unique(labels).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=ids, zero_division=0)
    return {
        "num_records": int(len(labels)),
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, predictions, labels=present, average="weighted", zero_division=0)),
        "absent_from_reference": [label_names[i] for i in ids if i not in present],
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
    }


def evaluate(engine, split, batch_size: int, label_names: list[str]) -> tuple[dict, np.ndarray]:
    """Metrics and per-record predictions over exactly `split`; every rank must call this."""
    logits = predict_logits(engine, split, batch_size)
    predictions = logits.argmax(axis=1)
    return compute_metrics(split.labels, predictions, label_names), predictions
