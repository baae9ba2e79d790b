"""A classical baseline on the same split: TF-IDF over character n-grams + logistic regression.

    python -m pipeline.tools.tfidf_baseline                       # the bundled multilabel set, one-vs-rest
    python -m pipeline.tools.tfidf_baseline --task single_label \\
        --train pipeline/sample_data/imbalanced_train.jsonl --dev pipeline/sample_data/imbalanced_dev.jsonl \\
        --test pipeline/sample_data/imbalanced_test.jsonl --class-weights balanced

The files are read, labels parsed, thresholds tuned (on dev) and metrics computed by the pipeline's
own task functions (pipeline.tasks), so the numbers compare with a training run's eval files. Multi-label:
one logistic regression per label (one-vs-rest) and decision thresholds per --threshold, fitted on dev
and applied to test. Prints one JSON object: the metrics on dev and test.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from .. import tasks
from ..core.options import SAMPLE_DATA_DIR
from ..data.cache import read_split


def encoded(kind, split, names: list[str]) -> np.ndarray:
    """The split's labels as the model takes them (class ids or multi-hot rows), by the task's encoder."""
    import pyarrow as pa

    return kind.encode(pa.array(split.labels), names)


def fit_predict(kind, train, others: list, names: list[str], class_weights: str, seed: int) -> list[np.ndarray]:
    """Probabilities for each split in `others` from a TF-IDF + logistic-regression model fitted on `train`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(train.texts)
    weight = "balanced" if class_weights == "balanced" else None
    regression = LogisticRegression(max_iter=2000, C=10.0, class_weight=weight, random_state=seed)
    targets = encoded(kind, train, names)
    model = OneVsRestClassifier(regression) if kind.name == "multi_label" else regression
    model.fit(features, targets)
    return [model.predict_proba(vectorizer.transform(split.texts)) for split in others]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("single_label", "multi_label"), default="multi_label")  # a classifier baseline
    p.add_argument("--train", default=str(SAMPLE_DATA_DIR / "multilabel_train.jsonl"))
    p.add_argument("--dev", default=str(SAMPLE_DATA_DIR / "multilabel_dev.jsonl"))
    p.add_argument("--test", default=str(SAMPLE_DATA_DIR / "multilabel_test.jsonl"))
    p.add_argument("--threshold", default="per-label", help="multi_label: as the pipeline's --threshold")
    p.add_argument("--class-weights", choices=["none", "balanced"], default="none")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    kind = tasks.get(args.task)
    train, dev, test = (read_split(path, "text", "label", kind) for path in (args.train, args.dev, args.test))
    names = sorted({name for label in train.labels for name in kind.classes_of(label)})
    results = {}
    dev_p, test_p = fit_predict(kind, train, [dev, test], names, args.class_weights, args.seed)
    thresholds = kind.thresholds(encoded(kind, dev, names), dev_p, names, args.threshold)
    for name, split, probabilities in (("dev", dev, dev_p), ("test", test, test_p)):
        results[name] = kind.metrics(encoded(kind, split, names), kind.predict(probabilities, thresholds), names, thresholds)
    print(json.dumps({split: {k: results[split][k] for k in kind.metric_names} for split in results}, indent=1))
    return results


if __name__ == "__main__":
    main()
