"""The task seam: labels, predictions, probabilities and metrics (against scikit-learn)."""

import numpy as np
import pytest
from sklearn.metrics import classification_report

from pipeline import task
from pipeline.base import ConfigError


def test_metrics_match_scikit_learn_report():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 53), rng.integers(0, 4, 53)
    names = ["a", "b", "c", "d"]
    metrics = task.metrics(labels, preds, names)
    report = classification_report(labels, preds, labels=[0, 1, 2, 3], target_names=names, output_dict=True, zero_division=0)
    assert metrics["accuracy"] == pytest.approx(report["accuracy"])
    assert metrics["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    assert metrics["weighted_f1"] == pytest.approx(report["weighted avg"]["f1-score"])
    for name in names:
        assert metrics["per_class"][name]["recall"] == pytest.approx(report[name]["recall"])
        assert metrics["per_class"][name]["support"] == report[name]["support"]
    assert metrics["num_records"] == 53


def test_class_absent_from_eval_set_is_reported_with_zero_support():
    metrics = task.metrics([0, 0, 1], [0, 1, 1], ["a", "b", "c"])
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_macro_f1_averages_over_classes_present_in_the_reference():
    """A training class missing from dev has no F1 to measure: perfect predictions score 1, not 0.667."""
    metrics = task.metrics([0, 0, 1, 1], [0, 0, 1, 1], ["a", "b", "c"])
    assert metrics["macro_f1"] == 1.0 and metrics["weighted_f1"] == 1.0
    assert metrics["absent_from_reference"] == ["c"]
    assert metrics["per_class"]["c"]["support"] == 0
    wrong = task.metrics([0, 0, 1, 1], [0, 2, 1, 1], ["a", "b", "c"])  # a record predicted as the absent class
    assert wrong["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert task.metrics([0, 1, 2], [0, 1, 2], ["a", "b", "c"])["absent_from_reference"] == []


def test_every_metric_is_logged_plotted_and_selectable_from_one_table():
    """Adding a metric is one entry in task.METRICS: the config check, plot and log line follow it."""
    from pipeline.config import TrainConfig
    from pipeline.plot import METRIC_NAMES as plotted

    assert plotted == task.METRIC_NAMES == ("accuracy", "macro_f1", "weighted_f1")
    for name in task.METRIC_NAMES:
        TrainConfig(best_metric=name, eval_every=5, save_every=5)
    with pytest.raises(ConfigError, match="best_metric.*accuracy or macro_f1 or weighted_f1"):
        TrainConfig(best_metric="f1", eval_every=5, save_every=5)
    assert (
        task.summary({"accuracy": 0.5, "macro_f1": 0.25, "weighted_f1": 1.0})
        == "accuracy 0.5000  macro-F1 0.2500  weighted-F1 1.0000"
    )


def test_labels_probabilities_and_predictions():
    assert task.label_names(["b", "a", "b"], "train.jsonl", {"dev.jsonl": ["a"]}) == ["a", "b"]
    with pytest.raises(ConfigError, match="dev.jsonl: record 2: label 'c' never appears in the training file train.jsonl"):
        task.label_names(["b", "a"], "train.jsonl", {"dev.jsonl": ["a", "c"]})
    with pytest.raises(ConfigError, match="a classifier needs at least 2"):
        task.label_names(["a", "a"], "train.jsonl", {})
    assert task.encode(["b", "a"], ["a", "b"]) == [1, 0]
    logits = np.array([[0.0, 2.0], [3.0, -1.0]])
    assert task.predictions(logits).tolist() == [1, 0]
    probabilities = task.probabilities(logits)
    assert np.allclose(probabilities.sum(axis=1), 1) and probabilities[0, 1] == pytest.approx(1 / (1 + np.exp(-2)))


def test_confusion_matrix_rows_are_true_labels_and_columns_predictions():
    matrix = task.metrics([0, 0, 0, 1, 2], [0, 2, 2, 1, 0], ["a", "b", "c"])["confusion_matrix"]
    assert matrix == {"labels": ["a", "b", "c"], "counts": [[1, 0, 2], [0, 1, 0], [1, 0, 0]]}
