"""The run's baseline on its own: TF-IDF over character n-grams + logistic regression on any split.

    python -m pipeline.tools.tfidf_baseline                       # the bundled multilabel set, one-vs-rest
    python -m pipeline.tools.tfidf_baseline --task single_label \\
        --train pipeline/sample_data/imbalanced_train.jsonl --dev pipeline/sample_data/imbalanced_dev.jsonl \\
        --test pipeline/sample_data/imbalanced_test.jsonl --class-weights balanced

The same code a training run fits in the background (pipeline.train.baseline): files read, labels
parsed, class weights resolved, thresholds tuned on dev and metrics computed by the pipeline's own
task, so the numbers compare with a run's eval files. Prints baseline.json's object and the wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from .. import tasks
from ..core.options import SAMPLE_DATA_DIR
from ..data.cache import read_split
from ..train.baseline import evaluate_baseline


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=tasks.names(), default="multi_label")
    p.add_argument("--train", default=str(SAMPLE_DATA_DIR / "multilabel_train.jsonl"))
    p.add_argument("--dev", default=str(SAMPLE_DATA_DIR / "multilabel_dev.jsonl"))
    p.add_argument("--test", default=str(SAMPLE_DATA_DIR / "multilabel_test.jsonl"), help="'' for none")
    p.add_argument("--threshold", default="", help="multi_label: as the pipeline's --threshold")
    p.add_argument("--class-weights", default="none", help="as the pipeline's --class-weights")
    args = p.parse_args(argv)
    kind = tasks.get(args.task)
    train, dev, test = (read_split(path, "text", "label", kind) if path else None for path in (args.train, args.dev, args.test))
    counts = Counter(name for label in train.labels for name in kind.classes_of(label))
    names = sorted(counts)
    weights = kind.class_weights(args.class_weights, counts, len(train.labels), names)
    start = time.perf_counter()
    result = evaluate_baseline(kind, train, dev, test, names, weights, args.threshold)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"fitted and scored in {time.perf_counter() - start:.1f} s ({len(train.labels)} training records)")
    return result


if __name__ == "__main__":
    main()
