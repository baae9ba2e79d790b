import numpy as np
import pytest
from sklearn.metrics import classification_report

from pipeline.evaluate import FILLER, compute_metrics, eval_index_batches


@pytest.mark.parametrize("n, world, batch", [(37, 2, 8), (5, 4, 2), (3, 8, 4), (100, 3, 7), (16, 2, 8)])
def test_eval_shards_cover_every_record_once_with_equal_batch_counts(n, world, batch):
    shards = [eval_index_batches(n, world, rank, batch) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forward passes on every rank (ZeRO-3)
    real = [i for s in shards for b in s for i in b if i != FILLER]
    assert sorted(real) == list(range(n))
    fillers = sum(i == FILLER for s in shards for b in s for i in b)
    assert fillers == -(-n // world) * world - n


def test_metrics_match_scikit_learn_report():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 53), rng.integers(0, 4, 53)
    names = ["a", "b", "c", "d"]
    metrics = compute_metrics(labels, preds, names)
    report = classification_report(labels, preds, labels=[0, 1, 2, 3], target_names=names, output_dict=True, zero_division=0)
    assert metrics["accuracy"] == pytest.approx(report["accuracy"])
    assert metrics["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    assert metrics["weighted_f1"] == pytest.approx(report["weighted avg"]["f1-score"])
    for name in names:
        assert metrics["per_class"][name]["recall"] == pytest.approx(report[name]["recall"])
        assert metrics["per_class"][name]["support"] == report[name]["support"]
    assert metrics["num_records"] == 53


def test_class_absent_from_eval_set_is_reported_with_zero_support():
    metrics = compute_metrics([0, 0, 1], [0, 1, 1], ["a", "b", "c"])
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_macro_f1_averages_over_classes_present_in_the_reference():
    """A training class missing from dev has no F1 to measure: perfect predictions score 1, not 0.667."""
    metrics = compute_metrics([0, 0, 1, 1], [0, 0, 1, 1], ["a", "b", "c"])
    assert metrics["macro_f1"] == 1.0 and metrics["weighted_f1"] == 1.0
    assert metrics["absent_from_reference"] == ["c"]
    assert metrics["per_class"]["c"]["support"] == 0
    wrong = compute_metrics([0, 0, 1, 1], [0, 2, 1, 1], ["a", "b", "c"])  # a record predicted as the absent class
    assert wrong["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert compute_metrics([0, 1, 2], [0, 1, 2], ["a", "b", "c"])["absent_from_reference"] == []
