"""single_label: one label per record; softmax, cross-entropy, argmax."""

from __future__ import annotations

import numpy as np

from .base import Metric, Task, f1_over_present, label_names, option_error, parse_label, register

PROBLEM_TYPE = "single_label_classification"  # transformers: cross-entropy over softmax


METRICS = (
    Metric("accuracy", "accuracy", lambda labels, predictions, present: float(np.mean(np.asarray(labels) == predictions))),
    Metric("macro_f1", "macro-F1", f1_over_present("macro")),
    Metric("weighted_f1", "weighted-F1", f1_over_present("weighted")),
)


METRIC_NAMES = tuple(m.name for m in METRICS)


def encode(labels, names: list[str]) -> np.ndarray:
    """Label ids of an Arrow array of label strings (the tokenized cache's column), all at once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.index_in(labels, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False).astype(np.int64)


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


def balanced_weights(counts: dict, num_records: int, names: list[str]) -> list[float]:
    """scikit-learn's "balanced" class weights, n / (k * count): a rare class weighs more.

    `counts` maps each training label to its record count (data.py counts them while tokenizing)."""
    return [num_records / (len(names) * counts[name]) for name in names]


def weighted_cross_entropy(weights):
    """Cross-entropy with one weight per class, averaged over the micro-batch's records.

    Divided by the number of records, not by the sum of the batch's weights (torch's weighted
    mean): every micro-batch then has the same denominator, so accumulated micro-batches still equal
    one big batch exactly. Over the training set the balanced weights average 1, so the loss keeps
    its scale."""

    def loss(logits, labels):
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), labels, weight=weights, reduction="none").mean()

    return loss


def check_options(cfg) -> None:
    """Label lists and thresholds are multi-label's."""
    if cfg.label_separator:
        raise option_error("label_separator", cfg.label_separator, "empty with task single_label (it cuts label lists)")
    if cfg.threshold:
        raise option_error("threshold", cfg.threshold, "empty with task single_label (thresholds are for multi_label)")


SINGLE_LABEL = register(
    Task(
        name="single_label",
        problem_type=PROBLEM_TYPE,
        metric_table=METRICS,
        output_key="label",
        parse=parse_label,
        label_names=label_names,
        encode=encode,
        scores=probabilities,
        predict=lambda probabilities, thresholds: predictions(probabilities),
        metrics=lambda labels, predicted, names, thresholds: metrics(labels, predicted, names),
        describe=lambda prediction, names: names[prediction],
        check_options=check_options,
        balanced_weights=balanced_weights,
        weighted_loss=weighted_cross_entropy,
    )
)
