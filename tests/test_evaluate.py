"""Exact distributed evaluation: every record on exactly one rank, the same number of forwards on each."""

import json

import numpy as np
import pytest
from helpers import export_window_logits, read_jsonl

from pipeline.data.reading import pool
from pipeline.tasks.single_label import metrics as single_label_metrics
from pipeline.tasks.single_label import predictions
from pipeline.train.evaluate import FILLER, eval_index_batches


@pytest.mark.parametrize("n, world, batch", [(37, 2, 8), (5, 4, 2), (3, 8, 4), (100, 3, 7), (16, 2, 8)])
def test_eval_shards_cover_every_record_once_with_equal_batch_counts(n, world, batch):
    shards = [eval_index_batches(n, world, rank, batch) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forward passes on every rank (ZeRO-3)
    real = [i for s in shards for b in s for i in b if i != FILLER]
    assert sorted(real) == list(range(n))
    fillers = sum(i == FILLER for s in shards for b in s for i in b)
    assert fillers == -(-n // world) * world - n


@pytest.mark.slow
def test_pooled_evaluation_on_two_ranks_counts_each_record_once_and_equals_one_process(chunked_run):
    """Records of 3-14 windows, 37 of them, over 2 ranks: window logits gathered, then pooled."""
    split, logits, names = export_window_logits(chunked_run)
    windows_per_record = np.bincount(split.records)
    assert len(windows_per_record) == 37 and len(set(windows_per_record)) > 1 and windows_per_record.min() > 1
    predicted = predictions(pool(logits, split.records, "max"))
    assert len(set(predicted)) > 1  # a model that predicts one class would hide a mix-up of records
    assert [row["label"] for row in read_jsonl(chunked_run / "predictions-dev.jsonl")] == [names[p] for p in predicted]
    expected = json.loads(json.dumps(single_label_metrics(split.record_labels, predicted, names)))
    assert json.loads((chunked_run / "eval_results.json").read_text())["dev"] == expected
    assert expected["num_records"] == 37 and sum(c["support"] for c in expected["per_class"].values()) == 37
