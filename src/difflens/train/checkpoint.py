"""Resumable checkpoints under `<out>/train_state/`.

Layout::

    train_state/latest.json          {"step": s, "dir": "step-000000123"}  (written last)
    train_state/step-000000123/
        state.json                   step, tokens, data positions per site
        rng.safetensors              torch RNG state
        <name>/                      the dictionary (dictionaries.io.save)
        <name>.optim.safetensors     Adam moments   (+ <name>.optim.json: groups, step counts)

A checkpoint is built in a temp folder and renamed into place, then `latest.json` is replaced
atomically: a kill at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from difflens.errors import DifflensError
from difflens.utils import atomic_write_bytes, read_json, write_json

STATE_DIR = "train_state"
LATEST = "latest.json"


def state_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR


def latest(out: Path) -> Path | None:
    """The folder of the newest complete checkpoint, or None."""
    sd = state_dir(out)
    pointer = sd / LATEST
    if not pointer.exists():
        return None
    try:
        folder = sd / read_json(pointer)["dir"]
    except (OSError, ValueError, KeyError) as e:
        raise DifflensError(f"{pointer} is unreadable ({e}); delete {sd} to start over") from e
    if not (folder / "state.json").exists():
        raise DifflensError(f"{pointer} points to {folder}, which is incomplete; delete {sd} to start over")
    return folder


def write(out: Path, step: int, fill, keep: int) -> Path:
    """Create a checkpoint for `step`: `fill(folder)` writes its files; then publish and prune."""
    sd = state_dir(out)
    sd.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:09d}"
    tmp = sd / f".{name}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    fill(tmp)
    final = sd / name
    k = 0
    while final.exists():  # re-checkpointing the same step (the end of a resumed, finished run): a new
        k += 1  # name, so the folder latest.json points to stays whole until the pointer moves
        final = sd / f"{name}-{k:03d}"
    os.rename(tmp, final)
    write_json(sd / LATEST, {"step": step, "dir": final.name})
    _prune(sd, keep, final)
    return final


def _prune(sd: Path, keep: int, current: Path) -> None:
    done = sorted(p for p in sd.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in sd.glob(".step-*.tmp"):  # a checkpoint cut by a kill
        shutil.rmtree(leftover, ignore_errors=True)


def save_rng(folder: Path) -> None:
    atomic_write_bytes(folder / "rng.safetensors", st_save({"torch": torch.get_rng_state()}))


def load_rng(folder: Path) -> None:
    path = folder / "rng.safetensors"
    if path.exists():
        torch.set_rng_state(st_load(path.read_bytes())["torch"])


def read_state(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text(encoding="utf-8"))
