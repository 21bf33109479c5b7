"""What the example scripts share (kept beside them, so each runs as `python examples/NN_name.py`)."""

from __future__ import annotations

from pathlib import Path


def new_folder(path: str) -> Path:
    """`path`, or `path-2`, `path-3`... if it already holds files: an example never writes over earlier output."""
    p, i = Path(path), 1
    while p.exists() and any(p.iterdir()):
        i += 1
        p = Path(f"{path}-{i}")
    p.mkdir(parents=True, exist_ok=True)
    return p
