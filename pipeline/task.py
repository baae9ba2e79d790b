"""What a classification task decides, in one place: how a label is read, the label set and
encoding, the model's `problem_type` (and so its loss), class weights, logits -> probabilities and
predictions, decision thresholds, and the metrics.

Two tasks, each a `Task` of the same few functions, chosen by `--task` (`TASKS[cfg.task]`):
- single_label: one label per record; softmax, cross-entropy, argmax (the module-level functions
  below, METRICS);
- multi_label: a set of labels per record (several diagnoses); sigmoid, binary cross-entropy per
  label, a decision threshold per label tuned on dev (MULTI_METRICS).
Data, the model builder, evaluation, predict, the run log, plot and the config check all ask the
task, so adding a metric means adding one entry to its metrics table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import ConfigError, load_json

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


def parse(value, separator: str = "") -> str:
    """One record's label as read from its file: a string or a number (read as a string).

    Raises ValueError saying what is wrong; the reader adds the file, record and column."""
    if isinstance(value, list):
        raise ValueError(
            f"is a list of labels ({json.dumps(value, ensure_ascii=False)[:80]}); several labels per record need --task multi_label"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ValueError(f"is empty or not a string or number ({value!r})")
    return str(value)


def label_names(train: dict, train_path, others: dict) -> list[str]:
    """The sorted label set of the training data (for multi-label: every label of any record's set);
    a label only seen in another split is an error.

    `train` maps each training label to {"count", "first_record"} (data.py counts them while
    tokenizing); `others` maps each other split's path to the same for its labels."""
    names = sorted(train)
    if len(names) < 2:
        raise ConfigError(f"{train_path}: found {len(names)} distinct label(s); a classifier needs at least 2")
    for path, labels in others.items():
        unknown = sorted((seen["first_record"], label) for label, seen in labels.items() if label not in train)
        if unknown:
            row, label = unknown[0]
            raise ConfigError(f"{path}: record {row}: label '{label}' never appears in the training file {train_path}")
    return names


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


def summary(values: dict, table: tuple[Metric, ...] = METRICS) -> str:
    """The console's one line of an evaluation: 'accuracy 0.7860  macro-F1 0.7211  ...'."""
    return "  ".join(f"{m.label} {values[m.name]:.4f}" for m in table)


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

        return F.cross_entropy(logits.float(), labels, weight=weights.to(logits.device), reduction="none").mean()

    return loss


# ----------------------------------------------------------------------------------------------
# Multi-label: a set of labels per record, sigmoid + binary cross-entropy, thresholds per label
# ----------------------------------------------------------------------------------------------

MULTI_PROBLEM_TYPE = "multi_label_classification"  # transformers: BCEWithLogits over a multi-hot target
THRESHOLD_EXPECTED, WEIGHT_EXPECTED = "a number between 0 and 1", "a positive number"
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
    Metric("macro_f1", "macro-F1", _f1("macro")),  # over the labels present in the reference, as single-label
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
    return sorted({parse(item) for item in value})


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

        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=weights.to(logits.device))

    return loss


def read_label_values(path: str, what: str, valid: Callable[[float], bool], expected: str) -> dict[str, float]:
    """A JSON file {label: number}, every number checked (before any process group: config.py)."""
    values = load_json(path)
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise ConfigError(f"{what} {path}: label '{name}' has {value!r}, expected {expected}")
    return values


def label_values(path: str, names: list[str], what: str, valid: Callable[[float], bool], expected: str) -> list[float]:
    """The numbers of a JSON file {label: number} that names exactly the task's labels, in `names` order."""
    values = read_label_values(path, what, valid, expected)
    unknown = sorted(set(values) - set(names))
    missing = [name for name in names if name not in values]
    if unknown or missing:
        problems = ([f"unknown labels {unknown}"] if unknown else []) + ([f"missing labels {missing}"] if missing else [])
        raise ConfigError(f"{what} {path}: {'; '.join(problems)}; it must give one value for each of the labels {names}")
    return [float(values[name]) for name in names]


def valid_weight(value: float) -> bool:
    return value > 0 and math.isfinite(value)


def valid_threshold(value: float) -> bool:
    return 0.0 < value < 1.0


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


# ----------------------------------------------------------------------------------------------
# The two tasks, chosen by --task
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One task's answers to what the pipeline asks; fields are plain functions."""

    name: str
    problem_type: str  # transformers' problem_type: the model's own loss, saved with the export
    metric_table: tuple[Metric, ...]
    output_key: str  # the key of a predicted label (set) in prediction files and `predict` output
    parse: Callable  # (file value, separator) -> label; ValueError says what is wrong
    encode: Callable  # (Arrow array of the cache's labels, names) -> class ids, or multi-hot rows
    probabilities: Callable  # logits -> probabilities
    balanced_weights: Callable  # (training label counts, records, names) -> a weight per label
    weighted_loss: Callable  # weights tensor -> (logits, labels) -> the micro-batch's mean loss
    thresholds: Callable  # (labels, probabilities, names, --threshold) -> {label: threshold} or None
    predict: Callable  # (probabilities, thresholds) -> predictions
    metrics: Callable  # (labels, predictions, names, thresholds) -> the evaluation's dict
    describe: Callable  # (one prediction, names) -> what `predict` prints for it

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metric_table)

    def summary(self, values: dict) -> str:
        return summary(values, self.metric_table)


SINGLE_LABEL = Task(
    name="single_label",
    problem_type=PROBLEM_TYPE,
    metric_table=METRICS,
    output_key="label",
    parse=parse,
    encode=encode,
    probabilities=probabilities,
    balanced_weights=balanced_weights,
    weighted_loss=weighted_cross_entropy,
    thresholds=lambda labels, probabilities, names, setting: None,
    predict=lambda probabilities, thresholds: predictions(probabilities),
    metrics=lambda labels, predicted, names, thresholds: metrics(labels, predicted, names),
    describe=lambda prediction, names: names[prediction],
)
MULTI_LABEL = Task(
    name="multi_label",
    problem_type=MULTI_PROBLEM_TYPE,
    metric_table=MULTI_METRICS,
    output_key="labels",
    parse=multi_parse,
    encode=multi_hot,
    probabilities=sigmoid,
    balanced_weights=pos_weights,
    weighted_loss=weighted_bce,
    thresholds=fit_thresholds,
    predict=multi_predict,
    metrics=multi_metrics,
    describe=lambda prediction, names: [name for name, on in zip(names, prediction) if on],
)
TASKS = {task.name: task for task in (SINGLE_LABEL, MULTI_LABEL)}
ALL_METRIC_NAMES = tuple(dict.fromkeys(name for task in TASKS.values() for name in task.metric_names))


def by_problem_type(problem_type: str | None) -> Task:
    """The task of an exported model, from its config's problem_type (older exports: single-label)."""
    return MULTI_LABEL if problem_type == MULTI_PROBLEM_TYPE else SINGLE_LABEL


def class_weights(kind: Task, setting: str, counts: dict, num_records: int, names: list[str]) -> list[float] | None:
    """--class-weights: none -> None; balanced -> from the training labels' counts; a .json file -> {label: weight}."""
    if setting == "none":
        return None
    if setting == "balanced":
        return kind.balanced_weights(counts, num_records, names)
    return label_values(setting, names, "--class-weights", valid_weight, WEIGHT_EXPECTED)
