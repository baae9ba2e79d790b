"""The regression task (a number per record): parsing, data, metrics against scikit-learn and
SciPy, metric direction in best-checkpoint selection, and one 2-rank run to a verified export that
`predict` reads."""

import json
import random

import numpy as np
import pytest
import torch
from helpers import ds_config, read_jsonl, train, write_jsonl

from pipeline import tasks
from pipeline.cli.main import main
from pipeline.core.base import ConfigError
from pipeline.core.options import TrainConfig
from pipeline.data.cache import TokenizedSplit, prepare_splits, read_split
from pipeline.data.tokenizer import load_tokenizer, tokenizer_source
from pipeline.tasks.regression import REGRESSION
from pipeline.train.state import TrainerState


def test_targets_are_finite_numbers_and_anything_else_is_named_with_its_file_record_and_column(tmp_path):
    assert [REGRESSION.parse(v) for v in (3, 4.5, "7", " 2.25 ")] == [3.0, 4.5, 7.0, 2.25]
    for bad in ("long", "", None, True, float("nan"), "inf", [3], {"days": 3}):
        with pytest.raises(ValueError, match="not a finite number; --task regression expects one number per record"):
            REGRESSION.parse(bad)
    path = write_jsonl(tmp_path / "stays.jsonl", [{"text": "主诉：发热。", "los": 3}, {"text": "主诉：胸痛。", "los": "long"}])
    with pytest.raises(ConfigError, match=r"stays\.jsonl: record 2: 'los' is 'long', not a finite number"):
        read_split(str(path), "text", "los", REGRESSION)


def test_numbers_are_cached_and_batched_as_float_targets_without_a_label_set(tmp_path):
    rows = [{"text": text, "label": i + 0.5} for i, text in enumerate(["主诉：发热。", "主诉：胸痛。", "主诉：腹痛。"] * 2)]
    cfg = TrainConfig(
        task="regression",
        train_file=str(write_jsonl(tmp_path / "train.jsonl", rows)),
        dev_file=str(write_jsonl(tmp_path / "dev.jsonl", rows[:3])),
        max_length=32,
        vocabulary="char",
    )

    class Log:
        def info(self, message):
            pass

    info = prepare_splits(cfg, REGRESSION, tokenizer_source(cfg, str(tmp_path / "cache")), str(tmp_path / "cache"), Log())
    assert info["label_names"] == [] and info["class_weights"] == {}
    tokenizer = load_tokenizer(info["tokenizer_dir"], 32)
    split = TokenizedSplit.from_cache(info["splits"]["train"], tokenizer.pad_token_id, [], REGRESSION)
    assert split.record_labels.tolist() == [r["label"] for r in rows]
    batch = split.batch([4, 1])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [4.5, 1.5]


def test_metrics_match_scikit_learn_and_scipy():
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(3)
    labels = rng.uniform(1, 30, 47)
    predicted = labels + rng.normal(0, 4, 47)
    metrics = REGRESSION.metrics(labels, predicted, [], None)
    assert metrics["num_records"] == 47
    assert metrics["mse"] == pytest.approx(mean_squared_error(labels, predicted))
    assert metrics["mae"] == pytest.approx(mean_absolute_error(labels, predicted))
    assert metrics["r2"] == pytest.approx(r2_score(labels, predicted))
    assert metrics["pearson"] == pytest.approx(pearsonr(labels, predicted).statistic)
    assert (
        REGRESSION.report(metrics)
        == f"MSE {metrics['mse']:.4f}  MAE {metrics['mae']:.4f}  R2 {metrics['r2']:.4f}  Pearson {metrics['pearson']:.4f}"
    )
    # Undefined cases stay JSON numbers: constant targets (scikit-learn's force_finite), constant predictions.
    same = np.full(5, 4.0)
    assert REGRESSION.metrics(same, same, [], None)["r2"] == r2_score(same, same) == 1.0
    assert REGRESSION.metrics(same, same + 1, [], None)["r2"] == r2_score(same, same + 1) == 0.0
    assert REGRESSION.metrics(labels[:5], same, [], None)["pearson"] == 0.0


def test_best_checkpoint_follows_each_metrics_direction():
    """Lower MSE/MAE is better, higher R2/Pearson: the best step and early stopping's count follow."""
    assert [REGRESSION.metric(name).higher_is_better for name in REGRESSION.metric_names] == [False, False, True, True]
    evaluations = {4: {"mse": 9.0, "r2": 0.1}, 8: {"mse": 2.0, "r2": 0.8}, 12: {"mse": 5.0, "r2": 0.9}}
    for name, best_step in [("mse", 8), ("r2", 12)]:
        state = TrainerState()
        for step, values in evaluations.items():
            state.note_evaluation(values[name], step, REGRESSION.metric(name).higher_is_better)
        assert (state.best_step, state.best_metric) == (best_step, evaluations[best_step][name])
        assert state.evaluations_since_best == (1 if name == "mse" else 0)


def test_the_task_is_registered_and_refuses_options_that_need_labels():
    assert tasks.get("regression") is REGRESSION and tasks.by_problem_type("regression") is REGRESSION
    for name in REGRESSION.metric_names:
        tasks.resolve(TrainConfig(task="regression", best_metric=name, eval_every=5, save_every=5))
    for values, message in [
        ({"class_weights": "balanced"}, "'class_weights' = 'balanced', expected none with task regression"),
        ({"threshold": "0.5"}, "'threshold'.*empty with task regression"),
        ({"label_separator": ";"}, "'label_separator'.*empty with task regression"),
        ({"best_metric": "macro_f1", "eval_every": 5, "save_every": 5}, "mse or mae or r2 or pearson"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tasks.resolve(TrainConfig(task="regression", **values))


def test_predict_prints_a_value_and_the_export_has_no_label_files():
    assert REGRESSION.output(np.float64(6.5), 6.5, []) == {"value": 6.5}
    assert REGRESSION.output(None, None, []) == {"value": None}
    assert REGRESSION.config_label_names({"id2label": {"0": "LABEL_0"}}) == []
    assert REGRESSION.model_config([]) == {"num_labels": 1}
    assert REGRESSION.export_files([], None) == {}


# Length of stay in weeks rests on the diagnosis and on how many complications the note records.
# (In weeks, near the scale of a freshly initialised head's output: a tiny model trained from scratch
# for 64 steps on targets in days only learned their mean.)
STAYS = {"肺炎": 1.0, "脑卒中": 2.0, "阑尾炎": 0.5}
COMPLICATION = "住院期间合并感染，予抗感染治疗。"


def stays(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        diagnosis, complications = list(STAYS)[i % 3], rng.randint(0, 3)
        text = f"入院诊断：{diagnosis}。" + COMPLICATION * complications + "患者一般情况可，饮食睡眠正常。"
        rows.append({"id": f"r{i}", "text": text, "label": STAYS[diagnosis] + 0.25 * complications})
    return rows


@pytest.mark.ranks
def test_a_two_rank_regression_run_keeps_the_lowest_dev_mse_and_its_export_predicts_values(tmp_path, capsys):
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", stays(128, 1)),
        "dev": write_jsonl(tmp_path / "dev.jsonl", stays(37, 2)),
    }
    options = ["--task", "regression", "--max-length", "48", "--epochs", "4", "--eval-every", "8", "--save-every", "8"]
    options += ["--best-metric", "mse", "--keep-checkpoints", "100", "--eval-batch-size", "8", "--report-to", "none"]
    run = train(tmp_path, "run", data, ds_config(tmp_path / "ds.json", 2, micro=4, accum=1, lr=3e-3), extra=options)

    results = json.loads((run / "eval_results.json").read_text(encoding="utf-8"))
    evaluated = {int(p.stem.rsplit("-", 1)[1]): json.loads(p.read_text()) for p in (run / "eval").glob("dev-step-*.json")}
    best = min(evaluated, key=lambda step: evaluated[step]["mse"])
    assert len(evaluated) >= 3 and results["step"] == best and results["best_value"] == evaluated[best]["mse"]

    dev = read_jsonl(data["dev"])
    labels = np.array([r["label"] for r in dev])
    trained = np.array([row["value"] for row in read_jsonl(run / "predictions-dev.jsonl")])
    assert results["dev"]["mse"] == pytest.approx(mean_squared_error(labels, trained))
    assert results["dev"]["mae"] == pytest.approx(mean_absolute_error(labels, trained))
    assert results["dev"]["r2"] == pytest.approx(r2_score(labels, trained))
    assert results["dev"]["pearson"] == pytest.approx(pearsonr(labels, trained).statistic)
    assert results["dev"]["r2"] > 0.5, results["dev"]  # it learned the stays, not just their mean

    export = run / "export"
    config = json.loads((export / "config.json").read_text(encoding="utf-8"))
    assert (config["problem_type"], len(config["id2label"])) == ("regression", 1)  # one output
    assert not (export / "label_map.json").exists() and not (export / "thresholds.json").exists()
    console = (tmp_path / "run.console.txt").read_text(encoding="utf-8")
    assert "MSE" in console and "recall per class" not in console

    capsys.readouterr()
    assert main(["predict", "--model", str(export), "--input", str(data["dev"])]) == 0  # python -m pipeline predict
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(row) for row in rows] == [{"record", "id", "value"}] * len(dev)
    assert [row["id"] for row in rows] == [r["id"] for r in dev]
    assert np.allclose([row["value"] for row in rows], trained, rtol=1e-4, atol=1e-4)
