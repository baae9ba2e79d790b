import numpy as np
import pytest
from helpers import SAMPLE, read_jsonl

from pipeline.core.base import ConfigError
from pipeline.core.options import TrainConfig
from pipeline.data.reading import HEAD_SHARE, Reading, encode, pool
from pipeline.data.tokenizer import build_tokenizer, load_tokenizer

TEXTS = [r["text"] for r in read_jsonl(SAMPLE / "dev.jsonl")[:40]]
MAX_LENGTH = 24


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = build_tokenizer(TEXTS, "reading-tests", str(tmp_path_factory.mktemp("tok")))
    return load_tokenizer(str(directory), MAX_LENGTH)


def content(tokenizer, text: str) -> list[int]:
    """The whole text's tokens, without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def wrapped(tokenizer, ids: list[int]) -> list[int]:
    return [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]


def test_head_is_what_the_tokenizer_itself_truncates_to(tokenizer):
    inputs, record = encode(tokenizer, TEXTS, Reading(MAX_LENGTH))
    assert inputs == dict(tokenizer(TEXTS, truncation=True, max_length=MAX_LENGTH))
    assert record == list(range(len(TEXTS)))


@pytest.mark.parametrize("truncation", ["tail", "head+tail"])
def test_tail_and_head_plus_tail_keep_exactly_those_tokens(tokenizer, truncation):
    budget = MAX_LENGTH - 2
    head = 0 if truncation == "tail" else budget // HEAD_SHARE
    inputs, record = encode(tokenizer, TEXTS, Reading(MAX_LENGTH, truncation))
    assert record == list(range(len(TEXTS)))
    for text, ids, mask in zip(TEXTS, inputs["input_ids"], inputs["attention_mask"]):
        full = content(tokenizer, text)
        assert len(full) > budget  # every sample text is longer than the budget
        assert ids == wrapped(tokenizer, full[:head] + full[len(full) - (budget - head) :])
        assert mask == [1] * MAX_LENGTH
    # Segment ids, where the tokenizer makes them (the pipeline's built tokenizers do not: BERT takes 0s).
    assert all(types == [0] * MAX_LENGTH for types in inputs.get("token_type_ids", []))


@pytest.mark.parametrize("truncation", ["head", "tail", "head+tail"])
def test_a_record_within_the_budget_is_read_whole_in_every_mode(tokenizer, truncation):
    short = "主诉：胸痛2小时。"
    for reading in (Reading(MAX_LENGTH, truncation), Reading(MAX_LENGTH, long_records="chunks", stride=5)):
        inputs, record = encode(tokenizer, [short], reading)
        assert inputs["input_ids"] == [tokenizer(short)["input_ids"]] and record == [0]


@pytest.mark.parametrize("stride", [0, 1, 7, MAX_LENGTH - 3])
def test_windows_cover_every_token_and_neighbours_share_stride_tokens(tokenizer, stride):
    budget = MAX_LENGTH - 2
    inputs, record = encode(tokenizer, TEXTS, Reading(MAX_LENGTH, long_records="chunks", stride=stride))
    assert record == sorted(record) and sorted(set(record)) == list(range(len(TEXTS)))
    for index, text in enumerate(TEXTS):
        windows = [ids for ids, r in zip(inputs["input_ids"], record) if r == index]
        assert all(w[0] == tokenizer.cls_token_id and w[-1] == tokenizer.sep_token_id for w in windows)
        pieces = [w[1:-1] for w in windows]
        assert all(len(p) == budget for p in pieces[:-1]) and 0 < len(pieces[-1]) <= budget
        step = budget - stride
        rebuilt = pieces[0] + [t for p in pieces[1:] for t in p[stride:]]
        assert rebuilt == content(tokenizer, text)  # every token, in order, each window starting `step` on
        assert all(p[:stride] == q[step:] for q, p in zip(pieces, pieces[1:]))
        assert len(pieces) == 1 + -(-(len(rebuilt) - budget) // step)  # no window lies inside the one before


def test_stride_must_leave_room_for_new_tokens(tokenizer):
    with pytest.raises(ConfigError, match="stride 22 must be less than the 22 text tokens of a window"):
        encode(tokenizer, TEXTS[:1], Reading(MAX_LENGTH, long_records="chunks", stride=MAX_LENGTH - 2))


def test_pooling_combines_each_records_windows_once():
    logits = np.array([[1.0, 4.0], [3.0, 0.0], [5.0, 5.0], [-1.0, 2.0], [0.0, -3.0], [2.0, 2.0]], dtype=np.float32)
    record = np.array([0, 0, 1, 2, 2, 2])
    np.testing.assert_allclose(pool(logits, record, "mean"), [[2.0, 2.0], [5.0, 5.0], [1 / 3, 1 / 3]], rtol=1e-6)
    np.testing.assert_array_equal(pool(logits, record, "max"), [[3.0, 4.0], [5.0, 5.0], [2.0, 2.0]])
    one_each = np.arange(4)
    np.testing.assert_array_equal(pool(logits[:4], one_each, "mean"), logits[:4])  # truncation: pooling is identity


@pytest.mark.parametrize(
    "options, message",
    [
        ({"truncation": "middle"}, "'truncation' = 'middle', expected head or tail or head\\+tail"),
        ({"long_records": "windows"}, "'long_records' = 'windows', expected truncate or chunks"),
        ({"stride": 16}, "'stride' = 16, expected 0 unless long_records is chunks"),
        ({"pool": "max"}, "'pool' = 'max', expected mean or max with long_records chunks"),
        ({"long_records": "chunks", "pool": "sum"}, "'pool' = 'sum'"),
        ({"long_records": "chunks", "stride": 128, "max_length": 128}, "'stride' = 128, expected less than max_length 128"),
        ({"long_records": "chunks", "stride": -1}, "'stride' = -1, expected >= 0"),
        ({"long_records": "chunks", "truncation": "tail"}, "'truncation' = 'tail', expected the default head"),
    ],
)
def test_bad_reading_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_reading_of_a_config_and_of_an_old_export():
    cfg = TrainConfig(max_length=64, long_records="chunks", stride=8)
    assert Reading.from_config(cfg) == Reading(64, "head", "chunks", 8, "mean")
    assert Reading.saved(Reading.from_config(cfg).as_dict(), 512) == Reading.from_config(cfg)
    assert Reading.saved(None, 128) == Reading(128)  # exported before the reading was saved: the head
