import json
from collections import Counter

import numpy as np
import pytest
from helpers import REPO, write_jsonl

from pipeline.core.base import ConfigError
from pipeline.core.model_dir import check_model_dir, has_tokenizer, has_weights
from pipeline.data.cache import count_unknown, read_split
from pipeline.data.tokenizer import build_tokenizer, load_tokenizer
from pipeline.tasks.single_label import SINGLE_LABEL
from pipeline.train.model import build_model

ROWS = [{"text": "主诉：发热3天，咳嗽。WBC 12.3", "label": "肺炎"}, {"text": "主诉：胸痛2小时。cTnI 2.1", "label": "心梗"}]


@pytest.fixture()
def split(tmp_path):
    return read_split(str(write_jsonl(tmp_path / "train.jsonl", ROWS * 3)), "text", "label", SINGLE_LABEL)


@pytest.mark.parametrize("vocabulary", ["char", "wordpiece"])
def test_built_tokenizer_is_character_level_for_chinese_cached_and_reads_its_texts_once(tmp_path, split, vocabulary):
    first = build_tokenizer(iter(split.texts), "digest", str(tmp_path), vocabulary)  # an iterator: one pass only
    again = build_tokenizer(["other texts"], "digest", str(tmp_path), vocabulary)
    assert first == again  # same training-file digest: reused, not retrained
    tokenizer = load_tokenizer(str(first), 64)
    assert tokenizer.tokenize("发热咳嗽")[:4] == ["发", "热", "咳", "嗽"]
    ids = np.concatenate(tokenizer(split.texts)["input_ids"])
    assert count_unknown(tokenizer, ids) == (0, len(ids) - 2 * len(split.texts))  # [CLS] and [SEP] not counted
    rebuilt = build_tokenizer(split.texts, "digest", str(tmp_path / "elsewhere"), vocabulary)
    assert load_tokenizer(str(rebuilt), 64).get_vocab() == tokenizer.get_vocab()  # same ids every time


def test_every_training_word_of_recurring_characters_is_spelled_without_unk_by_wordpiece(tmp_path, split):
    texts = split.texts + ["Xylophone 987654"] * 2
    tokenizer = load_tokenizer(str(build_tokenizer(texts, "d2", str(tmp_path), "wordpiece")), 64)
    assert "[UNK]" not in tokenizer.tokenize("xylophone 987654 发热")


@pytest.mark.parametrize("vocabulary", ["char", "wordpiece"])
def test_a_character_seen_fewer_than_min_char_count_times_is_unk(tmp_path, vocabulary):
    texts = ["患者发热，咳嗽，CT示肺炎", "发热伴咳嗽，CT未见异常", "咳嗽三天，偶见罕"]  # 罕 偶 三 天 once each
    rare = load_tokenizer(str(build_tokenizer(texts, "k", str(tmp_path), vocabulary)), 64)  # the default: 2
    assert rare.tokenize("罕见发热") == ["[UNK]", "见", "发", "热"]  # 见 twice (未见, 偶见)
    assert "罕" not in rare.get_vocab() and "##罕" not in rare.get_vocab()
    assert rare.tokenize("CT") == (["c", "t"] if vocabulary == "char" else ["ct"])  # Latin seen twice: kept
    kept = load_tokenizer(str(build_tokenizer(texts, "k", str(tmp_path), vocabulary, min_char_count=1)), 64)
    assert kept.tokenize("罕见发热")[0] == "罕"  # min_char_count 1: every character has a token
    strict = load_tokenizer(str(build_tokenizer(texts, "k", str(tmp_path), vocabulary, min_char_count=3)), 64)
    assert strict.tokenize("发热咳嗽") == ["[UNK]", "[UNK]", "咳", "嗽"]  # 发 热 twice, 咳 嗽 three times


def test_char_vocabulary_is_every_character_seen_twice_and_the_rest_is_unk(tmp_path):
    texts = ["发热 39.5℃，咳嗽", "发热WBC 12", "咳 嗽 罕 3，"]  # 罕 9 . 5 ℃ w b c 1 2: once each
    tokenizer = load_tokenizer(str(build_tokenizer(texts, "k", str(tmp_path), "char")), 64)
    seen = Counter(c for text in texts for c in text.lower() if not c.isspace())
    assert set(tokenizer.get_vocab()) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"} | {c for c, n in seen.items() if n >= 2}
    assert tokenizer.tokenize("发热 39.5 罕见") == ["发", "热", "3", "[UNK]", "[UNK]", "[UNK]", "[UNK]", "[UNK]"]
    assert tokenizer.tokenize("咳嗽，3") == ["咳", "嗽", "，", "3"]  # one token per character, spaces dropped


def test_vocabulary_choice_is_part_of_the_tokenizer_cache_key(tmp_path, split):
    char, wordpiece = (build_tokenizer(split.texts, "same-key", str(tmp_path), v) for v in ("char", "wordpiece"))
    assert char != wordpiece
    assert load_tokenizer(str(char), 64).get_vocab() != load_tokenizer(str(wordpiece), 64).get_vocab()


def test_model_directory_checks(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        check_model_dir(str(tmp_path), 128)
    tiny = REPO / "pipeline" / "models" / "tiny-bert"
    check_model_dir(str(tiny), 512)
    assert not has_weights(str(tiny)) and not has_tokenizer(str(tiny))


def test_random_init_takes_labels_and_vocabulary_from_the_data():
    ds_config = {"zero_optimization": {"stage": 2}}
    model = build_model(str(REPO / "pipeline" / "models" / "tiny-bert"), ["a", "b", "c"], 321, ds_config, seed=1)
    again = build_model(str(REPO / "pipeline" / "models" / "tiny-bert"), ["a", "b", "c"], 321, ds_config, seed=1)
    assert model.config.num_labels == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert model.bert.embeddings.word_embeddings.weight.shape[0] == 321
    assert all((p == q).all() for p, q in zip(model.parameters(), again.parameters()))  # seeded


def test_multi_label_model_starts_at_the_label_priors():
    from pipeline.tasks.multi_label import MULTI_LABEL

    targets = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 1, 0]], dtype=np.float32)  # priors 1/4, 1/4, 3/4
    bias = MULTI_LABEL.initial_bias(targets, None)
    model = build_model(
        str(REPO / "pipeline" / "models" / "tiny-bert"),
        ["a", "b", "c"],
        99,
        {"zero_optimization": {"stage": 2}},
        1,
        False,
        MULTI_LABEL,
        bias,
    )
    assert model.classifier.bias.tolist() == pytest.approx([np.log(1 / 3), np.log(1 / 3), np.log(3)], rel=1e-6)
    assert MULTI_LABEL.initial_bias(targets, [3.0, 3.0, 1 / 3]) == pytest.approx([0, 0, 0], abs=1e-9)  # balanced: 1/2 each


def test_pretrained_directory_is_fine_tuned_not_reinitialised(initial_model):
    from safetensors.torch import load_file

    names = json.loads((initial_model / "config.json").read_text())["id2label"]
    model = build_model(str(initial_model), [f"l{i}" for i in range(len(names))], 0, {"zero_optimization": {"stage": 2}}, seed=9)
    saved = load_file(initial_model / "model.safetensors")
    assert (model.state_dict()["bert.embeddings.word_embeddings.weight"] == saved["bert.embeddings.word_embeddings.weight"]).all()


def model_dir(tmp_path, config: dict | str):
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config), encoding="utf-8")
    return str(tmp_path)


@pytest.mark.parametrize(
    "config, longest",
    [
        ({"model_type": "bert", "max_position_embeddings": 512, "pad_token_id": 0}, 512),
        ({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, 512),  # positions start at pad + 1
        ({"model_type": "xlm-roberta", "max_position_embeddings": 514}, 512),  # pad_token_id 1 by default
    ],
)
def test_max_length_beyond_the_position_embeddings_is_refused(tmp_path, config, longest):
    check_model_dir(model_dir(tmp_path, config), longest)
    with pytest.raises(ConfigError, match=f"--max-length {longest + 1} is more than model .* takes: {longest} tokens"):
        check_model_dir(str(tmp_path), longest + 1)


def test_relative_position_models_have_no_length_limit(tmp_path):
    check_model_dir(
        model_dir(tmp_path, {"model_type": "deberta-v2", "max_position_embeddings": 512, "position_biased_input": False}), 2048
    )


def test_config_json_that_is_not_json_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config.json: JSON syntax error at line 3, column 1"):
        check_model_dir(model_dir(tmp_path, '{\n  "model_type": "bert",\n}\n'), 128)


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"model_type": "bert",', "JSON syntax error at line 1"),
        ({"model_type": "bert", "max_position_embeddings": 512}, "--max-length 1024 is more than model"),
    ],
)
def test_train_stops_with_one_line_before_touching_data(tmp_path, config, message, capsys, monkeypatch):
    """Checked before the process group and the tokenizer (`zero-pipeline train` in this process): exit
    2, one line, no traceback, no cache."""
    from pipeline.cli.main import main

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    argv = ["train", "--model", model_dir(tmp_path, config), "--max-length", "1024", "--output-dir", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_config_json_that_is_not_json_is_one_error_for_predict_and_plan(tmp_path):
    from pipeline.cli.plan import model_shape
    from pipeline.cli.predict import predict

    path = model_dir(tmp_path, '{"model_type": "bert",\n')
    with pytest.raises(ConfigError, match=r"config.json: JSON syntax error at line 2"):
        model_shape(path)
    with pytest.raises(ConfigError, match=r"not an exported model \(no weights, no tokenizer\)"):
        predict(path, ["x"])  # a directory with only a config.json is no export, whatever that config says
