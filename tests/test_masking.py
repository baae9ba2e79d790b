"""Masked-LM inputs (data/masking.py): jieba's words masked whole, BERT's 80/10/10, a pure function of
(seed, epoch, row); and the bad inputs `pretrain` refuses before any rank starts."""

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline import tasks
from pipeline.core.base import ConfigError
from pipeline.core.options import TINY_MODEL_DIR, TrainConfig, command_settings
from pipeline.data import masking, reading
from pipeline.data.cache import TokenizedSplit, encoded_columns
from pipeline.data.masking import IGNORE, Masking
from pipeline.data.tokenizer import TOKENIZER_KEY, check_model_tokenizer, load_tokenizer, write_tokenizer

SENTENCE = "患者因反复咳嗽三天入院，查体体温升高，考虑社区获得性肺炎，予头孢曲松抗感染治疗。"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A character vocabulary of the sentence (each character twice, so none is [UNK])."""
    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(directory, [SENTENCE, SENTENCE], "char", 2)
    return load_tokenizer(str(directory), 128)


def masker(tokenizer, whole_words=True, probability=0.15, seed=0):
    return Masking(seed, probability, whole_words, tokenizer.mask_token_id, len(tokenizer), tuple(tokenizer.all_special_ids))


def split_of(tokenizer, texts, masking):
    """Texts encoded with word starts, as a pretraining cache holds them, served as a split."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    columns, _ = encoded_columns(tokenizer, texts, reading.Reading(128), words=True)
    rows = datasets.Dataset(InMemoryTable(pa.table(columns))).with_format("arrow")
    return TokenizedSplit(rows, tokenizer.pad_token_id, None, masking=masking)


def word_spans(text):
    """(start, end) token positions of each jieba word, for a one-character-per-token text after [CLS]."""
    spans, at = [], 1
    for word in masking.words(text):
        spans.append((at, at + len(word)))
        at += len(word)
    return spans


def test_word_starts_follow_jiebas_words(tokenizer):
    columns, _ = encoded_columns(tokenizer, [SENTENCE], reading.Reading(128), words=True)
    starts = columns[masking.WORD_START][0].as_py()
    expected = [1]  # [CLS]
    for word in masking.words(SENTENCE):
        expected += [1] + [0] * (len(word) - 1)
    assert starts == expected + [1]  # [SEP]
    assert 0 in starts  # the sentence has words of several characters


def test_whole_word_masking_masks_every_character_of_a_word_together(tokenizer):
    split = split_of(tokenizer, [SENTENCE] * 200, masker(tokenizer))
    labels = split.batch(range(200), epoch=0)["labels"].numpy() != IGNORE
    long_words = [(a, b) for a, b in word_spans(SENTENCE) if b - a > 1]
    masked_long_words = 0
    for row in labels:
        for a, b in word_spans(SENTENCE):
            assert row[a:b].all() or not row[a:b].any(), f"word {SENTENCE[a - 1 : b - 1]} masked in part"
        masked_long_words += sum(row[a:b].all() for a, b in long_words)
    assert masked_long_words > 50  # words of several characters were masked, not only single ones
    # Token masking, by contrast, splits words.
    tokens = split_of(tokenizer, [SENTENCE] * 200, masker(tokenizer, whole_words=False)).batch(range(200), epoch=0)
    chosen = tokens["labels"].numpy() != IGNORE
    assert any(row[a:b].any() and not row[a:b].all() for row in chosen for a, b in long_words)


def test_masking_follows_bert_80_10_10(tokenizer):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, len(tokenizer), size=(400, 100))
    rule = masker(tokenizer, whole_words=False)
    chosen = kept = masked = randomised = total = 0
    for row, row_ids in enumerate(ids):
        full = np.r_[tokenizer.cls_token_id, row_ids, tokenizer.sep_token_id]
        out, labels = rule.row(full, np.ones(len(full), dtype=np.int64), np.random.default_rng([0, 0, 0, row]))
        at = labels != IGNORE
        assert not at[0] and not at[-1]  # special tokens are never chosen
        assert (labels[at] == full[at]).all()  # the label is the original token
        assert (out[~at] == full[~at]).all()  # nothing else changes
        chosen, total = chosen + at.sum(), total + len(row_ids)
        masked += (out[at] == tokenizer.mask_token_id).sum()
        kept += (out[at] == full[at]).sum()
        randomised += ((out[at] != full[at]) & (out[at] != tokenizer.mask_token_id)).sum()
    assert chosen / total == pytest.approx(0.15, abs=0.005)  # round(0.15 x 100) per row
    # 6,000 chosen tokens: a standard error of about 0.005 for 80%, 0.004 for 10%.
    assert masked / chosen == pytest.approx(0.8, abs=0.02)
    assert randomised / chosen == pytest.approx(0.1, abs=0.015)
    assert kept / chosen == pytest.approx(0.1, abs=0.015)


def test_a_row_is_masked_by_seed_epoch_and_row_alone(tokenizer):
    texts = [SENTENCE[i:] + SENTENCE[:i] for i in range(16)]
    split = split_of(tokenizer, texts, masker(tokenizer))
    alone = [split.batch([i], epoch=3)["input_ids"][0] for i in range(16)]
    together = split.batch([7, 2, 11], epoch=3)["input_ids"]
    for position, row in enumerate([7, 2, 11]):  # another batch, same masking
        assert torch.equal(together[position, : len(alone[row])], alone[row])
    assert not torch.equal(split.batch([7], epoch=4)["input_ids"][0], alone[7])  # each epoch masks afresh
    held_out = split.batch([5])["input_ids"]
    assert torch.equal(split.batch([5])["input_ids"], held_out)  # the held-out masking is fixed
    other_seed = split_of(tokenizer, texts, masker(tokenizer, seed=1)).batch([7], epoch=3)["input_ids"][0]
    assert not torch.equal(other_seed, alone[7])


def test_held_out_part_takes_whole_records(tokenizer, tmp_path):
    """Windows of one record all fall on one side; the part is a seeded share of the records."""
    import pyarrow as pa

    from pipeline.data.cache import CACHE_DATA, RECORD

    texts = [SENTENCE * 3] * 40  # several windows each at max length 32
    columns, _ = encoded_columns(tokenizer, texts, reading.Reading(32, long_records="chunks"), words=True)
    windows = len(columns[RECORD]) // 40
    assert windows > 1
    columns["labels"] = pa.nulls(len(columns[RECORD]))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        table = pa.table(columns)
        with pa.OSFile(str(tmp_path / name / CACHE_DATA), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    parts = TokenizedSplit.held_out([str(tmp_path / "a"), str(tmp_path / "b")], 0, None, 0.1, seed=3)
    assert len(parts["dev"]) == 8 * windows and len(parts["train"]) == 72 * windows  # 8 of 80 records, whole
    for part in parts.values():
        assert (np.bincount(part.rows[RECORD].to_numpy()) % windows == 0).all()


# ----------------------------------------------------------------------------------------------
# Bad input, refused with one line before any rank (tasks.resolve runs in ./launch.sh and check-config)
# ----------------------------------------------------------------------------------------------


def pretrain_config(**values) -> TrainConfig:
    return TrainConfig(**command_settings("pretrain", values))


def test_a_text_file_without_the_text_column_is_refused(tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps({"note": SENTENCE}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{notes}: no column 'text' \(columns: note\)"):
        tasks.resolve(pretrain_config(text_file=str(notes)))
    plain = tmp_path / "notes.txt"  # plain text: one record per non-blank line, column 'text'
    plain.write_text(SENTENCE + "\n\n" + SENTENCE + "\n", encoding="utf-8")
    tasks.resolve(pretrain_config(text_file=str(notes), text_column="note"))
    with pytest.raises(ConfigError, match=rf"{plain}: no column 'note'"):  # every file is checked
        tasks.resolve(pretrain_config(text_file=f"{notes},{plain}", text_column="note"))


@pytest.mark.ranks  # builds and saves a model
def test_a_model_directory_with_no_masked_lm_head_or_no_config_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    notes = tmp_path / "notes.txt"
    notes.write_text(SENTENCE + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"no config\.json"):
        tasks.resolve(pretrain_config(text_file=str(notes), model=str(tmp_path)))
    classifier = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR)).save_pretrained(classifier)
    with pytest.raises(ConfigError, match=r"has weights but no masked-LM head"):
        tasks.resolve(pretrain_config(text_file=str(notes), model=str(classifier)))
    tasks.resolve(pretrain_config(text_file=str(notes)))  # config only: pretraining from scratch


def test_options_of_train_and_pretrain_do_not_mix(tmp_path):
    with pytest.raises(ConfigError, match="text_file"):
        tasks.resolve(pretrain_config())
    with pytest.raises(ConfigError, match="'text_file'.*unset with task single_label"):
        tasks.resolve(TrainConfig(text_file="notes.txt"))
    with pytest.raises(ConfigError, match="pretrain trains a masked LM"):
        command_settings("pretrain", {"task": "multi_label"})


def test_a_model_trained_here_is_refused_with_another_tokenizer(tokenizer, tmp_path):
    from pipeline.data.cache import tokenizer_fingerprint

    model = tmp_path / "export"
    shutil.copytree(TINY_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, TOKENIZER_KEY: tokenizer_fingerprint(tokenizer)}))
    (model / "model.safetensors").write_bytes(b"")  # weights: only their presence is looked at
    with pytest.raises(ConfigError, match="holds no tokenizer files"):
        check_model_tokenizer(str(model))
    tokenizer.save_pretrained(model)
    check_model_tokenizer(str(model))  # its own tokenizer
    write_tokenizer(model, [SENTENCE + "另一个词表", SENTENCE + "另一个词表"], "char", 2)  # another vocabulary
    with pytest.raises(ConfigError, match="not the tokenizer its weights were trained with"):
        check_model_tokenizer(str(model))
