"""Data files, read one record at a time by a reader registered for the file's extension.

Training, evaluation and `predict` all read through `iter_records`. A reader gets the path (for its
messages) and the file opened in binary, so a binary format is one more reader: Parquet is one.
Every byte reaches the reader through `DigestingFile`, so when the records are exhausted the
SHA-256 of exactly what they were read from is known (data/cache.py checks it against the digest
its cache key was made from).

Read here rather than with `datasets.load_dataset`, whose cache trusts file modification times: a
file rewritten with its old mtime (cp -p, rsync -a, tar) gave the old records.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..core.base import ConfigError

READERS: dict[str, Callable[[Path, BinaryIO], Iterator[dict]]] = {}  # extension -> reader(path, binary file)


def reader(*extensions: str):
    """Register the decorated function as the reader of files with these extensions."""

    def register(read):
        READERS.update(dict.fromkeys(extensions, read))
        return read

    return register


class DigestingFile(io.RawIOBase):
    """A file opened for reading whose bytes all go into `digest`, each once and in file order.

    A reader that jumps ahead (Parquet reads its footer first) has the bytes it skipped hashed on
    the way; bytes read again are not hashed twice. Everything is read through one open
    descriptor: a file replaced by a rename meanwhile is not seen at all, and one rewritten in
    place gives a digest other than the one taken before reading.
    """

    def __init__(self, path: Path, digest):
        super().__init__()
        self._file = open(path, "rb", buffering=0)
        self.digest = digest
        self._hashed = 0  # the file's first `_hashed` bytes are in the digest

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        start = self._file.tell()
        self._hash_until(start)
        count = self._file.readinto(buffer)
        if start + count > self._hashed:
            self.digest.update(memoryview(buffer)[self._hashed - start : count])
            self._hashed = start + count
        return count

    def finish(self) -> None:
        """Hash whatever the reader left unread, so the digest covers the whole file."""
        self._hash_until(None)

    def _hash_until(self, end: int | None) -> None:
        """Hash the bytes from the last one hashed up to `end` (None: the end of the file); the position is kept."""
        if end is not None and end <= self._hashed:
            return
        position = self._file.tell()
        self._file.seek(self._hashed)
        while block := self._file.read(1 << 20 if end is None else min(1 << 20, end - self._hashed)):
            self.digest.update(block)
            self._hashed += len(block)
        self._file.seek(position)

    def close(self) -> None:
        self._file.close()
        super().close()


NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as errors="surrogateescape" decodes it


def text_lines(path, file: BinaryIO) -> Iterator[tuple[int, str]]:
    """(line number, line with its end) of a binary file read as UTF-8 text, one line at a time.

    Lines end at \\n, \\r\\n or \\r (what editors and spreadsheets write, old Macs included) and nowhere
    else: \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028 and \\u2029, common in text pasted from Word or PDFs,
    stay inside their line (str.splitlines() would cut there and shift every later line number).
    A leading byte-order mark is dropped; a byte that is not UTF-8 is refused naming its line and column.
    """
    text = io.TextIOWrapper(file, encoding="utf-8-sig", errors="surrogateescape", newline="")
    for number, line in enumerate(text, start=1):
        if bad := NOT_UTF8.search(line):
            byte = ord(bad.group()) - 0xDC00
            raise ConfigError(f"{path}: line {number}, column {bad.start() + 1}: not UTF-8 text (byte 0x{byte:02x})")
        yield number, line
    text.detach()  # leaves `file` open for its owner


def unique_columns(path: Path, names: list[str]) -> None:
    """Refuse a header that names a column twice: one of the two would be dropped without a word."""
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{path}: column '{name}' appears twice in the header; give each column its own name")
        seen.add(name)


@reader(".jsonl")
def _jsonl_records(path: Path, file: BinaryIO):
    """JSON Lines, one record per non-blank line."""
    for number, line in text_lines(path, file):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {number}, column {e.colno}: invalid JSON ({e.msg})") from None


@reader(".txt")
def _text_records(path: Path, file: BinaryIO):
    """Plain text (pretraining's unlabelled records): one record per non-blank line, as column 'text'."""
    for _, line in text_lines(path, file):
        if line.strip():
            yield {"text": line.rstrip("\r\n")}


@reader(".json")
def _json_records(path: Path, file: BinaryIO):
    """A JSON array of records (read at once: large data belongs in JSON Lines), or JSON Lines named .json."""
    if not file.peek(4096)[:4096].removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        yield from _jsonl_records(path, file)
        return
    text = "".join(line for _, line in text_lines(path, file))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    yield from records


# csv's default cell limit is 131,072 characters, and one long record (a whole discharge summary)
# exceeds it. The limit is process-wide; this is the largest a C long holds on every platform.
CSV_FIELD_LIMIT = 2**31 - 1


@reader(".csv", ".tsv")
def _delimited_records(path: Path, file: BinaryIO):
    """Rows of a CSV file, or a tab-separated .tsv file (quoted as CSV), under a header line; every
    value a string, as written. Quoted cells may span lines."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    rows = csv.reader((line for _, line in text_lines(path, file)), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        header = next(rows, None)
        if header is None:
            return
        unique_columns(path, header)
        for row in rows:
            if not row:
                continue
            if len(row) != len(header):
                raise ConfigError(f"{path}: line {rows.line_num}: {len(row)} fields, the header has {len(header)}")
            yield dict(zip(header, row))
    except csv.Error as e:
        raise ConfigError(f"{path}: line {rows.line_num}: {e}") from None


PARQUET_BATCH = 1000  # rows per record batch: memory is bounded by this, not by the file


@reader(".parquet")
def _parquet_records(path: Path, file: BinaryIO):
    """Rows of a Parquet file, one record batch at a time; values as Arrow gives them (numbers stay
    numbers, lists lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        unique_columns(path, parquet.schema_arrow.names)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH):
            yield from batch.to_pylist()
    except pa.ArrowException as e:
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from None


def iter_records(path: str | os.PathLike, digest=None):
    """The records of a data file, in file order, one at a time: a million-record file is never
    held in memory. The reader is the one registered for the file's extension.

    `digest` (a hashlib object), if given, takes every byte of the file as it is read: once the
    records are exhausted it is the SHA-256 of exactly what they came from.
    """
    path = Path(path)
    read = READERS.get(path.suffix.lower())
    if read is None:
        raise ConfigError(f"{path}: unknown data format '{path.suffix}'; known formats: {', '.join(READERS)}")
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: data file is empty")
    with DigestingFile(path, digest or hashlib.sha256()) as raw, io.BufferedReader(raw) as file:
        row = 0
        for row, record in enumerate(read(path, file), start=1):
            if not isinstance(record, dict):
                raise ConfigError(f"{path}: record {row}: expected an object with named fields, got {json.dumps(record)[:80]}")
            yield record
        if row == 0:
            raise ConfigError(f"{path}: data file has no records")
        raw.finish()


def require_columns(path: Path, records: list[dict], columns: list[str]) -> None:
    for column in columns:
        if not any(column in record for record in records):
            raise ConfigError(f"{path}: no column '{column}' (columns: {', '.join(records[0])}); set text_column/label_column")
