import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SAMPLE, read_jsonl, write_jsonl

from pipeline import tasks
from pipeline.core.base import ConfigError, file_digest
from pipeline.core.options import TrainConfig
from pipeline.data.batching import RankMicroBatches, epoch_global_batches, pinned_for, pins_memory
from pipeline.data.cache import Split, TokenizedSplit, cache_info, load_tokenized, prepare_splits, read_split, tokenize_cached
from pipeline.data.readers import iter_records
from pipeline.data.reading import Reading
from pipeline.data.tokenizer import build_tokenizer, load_tokenizer, tokenizer_source
from pipeline.tasks.multi_label import MULTI_LABEL
from pipeline.tasks.single_label import SINGLE_LABEL

ROWS = [
    {"text": "主诉：发热3天，咳嗽。", "label": "肺炎"},
    {"text": "主诉：胸痛2小时。", "label": "心梗"},
    {"text": "主诉：腹痛，呕吐。", "label": "胃肠炎"},
]


@pytest.fixture()
def files(tmp_path):
    return {"train": write_jsonl(tmp_path / "train.jsonl", ROWS * 4), "dev": write_jsonl(tmp_path / "dev.jsonl", ROWS[:2])}


def test_jsonl_and_csv_load_with_configurable_columns(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"record": r["text"], "dx": r["label"]} for r in ROWS])
    csv = tmp_path / "a.csv"
    csv.write_text("record,dx\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS), encoding="utf-8")
    for path in (jsonl, csv):
        split = read_split(str(path), "record", "dx", SINGLE_LABEL)
        assert split.texts == [r["text"] for r in ROWS] and split.labels == [r["label"] for r in ROWS]


def test_numeric_labels_become_strings(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": 3}, {"text": "b", "label": 10}])
    assert read_split(str(path), "text", "label", SINGLE_LABEL).labels == ["3", "10"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "data file not found"),
        (b"", "data file is empty"),
        (b'{"text": "ok", "label": "a"}\n{"text": "bad \xff\xfe", "label": "b"}\n', r"line 2, column 15: not UTF-8"),
        (b'{"text": "ok", "label": "a"}\n{"text": "x", "label": }\n', r"line 2, column \d+: invalid JSON"),
        (b'{"body": "ok", "label": "a"}\n', "no column 'text'"),
        (b'{"text": "ok", "diagnosis": "a"}\n', "no column 'label'"),
        (b'{"text": "ok", "label": "a"}\n{"text": "", "label": "a"}\n', "record 2: 'text' is empty"),
        (b'{"text": "ok", "label": "a"}\n{"text": "b", "label": null}\n', "record 2: 'label' is empty"),
    ],
)
def test_bad_data_files_name_file_and_place(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        read_split(str(path), "text", "label", SINGLE_LABEL)
    assert str(path) in str(e.value)


def test_an_unknown_format_is_refused_naming_the_file_and_the_known_formats(tmp_path):
    (tmp_path / "a.xls").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"a\.xls: unknown data format '\.xls'; known formats: \.jsonl, .*\.parquet, \.xlsx"):
        read_split(str(tmp_path / "a.xls"), "text", "label", SINGLE_LABEL)


def test_a_gb18030_file_is_refused_as_utf8_naming_the_option_then_read_with_it(tmp_path):
    """Hospital systems in China export GBK/GB18030: as UTF-8 one error with file, line and the way
    forward; with --encoding the same records as the UTF-8 file, in training, the launch's check and predict."""
    from pipeline.cli.predict import read_inputs
    from pipeline.launch.inputs import check_data_file

    rows = ROWS * 3  # every character seen at least twice: none is unknown to the vocabulary built from them
    text = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    gbk, utf8 = tmp_path / "gbk.csv", tmp_path / "utf8.csv"
    gbk.write_bytes(text.encode("gb18030"))
    utf8.write_text(text, encoding="utf-8")
    jsonl = tmp_path / "gbk.jsonl"
    jsonl.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("gb18030"))
    for path in (gbk, jsonl):
        with pytest.raises(
            ConfigError, match=r"line \d, column \d+: not UTF-8 text \(byte 0x[0-9a-f]{2}\).*--encoding gb18030"
        ) as e:
            read_split(str(path), "text", "label", SINGLE_LABEL)
        assert str(path) in str(e.value)
        assert read_split(str(path), "text", "label", SINGLE_LABEL, encoding="gb18030").texts == [r["text"] for r in rows]
    as_utf8 = read_split(str(utf8), "text", "label", SINGLE_LABEL)
    assert read_split(str(gbk), "text", "label", SINGLE_LABEL, encoding="gb18030")[1:] == as_utf8[1:]
    with pytest.raises(ConfigError, match=r"line 2, column \d+: not ascii text .*check --encoding"):
        read_split(str(gbk), "text", "label", SINGLE_LABEL, encoding="ascii")
    cfg = TrainConfig(train_file=str(gbk), dev_file=str(gbk), encoding="gb18030")
    assert prepare(cfg, tmp_path / "c")["label_names"] == sorted(r["label"] for r in ROWS)
    assert "columns text, label present" in check_data_file(str(gbk), ["text", "label"], cfg.encoding)
    assert [entry["text"] for entry in read_inputs(str(gbk), "text", "id", "gb18030")] == [r["text"] for r in rows]
    # The same bytes decoded otherwise are other texts: the key says how they were decoded.
    ascii_text = tmp_path / "ascii.csv"
    ascii_text.write_text("text,label\nfever,a\n", encoding="utf-8")
    keys = {enc: Split(ascii_text, "text", "label", SINGLE_LABEL, encoding=enc).key for enc in ("utf-8", "UTF8", "gb18030")}
    assert keys["utf-8"] == keys["UTF8"] != keys["gb18030"]
    with pytest.raises(ConfigError, match=r"'encoding' = 'gbk2', expected a text encoding"):
        TrainConfig(encoding="gbk2")


def write_xlsx(path: Path, rows: list[list]) -> Path:
    import openpyxl

    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    book.create_sheet("second")["A1"] = "not read: the first sheet is the data"
    book.save(path)
    return path


def test_an_excel_workbook_gives_the_records_of_its_csv_export(tmp_path):
    """Its first sheet, the header row naming the columns, each value as the CSV export writes it."""
    rows = [{**r, "age": str(40 + i)} for i, r in enumerate(ROWS * 3)]
    (tmp_path / "a.csv").write_text(
        "text,label,age\n" + "".join(f"{r['text']},{r['label']},{r['age']}\n" for r in rows), encoding="utf-8"
    )
    # Numbers as Excel stores them (a whole float too), a blank row, an empty formatted cell past the header.
    sheet = [["text", "label", "age", None]] + [
        [r["text"], r["label"], float(r["age"]) if i % 2 else int(r["age"])] for i, r in enumerate(rows)
    ]
    sheet.insert(3, [None, None, None])
    xlsx = write_xlsx(tmp_path / "a.xlsx", sheet)
    records = lambda path: [dict(record) for record in iter_records(path)]  # noqa: E731
    assert records(xlsx) == records(tmp_path / "a.csv")
    info = prepare(TrainConfig(train_file=str(xlsx), dev_file=str(tmp_path / "a.csv")), tmp_path / "c")
    assert info["label_names"] == sorted({r["label"] for r in ROWS})
    for bad, message in (
        ([["text", None, "label"], ["a", "", "b"]], r"sheet 'Sheet', row 1: column 2 of the header is empty"),
        ([["text", "label"], ["a", "b", "extra"]], r"sheet 'Sheet', row 2: a value right of the header's 2 columns"),
        ([["text", "text"], ["a", "b"]], r"column 'text' appears twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            read_split(str(write_xlsx(tmp_path / "bad.xlsx", bad)), "text", "label", SINGLE_LABEL)
    (tmp_path / "broken.xlsx").write_bytes(b"PK not really a workbook")
    with pytest.raises(ConfigError, match=r"broken\.xlsx: not a readable \.xlsx workbook"):
        read_split(str(tmp_path / "broken.xlsx"), "text", "label", SINGLE_LABEL)


def test_an_excel_workbook_without_openpyxl_is_refused_with_the_export_steps(tmp_path, monkeypatch):
    xlsx = write_xlsx(tmp_path / "a.xlsx", [["text", "label"], ["a", "b"]])
    monkeypatch.setitem(sys.modules, "openpyxl", None)  # what `import openpyxl` meets where it is not installed
    with pytest.raises(ConfigError, match=r"a\.xlsx: reading \.xlsx needs openpyxl .*\[excel\].*CSV UTF-8 \(Comma delimited\)"):
        read_split(str(xlsx), "text", "label", SINGLE_LABEL)


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def test_every_format_gives_the_same_records(tmp_path):
    """One reader per format (by extension), Parquet a binary one read a record batch at a time."""
    rows = [{**r, "id": i} for i, r in enumerate(ROWS * 3)]
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    for name, separator in (("a.csv", ","), ("a.tsv", "\t")):
        lines = [separator.join(["text", "label"])] + [separator.join([r["text"], r["label"]]) for r in rows]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    files = [write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "a.json", tmp_path / "a.csv", tmp_path / "a.tsv"]
    for path in files + [write_parquet(tmp_path / "a.parquet", rows)]:
        split = read_split(str(path), "text", "label", SINGLE_LABEL)
        assert (split.texts, split.labels) == ([r["text"] for r in rows], [r["label"] for r in rows]), path.name
    numbers = write_parquet(tmp_path / "n.parquet", [{"text": "a", "label": 3}, {"text": "b", "label": 10}])
    assert read_split(str(numbers), "text", "label", SINGLE_LABEL).labels == ["3", "10"]
    info = prepare(TrainConfig(train_file=str(tmp_path / "a.parquet"), dev_file=str(tmp_path / "a.tsv")), tmp_path / "c")
    assert info["label_names"] == sorted({r["label"] for r in ROWS})  # training reads them as it reads JSONL
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match=r"broken\.parquet: not a readable Parquet file"):
        read_split(str(tmp_path / "broken.parquet"), "text", "label", SINGLE_LABEL)


def test_csv_from_the_wild_long_cells_and_cr_line_endings(tmp_path):
    """A cell over csv's default limit of 131,072 characters, and old-Mac (CR-only) line endings."""
    long_text = "主诉：发热。" * 30000  # 180,000 characters
    path = tmp_path / "long.csv"
    path.write_text(f"text,label\n{ROWS[0]['text']},a\n{long_text},b\n", encoding="utf-8")
    assert read_split(str(path), "text", "label", SINGLE_LABEL).texts == [ROWS[0]["text"], long_text]
    cr = tmp_path / "cr.csv"
    cr.write_bytes('text,label\r"发热,\r咳嗽",肺炎\r胸痛,心梗\r'.encode())
    assert read_split(str(cr), "text", "label", SINGLE_LABEL).texts == ["发热,\r咳嗽", "胸痛"]
    ragged = tmp_path / "ragged.csv"
    ragged.write_bytes(b"text,label\rok,a\rtoo,many,fields\r")
    with pytest.raises(ConfigError, match=r"ragged\.csv: line 3: 3 fields, the header has 2"):
        read_split(str(ragged), "text", "label", SINGLE_LABEL)


def test_a_column_named_twice_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "twice.csv"
    path.write_text("text,label,label\n发热,a,b\n", encoding="utf-8")
    parquet = tmp_path / "twice.parquet"
    pq.write_table(
        pa.Table.from_arrays([pa.array(["发热"]), pa.array(["a"]), pa.array(["b"])], ["text", "label", "label"]), parquet
    )
    for file in (path, parquet):
        with pytest.raises(ConfigError, match=rf"{file.name}: column 'label' appears twice in the header"):
            read_split(str(file), "text", "label", SINGLE_LABEL)


def test_one_label_is_one_class_however_the_file_spells_it(tmp_path):
    """A float column from pandas (1.0) and a trailing space from Excel (" 1") are the label 1."""
    spellings = [1, "1", 1.0, " 1", "1.0 ", "2", 2.0]
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "主诉：发热。", "label": value} for value in spellings])
    assert read_split(str(path), "text", "label", SINGLE_LABEL).labels == ["1"] * 5 + ["2"] * 2
    csv = tmp_path / "l.csv"
    csv.write_text("text,label\n发热,1.0\n胸痛,2 \n腹痛,01\n", encoding="utf-8")
    assert read_split(str(csv), "text", "label", SINGLE_LABEL).labels == ["1", "2", "01"]
    multi = write_jsonl(tmp_path / "m.jsonl", [{"text": "主诉：发热。", "label": [1.0, " 1", "肺炎 "]}])
    assert read_split(str(multi), "text", "label", MULTI_LABEL).labels == [["1", "肺炎"]]
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"nan\.jsonl: record 2: 'label' is not a finite number \(nan\)"):
        read_split(str(nan), "text", "label", SINGLE_LABEL)


class Log:
    def info(self, _):
        pass


def prepare(cfg: TrainConfig, cache: Path, tokenizer_dir=None) -> dict:
    """prepare_splits as rank 0 runs it (with the tokenizer a run would use: data.tokenizer.tokenizer_source), or with the tokenizer given."""

    def given(train):
        return load_tokenizer(str(tokenizer_dir), cfg.max_length), tokenizer_dir

    return prepare_splits(
        cfg, tasks.get(cfg.task), given if tokenizer_dir else tokenizer_source(cfg, str(cache)), str(cache), Log()
    )


def test_label_seen_only_in_dev_is_an_error(tmp_path, files):
    dev = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"text": "头痛", "label": "偏头痛"}] * 2)
    with pytest.raises(ConfigError, match=r"d\.jsonl: record 4: label '偏头痛' never appears in the training file"):
        prepare(TrainConfig(train_file=str(files["train"]), dev_file=str(dev)), tmp_path / "c")
    info = prepare(TrainConfig(train_file=str(files["train"]), dev_file=str(files["dev"])), tmp_path / "c")
    assert info["label_names"] == sorted({r["label"] for r in ROWS})


def test_tokenized_cache_is_reused_and_keyed_by_content_and_max_length(tmp_path, files):
    split = Split(files["train"], "text", "label", SINGLE_LABEL)
    tokenizer = load_tokenizer(str(build_tokenizer(split.texts(), "d", str(tmp_path))), 64)
    path, reused = tokenize_cached(split, tokenizer, Reading(64), str(tmp_path / "cache"))
    assert not reused
    again, reused = tokenize_cached(
        Split(files["train"], "text", "label", SINGLE_LABEL), tokenizer, Reading(64), str(tmp_path / "cache")
    )
    assert reused and again == path
    shorter, reused = tokenize_cached(split, tokenizer, Reading(8), str(tmp_path / "cache"))
    assert not reused and shorter != path
    assert max(len(ids) for ids in load_tokenized(shorter)["input_ids"]) == 8
    write_jsonl(files["train"], ROWS * 5)
    assert (
        tokenize_cached(Split(files["train"], "text", "label", SINGLE_LABEL), tokenizer, Reading(64), str(tmp_path / "cache"))[0]
        != path
    )
    assert load_tokenized(path)["labels"] == [r["label"] for r in ROWS * 4]  # as written; ids are given on loading


def test_switching_the_text_column_does_not_reuse_the_other_columns_cache(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": r["text"], "summary": r["label"], "label": r["label"]} for r in ROWS])
    by_text, by_summary = (
        read_split(str(path), "text", "label", SINGLE_LABEL),
        read_split(str(path), "summary", "label", SINGLE_LABEL),
    )
    tokenizer = load_tokenizer(str(build_tokenizer(by_text.texts + by_summary.texts, "d", str(tmp_path))), 64)
    first, _ = tokenize_cached(by_text.split, tokenizer, Reading(64), str(tmp_path / "cache"))
    second, reused = tokenize_cached(by_summary.split, tokenizer, Reading(64), str(tmp_path / "cache"))
    assert not reused and second != first
    assert load_tokenized(second)["input_ids"] == tokenizer(by_summary.texts)["input_ids"]


def test_file_rewritten_with_its_old_mtime_is_read_again(tmp_path):
    """cp -p, rsync -a and tar keep modification times; datasets' cache returned the old records."""
    import os

    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    before = path.stat()
    assert read_split(str(path), "text", "label", SINGLE_LABEL).texts == [r["text"] for r in ROWS]
    rewritten = [{**r, "text": r["text"][::-1]} for r in ROWS]  # same size, other content
    write_jsonl(path, rewritten)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert read_split(str(path), "text", "label", SINGLE_LABEL).texts == [r["text"] for r in rewritten]


def test_json_array_csv_quoting_and_ragged_csv_rows(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS, ensure_ascii=False, indent=2), encoding="utf-8")
    assert read_split(str(array), "text", "label", SINGLE_LABEL).labels == [r["label"] for r in ROWS]
    quoted = tmp_path / "q.csv"
    quoted.write_text('text,label\n"发热, 咳嗽 ""3天""",肺炎\n', encoding="utf-8")
    assert read_split(str(quoted), "text", "label", SINGLE_LABEL).texts == ['发热, 咳嗽 "3天"']
    ragged = tmp_path / "r.csv"
    ragged.write_text("text,label\n发热,肺炎\n胸痛,心梗,extra\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"r\.csv: line 3: 3 fields, the header has 2"):
        read_split(str(ragged), "text", "label", SINGLE_LABEL)


def test_tokenized_cache_is_written_in_bounded_batches_with_unknown_tokens_counted(tmp_path, files, monkeypatch):
    """Hospital-scale files: the tokenizer sees TOKENIZE_BATCH records at a time, each written to the
    Arrow file as it comes, and the [UNK] share is counted then and stored with the cache."""
    import pyarrow as pa

    import pipeline.data.cache as data

    monkeypatch.setattr(data, "TOKENIZE_BATCH", 5)
    split = read_split(str(files["train"]), "text", "label", SINGLE_LABEL)  # 12 records
    tokenizer = load_tokenizer(str(build_tokenizer(split.texts[:1] * 2, "first-text-only", str(tmp_path))), 64)
    path, _ = tokenize_cached(split.split, tokenizer, Reading(64), str(tmp_path / "cache"))
    with pa.memory_map(str(path / data.CACHE_DATA)) as source:
        assert [len(batch) for batch in pa.ipc.open_stream(source)] == [5, 5, 2]
    ids = tokenizer(split.texts)["input_ids"]
    assert load_tokenized(path)["input_ids"] == ids
    unknown, tokens = data.count_unknown(tokenizer, np.concatenate(ids))
    assert 0 < unknown < tokens  # a vocabulary from one text: the others' characters are [UNK]
    assert data.cache_info(path) == {
        "sha256": file_digest(files["train"]),  # of the bytes read, which here are the file's
        "num_records": 12,
        "num_windows": 12,
        "labels": {r["label"]: {"count": 4, "first_record": i} for i, r in enumerate(ROWS, start=1)},
        "tokens": tokens,
        "unknown_tokens": unknown,
        "unk_fraction": unknown / tokens,
    }


def test_a_reused_cache_is_not_read_again(tmp_path, files, monkeypatch):
    """A warm start hashes the files and loads what was counted with the cache: no record is read
    and no token counted (a million records took minutes to read)."""
    import pipeline.data.cache as data

    cfg = TrainConfig(train_file=str(files["train"]), dev_file=str(files["dev"]))
    first = prepare(cfg, tmp_path / "c")
    monkeypatch.setattr(data, "iter_records", lambda path, digest: pytest.fail(f"{path} read again"))
    monkeypatch.setattr(data, "load_tokenized", lambda path: pytest.fail(f"reused cache {path} read again"))
    assert prepare(cfg, tmp_path / "c") == first


def test_a_file_replaced_between_hashing_and_reading_is_not_cached_under_the_old_content(tmp_path, files):
    """The cache key is the file's digest before reading: a file that changes after it (a sweep
    writing data while a run starts) must not leave the new records under the old records' key."""
    split = Split(files["train"], "text", "label", SINGLE_LABEL)
    tokenizer = load_tokenizer(str(build_tokenizer(split.texts(), "d", str(tmp_path))), 64)
    assert split.digest  # hashed, as tokenize_cached does to find the key
    replacement = write_jsonl(tmp_path / "new.jsonl", ROWS * 5)
    os.replace(replacement, files["train"])
    with pytest.raises(ConfigError, match=r"train\.jsonl: the file changed while it was read"):
        tokenize_cached(split, tokenizer, Reading(64), str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_a_file_rewritten_during_reading_is_refused_and_the_fingerprint_has_what_was_read(tmp_path, monkeypatch):
    import pipeline.data.cache as data

    # Larger than the readers' buffers, so a rewrite changes what is read next; every line of the
    # same length, so the rewritten file reads on cleanly from any line (only labels differ).
    rows = [{"text": f"主诉：发热{i % 10}天。", "label": ["肺炎", "心梗"][i % 2]} for i in range(1200)]
    swapped = [{**r, "label": ["心梗", "肺炎"][i % 2]} for i, r in enumerate(rows)]
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "dev": write_jsonl(tmp_path / "dev.jsonl", rows[:4])}
    cfg = TrainConfig(train_file=str(files["train"]), dev_file=str(files["dev"]))
    tokenizer_dir = build_tokenizer([r["text"] for r in rows], "d", str(tmp_path))
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 100)
    encode, rewritten = data.reading.encode, []

    def rewrite_after_the_first_batch(tokenizer, texts, how, words=False):
        if not rewritten:  # the training file's first batch is read (and the readers' buffers filled)
            write_jsonl(files["train"], swapped)  # in place: the open file reads on into it
            rewritten.append(files["train"])
        return encode(tokenizer, texts, how, words)

    monkeypatch.setattr(data.reading, "encode", rewrite_after_the_first_batch)
    with pytest.raises(ConfigError, match=r"train\.jsonl: the file changed while it was read"):
        prepare(cfg, tmp_path / "c", tokenizer_dir)
    assert not list((tmp_path / "c").glob("tokenized-train-*"))
    monkeypatch.setattr(data.reading, "encode", encode)
    info = prepare(cfg, tmp_path / "c", tokenizer_dir)
    (train,) = (tmp_path / "c").glob("tokenized-train-*")
    assert info["train_data"]["train file content (sha256)"] == cache_info(train)["sha256"] == file_digest(files["train"])
    assert load_tokenized(train)["labels"] == [r["label"] for r in swapped]


def _build_shared_caches(split, cache: str, barrier) -> None:
    """One run of a sweep: tokenizer, then tokenized data, each started at the same moment as the others'."""
    barrier.wait()
    tokenizer = load_tokenizer(str(build_tokenizer(split.texts(), "d", cache)), 64)
    barrier.wait()
    tokenize_cached(split, tokenizer, Reading(64), cache)


def test_concurrent_runs_build_the_same_cache_entries_safely(tmp_path, files):
    """Every builder but the first finds its rename refused (ENOTEMPTY): each must still succeed
    with the winner's entry and remove its own temporary directory."""
    import multiprocessing

    split = Split(files["train"], "text", "label", SINGLE_LABEL)
    context = multiprocessing.get_context("fork")  # the children share this process's imported libraries
    barrier = context.Barrier(4)
    runs = [context.Process(target=_build_shared_caches, args=(split, str(tmp_path / "cache"), barrier)) for _ in range(4)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=120)
    assert [run.exitcode for run in runs] == [0] * 4
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert entries == ["tokenized", "tokenizer"], entries  # one of each, no temporary directory left


def test_batches_equal_hf_padding_collator(tmp_path):
    """TokenizedSplit.batch pads with numpy; it must give what DataCollatorWithPadding gives."""
    import torch
    from transformers import DataCollatorWithPadding

    split = read_split(str(SAMPLE / "dev.jsonl"), "text", "label", SINGLE_LABEL)
    tokenizer = load_tokenizer(str(build_tokenizer(split.texts, "d", str(tmp_path))), 512)
    path, _ = tokenize_cached(split.split, tokenizer, Reading(512), str(tmp_path / "cache"))
    names = sorted(set(split.labels))
    rows = load_tokenized(path).remove_columns("record").map(lambda r: {"labels": names.index(r["labels"])})
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    data = TokenizedSplit.from_cache(path, tokenizer.pad_token_id, names, SINGLE_LABEL)
    assert len(data) == len(rows) and data.record_labels.tolist() == rows["labels"]
    rng = np.random.default_rng(0)
    for size in (1, 3, 8, 32):
        indices = rng.choice(len(rows), size, replace=False).tolist()
        expected, got = collate([rows[i] for i in indices]), data.batch(indices)
        assert set(got) == set(expected)
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert min(lengths) < max(lengths)  # so padding was exercised
    padded = TokenizedSplit.from_cache(path, 5, names, SINGLE_LABEL).batch(
        [lengths.index(min(lengths)), lengths.index(max(lengths))]
    )
    assert padded["input_ids"][0, min(lengths) :].eq(5).all() and padded["attention_mask"][0, min(lengths) :].eq(0).all()


def test_tokenizer_that_maps_text_to_unk_is_refused(tmp_path, files):
    """transformers 5 ignores BertTokenizerFast(vocab_file=...): every character becomes [UNK]."""
    from transformers import BertTokenizerFast

    split = read_split(str(files["train"]), "text", "label", SINGLE_LABEL)
    vocabulary = load_tokenizer(str(build_tokenizer(split.texts, "d", str(tmp_path))), 64).get_vocab()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(sorted(vocabulary, key=vocabulary.get)) + "\n", encoding="utf-8")
    broken = BertTokenizerFast(vocab_file=str(vocab))
    broken_dir = tmp_path / "broken"
    broken.save_pretrained(broken_dir)
    (broken_dir / "config.json").write_text("{}")
    cfg = TrainConfig(train_file=str(files["train"]), dev_file=str(files["dev"]), model=str(broken_dir))
    with pytest.raises(ConfigError, match=r"of the training tokens .* are '\[UNK\]'"):
        prepare(cfg, tmp_path / "c", tokenizer_dir=broken_dir)


def _step_samples(num, micro, accum, world, step, seed=5, epoch=0):
    """All samples of optimizer step `step`, gathered over ranks, with the per-micro-batch sizes."""
    samples, sizes = [], []
    for rank in range(world):
        batches = list(RankMicroBatches(num, micro, accum, world, rank, seed, epoch))
        mine = batches[step * accum : (step + 1) * accum]
        samples += [i for b in mine for i in b]
        sizes += [len(b) for b in mine]
    return sorted(samples), sizes


def test_optimizer_step_samples_do_not_depend_on_world_size():
    for step in range(6):
        reference, _ = _step_samples(100, 16, 1, 1, step)
        for micro, accum, world in [(4, 2, 2), (4, 4, 1), (2, 2, 4), (1, 2, 8)]:
            samples, sizes = _step_samples(100, micro, accum, world, step)
            assert samples == reference
            assert set(sizes) == {micro}  # every micro-batch full: equal weights under DeepSpeed's 1/accum


def test_a_position_beyond_the_epoch_is_an_error_not_an_empty_epoch():
    """An empty epoch never advances the training loop, which would then spin forever."""
    assert len(RankMicroBatches(256, 4, 2, 2, 0, seed=0, epoch=0, start_step=15)) == 2
    with pytest.raises(ValueError, match="start step 16 is outside the epoch's 16 optimizer steps"):
        RankMicroBatches(256, 4, 2, 2, 0, seed=0, epoch=0, start_step=16)


def test_training_batches_are_pinned_only_for_a_cuda_device():
    """Pinned batches let a GPU run's host-to-device copies go without waiting for the GPU; on the
    CPU pinning would only be an extra copy."""
    assert pins_memory("cuda:3") and pins_memory(torch.device("cuda", 0))
    assert not pins_memory("cpu") and not pins_memory(torch.device("cpu"))
    batches = [{"input_ids": torch.ones(2, 3, dtype=torch.int64)}]
    assert pinned_for("cpu", batches) is batches
    with pytest.raises(RuntimeError, match="accelerator"):  # it pins: this CPU build of torch cannot
        next(iter(pinned_for("cuda:0", batches)))


def test_epoch_order_is_seeded_and_drops_the_short_last_window():
    a = epoch_global_batches(100, 16, seed=1, epoch=0)
    assert a.shape == (6, 16) and len(set(a.ravel())) == 96
    assert np.array_equal(a, epoch_global_batches(100, 16, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_global_batches(100, 16, seed=1, epoch=1))
    assert len(RankMicroBatches(100, 4, 2, 2, 0, 1, 0)) == 6 * 2
    resumed = list(RankMicroBatches(100, 4, 2, 2, 1, 1, 0, start_step=2))
    assert resumed == list(RankMicroBatches(100, 4, 2, 2, 1, 1, 0))[4:]


def test_bundled_sample_data_shape():
    splits = {name: read_jsonl(SAMPLE / f"{name}.jsonl") for name in ("train", "dev", "test")}
    assert len(splits["train"]) >= 3000 and len(splits["dev"]) >= 300 and len(splits["test"]) >= 300
    labels = {r["label"] for r in splits["train"]}
    assert len(labels) >= 8
    lengths = [len(r["text"]) for r in splits["train"]]
    assert min(lengths) < 128 and max(lengths) > 512
    assert all(r["text"].startswith("主诉") or "现病史" in r["text"] for r in splits["train"][:50])


def test_records_are_read_one_at_a_time(tmp_path):
    """A million-record file is never held in memory: the first record comes before the file's end
    is read (here, a broken last line is only met when the reading gets there)."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS) + '{"text": "cut sh', encoding="utf-8")
    records = Split(path, "text", "label", SINGLE_LABEL).records()
    assert next(records) == (1, ROWS[0]["text"], ROWS[0]["label"])
    with pytest.raises(ConfigError, match=r"train\.jsonl: line 4, column \d+: invalid JSON"):
        list(records)


def test_tokenized_cache_is_keyed_by_how_records_are_read_but_not_by_pooling(tmp_path, files):
    split = read_split(str(files["train"]), "text", "label", SINGLE_LABEL)
    tokenizer = load_tokenizer(str(build_tokenizer(split.texts, "d", str(tmp_path))), 8)
    names, cache = sorted(set(split.labels)), str(tmp_path / "cache")
    readings = [
        Reading(8),
        Reading(8, "tail"),
        Reading(8, "head+tail"),
        Reading(8, long_records="chunks"),
        Reading(8, long_records="chunks", stride=2),
    ]
    paths = [tokenize_cached(split.split, tokenizer, reading, cache)[0] for reading in readings]
    assert len(set(paths)) == len(readings)
    again, reused = tokenize_cached(split.split, tokenizer, Reading(8, long_records="chunks", stride=2, pool="max"), cache)
    assert reused and again == paths[-1]
    windows = TokenizedSplit.from_cache(paths[-1], tokenizer.pad_token_id, names, SINGLE_LABEL)
    assert len(windows) > len(split.texts) and windows.records.tolist() == sorted(windows.records.tolist())
    assert windows.record_labels.tolist() == [names.index(label) for label in split.labels]


MULTI_ROWS = [
    {"text": "主诉：发热3天，咳嗽。胸痛2小时。", "label": ["肺炎", "心梗"]},
    {"text": "主诉：胸痛2小时。", "label": ["心梗"]},
    {"text": "主诉：腹痛，呕吐。", "label": ["胃肠炎"]},
]


def test_multi_label_lists_in_jsonl_and_separated_strings_in_csv(tmp_path):
    jsonl = write_jsonl(tmp_path / "m.jsonl", MULTI_ROWS)
    csv = tmp_path / "m.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{';'.join(r['label'])}\n" for r in MULTI_ROWS), encoding="utf-8")
    expected = [sorted(r["label"]) for r in MULTI_ROWS]
    assert read_split(str(jsonl), "text", "label", MULTI_LABEL).labels == expected
    assert read_split(str(csv), "text", "label", MULTI_LABEL, ";").labels == expected
    with pytest.raises(ConfigError, match=r"m\.csv: record 1: 'label' is '.*;.*', not a list of labels.*--label-separator"):
        read_split(str(csv), "text", "label", MULTI_LABEL)
    with pytest.raises(ConfigError, match=r"m\.jsonl: record 1: 'label' is a list of labels .*--task multi_label"):
        read_split(str(jsonl), "text", "label", SINGLE_LABEL)
    empty = write_jsonl(tmp_path / "e.jsonl", MULTI_ROWS + [{"text": "主诉：头痛。", "label": []}])
    with pytest.raises(ConfigError, match=r"e\.jsonl: record 4: 'label' is an empty label set"):
        read_split(str(empty), "text", "label", MULTI_LABEL)


def test_multi_hot_labels_are_cached_and_batched_as_floats_under_a_key_with_the_task(tmp_path):
    split = read_split(str(write_jsonl(tmp_path / "m.jsonl", MULTI_ROWS)), "text", "label", MULTI_LABEL)
    names = ["心梗", "肺炎", "胃肠炎"]
    tokenizer = load_tokenizer(str(build_tokenizer(split.texts, "m", str(tmp_path))), 32)
    path, _ = tokenize_cached(split.split, tokenizer, Reading(32), str(tmp_path / "cache"))
    assert sorted(cache_info(path)["labels"]) == names
    tokenized = TokenizedSplit.from_cache(path, tokenizer.pad_token_id, names, MULTI_LABEL)
    assert tokenized.labels.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    batch = tokenized.batch([2, 0])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[0, 0, 1], [1, 1, 0]]
    single = write_jsonl(tmp_path / "s.jsonl", [{"text": "主诉：胸痛。", "label": "a"}] * 2)
    as_single = tokenize_cached(Split(single, "text", "label", SINGLE_LABEL), tokenizer, Reading(32), str(tmp_path / "cache"))[0]
    as_multi = tokenize_cached(Split(single, "text", "label", MULTI_LABEL, ";"), tokenizer, Reading(32), str(tmp_path / "cache"))[
        0
    ]
    assert as_single != as_multi  # how labels are read is part of the cache key


def test_label_files_that_name_other_labels_are_refused_before_training(tmp_path, files):
    class Log:
        def info(self, _):
            pass

    names = sorted({r["label"] for r in ROWS})
    tokenizer_dir = build_tokenizer([r["text"] for r in ROWS] * 2, "d", str(tmp_path))  # every character twice: none is [UNK]
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({**dict.fromkeys(names[:2], 1.0), "偏头痛": 2.0}, ensure_ascii=False), encoding="utf-8")
    cfg = TrainConfig(train_file=str(files["train"]), dev_file=str(files["dev"]), class_weights=str(weights))
    with pytest.raises(
        ConfigError, match=rf"--class-weights {weights}: unknown labels \['偏头痛'\]; missing labels \['{names[2]}'\]"
    ):
        prepare(cfg, tmp_path / "c", tokenizer_dir)
    multi = {"train": write_jsonl(tmp_path / "mt.jsonl", MULTI_ROWS * 2), "dev": write_jsonl(tmp_path / "md.jsonl", MULTI_ROWS)}
    thresholds = tmp_path / "t.json"
    thresholds.write_text('{"a": 0.5, "b": 0.5}')
    cfg = TrainConfig(task="multi_label", train_file=str(multi["train"]), dev_file=str(multi["dev"]), threshold=str(thresholds))
    with pytest.raises(ConfigError, match=r"--threshold .*t\.json: unknown labels \['a', 'b'\]"):
        prepare(cfg, tmp_path / "c", tokenizer_dir)
    cfg = TrainConfig(task="multi_label", train_file=str(multi["train"]), dev_file=str(multi["dev"]), class_weights="balanced")
    info = prepare(cfg, tmp_path / "c", tokenizer_dir)
    assert info["class_weights"] == {"心梗": pytest.approx(1 / 2), "肺炎": pytest.approx(2 / 1), "胃肠炎": pytest.approx(2 / 1)}


def test_val_size_holds_out_a_stratified_seeded_share_of_the_training_file(tmp_path):
    from collections import Counter

    from pipeline.data.cache import hold_out

    rows = [{"text": f"记录{i}", "label": "甲" if i % 4 else "乙"} for i in range(200)]  # 150 甲, 50 乙
    rows.append({"text": "只出现一次", "label": "丙"})
    split = Split(write_jsonl(tmp_path / "all.jsonl", rows), "text", "label", SINGLE_LABEL)
    train, dev = hold_out(split, 0.2, seed=1)
    assert not train.rows & dev.rows and len(train.rows | dev.rows) == 201
    labels = {row: label for row, _, label in split.records()}
    assert Counter(labels[r] for r in dev.rows) == {"甲": 30, "乙": 10}  # each label's share; 丙 stays in training
    assert hold_out(split, 0.2, seed=1)[1].rows == dev.rows and hold_out(split, 0.2, seed=2)[1].rows != dev.rows
    assert [row for row, _, _ in dev.records()] == sorted(dev.rows)  # records() yields only the held-out ones
    assert len({train.key, dev.key, split.key}) == 3  # their caches and tokenizers are keyed apart, each pair


def test_a_training_file_of_ones_own_never_pairs_with_the_bundled_dev_set():
    with pytest.raises(ConfigError, match="give its dev set \\(--dev-file\\) or hold part of it out \\(--val-size 0.1\\)"):
        TrainConfig(train_file="my.csv")
    with pytest.raises(ConfigError, match="'val_size' .* 0 when a dev_file is given"):
        TrainConfig(train_file="my.csv", dev_file="dev.csv", val_size=0.1)
    assert TrainConfig(train_file="my.csv", val_size=0.1).dev_file == ""
    assert TrainConfig().dev_file == str(SAMPLE / "dev.jsonl")


def _lengths(num, seed=3):
    """Lengths with a long tail, as real notes have (lognormal, capped at 128 tokens)."""
    return np.minimum(np.random.default_rng(seed).lognormal(3.8, 0.7, num).astype(int) + 3, 128)


def _grouped(num, micro, accum, world, rank, start_step=0, lengths=None, seed=5, epoch=0):
    lengths = _lengths(num) if lengths is None else lengths
    return list(RankMicroBatches(num, micro, accum, world, rank, seed, epoch, start_step, lengths))


def test_grouped_order_is_seeded_the_same_on_every_rank_and_across_a_resume():
    num, micro, accum, world = 1000, 4, 2, 2
    lengths = _lengths(num)
    ranks = [_grouped(num, micro, accum, world, r) for r in range(world)]
    assert ranks[0] != _grouped(num, micro, accum, world, 0, seed=6)  # the seed decides the order
    steps = len(ranks[0]) // accum
    # The ranks' micro-batches of one micro-step are consecutive runs of a length-sorted mega-batch:
    # rank 0's then rank 1's lengths read longest first, so no rank waits on another's long batch.
    for k in range(len(ranks[0])):
        step_lengths = np.concatenate([lengths[ranks[r][k]] for r in range(world)])
        assert np.all(np.diff(step_lengths) <= 0), k
        if k % accum:  # and a window's micro-steps follow each other down the sorted run
            before = np.concatenate([lengths[ranks[r][k - 1]] for r in range(world)])
            assert before.min() >= step_lengths.max(), k
    # Every sample at most once, every micro-batch full, and a resume continues the same order.
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat)) == steps * micro * accum * world
    assert {len(b) for r in ranks for b in r} == {micro}
    for r in range(world):
        assert _grouped(num, micro, accum, world, r, start_step=7) == ranks[r][7 * accum :]
    # The global batch with the longest sample runs first (running out of memory shows at once).
    assert max(lengths[ranks[0][0]].max(), lengths[ranks[1][0]].max()) == lengths[flat].max()


def test_grouping_cuts_padding_and_keeps_each_step_independent_of_the_world_size():
    num, lengths = 2000, _lengths(2000)

    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    plain = list(RankMicroBatches(num, 16, 1, 1, 0, 5, 0))
    grouped = _grouped(num, 16, 1, 1, 0, lengths=lengths)
    real = sum(lengths[b].sum() for b in plain)
    assert real / padded(plain) < 0.6 and sum(lengths[b].sum() for b in grouped) / padded(grouped) > 0.9
    for step in range(5):  # accumulation stays exact: the step's samples, whatever the layout
        reference = sorted(i for b in _grouped(num, 16, 1, 1, 0, lengths=lengths)[step : step + 1] for i in b)
        for micro, accum, world in [(4, 2, 2), (4, 4, 1), (2, 2, 4), (1, 2, 8)]:
            samples = sorted(
                i
                for r in range(world)
                for b in _grouped(num, micro, accum, world, r, lengths=lengths)[step * accum : (step + 1) * accum]
                for i in b
            )
            assert samples == reference
