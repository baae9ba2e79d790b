import io
import json
import sys

import numpy as np
import pytest
import torch
from helpers import export_window_logits, pipeline_command, read_jsonl

from pipeline.cli.main import main
from pipeline.cli.predict import check_export_dir, choose_device, predict, read_inputs
from pipeline.core.base import ConfigError
from pipeline.data.reading import pool
from pipeline.tasks.single_label import probabilities


@pytest.mark.ranks
def test_predict_from_stdin_and_txt_file_agree(initial_model, tmp_path, capsys, monkeypatch):
    """The command's own stdin (a pipe, in a process of its own) against a .txt file read in this process."""
    texts = ["主诉：发热3天，咳嗽。", "主诉：胸痛2小时。"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    from_stdin = pipeline_command("predict", "--model", str(initial_model), input="\n".join(texts), check=True).stdout
    rows = [json.loads(line) for line in from_stdin.splitlines()]
    assert [{k: v for k, v in r.items() if k != "line"} for r in rows] == predict(str(initial_model), texts)
    assert [r["line"] for r in rows] == [1, 2]
    assert run_predict(capsys, monkeypatch, initial_model, "--input", str(tmp_path / "in.txt")) == rows
    assert all(set(r["probabilities"]) == set(json.loads((initial_model / "config.json").read_text())["label2id"]) for r in rows)


def test_predict_refuses_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(ConfigError, match="not an exported model"):
        predict(str(tmp_path), ["x"])


def test_a_directory_that_is_not_an_export_is_one_line_naming_what_is_missing_and_where_the_export_is(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"no config.json, no weights, no tokenizer\); the run's export is {run / 'export'}$"):
        check_export_dir(str(run))
    hf = run / "checkpoints" / "step-5" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer.json").write_text("{}")
    (hf.parent / "trainer_state.json").write_text("{}")
    with pytest.raises(
        ConfigError,
        match=r"\(no weights\); this is checkpoint .*step-5's hf/ directory: export it with `python -m pipeline export",
    ):
        check_export_dir(str(hf))
    with pytest.raises(ConfigError, match="only.json: model directory not found"):
        check_export_dir(str(tmp_path / "only.json"))


def test_predict_refuses_an_unknown_extension_fp16_on_the_cpu_and_a_missing_gpu_in_one_line(tmp_path):
    (tmp_path / "in.xml").write_text("<x/>")
    with pytest.raises(ConfigError, match=r"in.xml: unknown input format '.xml'; predict reads .txt"):
        read_inputs(str(tmp_path / "in.xml"), "text", "id")
    with pytest.raises(ConfigError, match="--precision fp16 needs --device cuda"):
        choose_device("cpu", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: no GPU is visible"):
            choose_device("cuda", "fp32")
    assert choose_device(None, "bf16").type == ("cuda" if torch.cuda.is_available() else "cpu")


def run_predict(capsys, monkeypatch, model, *args, stdin="") -> list[dict]:
    """`python -m pipeline predict`, in this process."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
    capsys.readouterr()
    assert main(["predict", "--model", str(model), *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_blank_lines_keep_their_row_so_output_lines_up_with_input(initial_model, tmp_path, capsys, monkeypatch):
    lines = ["主诉：发热3天，咳嗽。", "", "主诉：胸痛2小时。", "   "]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for rows in (
        run_predict(capsys, monkeypatch, initial_model, "--input", str(tmp_path / "in.txt")),
        run_predict(capsys, monkeypatch, initial_model, stdin="\n".join(lines)),
    ):
        assert [r["line"] for r in rows] == [1, 2, 3, 4]
        assert [r["label"] is None for r in rows] == [False, True, False, True]
        assert rows[0]["label"] in rows[0]["probabilities"]


def test_json_array_input_gives_one_row_per_record_with_its_id(initial_model, tmp_path, capsys, monkeypatch):
    records = [{"id": "a7", "text": "主诉：发热3天，咳嗽。"}, {"id": 8, "text": ""}, {"text": "主诉：胸痛2小时。"}]
    (tmp_path / "in.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    rows = run_predict(capsys, monkeypatch, initial_model, "--input", str(tmp_path / "in.json"))
    assert [(r["record"], r.get("id")) for r in rows] == [(1, "a7"), (2, 8), (3, None)]
    assert [r["label"] is None for r in rows] == [False, True, False]


@pytest.mark.ranks
def test_predict_reads_records_as_the_chunked_run_did_and_pools_its_windows(chunked_run):
    config = json.loads((chunked_run / "export" / "config.json").read_text())
    assert config["record_reading"] == {
        "max_length": 64,
        "truncation": "head",
        "long_records": "chunks",
        "stride": 16,
        "pool": "max",
    }
    texts = [row["text"] for row in read_jsonl(chunked_run.parent / "dev.jsonl")]
    rows = predict(str(chunked_run / "export"), texts, batch_size=5)  # records of up to 14 windows: several forwards
    split, logits, names = export_window_logits(chunked_run)
    expected = probabilities(pool(logits, split.records, "max"))
    got = np.array([[row["probabilities"][name] for name in names] for row in rows])
    np.testing.assert_allclose(got, expected, atol=2e-6)  # predict rounds to 6 decimals
    assert [row["label"] for row in rows] == [row["label"] for row in read_jsonl(chunked_run / "predictions-dev.jsonl")]


@pytest.mark.ranks
def test_multi_label_predict_gives_label_sets_by_the_exported_thresholds(multilabel_run, tmp_path):
    export = multilabel_run / "export"
    thresholds = json.loads((export / "thresholds.json").read_text())
    dev = [json.loads(line) for line in (multilabel_run.parent / "dev.jsonl").read_text().splitlines()]
    rows = predict(str(export), [r["text"] for r in dev] + [""])
    assert rows[-1] == {"labels": None, "probabilities": None}
    trained = [json.loads(line) for line in (multilabel_run / "predictions-dev.jsonl").read_text().splitlines()]
    for row, during_training in zip(rows, trained):
        assert set(row["probabilities"]) == set(thresholds)
        assert row["labels"] == [name for name, p in row["probabilities"].items() if p >= thresholds[name]]
        # The export reproduces the training run's decisions (up to float noise right at a threshold).
        clear = {name for name, p in row["probabilities"].items() if abs(p - thresholds[name]) > 1e-4}
        assert set(row["labels"]) & clear == set(during_training["labels"]) & clear
    lower = tmp_path / "lower.json"
    lower.write_text(json.dumps({name: 0.01 for name in thresholds}, ensure_ascii=False), encoding="utf-8")
    assert all(r["labels"] == sorted(thresholds) for r in predict(str(export), [dev[0]["text"]], thresholds=str(lower)))
    other = tmp_path / "other.json"
    other.write_text('{"偏头痛": 0.5}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"thresholds .*other\.json: unknown labels \['偏头痛'\]; missing labels"):
        predict(str(export), ["主诉：头痛。"], thresholds=str(other))


def test_lines_end_only_at_line_breaks_so_line_numbers_stay_right(initial_model, tmp_path, capsys, monkeypatch):
    """str.splitlines() also cuts at \\x0b \\x0c \\x1c-\\x1e \\x85 \\u2028 \\u2029 (text pasted from Word
    or PDFs): every later prediction was given the wrong line number. \\n, \\r\\n and \\r end a line."""
    inside = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
    texts = [f"主诉：发热3天{c}咳嗽。" for c in inside] + ["主诉：胸痛2小时。", "主诉：腹痛。", "主诉：头痛。"]
    content = "\n".join(texts[:-2]) + "\r\n" + texts[-2] + "\r" + texts[-1] + "\n"
    (tmp_path / "in.txt").write_text(content, encoding="utf-8", newline="")
    expected = predict(str(initial_model), texts)
    for rows in (
        run_predict(capsys, monkeypatch, initial_model, "--input", str(tmp_path / "in.txt")),
        run_predict(capsys, monkeypatch, initial_model, stdin=content),
    ):
        assert [r["line"] for r in rows] == list(range(1, len(texts) + 1))
        assert [{k: v for k, v in r.items() if k != "line"} for r in rows] == expected


def test_predict_reads_every_training_format_with_its_reader(initial_model, tmp_path, capsys, monkeypatch):
    """One reader per format for training and predict: Parquet, and a CSV from the wild (CR line
    endings, a cell longer than csv's default limit of 131,072 characters)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["主诉：发热3天，咳嗽。", "主诉：胸痛2小时。" * 20000]
    pq.write_table(pa.Table.from_pylist([{"id": i, "text": t} for i, t in enumerate(texts)]), tmp_path / "in.parquet")
    (tmp_path / "in.csv").write_bytes(("id,text\r" + "".join(f'{i},"{t}"\r' for i, t in enumerate(texts))).encode())
    expected = [{"record": i + 1, "id": i, **row} for i, row in enumerate(predict(str(initial_model), texts))]
    assert run_predict(capsys, monkeypatch, initial_model, "--input", str(tmp_path / "in.parquet")) == expected
    from_csv = run_predict(capsys, monkeypatch, initial_model, "--input", str(tmp_path / "in.csv"))
    assert from_csv == [{**row, "id": str(row["id"])} for row in expected]  # CSV values are strings
    (tmp_path / "in.docx").write_bytes(b"PK")
    assert main(["predict", "--model", str(initial_model), "--input", str(tmp_path / "in.docx")]) == 2
    message = f"error: {tmp_path / 'in.docx'}: unknown input format '.docx'; predict reads .txt (one text per line), .jsonl"
    assert capsys.readouterr().err.startswith(message)


def test_predict_in_bf16_on_the_cpu_is_close_to_fp32(initial_model, tmp_path):
    """On a model whose classes' probabilities differ widely (the untrained model's are all about
    0.1, which any precision matches): bf16 picks the same class and stays within 0.02 of fp32,
    while each text's probabilities span far more than that."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(initial_model)
    with torch.no_grad():  # a random classifier head, scaled so that the logits span several units
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=torch.Generator().manual_seed(0)) * 3)
    model.save_pretrained(tmp_path / "confident")
    AutoTokenizer.from_pretrained(initial_model).save_pretrained(tmp_path / "confident")
    texts = ["主诉：发热3天，咳嗽。", "主诉：胸痛2小时。", "主诉：多饮多尿半年，体重下降。", "主诉：头晕伴恶心呕吐1天。"]
    fp32 = predict(str(tmp_path / "confident"), texts)
    bf16 = predict(str(tmp_path / "confident"), texts, precision="bf16")
    for a, b in zip(fp32, bf16):
        p32, p16 = np.array(list(a["probabilities"].values())), np.array(list(b["probabilities"].values()))
        assert p32.max() - p32.min() > 0.3  # a difference of 0.02 is small beside it
        assert not np.array_equal(p32, p16)  # the weights really ran in bf16
        np.testing.assert_allclose(p16, p32, atol=0.02)
        assert a["label"] == b["label"]
