"""multi_label: a set of labels per record (several diagnoses); sigmoid, binary cross-entropy per
label, a decision threshold per label tuned on dev."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..core.base import ConfigError
from .base import (
    THRESHOLD_EXPECTED,
    Metric,
    Task,
    f1_over_present,
    label_map,
    label_names,
    label_values,
    option_error,
    parse_label,
    read_label_values,
    register,
    valid_threshold,
)

MULTI_PROBLEM_TYPE = "multi_label_classification"  # transformers: BCEWithLogits over a multi-hot target


OUTCOMES = ("tp", "fn", "fp", "tn")  # a label's outcomes on one record: true/false positive/negative


THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)  # candidates when tuning on dev


def _sklearn_f1(average: str) -> Callable:
    def compute(labels, predictions, present) -> float:
        from sklearn.metrics import f1_score

        return float(f1_score(labels, predictions, average=average, zero_division=0))

    return compute


def _subset_accuracy(labels, predictions, present) -> float:
    return float(np.mean(np.all(np.asarray(labels) == predictions, axis=1)))


MULTI_METRICS = (
    Metric("micro_f1", "micro-F1", _sklearn_f1("micro")),
    Metric("macro_f1", "macro-F1", f1_over_present("macro")),  # over the labels present in the reference, as single-label
    Metric("samples_f1", "samples-F1", _sklearn_f1("samples")),
    Metric("subset_accuracy", "subset-accuracy", _subset_accuracy),
)


def multi_parse(value, separator: str = "") -> list[str]:
    """A record's label set: a JSON list, or a string cut at `separator` (CSV); sorted, no repeats."""
    if isinstance(value, str) and separator:
        value = [piece.strip() for piece in value.split(separator) if piece.strip()]
    if not isinstance(value, list):
        how = f"set --label-separator to cut strings such as 'a{separator or ';'}b'" if isinstance(value, str) else "write a list"
        raise ValueError(f'is {value!r}, not a list of labels; --task multi_label expects a JSON list such as ["a", "b"] ({how})')
    if not value:
        raise ValueError("is an empty label set; every record needs at least one label")
    return sorted({parse_label(item) for item in value})


def multi_hot(labels, names: list[str]) -> np.ndarray:
    """Multi-hot rows (float32, records x labels) of an Arrow array of label lists (the cache's column)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pc.index_in(pc.list_flatten(labels), value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False)
    rows = np.zeros((len(labels), len(names)), dtype=np.float32)
    rows[pc.list_parent_indices(labels).to_numpy(), ids] = 1.0
    return rows


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def pos_weights(counts: dict, num_records: int, names: list[str]) -> list[float]:
    """Per label, negatives / positives of the training set (BCE's pos_weight): rare labels weigh more.

    `counts` maps each label to the number of training records that carry it."""
    for name in names:
        if counts[name] == num_records:
            raise ConfigError(f"--class-weights balanced: label '{name}' is on every training record; its weight would be 0")
    return [(num_records - counts[name]) / counts[name] for name in names]


def weighted_bce(weights):
    """Binary cross-entropy with `pos_weight`, averaged over records x labels (transformers' mean)."""

    def loss(logits, labels):
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=weights)

    return loss


def prior_bias(targets: np.ndarray, weights: list[float] | None) -> list[float]:
    """Each label's log-odds in training, with its pos_weight: the model starts out predicting the
    label priors instead of 0.5 (RetinaNet's prior initialisation, Lin et al. 2017).

    From a zero bias, the first steps of unweighted BCE go into pushing every logit down toward
    rare labels' priors through the whole encoder; a tiny model trained from scratch then stayed at
    the priors (docs/data-and-models.md). With balanced pos_weight the weighted prior is 1/2: 0."""
    positive = np.clip(np.asarray(targets, dtype=np.float64).mean(axis=0), 1e-6, 1 - 1e-6)
    weight = np.asarray(weights, dtype=np.float64) if weights else 1.0
    return np.log(weight * positive / (1 - positive)).tolist()


def _best_threshold(scores: np.ndarray) -> float:
    """The grid threshold with the highest score; ties go to the one nearest 0.5."""
    best = np.flatnonzero(scores == scores.max())
    return float(THRESHOLD_GRID[best[np.argmin(np.abs(THRESHOLD_GRID[best] - 0.5))]])


def _f1_per_threshold(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """F1 at each THRESHOLD_GRID value, pooled over the given columns (micro-F1 for several)."""
    predicted = probabilities[..., None] >= THRESHOLD_GRID  # (records, labels, thresholds)
    truth = labels[..., None].astype(bool)
    tp = (predicted & truth).sum(axis=(0, 1))
    return 2 * tp / np.maximum(predicted.sum(axis=(0, 1)) + truth.sum(axis=(0, 1)), 1)


def fit_thresholds(labels, probabilities: np.ndarray, names: list[str], setting: str) -> dict[str, float]:
    """Decision thresholds per label, from `setting` (--threshold):

    per-label (or ""): each label's threshold maximises that label's F1 on these records (dev);
    global: one threshold for all labels, maximising micro-F1 on these records;
    a number in (0, 1): that threshold for every label; a .json file: {label: threshold}."""
    labels = np.asarray(labels)
    if setting in ("", "per-label"):
        return {name: _best_threshold(_f1_per_threshold(labels[:, [j]], probabilities[:, [j]])) for j, name in enumerate(names)}
    if setting == "global":
        return dict.fromkeys(names, _best_threshold(_f1_per_threshold(labels, probabilities)))
    if setting.endswith(".json"):
        return dict(zip(names, label_values(setting, names, "--threshold", valid_threshold, THRESHOLD_EXPECTED)))
    return dict.fromkeys(names, float(setting))


def multi_predict(probabilities: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """Multi-hot predictions: each label whose probability reaches its threshold."""
    return (probabilities >= np.array(list(thresholds.values()))).astype(np.int64)


def multi_metrics(labels, predicted, names: list[str], thresholds: dict[str, float]) -> dict:
    """MULTI_METRICS, and per label: precision/recall/F1/support (scikit-learn), the 2x2 counts
    (tp, fp, fn, tn) and the threshold used."""
    from sklearn.metrics import precision_recall_fscore_support

    labels, predicted = np.asarray(labels).astype(np.int64), np.asarray(predicted).astype(np.int64)
    present = np.flatnonzero(labels.sum(axis=0)).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, average=None, zero_division=0)
    tp, fp = (labels & predicted).sum(axis=0), ((1 - labels) & predicted).sum(axis=0)
    fn, tn = (labels & (1 - predicted)).sum(axis=0), ((1 - labels) & (1 - predicted)).sum(axis=0)
    return {
        "num_records": int(len(labels)),
        **{m.name: m.compute(labels, predicted, present) for m in MULTI_METRICS},
        "absent_from_reference": [names[i] for i in range(len(names)) if i not in present],
        "thresholds": thresholds,
        # One row per label: its 2x2 outcome counts (what `plot` draws for a multi-label run).
        "confusion_matrix": {"labels": names, "columns": list(OUTCOMES), "counts": np.stack([tp, fn, fp, tn], axis=1).tolist()},
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                **{"tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]), "tn": int(tn[i])},
                "threshold": thresholds[name],
            }
            for i, name in enumerate(names)
        },
    }


THRESHOLDS = "thresholds.json"  # in an export of a multi-label model: {label: decision threshold}


def export_files(names: list[str], thresholds: dict | None) -> dict:
    """An export's label map and the decision thresholds of its last dev evaluation."""
    return {**label_map(names, thresholds), **({THRESHOLDS: thresholds} if thresholds else {})}


def export_thresholds(export_dir: str, names: list[str], override: str | None) -> dict[str, float]:
    """What `predict` decides with: `override` (a .json file) or the export's thresholds.json, for exactly its labels."""
    path = override or str(Path(export_dir) / THRESHOLDS)
    if not Path(path).is_file():
        raise ConfigError(f"{export_dir}: multi-label model without {THRESHOLDS}; give one with --thresholds FILE")
    return dict(zip(names, label_values(path, names, "thresholds", valid_threshold, THRESHOLD_EXPECTED)))


def check_options(cfg) -> None:
    """--threshold: per-label, global, a number in (0, 1) or a .json file (its labels are checked
    against the data's when it is read)."""
    if cfg.threshold.endswith(".json"):
        read_label_values(cfg.threshold, "--threshold", valid_threshold, THRESHOLD_EXPECTED)
    elif cfg.threshold not in ("", "per-label", "global"):
        try:
            number = float(cfg.threshold)
        except ValueError:
            number = None
        if number is None or not valid_threshold(number):
            raise option_error("threshold", cfg.threshold, "per-label, global, a number in (0, 1) or a .json file")


MULTI_LABEL = register(
    Task(
        name="multi_label",
        problem_type=MULTI_PROBLEM_TYPE,
        metric_table=MULTI_METRICS,
        output_key="labels",
        parse=multi_parse,
        label_names=label_names,
        encode=multi_hot,
        scores=sigmoid,
        predict=multi_predict,
        metrics=multi_metrics,
        describe=lambda prediction, names: [name for name, on in zip(names, prediction) if on],
        check_options=check_options,
        classes_of=lambda labels: labels,
        balanced_weights=pos_weights,
        weighted_loss=weighted_bce,
        thresholds=fit_thresholds,
        initial_bias=prior_bias,
        export_files=export_files,
        export_thresholds=export_thresholds,
    )
)
