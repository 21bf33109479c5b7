"""Repairing a damaged store so that `harvest --resume` regenerates exactly what was lost.

`repair` first restores manifest fields (dtype, site widths) that every shard contradicts in the
same way, then checks every unit (`Store.check_units`) and sets each damaged one aside: its unit
record, shard and samples file move to `quarantine/<time>/` (nothing is deleted) and its entry
leaves the manifest's shard list. The unit ids are then free again, and units are numbered
deterministically, so a `harvest --resume` with the original settings rewrites them exactly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from difflens.errors import DifflensError
from difflens.store.format import (
    ACT_DTYPES,
    FORMAT_NAME,
    LOCK_FILE,
    MANIFEST,
    UNITS_DIR,
    check_unit_id,
    samples_rel,
    shard_rel,
)
from difflens.store.fsio import inside, locked, write_json_atomic
from difflens.store.integrity import header_layout
from difflens.store.manifest import check_manifest_fields, load_records
from difflens.store.shardfile import SafetensorsFile

QUARANTINE_DIR = "quarantine"


def _raw_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DifflensError(f"{root} is not a difflens store (no {MANIFEST}): point to a harvest output folder") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DifflensError(f"{path} is unreadable ({e}); it cannot be repaired automatically: restore it from a backup") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise DifflensError(f"{path} is not a difflens store manifest: point to a harvest output folder")
    return m


def restore_layout(root: Path, manifest: dict, records) -> list[str]:
    """Set manifest dtype / site widths from the shards when all shards agree; returns what changed."""
    changes: list[str] = []
    layouts: dict[str, set] = {}
    for rec in records:
        try:
            f = SafetensorsFile(inside(root, rec.shard, "shard path"))
        except DifflensError:
            continue
        for site, n in rec.rows.items():
            if n:
                layouts.setdefault(site, set()).add(header_layout(f, site))
    agreed = {s: next(iter(v)) for s, v in layouts.items() if len(v) == 1 and None not in v}
    st_names = {v.st: k for k, v in ACT_DTYPES.items()}
    dtypes = {st_names.get(st) for st, _ in agreed.values()}
    if len(dtypes) == 1 and None not in dtypes:
        dtype = dtypes.pop()
        if manifest.get("dtype") != dtype:
            changes.append(f"dtype {manifest.get('dtype')!r} -> {dtype!r}")
            manifest["dtype"] = dtype
            for c in manifest.get("configs") or []:
                if isinstance(c, dict):
                    c["dtype"] = dtype
    sites = manifest.get("sites") if isinstance(manifest.get("sites"), dict) else {}
    for site, (_, d) in sorted(agreed.items()):
        if sites.get(site) != d:
            changes.append(f"sites[{site!r}] {sites.get(site)!r} -> {d}")
            sites[site] = d
            for c in manifest.get("configs") or []:
                if isinstance(c, dict) and isinstance(c.get("sites"), dict) and site in c["sites"]:
                    c["sites"][site] = d
    manifest["sites"] = dict(sorted(sites.items()))
    return changes


def _set_aside(root: Path, unit_ids: set[str], bad_files: list[str], folder: Path) -> list[str]:
    moved = []
    paths = [f"{UNITS_DIR}/{name}" for name in bad_files]
    for u in sorted(unit_ids):
        try:
            check_unit_id(u)
        except DifflensError:
            continue
        paths += [f"{UNITS_DIR}/{u}.json", shard_rel(u), samples_rel(u)]
    for rel in dict.fromkeys(paths):
        src = root / rel
        if not src.is_file() and not src.is_symlink():
            continue
        dst = folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)  # a rename inside the store: the link itself moves, never its target
        moved.append(rel)
    return moved


def repair(path: str | os.PathLike, *, dry_run: bool = False) -> dict:
    """Restore the manifest from the shards, set damaged units aside; returns what was done."""
    from difflens.store.reader import Store

    root = Path(path)
    if not root.is_dir():
        raise DifflensError(f"store {root} does not exist: pass the folder a harvest wrote")
    with locked(root / LOCK_FILE):
        manifest = _raw_manifest(root)
        bad_records: list = []
        records = load_records(root, manifest, bad=bad_records)
        layout_changes = restore_layout(root, manifest, records)
        check_manifest_fields(root / MANIFEST, manifest)  # what the shards cannot tell is not guessed
        if layout_changes and not dry_run:
            write_json_atomic(root / MANIFEST, manifest)
        bad: dict[str, list[str]] = {}
        bad_files: list[str] = []
        for unit, msg in bad_records:
            bad.setdefault(unit, []).append(msg)
            if (root / UNITS_DIR / f"{unit}.json").is_file():
                bad_files.append(f"{unit}.json")
        if not dry_run or not layout_changes:
            store = Store.from_parts(root, manifest, records)
            for u, problems in store.check_units(show_progress=False).items():
                bad.setdefault(u, []).extend(problems)
        moved: list[str] = []
        if bad and not dry_run:
            folder = root / QUARANTINE_DIR / time.strftime("%Y%m%d-%H%M%S")
            moved = _set_aside(root, set(bad), bad_files, folder)
            keep = [js for js in manifest.get("shards", []) if isinstance(js, dict) and js.get("unit_id") not in bad]
            manifest["shards"] = keep
            manifest["num_rows"] = {s: sum(int((js.get("rows") or {}).get(s, 0)) for js in keep) for s in manifest["sites"]}
            manifest["finalized_at"] = None
            manifest.pop("fingerprint", None)
            write_json_atomic(root / MANIFEST, manifest)
    return {"store": str(root), "manifest_fixes": layout_changes, "damaged_units": {u: bad[u] for u in sorted(bad)},
            "set_aside": moved, "dry_run": dry_run, "units_ok": len(records) - len(set(bad) & {r.unit_id for r in records})}


__all__ = ["repair", "restore_layout", "QUARANTINE_DIR"]
