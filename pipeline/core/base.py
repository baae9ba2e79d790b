"""What every stage shares, and nothing else: the user-error type, JSON read with located errors,
atomic writes of files and of cache directories, and file digests. It imports nothing from the package, so anything may import it.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path


class ConfigError(Exception):
    """Bad user input: the message names the file, key or value and what was expected."""


def load_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, reporting syntax errors with file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def unknown_key_message(where: str, key: str, known) -> str:
    hint = difflib.get_close_matches(key, sorted(known), n=1)
    return f"{where}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file atomically: a reader (or a crash) sees the old file or the new one, never half.

    The temporary name carries the pid, so concurrent writers never share one."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file the mode a plain open() would have: writers that go through a private temporary
    file (safetensors) leave it 0600, unreadable to the group the umask would let in."""
    mask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def free_port() -> int:
    """A port no one listens on now (the kernel's choice), as torchrun --standalone takes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disk_full(error: BaseException) -> bool:
    """Whether `error` is the file system running out of space (or of the user's quota)."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2))


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
