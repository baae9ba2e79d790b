"""Data files, read one record at a time by a reader registered for the file's extension.

Training, evaluation and `predict` all read through `iter_records`. A reader gets the path (for its
messages), the file opened in binary and the text encoding (`--encoding`: what the text formats are
decoded with), so a binary format is one more reader: Parquet and Excel are two.
Every byte reaches the reader through `DigestingFile`, so when the records are exhausted the
SHA-256 of exactly what they were read from is known (data/cache.py checks it against the digest
its cache key was made from).

Read here rather than with `datasets.load_dataset`, whose cache trusts file modification times: a
file rewritten with its old mtime (cp -p, rsync -a, tar) gave the old records.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..core.base import ConfigError

READERS: dict[str, Callable[[Path, BinaryIO, str], Iterator[dict]]] = {}  # extension -> reader(path, binary file, encoding)


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


NOT_DECODED = re.compile("[\udc80-\udcff]")  # a byte the encoding does not decode, as errors="surrogateescape" gives it


def text_lines(path, file: BinaryIO, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, line with its end) of a binary file read as text in `encoding`, one line at a time.

    Lines end at \\n, \\r\\n or \\r (what editors and spreadsheets write, old Macs included) and nowhere
    else: \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028 and \\u2029, common in text pasted from Word or PDFs,
    stay inside their line (str.splitlines() would cut there and shift every later line number).
    A leading UTF-8 byte-order mark is dropped; a byte the encoding does not decode is refused naming
    its line and column, and (for UTF-8, the default) the option that reads a GBK export.
    """
    utf8 = codecs.lookup(encoding).name == "utf-8"
    text = io.TextIOWrapper(file, encoding="utf-8-sig" if utf8 else encoding, errors="surrogateescape", newline="")
    for number, line in enumerate(text, start=1):
        if bad := NOT_DECODED.search(line):
            byte = ord(bad.group()) - 0xDC00
            where = f"{path}: line {number}, column {bad.start() + 1}"
            if utf8:  # hospital systems in China export GBK (GB2312, GB18030): the usual cause
                raise ConfigError(
                    f"{where}: not UTF-8 text (byte 0x{byte:02x}); if the file was saved in another encoding, "
                    "name it, e.g. --encoding gb18030 for GBK or GB2312 exports"
                )
            raise ConfigError(f"{where}: not {encoding} text (byte 0x{byte:02x}); check --encoding")
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
def _jsonl_records(path: Path, file: BinaryIO, encoding: str):
    """JSON Lines, one record per non-blank line."""
    for number, line in text_lines(path, file, encoding):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: line {number}, column {e.colno}: invalid JSON ({e.msg})") from None


@reader(".txt")
def _text_records(path: Path, file: BinaryIO, encoding: str):
    """Plain text (pretraining's unlabelled records): one record per non-blank line, as column 'text'."""
    for _, line in text_lines(path, file, encoding):
        if line.strip():
            yield {"text": line.rstrip("\r\n")}


@reader(".json")
def _json_records(path: Path, file: BinaryIO, encoding: str):
    """A JSON array of records (read at once: large data belongs in JSON Lines), or JSON Lines named .json."""
    if not file.peek(4096)[:4096].removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        yield from _jsonl_records(path, file, encoding)
        return
    text = "".join(line for _, line in text_lines(path, file, encoding))
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    yield from records


# csv's default cell limit is 131,072 characters, and one long record (a whole discharge summary)
# exceeds it. The limit is process-wide; this is the largest a C long holds on every platform.
CSV_FIELD_LIMIT = 2**31 - 1


@reader(".csv", ".tsv")
def _delimited_records(path: Path, file: BinaryIO, encoding: str):
    """Rows of a CSV file, or a tab-separated .tsv file (quoted as CSV), under a header line; every
    value a string, as written. Quoted cells may span lines."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    rows = csv.reader(
        (line for _, line in text_lines(path, file, encoding)), delimiter="\t" if path.suffix.lower() == ".tsv" else ","
    )
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
def _parquet_records(path: Path, file: BinaryIO, encoding: str):
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


# What to do with an .xlsx file where openpyxl is not installed: the steps, in the programs' own words.
EXCEL_STEPS = (
    "reading .xlsx needs openpyxl (pip install -c constraints.txt -e '.[excel]'); or save the sheet as CSV and "
    "give the .csv file: in Excel, File > Save As, 'Save as type': CSV UTF-8 (Comma delimited) (*.csv); in "
    "LibreOffice Calc, File > Save As, 'File type': Text CSV (.csv), then 'Character set': Unicode (UTF-8)"
)


def _cell_text(value) -> str:
    """An Excel cell as a CSV export writes it: empty "", a whole number without ".0", else str()."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@reader(".xlsx")
def _excel_records(path: Path, file: BinaryIO, encoding: str):
    """The first sheet of an Excel workbook, streamed (openpyxl's read-only mode: memory does not grow
    with the sheet): the first row names the columns, each later row with a value is a record. Every
    value a string, as in the sheet's CSV export (see _cell_text); a formula gives its saved result."""
    try:
        import openpyxl
        from openpyxl.utils.exceptions import InvalidFileException
    except ImportError:
        raise ConfigError(f"{path}: {EXCEL_STEPS}") from None
    try:
        book = openpyxl.load_workbook(file, read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, KeyError) as e:
        raise ConfigError(f"{path}: not a readable .xlsx workbook ({e})") from None
    try:
        sheet = book.worksheets[0]
        rows = sheet.iter_rows(values_only=True)
        header = [_cell_text(value) for value in next(rows, ())]
        while header and not header[-1]:  # cells formatted but empty right of the last column
            header.pop()
        if "" in header:
            raise ConfigError(
                f"{path}: sheet '{sheet.title}', row 1: column {header.index('') + 1} of the header is empty; name every column"
            )
        unique_columns(path, header)
        for number, row in enumerate(rows, start=2):
            values = [_cell_text(value) for value in row]
            if any(values[len(header) :]):
                raise ConfigError(
                    f"{path}: sheet '{sheet.title}', row {number}: a value right of the header's {len(header)} columns"
                )
            if any(values):
                yield dict(itertools.zip_longest(header, values[: len(header)], fillvalue=""))
    finally:
        book.close()


def iter_records(path: str | os.PathLike, digest=None, encoding: str = "utf-8"):
    """The records of a data file, in file order, one at a time: a million-record file is never
    held in memory. The reader is the one registered for the file's extension; text formats are
    decoded with `encoding`.

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
        for row, record in enumerate(read(path, file, encoding), start=1):
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
