"""Data: read and check the files, map labels, tokenize once into a cache, and order batches.

Data order is defined globally (see `epoch_global_batches`): each epoch is a seeded permutation of
the whole training set, cut into global batches of micro x accumulation x world size samples, and
each rank takes its share of every global batch. Which samples make up optimizer step k therefore
does not depend on how many ranks share the work.

The last incomplete global batch of each epoch is dropped. DeepSpeed divides every micro-batch
loss by the accumulation steps, so a short window would be under-weighted (or, padded with repeats,
some samples would count twice); dropping it keeps every optimizer step an equal-weight average of
exactly one global batch. The permutation changes every epoch, so different samples are left out
each time (at most global batch - 1 per epoch).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import task
from .base import ConfigError, build_once, file_digest, write_json
from .config import TrainConfig
from .ds_config import steps_per_epoch

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


# ----------------------------------------------------------------------------------------------
# Reading and checking files
# ----------------------------------------------------------------------------------------------


def _decode(path: Path) -> str:
    """The file's text: existence, format, emptiness and UTF-8 checked, errors with line and column."""
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"{path}: unsupported data format '{path.suffix}', expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    raw = path.read_bytes()
    if not raw.strip():
        raise ConfigError(f"{path}: data file is empty")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None


def _json_records(path: Path, text: str) -> list:
    """A JSON array (a .json file starting with '['), else JSON Lines; blank lines are skipped."""
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {number}, column {e.colno}: invalid JSON ({e.msg})") from None
    return records


def _csv_records(path: Path, text: str) -> list[dict]:
    """Rows of a CSV file with a header line; every value a string, as written."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    records = []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise ConfigError(f"{path}: line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
        records.append(dict(zip(header, row)))
    return records


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL, JSON or CSV file, in file order.

    Read here rather than with `datasets.load_dataset`, whose cache trusts file modification
    times: a file rewritten with its old mtime (cp -p, rsync -a, tar) gave the old records.
    """
    path = Path(path)
    text = _decode(path)
    records = _csv_records(path, text) if FORMATS[path.suffix.lower()] == "csv" else _json_records(path, text)
    if not records:
        raise ConfigError(f"{path}: data file has no records")
    for row, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: record {row}: expected an object with named fields, got {json.dumps(record)[:80]}")
    return records


@dataclass
class Split:
    """One data file: its texts and string labels, in file order."""

    path: Path
    texts: list[str]
    labels: list[str]

    @cached_property
    def fingerprint(self) -> str:
        """Hash of exactly what was read: covers the file's content and which columns were taken.

        One JSON value per line, texts then labels after a null, hashed as it goes (no copy of the data).
        """
        h = hashlib.sha256()
        for value in itertools.chain(self.texts, [None], self.labels):
            h.update(json.dumps(value, ensure_ascii=False).encode() + b"\n")
        return h.hexdigest()[:20]


def require_columns(path: Path, records: list[dict], columns: list[str]) -> None:
    for column in columns:
        if not any(column in record for record in records):
            raise ConfigError(f"{path}: no column '{column}' (columns: {', '.join(records[0])}); set text_column/label_column")


def _label(path: Path, row: int, column: str, value, parse, separator: str):
    """The record's label (or label set) as the task reads it, with the file and record named on error."""
    try:
        return parse(value, separator)
    except ValueError as e:
        raise ConfigError(f"{path}: record {row}: '{column}' {e}") from None


def read_split(
    path: str, text_column: str, label_column: str | None, parse=task.SINGLE_LABEL.parse, label_separator: str = ""
) -> Split:
    """Read a data file and check its text and (unless None) label column in every record.

    `parse` is the task's label reader (task.Task.parse): a string, or a list of strings for multi-label."""
    records = read_records(path)
    path = Path(path)
    require_columns(path, records, [text_column] if label_column is None else [text_column, label_column])
    texts = [record.get(text_column) for record in records]
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path}: record {row}: '{text_column}' is empty or not text ({text!r})")
    labels = (
        []
        if label_column is None
        else [
            _label(path, row, label_column, record.get(label_column), parse, label_separator)
            for row, record in enumerate(records, start=1)
        ]
    )
    return Split(path, texts, labels)


def label_names_from(train: Split, others: list[Split], kind: task.Task = task.SINGLE_LABEL) -> list[str]:
    """The task's label set for these splits (task.Task.label_names)."""
    return kind.label_names(train.labels, train.path, {split.path: split.labels for split in others})


# ----------------------------------------------------------------------------------------------
# Tokenizing, with an on-disk cache keyed by the records, tokenizer, max length and label names
# ----------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of vocabulary, normalizer and pre-tokenizer; not of the truncation state a call leaves behind."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None), spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# The tokenized cache: one Arrow stream file, read memory-mapped, and the counts taken while it was
# written. CACHE_FORMAT is part of the key: bump it when the layout changes.
CACHE_FORMAT = 2
CACHE_DATA, CACHE_INFO = "data.arrow", "info.json"
# Records per tokenizer call and per Arrow record batch: memory is bounded by this, not by the file.
# On 50,000 generated records, 10,000 at a time peaked at 2.3 GB RSS, 1,000 at 0.66 GB, no slower.
TOKENIZE_BATCH = 1000


def count_unknown(tokenizer, ids: np.ndarray) -> tuple[int, int]:
    """(unknown tokens, non-special tokens) among token `ids`."""
    special = sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})
    counted = ids[~np.isin(ids, special)]
    return int(np.count_nonzero(counted == tokenizer.unk_token_id)), int(counted.size)


def _write_tokenized(split: Split, label_names: list[str], tokenizer, max_length: int, path: Path, kind: task.Task) -> dict:
    """Tokenize `split` TOKENIZE_BATCH records at a time into an Arrow stream file at `path`.

    Returns the cache's info: record count and the unknown-token share, counted here once rather
    than over every token on every run.
    """
    import pyarrow as pa

    unknown = tokens = 0
    with pa.OSFile(str(path), "wb") as sink:
        writer = None
        for start in range(0, len(split.texts), TOKENIZE_BATCH):
            encoded = tokenizer(split.texts[start : start + TOKENIZE_BATCH], truncation=True, max_length=max_length)
            # Token ids need int32; masks and segment ids fit int8 (a third of the file, as datasets stores them).
            columns = {
                name: pa.array(encoded[name], type=pa.list_(pa.int32() if name == "input_ids" else pa.int8()))
                for name in encoded.keys()
            }
            # Class ids (int64) or multi-hot rows (a list of floats per record), as the task encodes them.
            columns["labels"] = pa.array(kind.encode(split.labels[start : start + TOKENIZE_BATCH], label_names))
            batch = pa.RecordBatch.from_pydict(columns)
            writer = writer or pa.ipc.new_stream(sink, batch.schema)
            writer.write_batch(batch)
            batch_unknown, batch_tokens = count_unknown(tokenizer, columns["input_ids"].flatten().to_numpy())
            unknown, tokens = unknown + batch_unknown, tokens + batch_tokens
        writer.close()
    return {
        "num_records": len(split.texts),
        "tokens": tokens,
        "unknown_tokens": unknown,
        "unk_fraction": unknown / max(tokens, 1),
    }


def tokenize_cached(
    split: Split, label_names: list[str], tokenizer, max_length: int, cache_dir: str, kind: task.Task = task.SINGLE_LABEL
):
    """Tokenize a split once per (records read, tokenizer, max length, label names, task); reuse it afterwards.

    Returns (path of the cached dataset, whether it was reused). The cache is written to a
    temporary directory and renamed (`build_once`), so an interrupted build is never mistaken for a cache.
    """
    key = hashlib.sha256(
        json.dumps(
            [CACHE_FORMAT, split.fingerprint, tokenizer_fingerprint(tokenizer), max_length, label_names, kind.name]
        ).encode()
    ).hexdigest()[:20]
    target = Path(cache_dir) / f"tokenized-{split.path.stem}-{key}"
    if (target / CACHE_INFO).is_file():
        return target, True

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        write_json(tmp / CACHE_INFO, _write_tokenized(split, label_names, tokenizer, max_length, tmp / CACHE_DATA, kind))

    build_once(target, CACHE_INFO, build)
    return target, False


def cache_info(path: str | os.PathLike) -> dict:
    """What was counted when the tokenized cache at `path` was built (see _write_tokenized)."""
    return json.loads((Path(path) / CACHE_INFO).read_text(encoding="utf-8"))


def load_tokenized(path: str | os.PathLike):
    """The tokenized cache at `path` as a `datasets.Dataset`, memory-mapped (not read into memory)."""
    import datasets

    return datasets.Dataset.from_file(str(Path(path) / CACHE_DATA))


def _labels_array(column) -> np.ndarray:
    """The labels column as the model takes it: class ids (int64), or multi-hot rows (float32, records x labels)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(column.type):
        return pc.list_flatten(column).to_numpy().astype(np.float32).reshape(len(column), -1)
    return column.to_numpy().astype(np.int64)


class TokenizedSplit:
    """A cached tokenized split; `batch(indices)` returns those records as one padded batch of tensors.

    Each batch is padded to its own longest record, not to max_length: less wasted compute. Records
    are taken as Arrow arrays and padded with numpy, about 0.3 ms for 8 records of the sample data;
    row dicts through a DataLoader and DataCollatorWithPadding (tokenizer.pad) took about 1.8 ms,
    up to 2.6% of the step time at accumulation 8 in the benchmark of commit 7a88312.
    """

    def __init__(self, path: str | os.PathLike, pad_id: int):
        self.rows = load_tokenized(path).with_format("arrow")
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return _labels_array(self.rows["labels"])

    def batch(self, indices) -> dict:
        import pyarrow.compute as pc
        import torch

        table = self.rows[list(indices)]
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
        inside = np.arange(lengths.max()) < lengths[:, None]  # row-major, as the flattened values
        out = {"labels": torch.from_numpy(_labels_array(table.column("labels")))}
        for name in table.column_names:
            if name != "labels":
                padded = np.full(inside.shape, self.pad_id if name == "input_ids" else 0, dtype=np.int64)
                padded[inside] = pc.list_flatten(table.column(name)).to_numpy()
                out[name] = torch.from_numpy(padded)
        return out


# ----------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------


def epoch_global_batches(num_samples: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, global_batch) sample indices: a seeded permutation of the epoch, remainder dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    steps = steps_per_epoch(num_samples, global_batch)
    return order[: steps * global_batch].reshape(steps, global_batch)


class RankMicroBatches:
    """This rank's micro-batches of each global batch, in step order.

    Global batch g is split into `world` contiguous shares; share r is cut into `accum`
    micro-batches. Every micro-batch has exactly `micro` samples.
    """

    def __init__(
        self, num_samples: int, micro: int, accum: int, world: int, rank: int, seed: int, epoch: int, start_step: int = 0
    ):
        batches = epoch_global_batches(num_samples, micro * accum * world, seed, epoch)
        if not 0 <= start_step < len(batches):  # an empty epoch would leave the training loop spinning
            raise ValueError(f"start step {start_step} is outside the epoch's {len(batches)} optimizer steps")
        self.batches = batches[start_step:]
        self.micro, self.world, self.rank = micro, world, rank

    def __len__(self) -> int:
        return len(self.batches) * (self.batches.shape[1] // self.world // self.micro)

    def __iter__(self):
        for global_batch in self.batches:
            share = global_batch.reshape(self.world, -1)[self.rank]
            for micro_batch in share.reshape(-1, self.micro):
                yield micro_batch.tolist()


def train_batches(
    split: TokenizedSplit, micro: int, accum: int, world: int, rank: int, seed: int, epoch: int, start_step: int = 0
):
    """This rank's padded micro-batches of one epoch, from optimizer step `start_step` on."""
    for indices in RankMicroBatches(len(split), micro, accum, world, rank, seed, epoch, start_step):
        yield split.batch(indices)


def train_fingerprint(cfg: TrainConfig, train: Split, tokenizer) -> dict:
    """What fixes the training batches and their order: a resume must find all of it unchanged."""
    return {
        "train file content (sha256)": file_digest(train.path),
        "train records": len(train.texts),
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "max_length": cfg.max_length,
        "tokenizer (fingerprint)": tokenizer_fingerprint(tokenizer),
    }


def prepare_splits(cfg: TrainConfig, tokenizer_for, cache_dir: str, log) -> dict:
    """Rank 0's data work: read and check all files, get a tokenizer, tokenize into the cache.

    `tokenizer_for(train_split)` returns (tokenizer, tokenizer_dir). Returns a small, picklable
    description the other ranks use to load the same cached data.
    """
    kind = task.TASKS[cfg.task]

    def read(path):
        return read_split(path, cfg.text_column, cfg.label_column, kind.parse, cfg.label_separator)

    train = read(cfg.train_file)
    others = {"dev": read(cfg.dev_file)}
    if cfg.test_file:
        others["test"] = read(cfg.test_file)
    label_names = label_names_from(train, list(others.values()), kind)
    weights = task.class_weights(kind, cfg.class_weights, kind.encode(train.labels, label_names), label_names)
    if cfg.threshold.endswith(".json"):
        kind.thresholds(None, None, label_names, cfg.threshold)  # a file for other labels: refused before training
    tokenizer, tokenizer_dir = tokenizer_for(train)
    info = {
        "label_names": label_names,
        "class_weights": dict(zip(label_names, weights)) if weights else {},
        "tokenizer_dir": str(tokenizer_dir),
        "splits": {},
        "train_data": train_fingerprint(cfg, train, tokenizer),
    }
    for name, split in {"train": train, **others}.items():
        path, reused = tokenize_cached(split, label_names, tokenizer, cfg.max_length, cache_dir, kind)
        info["splits"][name] = str(path)
        log.info(f"data: {name} {split.path} ({len(split.texts)} records) -> {'reused' if reused else 'built'} cache {path}")
    unk = cache_info(info["splits"]["train"])["unk_fraction"]
    if unk > cfg.max_unk_fraction:
        raise ConfigError(
            f"tokenizer {tokenizer_dir}: {unk:.1%} of the training tokens of {train.path} are '{tokenizer.unk_token}' "
            f"(limit max_unk_fraction={cfg.max_unk_fraction:.0%}). The vocabulary does not fit this text; a model "
            "trained so learns from lengths alone. (transformers 5 ignores BertTokenizerFast(vocab_file=...): "
            "load tokenizers with from_pretrained(dir).)"
        )
    info["unk_fraction"] = unk
    return info
