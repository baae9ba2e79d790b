"""Data files, read one record at a time: JSON Lines, a JSON array, CSV.

Read here rather than with `datasets.load_dataset`, whose cache trusts file modification times: a
file rewritten with its old mtime (cp -p, rsync -a, tar) gave the old records.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..core.base import ConfigError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


def _lines(path: Path):
    """(line number, text) of each line, read one at a time; UTF-8 errors name the line and column."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8").removeprefix("\ufeff") if number == 1 else raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"{path}: line {number}, column {e.start + 1}: not UTF-8 text (byte 0x{raw[e.start]:02x})"
                ) from None


def _jsonl_records(path: Path, lines):
    """JSON Lines, one record per non-blank line."""
    for number, line in lines:
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {number}, column {e.colno}: invalid JSON ({e.msg})") from None


def _json_array(path: Path):
    """A whole JSON array (read at once: large data belongs in JSON Lines or CSV)."""
    text = "".join(line for _, line in _lines(path))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path}: expected a JSON array of records or JSON Lines")
    yield from records


def _csv_records(path: Path, lines):
    """Rows of a CSV file with a header line; every value a string, as written."""
    reader = csv.reader(line for _, line in lines)
    header = next(reader, None)
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise ConfigError(f"{path}: line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
        yield dict(zip(header, row))


def _starts_with(path: Path, char: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(char)


def iter_records(path: str | os.PathLike):
    """The records of a JSONL, JSON or CSV file, in file order, one at a time: a million-record
    file is never held in memory.

    Read here rather than with `datasets.load_dataset`, whose cache trusts file modification
    times: a file rewritten with its old mtime (cp -p, rsync -a, tar) gave the old records.
    """
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"{path}: unsupported data format '{path.suffix}', expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    if not any(line.strip() for _, line in _lines(path)):
        raise ConfigError(f"{path}: data file is empty")
    if FORMATS[path.suffix.lower()] == "csv":
        records = _csv_records(path, _lines(path))
    elif path.suffix.lower() == ".json" and _starts_with(path, b"["):
        records = _json_array(path)
    else:
        records = _jsonl_records(path, _lines(path))
    row = 0
    for row, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: record {row}: expected an object with named fields, got {json.dumps(record)[:80]}")
        yield record
    if row == 0:
        raise ConfigError(f"{path}: data file has no records")


def read_records(path: str | os.PathLike) -> list[dict]:
    """All records of a (small) file, e.g. predict's input."""
    return list(iter_records(path))


def require_columns(path: Path, records: list[dict], columns: list[str]) -> None:
    for column in columns:
        if not any(column in record for record in records):
            raise ConfigError(f"{path}: no column '{column}' (columns: {', '.join(records[0])}); set text_column/label_column")
