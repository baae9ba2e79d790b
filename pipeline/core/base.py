"""What every stage shares, and nothing else: the user-error type, configuration files read as UTF-8
and JSON with located errors, atomic writes of files and of cache directories under names unique across
hosts, file digests, URIs shown without their credentials, and which file systems are network ones.
It imports nothing from the package, so anything may import it.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from pathlib import Path


class ConfigError(Exception):
    """Bad user input: the message names the file, key or value and what was expected."""


def load_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, reporting syntax errors with file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def read_utf8(path: str | os.PathLike) -> str:
    """The text of a configuration file (a run file, hostfile, env file, JSON config): these are UTF-8
    whatever the data's --encoding, and one that is not is refused naming the line and byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); configuration files "
            f"must be UTF-8: save it as UTF-8 (e.g. iconv -f gb18030 -t utf-8 {path} > NEW_FILE)"
        ) from None


def is_text_encoding(name: str) -> bool:
    """Whether Python decodes bytes to text under this name (utf-8, gb18030; not rot13 or a typo)."""
    try:
        "a".encode(name)  # (an empty string is encoded without looking the codec up)
    except LookupError:
        return False
    return True


CREDENTIALS = re.compile(r"(?<=://)[^/\s]*@")  # a URI's user:password@ (or token@), up to its last @: a password may hold one


def mask_credentials(text: str) -> str:
    """`text` with every URI's user:password@ shown as ***@ (MLflow's own errors repeat the URI)."""
    return CREDENTIALS.sub("***@", text)


# File systems shared over the network, as /proc/mounts names them: SQLite's locking is not
# reliable there (sqlite.org: howtocorrupt.html, section 2.1; wal.html: WAL does not work over one).
NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "afs", "9p")


MOUNTS = "/proc/mounts"  # Linux's table of mounted file systems


def network_file_system(path: str | os.PathLike, mounts: str | None = None) -> str:
    """The type of the network file system holding `path` (which need not exist yet), or "" for a
    local one or where the mount table (`mounts`, else MOUNTS) cannot be read: the deepest mount
    point above it decides."""
    try:
        lines = Path(mounts or MOUNTS).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    target, best, kind = Path(path).resolve(), "", ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")  # /proc/mounts writes a space in a path as \040
        if target.is_relative_to(point) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind.removeprefix("fuse.") in NETWORK_FILE_SYSTEMS else ""


def unknown_key_message(where: str, key: str, known) -> str:
    hint = difflib.get_close_matches(key, sorted(known), n=1)
    return f"{where}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file atomically: a reader (or a crash) sees the old file or the new one, never half.

    Concurrent writers, on this host or another sharing the file system, never share a temporary name."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{unique_suffix()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def unique_suffix() -> str:
    """HOST-PID-RANDOM: a name no other process uses, on this host or another sharing the file system
    (a pid alone repeats across hosts, and on one host after a restart)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file the mode a plain open() would give it in its directory: writers that go through a
    private temporary file (safetensors) leave it 0600, unreadable to the group the umask would let in.

    The mode is taken from a plain file created beside it, not from the umask: reading the umask
    means setting it, and a file another thread created in that moment would get that mode."""
    path = Path(path)
    probe = path.with_name(f".{path.name}.mode-{socket.gethostname()}-{os.getpid()}")
    probe.touch()
    try:
        os.chmod(path, stat.S_IMODE(probe.stat().st_mode))
    finally:
        probe.unlink()


# --file-access: the permission bits a run takes away from everything it creates, on top of the umask.
CLOSED_TO = {"group": 0o027, "owner": 0o077, "umask": 0o000}


def close_new_files(access: str) -> int:
    """From now on this process (and the processes it starts) creates files and directories no more
    open than `access` allows, whatever the umask: group, others get nothing and the group reads
    (directories 0750, files 0640 under umask 022); owner, the owner alone; umask, as it says. A
    stricter umask stays. Returns the umask now in force.

    One call at the start of a run covers every writer in it (ours, DeepSpeed's torch.save, datasets,
    tokenizers, TensorBoard, the baseline's process) without a chmod after each; the umask belongs to
    the process, and a run is its own process. Reading the umask means setting it: for that moment it
    is 0o077, so a file another thread creates meanwhile is more closed, never open."""
    mask = os.umask(0o077) | CLOSED_TO[access]
    os.umask(mask)
    return mask


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
    tmp = target.with_name(f"{target.name}.tmp-{unique_suffix()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (target / done).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
