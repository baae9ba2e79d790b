"""Exact distributed evaluation: every record on exactly one rank, the same number of forwards on each."""

import json

import numpy as np
import pytest
import torch
from helpers import export_window_logits, read_jsonl

from pipeline.data.reading import pool
from pipeline.tasks.single_label import metrics as single_label_metrics
from pipeline.tasks.single_label import predictions
from pipeline.train.evaluate import FILLER, eval_index_batches, predict_logits


def test_sorted_eval_shards_run_longest_first_and_keep_fillers_last():
    lengths = np.array([3, 9, 1, 7, 5, 2, 8])
    shards = [eval_index_batches(7, 2, rank, 2, lengths) for rank in range(2)]
    assert shards == [[[6, 4], [0, 2]], [[1, 3], [5, FILLER]]]


@pytest.mark.ranks
def test_evaluation_and_predict_give_the_same_logits_sorted_by_length_or_not(initial_model, small_data):
    """Sorting only changes which rows share a batch: logits come back in the input order, equal."""
    from pipeline.checkpoint.export import load_export
    from pipeline.data.cache import TokenizedSplit
    from pipeline.data.reading import Reading

    tokenizer, model = load_export(initial_model)
    texts = [row["text"] for row in read_jsonl(small_data["dev"])][:60]
    texts = [text[: 4 + (i * 37) % 120] for i, text in enumerate(texts)]  # lengths that differ a lot
    split = TokenizedSplit.from_texts(tokenizer, texts, Reading.saved(None, 128))
    assert len(set(split.lengths)) > 10
    sorted_logits, sorted_padding = predict_logits(model, split, 8, by_length=True)
    plain_logits, plain_padding = predict_logits(model, split, 8, by_length=False)
    np.testing.assert_allclose(sorted_logits, plain_logits, atol=1e-5)
    assert (sorted_logits.argmax(1) == plain_logits.argmax(1)).all()
    assert sorted_padding.real == plain_padding.real == split.lengths.sum()
    assert sorted_padding.efficiency > plain_padding.efficiency


@pytest.mark.parametrize("n, world, batch", [(37, 2, 8), (5, 4, 2), (3, 8, 4), (100, 3, 7), (16, 2, 8)])
def test_eval_shards_cover_every_record_once_with_equal_batch_counts(n, world, batch):
    shards = [eval_index_batches(n, world, rank, batch) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forward passes on every rank (ZeRO-3)
    real = [i for s in shards for b in s for i in b if i != FILLER]
    assert sorted(real) == list(range(n))
    fillers = sum(i == FILLER for s in shards for b in s for i in b)
    assert fillers == -(-n // world) * world - n


@pytest.mark.ranks
def test_pooled_evaluation_on_two_ranks_counts_each_record_once_and_equals_one_process(chunked_run):
    """Records of 3-14 windows, 37 of them, over 2 ranks: window logits gathered, then pooled."""
    split, logits, names = export_window_logits(chunked_run)
    windows_per_record = np.bincount(split.records)
    assert len(windows_per_record) == 37 and len(set(windows_per_record)) > 1 and windows_per_record.min() > 1
    predicted = predictions(pool(logits, split.records, "max"))
    assert len(set(predicted)) > 1  # a model that predicts one class would hide a mix-up of records
    assert [row["label"] for row in read_jsonl(chunked_run / "predictions-dev.jsonl")] == [names[p] for p in predicted]
    expected = json.loads(json.dumps(single_label_metrics(split.record_labels, predicted, names)))
    got = json.loads((chunked_run / "eval_results.json").read_text())["dev"]
    pooled = torch.from_numpy(pool(logits, split.records, "max"))
    loss = torch.nn.functional.cross_entropy(pooled, torch.from_numpy(split.record_labels)).item()
    assert got.pop("loss") == pytest.approx(loss, rel=1e-4)  # the model's loss over every record, all ranks
    assert 0.5 < got.pop("padding_efficiency") <= 1
    assert got == expected
    assert expected["num_records"] == 37 and sum(c["support"] for c in expected["per_class"].values()) == 37


def test_the_held_out_masked_lm_loss_is_the_cross_entropy_of_every_masked_token(one_rank, tmp_path):
    """Computed on the device at the masked positions: the same sum as the cross-entropy of the whole
    logits on the host with the unmasked positions ignored, on a one-rank pretraining run's held-out part."""
    from helpers import SAMPLE, ds_config, write_jsonl

    from pipeline.core.options import TrainConfig, command_settings
    from pipeline.data.masking import IGNORE
    from pipeline.train.evaluate import evaluate, masked_token_loss
    from pipeline.train.run import Run

    notes = write_jsonl(tmp_path / "notes.jsonl", [{"text": row["text"]} for row in read_jsonl(SAMPLE / "train.jsonl")[:40]])
    settings = dict(
        ds_config=str(ds_config(tmp_path / "ds.json", 2, micro=2, accum=1)),
        text_file=str(notes),
        heldout_fraction=0.25,
        cache_dir=str(one_rank["cache"]),
        output_dir=str(tmp_path),
        run_name="pretrain",
        max_length=32,
        report_to="none",
    )
    run = Run.setup(TrainConfig(**command_settings("pretrain", settings)))
    held_out = run.data.splits["dev"]
    batch_size = 3  # the last batch of the held-out rows is padded with a filler
    assert len(held_out) % batch_size
    loss_sum, tokens = masked_token_loss(run.engine, held_out, batch_size)

    run.engine.eval()
    expected, masked = 0.0, 0
    with torch.no_grad():
        for i in range(len(held_out)):  # the old way: the whole logits on the host, unmasked positions ignored
            batch = held_out.batch([i])
            labels = batch.pop("labels")
            logits = run.engine(**batch).logits.float().cpu()
            expected += float(torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=IGNORE, reduction="sum"))
            masked += int((labels != IGNORE).sum())
    assert tokens == masked > 0
    assert loss_sum == pytest.approx(expected, rel=1e-5)
    metrics, _ = evaluate(run.engine, held_out, batch_size, [], run.task)
    assert metrics["mlm_loss"] == pytest.approx(expected / masked, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(np.exp(expected / masked), rel=1e-5)
