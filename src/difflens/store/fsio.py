"""Crash-safe file writes for a store shared by several processes.

Temp files carry the writer's host and pid in their name, so a process can tell a dead
writer's leftovers (safe to delete) from a live writer's work in progress (not ours to touch).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?P<tok>[0-9a-f]{8})\.tmp$")


def temp_path(final: Path) -> Path:
    return final.parent / f".{final.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def inside(root: Path, rel: str | os.PathLike, what: str = "path") -> Path:
    """`root / rel`, refused (DifflensError) when it would leave `root`: absolute, `..`, or a link out.

    Every file a store, an interpretation or the browser reads from a folder goes through this, so
    a tampered record or a planted symlink cannot make difflens read (or copy, or serve) other files.
    """
    from difflens.errors import DifflensError

    text = os.fspath(rel)
    relp = Path(text)
    if not text or relp.is_absolute() or ".." in relp.parts or "\x00" in text or text.startswith("~"):
        raise DifflensError(f"{what} {text!r} is not a plain path inside {root}: refused (the record was altered?)")
    path = Path(root) / relp
    real_root, real = Path(root).resolve(), path.resolve()
    if real != real_root and real_root not in real.parents:
        raise DifflensError(
            f"{path} leads out of {root} (a link to {real}): refused; put the file itself there instead of a link"
        )
    return path


def is_temp_name(name: str) -> bool:
    return _TEMP.match(name) is not None


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def write_atomic(final: Path, fill: Callable[[BinaryIO], Any]) -> Any:
    """Write via `fill(file)` to a temp name, fsync, rename over `final`; returns fill's result."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        with open(tmp, "wb") as f:
            result = fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)
    return result


def write_bytes_atomic(final: Path, data: bytes) -> None:
    write_atomic(final, lambda f: f.write(data))


def json_default(obj: Any) -> Any:
    """Let numpy scalars/arrays and paths into JSON; anything else is a caller bug."""
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(obj: Any, *, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=json_default, allow_nan=False)


def write_json_atomic(final: Path, obj: Any) -> None:
    write_bytes_atomic(final, (dumps(obj) + "\n").encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_files(root: Path, subdirs: tuple[str, ...]) -> Iterator[tuple[Path, str, int]]:
    """Yield (path, host, pid) of every store temp file under root and its subdirs."""
    for d in (root, *(root / s for s in subdirs)):
        if not d.is_dir():
            continue
        for entry in os.scandir(d):
            m = _TEMP.match(entry.name)
            if m and entry.is_file():
                yield Path(entry.path), m["host"], int(m["pid"])


def clean_temp_files(root: Path, subdirs: tuple[str, ...], *, everything: bool = False) -> int:
    """Delete leftovers of dead writers on this host (or all temp files if `everything`)."""
    removed = 0
    for path, host, pid in temp_files(root, subdirs):
        if everything or (host == _HOST and pid != os.getpid() and not _pid_alive(pid)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock around manifest read-modify-write (several writers may open at once)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: best effort, single writer assumed
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
