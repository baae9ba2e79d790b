"""The TF-IDF baseline (pipeline/train/baseline.py): its metrics against scikit-learn's computed here,
independently, on the same splits; its cache, size limit and background process; a run's report."""

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import SAMPLE, read_jsonl, write_jsonl
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge, SGDClassifier
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error, r2_score

from pipeline import tasks
from pipeline.core.options import TrainConfig
from pipeline.data.cache import prepare_splits, read_split
from pipeline.data.tokenizer import tokenizer_source
from pipeline.tasks.single_label import SINGLE_LABEL
from pipeline.train import baseline


def tfidf(train_texts, texts):
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True, dtype=np.float32)
    return vectorizer.fit_transform(train_texts), vectorizer.transform(texts)


def sgd(class_weight=None):
    return SGDClassifier(loss="log_loss", alpha=1e-5, class_weight=class_weight, random_state=0)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline-data")
    return {
        "train": write_jsonl(root / "train.jsonl", read_jsonl(SAMPLE / "train.jsonl")[:600]),
        "dev": write_jsonl(root / "dev.jsonl", read_jsonl(SAMPLE / "dev.jsonl")[:200]),
    }


def test_single_label_baseline_equals_scikit_learn_with_balanced_weights(splits):
    train, dev = (read_split(str(splits[name]), "text", "label", SINGLE_LABEL) for name in ("train", "dev"))
    names = sorted(set(train.labels))
    counts = {name: train.labels.count(name) for name in names}
    weights = SINGLE_LABEL.class_weights("balanced", counts, len(train.labels), names)
    result = baseline.evaluate_baseline(SINGLE_LABEL, train, dev, None, names, weights, "")

    x, x_dev = tfidf(train.texts, dev.texts)
    predicted = sgd("balanced").fit(x, train.labels).predict(x_dev)  # scikit-learn's own "balanced"
    expected = {
        "accuracy": accuracy_score(dev.labels, predicted),
        "macro_f1": f1_score(dev.labels, predicted, average="macro"),
        "weighted_f1": f1_score(dev.labels, predicted, average="weighted"),
    }
    assert result["dev"] == pytest.approx(expected, abs=1e-12)
    assert "test" not in result and result["name"] == "tfidf" and "logistic regression" in result["description"]
    assert 0.5 < expected["macro_f1"] < 1  # a real fit, not a degenerate one


@pytest.mark.ranks
def test_multi_label_baseline_is_one_vs_rest_with_pos_weights_and_the_task_thresholds():
    kind = tasks.get("multi_label")
    train, dev, test = (
        read_split(str(SAMPLE / f"multilabel_{s}.jsonl"), "text", "label", kind) for s in ("train", "dev", "test")
    )
    names = sorted({name for labels in train.labels for name in labels})
    y, y_dev, y_test = (
        np.array([[name in labels for name in names] for labels in s.labels], dtype=int) for s in (train, dev, test)
    )
    weights = [(len(y) - y[:, j].sum()) / y[:, j].sum() for j in range(len(names))]
    result = baseline.evaluate_baseline(kind, train, dev, test, names, weights, "0.4")

    x, x_test = tfidf(train.texts, test.texts)
    predicted = np.stack(
        [sgd({0: 1.0, 1: weights[j]}).fit(x, y[:, j]).predict_proba(x_test)[:, 1] >= 0.4 for j in range(len(names))], axis=1
    ).astype(int)
    expected = {
        "micro_f1": f1_score(y_test, predicted, average="micro"),
        "macro_f1": f1_score(y_test, predicted, average="macro"),
        "samples_f1": f1_score(y_test, predicted, average="samples"),
        "subset_accuracy": accuracy_score(y_test, predicted),
    }
    assert result["test"] == pytest.approx(expected, abs=1e-12)
    assert set(result["dev"]) == set(expected)
    # Tuned per label on dev (the default), the thresholds are the task's: at least as good on dev.
    tuned = baseline.evaluate_baseline(kind, train, dev, test, names, weights, "")
    assert tuned["dev"]["macro_f1"] >= result["dev"]["macro_f1"] and tuned["test"] != result["test"]


def test_regression_baseline_is_ridge_regression(splits):
    kind = tasks.get("regression")
    rows = read_jsonl(splits["train"])
    numbers = [{"text": r["text"], "label": float(r["text"].count("，"))} for r in rows]  # commas: learnable from characters
    path = write_jsonl(splits["train"].parent / "numbers.jsonl", numbers)
    train = read_split(str(path), "text", "label", kind)
    dev = read_split(str(write_jsonl(splits["train"].parent / "numbers-dev.jsonl", numbers[:150])), "text", "label", kind)
    result = baseline.evaluate_baseline(kind, train, dev, None, [], None, "")

    x, x_dev = tfidf(train.texts, dev.texts)
    predicted = Ridge(alpha=1.0).fit(x, np.float32(train.labels)).predict(x_dev)
    truth = np.array(dev.labels)
    expected = {
        "mse": mean_squared_error(truth, predicted),
        "mae": mean_absolute_error(truth, predicted),
        "r2": r2_score(truth, predicted),
        "pearson": float(np.corrcoef(truth, predicted)[0, 1]),
    }
    assert result["dev"] == pytest.approx(expected, rel=1e-5)
    assert "ridge" in result["description"]


def test_verdict_says_plainly_when_the_baseline_wins():
    model = {"dev": {"macro_f1": 0.70}, "test": {"macro_f1": 0.40}}
    beside = {"dev": {"macro_f1": 0.60}, "test": {"macro_f1": 0.89}}
    line = baseline.verdict(SINGLE_LABEL, model, beside, "")
    assert line.startswith("THE BASELINE WINS: test macro-F1 0.4000 for the model, 0.8900 for the baseline")
    assert baseline.verdict(SINGLE_LABEL, {"dev": model["dev"]}, beside, "").startswith("the model beats the baseline: dev")
    regression = tasks.get("regression")  # lower MSE is better
    assert baseline.verdict(regression, {"dev": {"mse": 2.0}}, {"dev": {"mse": 1.0}}, "").startswith("THE BASELINE WINS")


@pytest.mark.ranks
def test_rank_zero_fits_it_in_the_background_once_per_data_and_skips_it_past_the_limit(splits, tmp_path, caplog):
    """Real data preparation into a cache, then `start`: a background process writes the cache entry
    (equal to the in-process result); the next start reuses it; over the size limit it is skipped."""
    cfg = TrainConfig(train_file=str(splits["train"]), dev_file=str(splits["dev"]), output_dir=str(tmp_path), max_length=64)
    log = logging.getLogger("baseline-test")
    info = prepare_splits(cfg, SINGLE_LABEL, tokenizer_source(cfg, cfg.cache_directory()), cfg.cache_directory(), log)
    data = SimpleNamespace(
        train_data=info["train_data"], cache_paths=info["splits"], label_names=info["label_names"], class_weights={}
    )
    job = baseline.start(cfg, SINGLE_LABEL, data, tmp_path, log)
    assert job.process is not None
    result = job.collect(log)
    train, dev = (read_split(str(splits[name]), "text", "label", SINGLE_LABEL) for name in ("train", "dev"))
    assert result == json.loads(
        json.dumps(baseline.evaluate_baseline(SINGLE_LABEL, train, dev, None, data.label_names, None, ""))
    )

    again = baseline.start(cfg, SINGLE_LABEL, data, tmp_path, log)
    assert again.process is None and again.target == job.target and again.collect(log) == result
    key = baseline.cache_key(cfg, SINGLE_LABEL, data.cache_paths, data.label_names, {})
    assert job.target.name.endswith(key)
    assert baseline.cache_key(cfg, SINGLE_LABEL, data.cache_paths, data.label_names, {"a": 2.0}) != key  # other weights
    with caplog.at_level(logging.INFO, logger="baseline-test"):
        limited = TrainConfig(**{**vars(cfg), "baseline_max_records": 599})
        assert baseline.start(limited, SINGLE_LABEL, data, tmp_path, log) is None
        assert baseline.start(TrainConfig(**{**vars(cfg), "baseline": "none"}), SINGLE_LABEL, data, tmp_path, log) is None
    assert "baseline: skipped, 600 training records is over --baseline-max-records 599" in caplog.text


def test_the_cache_key_follows_the_records_val_size_holds_out(splits, tmp_path):
    """--val-size and the seed choose the held-out records, whose digest is the whole training file's:
    the key must tell them apart. With a dev file the seed changes nothing the baseline reads."""
    log = logging.getLogger("baseline-test")

    def key(**settings):
        cfg = TrainConfig(train_file=str(splits["train"]), output_dir=str(tmp_path), max_length=64, **settings)
        info = prepare_splits(cfg, SINGLE_LABEL, tokenizer_source(cfg, cfg.cache_directory()), cfg.cache_directory(), log)
        return baseline.cache_key(cfg, SINGLE_LABEL, info["splits"], info["label_names"], {})

    held_out = [key(val_size=0.2, seed=1), key(val_size=0.3, seed=1), key(val_size=0.2, seed=2)]
    assert len(set(held_out)) == 3
    assert key(dev_file=str(splits["dev"]), seed=1) == key(dev_file=str(splits["dev"]), seed=2)


@pytest.mark.ranks
def test_a_val_size_run_has_its_baseline_fitted_and_scored_on_the_held_out_records(splits, tmp_path):
    """2 ranks, no dev file: the background baseline reads the same held-out records as the run."""
    from dataclasses import replace

    from helpers import ds_config, launch, output_options

    from pipeline.data.cache import Records, Split, hold_out

    config = ds_config(tmp_path / "ds.json", 2, micro=4, accum=1)
    args = ["train", "--ds-config", str(config), "--train-file", str(splits["train"]), *output_options(tmp_path, "run")]
    result = launch([*args, "--val-size", "0.2", "--baseline", "tfidf", "--max-steps", "2", "--max-length", "32"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the baseline failed" not in result.stdout + result.stderr
    run_dir = tmp_path / "run"
    held_out = json.loads((run_dir / "val_split.json").read_text())
    split = Split(splits["train"], "text", "label", SINGLE_LABEL)
    train = Records.of(hold_out(split, 0.2, held_out["seed"])[0])
    dev = Records.of(replace(split, rows=frozenset(held_out["dev_records"])))
    assert len(dev.texts) == 120 and len(train.texts) == 480  # a fifth of the 600 records held out
    expected = baseline.evaluate_baseline(SINGLE_LABEL, train, dev, None, sorted(set(train.labels)), None, "")
    written = json.loads((run_dir / "eval" / "baseline.json").read_text())
    assert written["dev"] == pytest.approx(expected["dev"], abs=1e-12) and "test" not in written
    assert json.loads((run_dir / "eval_results.json").read_text())["baseline"] == written
