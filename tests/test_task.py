"""The task seam: labels, predictions, probabilities and metrics (against scikit-learn)."""

import numpy as np
import pytest
from sklearn.metrics import classification_report

from pipeline.core.base import ConfigError
from pipeline.tasks.base import label_names, summary
from pipeline.tasks.multi_label import MULTI_LABEL, THRESHOLD_GRID
from pipeline.tasks.single_label import METRIC_NAMES, METRICS, SINGLE_LABEL, predictions, probabilities
from pipeline.tasks.single_label import encode as single_label_encode
from pipeline.tasks.single_label import metrics as single_label_metrics


def test_metrics_match_scikit_learn_report():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 53), rng.integers(0, 4, 53)
    names = ["a", "b", "c", "d"]
    metrics = single_label_metrics(labels, preds, names)
    report = classification_report(labels, preds, labels=[0, 1, 2, 3], target_names=names, output_dict=True, zero_division=0)
    assert metrics["accuracy"] == pytest.approx(report["accuracy"])
    assert metrics["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    assert metrics["weighted_f1"] == pytest.approx(report["weighted avg"]["f1-score"])
    for name in names:
        assert metrics["per_class"][name]["recall"] == pytest.approx(report[name]["recall"])
        assert metrics["per_class"][name]["support"] == report[name]["support"]
    assert metrics["num_records"] == 53


def test_class_absent_from_eval_set_is_reported_with_zero_support():
    metrics = single_label_metrics([0, 0, 1], [0, 1, 1], ["a", "b", "c"])
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_macro_f1_averages_over_classes_present_in_the_reference():
    """A training class missing from dev has no F1 to measure: perfect predictions score 1, not 0.667."""
    metrics = single_label_metrics([0, 0, 1, 1], [0, 0, 1, 1], ["a", "b", "c"])
    assert metrics["macro_f1"] == 1.0 and metrics["weighted_f1"] == 1.0
    assert metrics["absent_from_reference"] == ["c"]
    assert metrics["per_class"]["c"]["support"] == 0
    wrong = single_label_metrics([0, 0, 1, 1], [0, 2, 1, 1], ["a", "b", "c"])  # a record predicted as the absent class
    assert wrong["macro_f1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert single_label_metrics([0, 1, 2], [0, 1, 2], ["a", "b", "c"])["absent_from_reference"] == []


def test_every_metric_is_logged_plotted_and_selectable_from_one_table():
    """Adding a metric is one entry in METRICS: the config check, plot and log line follow it."""
    from pipeline import tasks
    from pipeline.core.options import TrainConfig
    from pipeline.tasks import all_metric_names

    assert METRIC_NAMES == SINGLE_LABEL.metric_names == ("accuracy", "macro_f1", "weighted_f1")
    names = all_metric_names()
    assert len(names) == len(set(names)) and set(names) >= {
        "accuracy",
        "macro_f1",
        "weighted_f1",
        "micro_f1",
        "samples_f1",
        "subset_accuracy",
    }
    for name in METRIC_NAMES:
        tasks.resolve(TrainConfig(best_metric=name, eval_every=5, save_every=5))
    with pytest.raises(ConfigError, match="best_metric.*accuracy or macro_f1 or weighted_f1"):
        tasks.resolve(TrainConfig(best_metric="f1", eval_every=5, save_every=5))
    assert (
        summary({"accuracy": 0.5, "macro_f1": 0.25, "weighted_f1": 1.0}, METRICS)
        == "accuracy 0.5000  macro-F1 0.2500  weighted-F1 1.0000"
    )


def seen(*labels) -> dict:
    """Labels as data.py counts them while tokenizing: {label: {"count", "first_record"}}."""
    out = {}
    for row, label in enumerate(labels, start=1):
        out.setdefault(label, {"count": 0, "first_record": row})["count"] += 1
    return out


def test_labels_probabilities_and_predictions():
    import pyarrow as pa

    assert label_names(seen("b", "a", "b"), "train.jsonl", {"dev.jsonl": seen("a")}) == ["a", "b"]
    with pytest.raises(ConfigError, match="dev.jsonl: record 2: label 'c' never appears in the training file train.jsonl"):
        label_names(seen("b", "a"), "train.jsonl", {"dev.jsonl": seen("a", "c", "d", "c")})
    with pytest.raises(ConfigError, match="a classifier needs at least 2"):
        label_names(seen("a", "a"), "train.jsonl", {})
    assert single_label_encode(pa.array(["b", "a", "b"]), ["a", "b"]).tolist() == [1, 0, 1]
    logits = np.array([[0.0, 2.0], [3.0, -1.0]])
    assert predictions(logits).tolist() == [1, 0]
    p = probabilities(logits)
    assert np.allclose(p.sum(axis=1), 1) and p[0, 1] == pytest.approx(1 / (1 + np.exp(-2)))


# ----------------------------------------------------------------------------------------------
# Multi-label, thresholds, class weights
# ----------------------------------------------------------------------------------------------


def test_label_parsing_for_each_task():
    assert SINGLE_LABEL.parse(3) == "3"
    with pytest.raises(ValueError, match="is a list of labels.*--task multi_label"):
        SINGLE_LABEL.parse(["a", "b"])
    assert MULTI_LABEL.parse(["b", "a", "b"]) == ["a", "b"]
    assert MULTI_LABEL.parse("b; a;", ";") == ["a", "b"]
    with pytest.raises(ValueError, match="not a list of labels.*--label-separator"):
        MULTI_LABEL.parse("a;b")
    with pytest.raises(ValueError, match="not a list of labels"):
        MULTI_LABEL.parse(7)
    for empty in ([], " ; ", ""):
        with pytest.raises(ValueError, match="empty"):
            MULTI_LABEL.parse(empty, ";")
    with pytest.raises(ValueError, match="empty or not a string"):
        MULTI_LABEL.parse(["a", None])


def test_multi_label_names_and_encoding():
    """Label sets are counted per label (data.py), so the label set and its checks are the single-label ones."""
    import pyarrow as pa

    names = label_names(seen("b", "a", "c"), "train.jsonl", {"dev.jsonl": seen("c")})
    assert names == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="dev.jsonl: record 2: label 'd' never appears"):
        label_names(seen("b", "a", "c"), "train.jsonl", {"dev.jsonl": seen("c", "d", "a")})
    assert MULTI_LABEL.encode(pa.array([["a", "c"], ["b"]]), names).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_multi_label_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(1)
    labels, predicted = rng.integers(0, 2, (41, 4)), rng.integers(0, 2, (41, 4))
    labels[:, 3] = 0  # a label absent from the reference
    names = ["a", "b", "c", "d"]
    thresholds = dict.fromkeys(names, 0.5)
    metrics = MULTI_LABEL.metrics(labels, predicted, names, thresholds)
    assert metrics["micro_f1"] == pytest.approx(f1_score(labels, predicted, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predicted, labels=[0, 1, 2], average="macro"))
    assert metrics["samples_f1"] == pytest.approx(f1_score(labels, predicted, average="samples", zero_division=0))
    assert metrics["subset_accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["absent_from_reference"] == ["d"]
    precision, recall, _, support = precision_recall_fscore_support(labels, predicted, zero_division=0)
    for j, name in enumerate(names):
        row = metrics["per_class"][name]
        assert (row["precision"], row["recall"], row["support"]) == pytest.approx((precision[j], recall[j], support[j]))
        truth, guess = labels[:, j] == 1, predicted[:, j] == 1
        assert [row[k] for k in ("tp", "fp", "fn", "tn")] == [
            int(np.sum(truth & guess)),
            int(np.sum(~truth & guess)),
            int(np.sum(truth & ~guess)),
            int(np.sum(~truth & ~guess)),
        ]
    assert MULTI_LABEL.summary(metrics).startswith("micro-F1 ")


def test_thresholds_per_label_maximise_each_labels_dev_f1_and_global_the_micro_f1(tmp_path):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, (60, 3))
    probabilities = np.clip(labels * rng.uniform(0.2, 0.9, (60, 3)) + (1 - labels) * rng.uniform(0.0, 0.6, (60, 3)), 0, 1)
    names = ["a", "b", "c"]
    per_label = MULTI_LABEL.thresholds(labels, probabilities, names, "per-label")
    assert MULTI_LABEL.thresholds(labels, probabilities, names, "") == per_label
    for j, name in enumerate(names):
        best = max(f1_score(labels[:, j], probabilities[:, j] >= t) for t in THRESHOLD_GRID)
        assert f1_score(labels[:, j], probabilities[:, j] >= per_label[name]) == pytest.approx(best)
    one = MULTI_LABEL.thresholds(labels, probabilities, names, "global")
    assert len(set(one.values())) == 1
    best = max(f1_score(labels, probabilities >= t, average="micro") for t in THRESHOLD_GRID)
    assert f1_score(labels, probabilities >= one["a"], average="micro") == pytest.approx(best)
    assert MULTI_LABEL.thresholds(labels, probabilities, names, "0.3") == dict.fromkeys(names, 0.3)
    predicted = MULTI_LABEL.predict(probabilities, per_label)
    assert predicted.tolist() == (probabilities >= [per_label[n] for n in names]).astype(int).tolist()
    (tmp_path / "t.json").write_text('{"a": 0.2, "b": 0.5, "c": 0.7}')
    assert MULTI_LABEL.thresholds(None, None, names, str(tmp_path / "t.json")) == {"a": 0.2, "b": 0.5, "c": 0.7}
    (tmp_path / "other.json").write_text('{"a": 0.2, "x": 0.5}')
    with pytest.raises(ConfigError, match=r"other.json: unknown labels \['x'\]; missing labels \['b', 'c'\]"):
        MULTI_LABEL.thresholds(None, None, names, str(tmp_path / "other.json"))


def test_class_weights_balanced_and_from_a_file(tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    encoded = [0, 0, 0, 0, 1, 1, 2]
    expected = compute_class_weight("balanced", classes=np.arange(3), y=np.array(encoded))
    counts = {"a": 4, "b": 2, "c": 1}  # records per label, as data.py counts them
    assert SINGLE_LABEL.class_weights("balanced", counts, 7, ["a", "b", "c"]) == pytest.approx(expected)
    assert SINGLE_LABEL.class_weights("none", counts, 7, ["a", "b", "c"]) is None
    # multi-hot [[1, 0], [1, 1], [0, 1], [0, 1]]: a on 2 of 4 records, b on 3
    assert MULTI_LABEL.class_weights("balanced", {"a": 2, "b": 3}, 4, ["a", "b"]) == pytest.approx([2 / 2, 1 / 3])
    with pytest.raises(ConfigError, match="label 'b' is on every training record"):
        MULTI_LABEL.class_weights("balanced", {"a": 1, "b": 2}, 2, ["a", "b"])
    path = tmp_path / "w.json"
    path.write_text('{"a": 1, "b": 2.5}')
    assert SINGLE_LABEL.class_weights(str(path), counts, 7, ["a", "b"]) == [1.0, 2.5]
    for content, message in [
        ('{"a": 1, "b": 2, "z": 3}', r"unknown labels \['z'\]"),
        ('{"a": 1}', r"missing labels \['b'\]"),
        ('{"a": 1, "b": 0}', "label 'b' has 0, expected a positive number"),
        ('{"a": 1, "b": "2"}', "label 'b' has '2', expected a positive number"),
    ]:
        path.write_text(content)
        with pytest.raises(ConfigError, match=message):
            SINGLE_LABEL.class_weights(str(path), counts, 7, ["a", "b"])


def test_weighted_losses_as_computed_by_hand():
    """Weighted cross-entropy and BCE with pos_weight on a small batch, against the formulas; each
    is a mean over the records, so two equal micro-batches average to the big batch's loss."""
    import torch

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -2.0, 0.5]])
    labels = torch.tensor([0, 1, 2, 2])
    weights = torch.tensor([0.5, 2.0, 4.0])
    by_hand = np.mean([weights[y].item() * -torch.log_softmax(row, dim=0)[y].item() for row, y in zip(logits, labels.tolist())])
    loss = SINGLE_LABEL.weighted_loss(weights)
    assert loss(logits, labels).item() == pytest.approx(by_hand, rel=1e-6)
    halves = (loss(logits[:2], labels[:2]) + loss(logits[2:], labels[2:])) / 2
    assert halves.item() == pytest.approx(loss(logits, labels).item(), rel=1e-6)
    # torch's own weighted mean divides by the batch's weight sum: different per micro-batch, so not this.
    torch_mean = torch.nn.functional.cross_entropy(logits, labels, weight=weights).item()
    assert torch_mean != pytest.approx(by_hand, rel=1e-3)

    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    sig = torch.sigmoid(logits)
    by_hand = -(weights * targets * torch.log(sig) + (1 - targets) * torch.log(1 - sig)).mean().item()
    assert MULTI_LABEL.weighted_loss(weights)(logits, targets).item() == pytest.approx(by_hand, rel=1e-6)
    ones = MULTI_LABEL.weighted_loss(torch.ones(3))(logits, targets).item()
    assert ones == pytest.approx(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets).item(), rel=1e-6)


def test_the_task_checks_its_options_at_the_edge(tmp_path):
    from pipeline import tasks
    from pipeline.core.options import TrainConfig

    for name in MULTI_LABEL.metric_names:
        tasks.resolve(TrainConfig(task="multi_label", best_metric=name, eval_every=5, save_every=5))
    for values, message in [
        ({"task": "multilabel"}, f"'task' = 'multilabel', expected {' or '.join(tasks.names())}"),  # every registered task
        ({"best_metric": "micro_f1", "eval_every": 5, "save_every": 5}, "for task single_label"),
        ({"label_separator": ";"}, "'label_separator'.*empty with task single_label"),
        ({"threshold": "0.4"}, "'threshold'.*empty with task single_label"),
        ({"task": "multi_label", "threshold": "1"}, "per-label, global, a number in \\(0, 1\\) or a .json file"),
        ({"task": "multi_label", "threshold": str(tmp_path / "none.json")}, "none.json: file not found"),
        ({"class_weights": "inverse"}, "none, balanced or a .json file"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tasks.resolve(TrainConfig(**values))
    (tmp_path / "w.json").write_text('{"a": -1}')
    with pytest.raises(ConfigError, match="w.json: label 'a' has -1, expected a positive number"):
        tasks.resolve(TrainConfig(class_weights=str(tmp_path / "w.json")))


def test_confusion_matrix_rows_are_true_labels_and_columns_predictions():
    matrix = single_label_metrics([0, 0, 0, 1, 2], [0, 2, 2, 1, 0], ["a", "b", "c"])["confusion_matrix"]
    assert matrix == {"labels": ["a", "b", "c"], "counts": [[1, 0, 2], [0, 1, 0], [1, 0, 0]]}


def test_a_saved_models_task_comes_from_its_problem_type_and_an_unknown_one_is_refused():
    from pipeline import tasks

    assert tasks.by_problem_type(None) is SINGLE_LABEL  # a base model, an older export
    assert tasks.by_problem_type("multi_label_classification") is MULTI_LABEL
    with pytest.raises(ConfigError, match="export/: config.json has problem_type 'ranking', which no task registers"):
        tasks.by_problem_type("ranking", "export/")


def test_what_a_classifier_task_writes_beside_its_export_and_prints_from_predict(tmp_path):
    names = ["a", "b"]
    config = {"id2label": {str(i): name for i, name in enumerate(names)}}
    assert SINGLE_LABEL.config_label_names(config) == MULTI_LABEL.config_label_names(config) == names
    assert SINGLE_LABEL.model_config(names) == {"num_labels": 2, "id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}}
    assert SINGLE_LABEL.export_files(names, None) == {"label_map.json": {"a": 0, "b": 1}}
    assert MULTI_LABEL.export_files(names, {"a": 0.3, "b": 0.6}) == {
        "label_map.json": {"a": 0, "b": 1},
        "thresholds.json": {"a": 0.3, "b": 0.6},
    }
    assert SINGLE_LABEL.export_thresholds(str(tmp_path), names, None) is None
    with pytest.raises(ConfigError, match="multi-label model without thresholds.json"):
        MULTI_LABEL.export_thresholds(str(tmp_path), names, None)
    assert SINGLE_LABEL.output(1, np.array([0.25, 0.75]), names) == {"label": "b", "probabilities": {"a": 0.25, "b": 0.75}}
    assert MULTI_LABEL.output(None, None, names) == {"labels": None, "probabilities": None}
    metrics = single_label_metrics([0, 1, 1], [0, 1, 0], names)
    assert SINGLE_LABEL.report(metrics) == f"{SINGLE_LABEL.summary(metrics)}\n  recall per class: a 1.00  b 0.50"
    assert [list(MULTI_LABEL.classes_of(["a", "b"])), list(SINGLE_LABEL.classes_of("a"))] == [["a", "b"], ["a"]]
