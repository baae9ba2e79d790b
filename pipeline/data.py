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

import errno
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, TrainConfig

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


# ----------------------------------------------------------------------------------------------
# Reading and checking files
# ----------------------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_file(path: Path) -> None:
    """Existence, format, UTF-8 and (for JSONL) syntax, each reported with line and column."""
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"{path}: unsupported data format '{path.suffix}', expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    raw = path.read_bytes()
    if not raw.strip():
        raise ConfigError(f"{path}: data file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    if FORMATS[path.suffix.lower()] == "json":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: line {number}, column {e.colno}: invalid JSON ({e.msg})") from None


@dataclass
class Split:
    """One data file: its texts and string labels, in file order."""

    path: Path
    texts: list[str]
    labels: list[str]


def read_split(path: str, text_column: str, label_column: str | None, cache_dir: str) -> Split:
    """Load a JSONL or CSV file with `datasets` and check its text and (unless None) label columns."""
    import datasets

    path = Path(path)
    _check_file(path)
    try:
        ds = datasets.load_dataset(FORMATS[path.suffix.lower()], data_files=str(path), split="train",
                                   cache_dir=str(Path(cache_dir) / "hf_datasets"))
    except Exception as e:  # datasets wraps parser errors in its own; keep the file name in front
        raise ConfigError(f"{path}: could not be read as {path.suffix} data: {e}") from None
    if len(ds) == 0:
        raise ConfigError(f"{path}: data file has no records")
    for column in (text_column, label_column):
        if column is not None and column not in ds.column_names:
            raise ConfigError(f"{path}: no column '{column}' (columns: {', '.join(ds.column_names)}); set text_column/label_column")
    texts = ds[text_column]
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path}: record {row}: '{text_column}' is empty or not text ({text!r})")
    labels = [] if label_column is None else [None if label is None else str(label) for label in ds[label_column]]
    for row, label in enumerate(labels, start=1):
        if label is None or not label.strip():
            raise ConfigError(f"{path}: record {row}: '{label_column}' is empty")
    return Split(path, list(texts), labels)


def label_names_from(train: Split, others: list[Split]) -> list[str]:
    """Sorted label set of the training data; a label only seen in dev/test is an error."""
    names = sorted(set(train.labels))
    if len(names) < 2:
        raise ConfigError(f"{train.path}: found {len(names)} distinct label(s); a classifier needs at least 2")
    known = set(names)
    for split in others:
        for row, label in enumerate(split.labels, start=1):
            if label not in known:
                raise ConfigError(f"{split.path}: record {row}: label '{label}' never appears in the training file {train.path}")
    return names


# ----------------------------------------------------------------------------------------------
# Tokenizing, with an on-disk cache keyed by file content, tokenizer and max length
# ----------------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of vocabulary, normalizer and pre-tokenizer; not of the truncation state a call leaves behind."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None), spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def unknown_fraction(tokenizer, input_ids: list[list[int]]) -> float:
    """Share of non-special tokens that are the unknown token."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    total = unk = 0
    for ids in input_ids:
        for i in ids:
            if i not in special:
                total += 1
                unk += i == tokenizer.unk_token_id
    return unk / max(total, 1)


def tokenize_cached(split: Split, label_names: list[str], tokenizer, max_length: int, cache_dir: str):
    """Tokenize a split once per (file content, tokenizer, max length, labels); reuse it afterwards.

    Returns (path of the cached dataset, whether it was reused). The cache is written to a
    temporary directory and renamed (`build_once`), so an interrupted build is never mistaken for a cache.
    """
    import datasets

    key = hashlib.sha256(json.dumps([file_digest(split.path), tokenizer_fingerprint(tokenizer), max_length,
                                     label_names]).encode()).hexdigest()[:20]
    target = Path(cache_dir) / f"tokenized-{split.path.stem}-{key}"
    if (target / "dataset_info.json").is_file():
        return target, True
    label_ids = {name: i for i, name in enumerate(label_names)}
    encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
    columns = {name: encoded[name] for name in encoded.keys()}
    columns["labels"] = [label_ids[label] for label in split.labels]
    build_once(target, "dataset_info.json", lambda tmp: datasets.Dataset.from_dict(columns).save_to_disk(str(tmp)))
    return target, False


def build_once(target: Path, done: str, build) -> None:
    """Build a cache directory with `build(tmp)` in a private temporary directory, then rename it into place.

    Runs sharing a cache (a sweep) may build the same entry at once: the first rename wins, and a
    later one fails with ENOTEMPTY; finding the entry complete (its file `done` present), the loser
    keeps the winner's copy. The temporary directory goes in every case, so none is left behind.
    """
    tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # unique on a shared file system
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (target / done).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenized(path: str | os.PathLike):
    import datasets

    return datasets.load_from_disk(str(path))


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
        return self.rows["labels"].to_numpy()

    def batch(self, indices) -> dict:
        import pyarrow.compute as pc
        import torch

        table = self.rows[list(indices)]
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
        inside = np.arange(lengths.max()) < lengths[:, None]  # row-major, as the flattened values
        out = {"labels": torch.from_numpy(table.column("labels").to_numpy().astype(np.int64))}
        for name in table.column_names:
            if name != "labels":
                padded = np.full(inside.shape, self.pad_id if name == "input_ids" else 0, dtype=np.int64)
                padded[inside] = pc.list_flatten(table.column(name)).to_numpy()
                out[name] = torch.from_numpy(padded)
        return out


# ----------------------------------------------------------------------------------------------
# Batch order
# ----------------------------------------------------------------------------------------------

def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return num_samples // global_batch


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

    def __init__(self, num_samples: int, micro: int, accum: int, world: int, rank: int, seed: int,
                 epoch: int, start_step: int = 0):
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


def train_batches(split: TokenizedSplit, micro: int, accum: int, world: int, rank: int, seed: int, epoch: int,
                  start_step: int = 0):
    """This rank's padded micro-batches of one epoch, from optimizer step `start_step` on."""
    for indices in RankMicroBatches(len(split), micro, accum, world, rank, seed, epoch, start_step):
        yield split.batch(indices)


def train_fingerprint(cfg: TrainConfig, train: Split, tokenizer) -> dict:
    """What fixes the training batches and their order: a resume must find all of it unchanged."""
    return {"train file content (sha256)": file_digest(train.path), "train records": len(train.texts),
            "text_column": cfg.text_column, "label_column": cfg.label_column, "max_length": cfg.max_length,
            "tokenizer (fingerprint)": tokenizer_fingerprint(tokenizer)}


def prepare_splits(cfg: TrainConfig, tokenizer_for, cache_dir: str, log) -> dict:
    """Rank 0's data work: read and check all files, get a tokenizer, tokenize into the cache.

    `tokenizer_for(train_split)` returns (tokenizer, tokenizer_dir). Returns a small, picklable
    description the other ranks use to load the same cached data.
    """
    train = read_split(cfg.train_file, cfg.text_column, cfg.label_column, cache_dir)
    others = {"dev": read_split(cfg.dev_file, cfg.text_column, cfg.label_column, cache_dir)}
    if cfg.test_file:
        others["test"] = read_split(cfg.test_file, cfg.text_column, cfg.label_column, cache_dir)
    label_names = label_names_from(train, list(others.values()))
    tokenizer, tokenizer_dir = tokenizer_for(train)
    info = {"label_names": label_names, "tokenizer_dir": str(tokenizer_dir), "splits": {},
            "train_data": train_fingerprint(cfg, train, tokenizer)}
    for name, split in {"train": train, **others}.items():
        path, reused = tokenize_cached(split, label_names, tokenizer, cfg.max_length, cache_dir)
        info["splits"][name] = str(path)
        log.info(f"data: {name} {split.path} ({len(split.texts)} records) -> {'reused' if reused else 'built'} cache {path}")
    unk = unknown_fraction(tokenizer, load_tokenized(info["splits"]["train"])["input_ids"])
    if unk > cfg.max_unk_fraction:
        raise ConfigError(
            f"tokenizer {tokenizer_dir}: {unk:.1%} of the training tokens of {train.path} are '{tokenizer.unk_token}' "
            f"(limit max_unk_fraction={cfg.max_unk_fraction:.0%}). The vocabulary does not fit this text; a model "
            "trained so learns from lengths alone. (transformers 5 ignores BertTokenizerFast(vocab_file=...): "
            "load tokenizers with from_pretrained(dir).)"
        )
    info["unk_fraction"] = unk
    return info
