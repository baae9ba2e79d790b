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

import codecs
import dataclasses
import hashlib
import itertools
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..core.base import ConfigError, build_once, file_digest, write_json
from ..core.dist import Progress
from ..core.options import TrainConfig
from ..core.stop import pause_for_test, raise_if_requested
from . import reading
from .readers import iter_records, require_columns

# ----------------------------------------------------------------------------------------------
# Reading and checking files
# ----------------------------------------------------------------------------------------------


def _label(path: Path, row: int, column: str, value, kind, separator: str):
    """The record's label (or label set) as the task reads it, with the file and record named on error."""
    try:
        return kind.parse(value, separator)
    except ValueError as e:
        raise ConfigError(f"{path}: record {row}: '{column}' {e}") from None


@dataclass
class Split:
    """One data file, the columns taken from it and how its labels are read (the task's `parse`:
    a string, or a set of strings for multi-label). Records are read on demand, one at a time."""

    path: Path
    text_column: str
    label_column: str | None = None
    kind: object = None  # the task (tasks.base.Task): how labels are read; None without a label column
    label_separator: str = ""
    rows: frozenset | None = None  # record numbers taken (--val-size); None: all
    encoding: str = "utf-8"  # of a text format (--encoding)

    def records(self):
        """(record number, text, label or None), every record checked as it is read.

        A file whose bytes, as read, are not the ones `digest` was taken from (replaced or rewritten
        after hashing, or while being read) is refused after its last record: what was built from
        it (a tokenizer, a tokenized cache) must not be kept under the old content's key."""
        columns = [self.text_column] if self.label_column is None else [self.text_column, self.label_column]
        expected, read = self.digest, CountingDigest()
        self.read = read  # how far reading has got, for progress
        for row, record in enumerate(iter_records(self.path, read, self.encoding), start=1):
            if row == 1:  # a column missing from the first record is taken for a wrong column name
                require_columns(self.path, [record], columns)
            text = record.get(self.text_column)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{self.path}: record {row}: '{self.text_column}' is empty or not text ({text!r})")
            if self.rows is not None and row not in self.rows:
                continue
            if self.label_column is None:
                yield row, text, None
            else:
                yield (
                    row,
                    text,
                    _label(self.path, row, self.label_column, record.get(self.label_column), self.kind, self.label_separator),
                )
        if read.hexdigest() != expected:
            raise ConfigError(
                f"{self.path}: the file changed while it was read (sha256 {expected[:12]} before reading, "
                f"{read.hexdigest()[:12]} read); start again once it is completely written"
            )

    def texts(self):
        return (text for _, text, _ in self.records())

    @cached_property
    def digest(self) -> str:
        """The file's SHA-256, taken before it is read: what caches are looked up by. A complete
        reading of `records` has read exactly these bytes."""
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: data file not found")
        return file_digest(self.path)

    @property
    def key(self) -> str:
        """What is read, without reading it: the file's content (not its mtime), the columns taken and
        how labels are read (and decoded: the same bytes read in another encoding are other texts)."""
        read = [self.digest, self.text_column, self.label_column, self.kind.name, self.label_separator]
        if codecs.lookup(self.encoding).name != "utf-8":  # appended only then: UTF-8 runs keep their caches
            read.append(codecs.lookup(self.encoding).name)
        if self.rows is not None:
            read.append(hashlib.sha256(json.dumps(sorted(self.rows)).encode()).hexdigest())
        return hashlib.sha256(json.dumps(read).encode()).hexdigest()[:20]


class CountingDigest:
    """SHA-256 that also counts the bytes it has taken: how much of a file its records came from."""

    def __init__(self):
        self.sha, self.bytes = hashlib.sha256(), 0

    def update(self, data) -> None:
        self.sha.update(data)
        self.bytes += len(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """--val-size: (training, dev) parts of one file. Each label gives round(fraction x its records)
    of them, drawn with the seed, so the dev set has the training set's label shares and the same
    seed gives the same split; a label seen once stays in training. Labels that are not one string
    (multi-label sets, numbers) are drawn from as one group."""
    by_label = defaultdict(list)
    for row, _, label in split.records():
        by_label[label if isinstance(label, str) else ""].append(row)
    rng = np.random.default_rng(seed)
    dev = set()
    for label in sorted(by_label):
        rows = by_label[label]
        dev.update(int(row) for row in rng.permutation(rows)[: round(fraction * len(rows))])
    if not dev:
        raise ConfigError(f"{split.path}: --val-size {fraction} of its records holds out none; use a larger fraction")
    train = {row for rows in by_label.values() for row in rows} - dev
    return dataclasses.replace(split, rows=frozenset(train)), dataclasses.replace(split, rows=frozenset(dev))


class Records(NamedTuple):
    split: Split
    texts: list[str]
    labels: list

    @classmethod
    def of(cls, split: Split) -> Records:
        """A small split's records, all read and checked at once (tests, tools, the baseline; training streams)."""
        rows = list(split.records())
        return cls(split, [text for _, text, _ in rows], [label for _, _, label in rows])


def read_split(
    path: str, text_column: str, label_column: str | None, kind, label_separator: str = "", encoding: str = "utf-8"
) -> Records:
    """A small file's records (Records.of)."""
    return Records.of(Split(Path(path), text_column, label_column, kind, label_separator, encoding=encoding))


# What `run_splits` reads of a run's configuration: all that decides which records each split holds.
SPLIT_SETTINGS = (
    "train_file",
    "dev_file",
    "test_file",
    "val_size",
    "seed",
    "text_column",
    "label_column",
    "label_separator",
    "encoding",
)


def run_splits(cfg, kind) -> dict[str, Split]:
    """The splits a run reads (not yet read): train; dev, its own file or held out of train
    (--val-size); test if given. `cfg`: a TrainConfig, or any object with its SPLIT_SETTINGS."""

    def split(path: str) -> Split:
        return Split(Path(path), cfg.text_column, cfg.label_column, kind, cfg.label_separator, encoding=cfg.encoding)

    splits = {"train": split(cfg.train_file)}
    if cfg.val_size:
        splits["train"], splits["dev"] = hold_out(splits["train"], cfg.val_size, cfg.seed)
    else:
        splits["dev"] = split(cfg.dev_file)
    if cfg.test_file:
        splits["test"] = split(cfg.test_file)
    return splits


# ----------------------------------------------------------------------------------------------
# Tokenizing, with an on-disk cache keyed by the records, tokenizer, reading settings and label names
# ----------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of vocabulary, normalizer and pre-tokenizer; not of the truncation state a call leaves behind."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None), spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# The tokenized cache: one Arrow stream file, read memory-mapped, and what was counted while it was
# written. One row per window (one per record unless long records are read in chunks); RECORD holds
# the row's record index. Labels are stored as written (strings): the label set is only known after
# every split is read, and ids are given when the cache is loaded. CACHE_FORMAT is part of the key:
# bump it when the layout (or how labels are read) changes.
CACHE_FORMAT = 5
RECORD = "record"
CACHE_DATA, CACHE_INFO = "data.arrow", "info.json"
# Records per tokenizer call and per Arrow record batch: memory is bounded by this, not by the file.
# On 50,000 generated records, 10,000 at a time peaked at 2.3 GB RSS, 1,000 at 0.66 GB, no slower.
TOKENIZE_BATCH = 1000


def count_unknown(tokenizer, ids: np.ndarray) -> tuple[int, int]:
    """(unknown tokens, non-special tokens) among token `ids`."""
    special = sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})
    counted = ids[~np.isin(ids, special)]
    return int(np.count_nonzero(counted == tokenizer.unk_token_id)), int(counted.size)


def in_batches(records, size: int):
    """Lists of `size` items of an iterator (the last one shorter)."""
    it = iter(records)
    while batch := list(itertools.islice(it, size)):
        yield batch


def encoded_columns(
    tokenizer, texts: list[str], how: reading.Reading, first_record: int = 0, words: bool = False
) -> tuple[dict, list[int]]:
    """The cache's Arrow columns of `texts` read as `how` says (reading.encode; `words`: with each
    token's word start), labels aside, and each window's text index in `texts`. RECORD numbers the
    texts from `first_record`."""
    import pyarrow as pa

    encoded, record = reading.encode(tokenizer, texts, how, words)
    # Token ids need int32; masks and segment ids fit int8 (a third of the file, as datasets stores them).
    columns = {
        name: pa.array(values, type=pa.list_(pa.int32() if name == "input_ids" else pa.int8()))
        for name, values in encoded.items()
    }
    columns[RECORD] = pa.array(np.asarray(record, dtype=np.int64) + first_record)
    return columns, record


def _write_tokenized(split: Split, tokenizer, how: reading.Reading, path: Path, log=None) -> dict:
    """Read `split` and tokenize it TOKENIZE_BATCH records at a time into an Arrow stream file at `path`.

    Each window is a row with its record's label and index. Returns the cache's info: the SHA-256
    of the bytes the records were read from, record and window counts, each label's count and
    first record (the label set and its checks need no second reading), and the unknown-token
    share, counted here once rather than over every token on every run. Progress goes to `log`
    (a logger; default the rank-aware one).
    """
    import pyarrow as pa

    unknown = tokens = records = windows = 0
    labels = {}
    # The file is streamed, so the records are not counted ahead: the ETA follows from the share
    # of the file's bytes read so far.
    size = split.path.stat().st_size
    with pa.OSFile(str(path), "wb") as sink, Progress(f"tokenize {split.path.name}", None, log=log and log.info) as progress:
        writer = None
        for batch in in_batches(split.records(), TOKENIZE_BATCH):
            texts = [text for _, text, _ in batch]
            columns, record = encoded_columns(tokenizer, texts, how, records, split.kind.pretraining)
            columns["labels"] = pa.array(
                [batch[i][2] for i in record]
            )  # as the task parsed it: a string, a list of them, a number
            for row, _, label in batch:
                for name in split.kind.classes_of(label):  # none for a task without a label set
                    labels.setdefault(name, {"count": 0, "first_record": row})["count"] += 1
            table = pa.RecordBatch.from_pydict(columns)
            writer = writer or pa.ipc.new_stream(sink, table.schema)
            writer.write_batch(table)
            pause_for_test("tokenize")
            raise_if_requested("data preparation")  # hours of tokenizing must not outlast a stop request
            batch_unknown, batch_tokens = count_unknown(tokenizer, columns["input_ids"].flatten().to_numpy())
            unknown, tokens = unknown + batch_unknown, tokens + batch_tokens
            records, windows = records + len(batch), windows + len(record)
            progress.update(len(batch), estimated_total=records * size // max(split.read.bytes, 1))
        writer.close()
    return {
        "sha256": split.digest,  # what was read: records() refuses a file that changed
        "num_records": records,
        "num_windows": windows,
        "labels": labels,
        "tokens": tokens,
        "unknown_tokens": unknown,
        "unk_fraction": unknown / max(tokens, 1),
    }


def tokenize_cached(split: Split, tokenizer, how: reading.Reading, cache_dir: str, log=None):
    """Tokenize a split once per (content and columns read, tokenizer, reading settings); reuse it afterwards.

    Returns (path of the cached dataset, whether it was reused). A reused cache costs one pass of
    SHA-256 over the file, not a reading of its records. The cache is written to a temporary
    directory and renamed (`build_once`), so an interrupted build is never mistaken for a cache;
    nor is a file that changed between hashing and reading cached under the old content's key.
    """
    key = hashlib.sha256(
        json.dumps([CACHE_FORMAT, split.key, tokenizer_fingerprint(tokenizer), how.data_key()]).encode()
    ).hexdigest()[:20]
    target = Path(cache_dir) / f"tokenized-{split.path.stem}-{key}"
    if (target / CACHE_INFO).is_file():
        return target, True

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)  # a file changed while read is refused here, before the rename
        write_json(tmp / CACHE_INFO, _write_tokenized(split, tokenizer, how, tmp / CACHE_DATA, log))

    build_once(target, CACHE_INFO, build)
    return target, False


def cache_info(path: str | os.PathLike) -> dict:
    """What was counted when the tokenized cache at `path` was built (see _write_tokenized)."""
    return json.loads((Path(path) / CACHE_INFO).read_text(encoding="utf-8"))


def load_tokenized(path: str | os.PathLike):
    """The tokenized cache at `path` as a `datasets.Dataset`, memory-mapped (not read into memory)."""
    import datasets

    return datasets.Dataset.from_file(str(Path(path) / CACHE_DATA))


class TokenizedSplit:
    """A tokenized split (a cache, or predict's texts); `batch(indices)` returns those rows as one
    padded batch of tensors.

    A row is a window of a record (reading.py): one per record unless long records are read in
    chunks. `records` gives each row's record; evaluation and predict pool rows per record with `pool`.

    Each batch is padded to its own longest record, not to max_length: less wasted compute. Records
    are taken as Arrow arrays and padded with numpy, about 0.3 ms for 8 records of the sample data;
    row dicts through a DataLoader and DataCollatorWithPadding (tokenizer.pad) took about 1.8 ms,
    up to 2.6% of the step time at accumulation 8 in the benchmark of commit 7a88312.
    """

    def __init__(self, rows, pad_id: int, labels: np.ndarray | None, pool: str = "mean", masking=None):
        """`rows`: a datasets.Dataset of the cache's columns in Arrow format; `labels`: each row's
        labels as the model's loss takes them, None for unlabelled texts; `masking` (a
        masking.Masking): makes a batch's inputs and labels for a masked LM (pretraining)."""
        self.rows, self.pad_id, self.labels, self.pool, self.masking = rows, pad_id, labels, pool, masking

    @classmethod
    def from_cache(cls, path: str | os.PathLike, pad_id: int, label_names: list[str], kind, pool: str = "mean"):
        """The tokenized cache at `path`, memory-mapped; labels encoded once, for every row, by the task."""
        rows = load_tokenized(path).with_format("arrow")
        return cls(rows, pad_id, kind.encode(rows["labels"], label_names), pool)

    @classmethod
    def held_out(cls, paths: list[str], pad_id: int, masking, fraction: float, seed: int) -> dict:
        """{"train", "dev"}: the unlabelled caches at `paths` read as one, cut by whole records into a
        training part and a seeded held-out part of `fraction` of the records (at least one)."""
        import datasets

        files = [load_tokenized(path).with_format("arrow") for path in paths]
        record, count = [], 0
        for file in files:  # each file numbers its records from 0
            record.append(file[RECORD].to_numpy() + count)
            count = int(record[-1][-1]) + 1
        record = np.concatenate(record)
        rows = datasets.concatenate_datasets(files).with_format("arrow")
        held = np.random.default_rng([seed]).permutation(count)[: max(1, round(count * fraction))]
        is_held = np.isin(record, held)
        return {
            name: cls(rows.select(np.flatnonzero(keep)), pad_id, None, masking=masking)
            for name, keep in (("train", ~is_held), ("dev", is_held))
        }

    @classmethod
    def from_texts(cls, tokenizer, texts: list[str], how: reading.Reading):
        """Unlabelled texts (predict) encoded in memory into the rows a cache holds: batched and
        pooled by the same code as evaluation."""
        import datasets
        import pyarrow as pa
        from datasets.table import InMemoryTable

        columns, _ = encoded_columns(tokenizer, texts, how)
        rows = datasets.Dataset(InMemoryTable(pa.table(columns))).with_format("arrow")
        return cls(rows, tokenizer.pad_token_id, None, how.pool)

    def __len__(self) -> int:
        """Rows (training samples), not records."""
        return len(self.rows)

    @cached_property
    def records(self) -> np.ndarray:
        return self.rows[RECORD].to_numpy()

    @cached_property
    def lengths(self) -> np.ndarray:
        """Each row's tokens (padding is added per batch): what batches are grouped and sorted by."""
        import pyarrow.compute as pc

        return pc.list_value_length(self.rows["input_ids"]).to_numpy()

    @cached_property
    def record_labels(self) -> np.ndarray:
        """One label (or multi-hot row) per record: its first window's."""
        first = np.r_[True, self.records[1:] != self.records[:-1]]
        return self.labels[first]

    def batch(self, indices, epoch: int | None = None) -> dict:
        """Rows `indices` padded into tensors; with masking, masked as in training `epoch` (None: as
        evaluation masks them, the same every time)."""
        import pyarrow.compute as pc
        import torch

        table = self.rows[list(indices)]
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
        inside = np.arange(lengths.max()) < lengths[:, None]  # row-major, as the flattened values
        out = {} if self.labels is None else {"labels": torch.from_numpy(self.labels[list(indices)])}
        for name in table.column_names:
            if name not in ("labels", RECORD):
                padded = np.full(inside.shape, self.pad_id if name == "input_ids" else 0, dtype=np.int64)
                padded[inside] = pc.list_flatten(table.column(name)).to_numpy()
                out[name] = torch.from_numpy(padded)
        return out if self.masking is None else self.masking(out, indices, epoch)


# ----------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------


def train_fingerprint(cfg: TrainConfig, train: dict, tokenizer) -> dict:
    """What fixes the training batches and their order: a resume must find all of it unchanged.
    `train` is the training cache's info: the digest of what was read, not of the file now (for
    pretraining, every text file's, and the held-out share)."""
    held_out = {"held-out fraction (pretrain)": cfg.heldout_fraction} if cfg.text_file else {}
    return {
        **held_out,
        "train file content (sha256)": train["sha256"],
        "train records": train["num_records"],
        "held out as dev (val_size)": cfg.val_size,
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "max_length": cfg.max_length,
        "reading (max length, truncation, long records, stride)": reading.Reading.from_config(cfg).data_key(),
        "tokenizer (fingerprint)": tokenizer_fingerprint(tokenizer),
    }


def prepare_splits(cfg: TrainConfig, kind, tokenizer_for, cache_dir: str, log) -> dict:
    """Rank 0's data work: get a tokenizer, read, check and tokenize each file into the cache.

    `kind` is the task (tasks.base.Task): how labels are read, the label set and class weights.
    `tokenizer_for(train_split)` returns (tokenizer, tokenizer_dir). Files already in the cache are
    not read again (only hashed), so a warm start of a million-record run takes seconds. Returns a
    small, picklable description the other ranks use to load the same cached data.
    """
    splits = run_splits(cfg, kind)
    tokenizer, tokenizer_dir = tokenizer_for(splits["train"])
    how = reading.Reading.from_config(cfg)
    paths, infos = {}, {}
    for name, split in splits.items():
        paths[name], reused = tokenize_cached(split, tokenizer, how, cache_dir, log)
        infos[name] = cache_info(paths[name])
        windows = f" in {infos[name]['num_windows']} windows" if cfg.long_records == "chunks" else ""
        part = f" (held out: --val-size {cfg.val_size})" if cfg.val_size and name == "dev" else ""
        log.info(
            f"data: {name} {split.path}{part} ({infos[name]['num_records']} records{windows}) -> "
            f"{'reused' if reused else 'built'} cache {paths[name]}"
        )
    seen = infos["train"]["labels"]
    label_names = kind.label_names(
        seen, splits["train"].path, {splits[n].path: infos[n]["labels"] for n in splits if n != "train"}
    )
    counts = {name: seen[name]["count"] for name in label_names}
    weights = kind.class_weights(cfg.class_weights, counts, infos["train"]["num_records"], label_names)
    if cfg.threshold.endswith(".json"):
        kind.thresholds(None, None, label_names, cfg.threshold)  # a file for other labels: refused before training
    unk = infos["train"]["unk_fraction"]
    check_unknown(cfg, unk, tokenizer, tokenizer_dir, cfg.train_file)
    return {
        "label_names": label_names,
        "class_weights": dict(zip(label_names, weights)) if weights else {},
        "tokenizer_dir": str(tokenizer_dir),
        "splits": {name: str(path) for name, path in paths.items()},
        "train_data": train_fingerprint(cfg, infos["train"], tokenizer),
        "unk_fraction": unk,
        "dev_records": sorted(splits["dev"].rows) if cfg.val_size else None,
    }


def check_unknown(cfg: TrainConfig, unk: float, tokenizer, tokenizer_dir, where: str) -> None:
    """Refuse a tokenizer that maps more than max_unk_fraction of the training tokens to [UNK]."""
    if unk > cfg.max_unk_fraction:
        raise ConfigError(
            f"tokenizer {tokenizer_dir}: {unk:.1%} of the training tokens of {where} are '{tokenizer.unk_token}' "
            f"(limit max_unk_fraction={cfg.max_unk_fraction:.0%}). The vocabulary does not fit this text; a model "
            "trained so learns from lengths alone. (transformers 5 ignores BertTokenizerFast(vocab_file=...): "
            "load tokenizers with from_pretrained(dir).)"
        )


def text_file_paths(text_file: str) -> list[Path]:
    """--text-file: one path, or several separated by commas."""
    return [Path(part.strip()) for part in text_file.split(",") if part.strip()]


@dataclass
class TextFiles:
    """Unlabelled files read as one text collection: what pretraining builds a vocabulary from."""

    splits: list[Split]

    def texts(self):
        return (text for split in self.splits for text in split.texts())

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps([split.key for split in self.splits]).encode()).hexdigest()[:20]


def prepare_text_files(cfg: TrainConfig, kind, tokenizer_for, cache_dir: str, log) -> dict:
    """Rank 0's data work for pretraining: a tokenizer, then each --text-file read, checked and
    tokenized (with word starts, the task being a pretraining one) into the cache, as prepare_splits
    does for labelled files. Returns what the other ranks need to load the same caches."""
    files = TextFiles(
        [Split(path, cfg.text_column, None, kind, encoding=cfg.encoding) for path in text_file_paths(cfg.text_file)]
    )
    tokenizer, tokenizer_dir = tokenizer_for(files)
    how = reading.Reading.from_config(cfg)
    paths, infos = [], []
    for split in files.splits:
        path, reused = tokenize_cached(split, tokenizer, how, cache_dir)
        paths.append(str(path))
        infos.append(cache_info(path))
        log.info(
            f"data: text {split.path} ({infos[-1]['num_records']} records in {infos[-1]['num_windows']} windows) -> "
            f"{'reused' if reused else 'built'} cache {path}"
        )
    unk = sum(info["unknown_tokens"] for info in infos) / max(sum(info["tokens"] for info in infos), 1)
    check_unknown(cfg, unk, tokenizer, tokenizer_dir, cfg.text_file)
    combined = {"sha256": [info["sha256"] for info in infos], "num_records": sum(info["num_records"] for info in infos)}
    return {
        "label_names": [],
        "class_weights": {},
        "tokenizer_dir": str(tokenizer_dir),
        "splits": {"text": paths},
        "train_data": train_fingerprint(cfg, combined, tokenizer),
        "unk_fraction": unk,
        "dev_records": None,  # the held-out part is cut when the caches are loaded (TokenizedSplit.held_out)
    }
