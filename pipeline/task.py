"""What a classification task decides, in one place: the label set and encoding, the model's
`problem_type` (and so its loss), logits -> probabilities and predictions, and the metrics.

Data, the model builder, evaluation, predict, the run log, plot and the config check all ask this
module, so adding a metric means adding one entry to METRICS. Today's task is single-label
classification (softmax, cross-entropy); a multi-label task would be a second implementation of the
same few functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import ConfigError

PROBLEM_TYPE = "single_label_classification"  # transformers: cross-entropy over softmax


@dataclass(frozen=True)
class Metric:
    """One summary metric of an evaluation: logged every evaluation, plotted, and selectable as
    --best-metric (higher is better for all of today's)."""

    name: str
    label: str  # how the console shows it
    compute: Callable  # (labels, predictions, present class ids) -> float


def _f1(average: str) -> Callable:
    def compute(labels, predictions, present) -> float:
        from sklearn.metrics import f1_score

        # Averaged over the classes present in the reference: a class absent from the eval set has
        # no F1 to measure, and counting it as 0 would punish perfect predictions.
        return float(f1_score(labels, predictions, labels=present, average=average, zero_division=0))

    return compute


METRICS = (
    Metric("accuracy", "accuracy", lambda labels, predictions, present: float(np.mean(np.asarray(labels) == predictions))),
    Metric("macro_f1", "macro-F1", _f1("macro")),
    Metric("weighted_f1", "weighted-F1", _f1("weighted")),
)
METRIC_NAMES = tuple(m.name for m in METRICS)


def label_names(train_labels: list[str], train_path, others: dict) -> list[str]:
    """The sorted label set of the training data; a label only seen in another split is an error.

    `others` maps each other split's path to its labels."""
    names = sorted(set(train_labels))
    if len(names) < 2:
        raise ConfigError(f"{train_path}: found {len(names)} distinct label(s); a classifier needs at least 2")
    known = set(names)
    for path, labels in others.items():
        for row, label in enumerate(labels, start=1):
            if label not in known:
                raise ConfigError(f"{path}: record {row}: label '{label}' never appears in the training file {train_path}")
    return names


def encode(labels: list[str], names: list[str]) -> list[int]:
    ids = {name: i for i, name in enumerate(names)}
    return [ids[label] for label in labels]


def probabilities(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def predictions(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(axis=-1)


def metrics(labels, predicted, names: list[str]) -> dict:
    """The summary METRICS, per-class precision/recall/F1/support (scikit-learn), the classes
    absent from the reference (their rows stay; a record wrongly predicted as one still lowers its
    true class's recall and F1), and the confusion matrix: counts[i][j] records of true class
    labels[i] predicted as labels[j]."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(names)))
    present = np.unique(labels).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=ids, zero_division=0)
    return {
        "num_records": int(len(labels)),
        **{m.name: m.compute(labels, predicted, present) for m in METRICS},
        "absent_from_reference": [names[i] for i in ids if i not in present],
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(names)
        },
        "confusion_matrix": {"labels": list(names), "counts": confusion_matrix(labels, predicted, labels=ids).tolist()},
    }


def summary(values: dict) -> str:
    """The console's one line of an evaluation: 'accuracy 0.7860  macro-F1 0.7211  ...'."""
    return "  ".join(f"{m.label} {values[m.name]:.4f}" for m in METRICS)
