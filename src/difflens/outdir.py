"""Output folders: a command writes only where it may, and never deletes what it did not write.

The rule for every `--out`: the folder is new (we create it), empty, or carries the marker file
`.difflens-out.json` that this same kind of command wrote earlier (with a matching identity when
the command has one). Anything else is refused with a message naming what is in the way; nothing
is changed or deleted. docs/security.md states the guarantee.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from difflens.errors import DifflensError

MARKER = ".difflens-out.json"


def os_error_message(e: OSError, path: str | os.PathLike, action: str = "write") -> str:
    """One wording for file-system failures: what failed, where, and what to do about it."""
    where = getattr(e, "filename", None) or path
    if e.errno == errno.ENOSPC:
        return f"the disk is full while writing {where}: free some space, then re-run (with --resume where the command has it)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot {action} {where} ({e.strerror}): choose a folder you can write to"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"cannot {action} {where}: a file is in the way of a folder ({e.strerror}); choose another path"
    return f"cannot {action} {where} ({e.strerror or e})"


def read_marker(folder: Path) -> dict | None:
    p = Path(folder) / MARKER
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) else None


def check_out_dir(path: str | os.PathLike, kind: str, identity: dict | None = None, *, flag: str = "--out",
                  accept_if=None) -> Path:
    """Refuse (DifflensError) unless `path` is absent, an empty folder, or carries our marker for `kind`.

    `accept_if(folder) -> bool` lets a command also accept its own outputs written before markers
    existed (e.g. a store's manifest.json); it must check a format field, not just a file name.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DifflensError(f"{flag} {p} is a file, not a folder: pass a folder path (it is created if missing)")
    if not p.is_dir():
        return p
    marker = read_marker(p)
    if marker is not None:
        if marker.get("kind") != kind:
            raise DifflensError(
                f"{flag} {p} holds the output of `difflens {marker.get('kind')}`, not `difflens {kind}`: "
                "choose a new or empty folder (nothing was changed)"
            )
        old = marker.get("identity")
        if identity is not None and old is not None and old != identity:
            diffs = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in diffs[:5])
            raise DifflensError(
                f"{flag} {p} holds a `difflens {kind}` output made with other settings ({shown}): "
                "choose a new folder, or repeat the original settings (nothing was changed)"
            )
        return p
    try:
        entries = sorted(os.listdir(p))
    except OSError as e:
        raise DifflensError(os_error_message(e, p, "read")) from None
    if entries and not (accept_if is not None and accept_if(p)):
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise DifflensError(
            f"{flag} {p} already holds files that `difflens {kind}` did not write ({shown}): "
            "choose a new or empty folder (nothing was changed or deleted)"
        )
    return p


def claim_out_dir(path: str | os.PathLike, kind: str, identity: dict | None = None, *, flag: str = "--out",
                  accept_if=None) -> Path:
    """check_out_dir, then create the folder and write our marker so a later run recognises it."""
    p = check_out_dir(path, kind, identity, flag=flag, accept_if=accept_if)
    try:
        p.mkdir(parents=True, exist_ok=True)
        if read_marker(p) is None or (identity is not None and read_marker(p).get("identity") is None):
            from difflens.store.fsio import write_json_atomic

            write_json_atomic(p / MARKER, {"format": "difflens-output", "kind": kind, "identity": identity})
    except OSError as e:
        raise DifflensError(os_error_message(e, p)) from None
    return p


__all__ = ["MARKER", "check_out_dir", "claim_out_dir", "os_error_message", "read_marker"]
