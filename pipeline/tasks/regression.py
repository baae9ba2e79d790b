"""regression: one number per record (e.g. length of stay in days); the model's one output is the
prediction, trained with the model's own mean squared error (transformers' problem_type
"regression"). There is no label set: no class weights, thresholds, per-class rows or confusion matrix.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Metric, Task, option_error, register

PROBLEM_TYPE = "regression"  # transformers: one output, MSELoss against a float target


def parse_number(value, separator: str = "") -> float:
    """A record's target: a finite number, or a string that reads as one (a CSV cell).

    Raises ValueError saying what is wrong; the reader adds the file, record and column."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"is {value!r}, not a finite number; --task regression expects one number per record")
    return number


def encode(labels, names: list[str]) -> np.ndarray:
    """The targets (float32, as the model's MSE loss takes them) of an Arrow array of numbers."""
    return np.asarray(labels.to_numpy(), dtype=np.float32)


def values(logits: np.ndarray) -> np.ndarray:
    """The model's one output per record is its prediction."""
    return np.asarray(logits, dtype=np.float64)[:, 0]


def mse(labels, predicted, present=None) -> float:
    return float(np.mean((labels - predicted) ** 2))


def mae(labels, predicted, present=None) -> float:
    return float(np.mean(np.abs(labels - predicted)))


def r2(labels, predicted, present=None) -> float:
    """1 - residual / total sum of squares. Constant targets have no variance to explain: 1 for exact
    predictions, else 0 (scikit-learn's force_finite), so the metric stays a JSON number."""
    total = float(np.sum((labels - labels.mean()) ** 2))
    residual = float(np.sum((labels - predicted) ** 2))
    if total == 0:
        return 1.0 if residual == 0 else 0.0
    return 1.0 - residual / total


def pearson(labels, predicted, present=None) -> float:
    """Pearson's r; 0 where either side is constant (a model that predicts one value correlates with nothing)."""
    x, y = labels - labels.mean(), predicted - predicted.mean()
    scale = math.sqrt(float(np.sum(x * x)) * float(np.sum(y * y)))
    return float(np.sum(x * y)) / scale if scale else 0.0


METRICS = (
    Metric("mse", "MSE", mse, higher_is_better=False),
    Metric("mae", "MAE", mae, higher_is_better=False),
    Metric("r2", "R2", r2),
    Metric("pearson", "Pearson", pearson),
)


def metrics(labels, predicted, names, thresholds) -> dict:
    labels, predicted = np.asarray(labels, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    return {"num_records": int(len(labels)), **{m.name: m.compute(labels, predicted) for m in METRICS}}


def check_options(cfg) -> None:
    """Label lists, thresholds and class weights need labels; a number has none."""
    if cfg.label_separator:
        raise option_error("label_separator", cfg.label_separator, "empty with task regression (labels are numbers)")
    if cfg.threshold:
        raise option_error("threshold", cfg.threshold, "empty with task regression (thresholds are for multi_label)")
    if cfg.class_weights != "none":
        raise option_error("class_weights", cfg.class_weights, "none with task regression (class weights need classes)")


REGRESSION = register(
    Task(
        name="regression",
        problem_type=PROBLEM_TYPE,
        metric_table=METRICS,
        output_key="value",
        parse=parse_number,
        label_names=lambda train, train_path, others: [],  # no label set
        encode=encode,
        scores=values,
        predict=lambda predicted, thresholds: predicted,
        metrics=metrics,
        describe=lambda value, names: float(value),
        check_options=check_options,
        model_config=lambda names: {"num_labels": 1},
        config_label_names=lambda config: [],
        classes_of=lambda value: (),  # nothing to count per label
        details=lambda metrics: "",
        export_files=lambda names, thresholds: {},
        scores_in_output=False,
    )
)
