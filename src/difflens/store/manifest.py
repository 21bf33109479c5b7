"""Manifest and unit records: what a store holds, and how per-unit commits consolidate.

The per-unit record (units/<unit_id>.json) is the commit: a unit exists once its record does.
manifest.json holds the store's configuration and, after finalize(), a consolidated copy of all
records. Readers take the union of both, so a store is readable before finalize() too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from difflens.errors import DifflensError
from difflens.store.format import (
    ACT_DTYPES,
    FORMAT_NAME,
    MANIFEST,
    SCHEMA_VERSION,
    UNITS_DIR,
    check_site,
    check_unit_id,
    samples_rel,
    shard_rel,
)
from difflens.store.fsio import dumps


def _plain_json(obj: Any, what: str) -> Any:
    """Normalise to what JSON gives back, so configs compare equal after a round trip."""
    try:
        return json.loads(dumps(obj, indent=None))
    except (TypeError, ValueError) as e:
        raise DifflensError(f"{what} must be JSON-serialisable ({e}); pass plain dicts, lists, numbers and strings") from None


@dataclass(frozen=True)
class StoreConfig:
    model: str
    sites: dict[str, int]
    dtype: str
    harvest_config: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model: str, sites: dict[str, int], dtype: str, harvest_config: dict | None) -> StoreConfig:
        if not isinstance(model, str) or not model:
            raise DifflensError(f"model must be a non-empty string (hub id, folder or 'toy'), got {model!r}")
        if dtype not in ACT_DTYPES:
            raise DifflensError(f"dtype {dtype!r} is not supported: use one of {sorted(ACT_DTYPES)}")
        if not isinstance(sites, dict) or not sites:
            raise DifflensError("sites must be a non-empty dict {site: d}, e.g. {'transformer_blocks.18:img': 3072}")
        clean: dict[str, int] = {}
        for s, d in sites.items():
            check_site(s)
            if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
                raise DifflensError(f"site {s!r}: width d must be a positive int, got {d!r}")
            clean[s] = int(d)
        hc = _plain_json(harvest_config or {}, "harvest_config")
        if not isinstance(hc, dict):
            raise DifflensError(f"harvest_config must be a dict, got {type(harvest_config).__name__}")
        return cls(model=model, sites=dict(sorted(clean.items())), dtype=dtype, harvest_config=hc)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, js: dict) -> StoreConfig:
        return cls(model=js["model"], sites=dict(js["sites"]), dtype=js["dtype"], harvest_config=js["harvest_config"])

    def differences(self, other: StoreConfig) -> list[str]:
        return [f for f in ("model", "sites", "dtype", "harvest_config") if getattr(self, f) != getattr(other, f)]


@dataclass(frozen=True)
class UnitRecord:
    """The commit record of one unit of harvest work."""

    unit_id: str
    shard: str  # path relative to the store root
    bytes: int
    sha256: str
    rows: dict[str, int]  # site -> rows in this unit (absent site = 0 rows)
    samples: str | None = None
    samples_sha256: str | None = None
    num_samples: int = 0
    images: list[int] = field(default_factory=list)
    config: int = 0  # index into manifest["configs"]
    written_at: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, js: dict, where: str) -> UnitRecord:
        try:
            rec = cls(
                unit_id=check_unit_id(js["unit_id"]),
                shard=str(js["shard"]),
                bytes=int(js["bytes"]),
                sha256=str(js["sha256"]),
                rows={str(k): int(v) for k, v in js["rows"].items()},
                samples=js.get("samples"),
                samples_sha256=js.get("samples_sha256"),
                num_samples=int(js.get("num_samples", 0)),
                images=[int(i) for i in js.get("images", [])],
                config=int(js.get("config", 0)),
                written_at=float(js.get("written_at", 0.0)),
            )
            if rec.shard != shard_rel(rec.unit_id) or rec.samples not in (None, samples_rel(rec.unit_id)):
                raise ValueError(
                    f"its paths ({rec.shard!r}, {rec.samples!r}) are not the unit's own files "
                    f"{shard_rel(rec.unit_id)!r} / {samples_rel(rec.unit_id)!r}"
                )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DifflensError(
                f"unit record {where} is malformed ({type(e).__name__}: {e}). Fix: run `difflens store repair "
                "<store>` (it sets the unit aside), then re-run the harvest with --resume to regenerate that unit"
            ) from None
        return rec


def new_manifest(config: StoreConfig, now: float) -> dict:
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "model": config.model,
        "dtype": config.dtype,
        "sites": dict(config.sites),
        "harvest_config": config.harvest_config,
        "configs": [{**config.to_json(), "added_at": now}],
        "created_at": now,
        "finalized_at": None,
        "num_rows": {s: 0 for s in config.sites},
        "shards": [],
    }


def configs_of(manifest: dict) -> list[StoreConfig]:
    return [StoreConfig.from_json(c) for c in manifest["configs"]]


def load_manifest(root: Path) -> dict | None:
    """The manifest, or None if the folder has none; refuses other formats and newer schemas."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise DifflensError(f"{path} is unreadable ({e}); restore it from the unit records by re-opening with StoreWriter") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise DifflensError(f"{path} is not a difflens store manifest (format field is {m.get('format')!r})")
    v = m.get("schema_version")
    if not isinstance(v, int) or v > SCHEMA_VERSION:
        raise DifflensError(
            f"{root} has store schema version {v}, this difflens reads up to {SCHEMA_VERSION}: upgrade difflens"
        )
    check_manifest_fields(path, m)
    return m


def check_manifest_fields(path: Path, m: dict) -> None:
    """The fields every reader relies on, so a damaged manifest is named instead of crashing a reader."""
    problems = []
    if m.get("dtype") not in ACT_DTYPES:
        problems.append(f"dtype is {m.get('dtype')!r} (must be one of {sorted(ACT_DTYPES)})")
    sites = m.get("sites")
    if not isinstance(sites, dict) or not sites:
        problems.append("sites is not a non-empty {site: width} object")
    else:
        bad = [s for s, d in sites.items() if isinstance(d, bool) or not isinstance(d, int) or d <= 0]
        if bad:
            problems.append(f"sites {bad} have no positive integer width")
    if not isinstance(m.get("configs"), list) or not m["configs"]:
        problems.append("configs is not a non-empty list")
    if not isinstance(m.get("shards", []), list):
        problems.append("shards is not a list")
    if problems:
        raise DifflensError(
            f"{path} is damaged: {'; '.join(problems)}. The shards are not blamed: run `difflens store repair "
            f"{path.parent}` to restore these fields from the shards, or restore manifest.json from a backup"
        )


def load_records(root: Path, manifest: dict, bad: list | None = None) -> list[UnitRecord]:
    """Union of the manifest's consolidated records and the per-unit commit files, by unit id.

    With `bad` (a list), malformed records are collected there as (unit id or file, message)
    instead of raising, so `difflens store repair` can drop them.
    """
    by_id: dict[str, UnitRecord] = {}

    def take(js, where: str, unit_hint: str) -> None:
        try:
            if not isinstance(js, dict):
                raise DifflensError(f"unit record {where} is malformed (not a JSON object). Fix: run `difflens store "
                                    f"repair {root}`, then re-run the harvest with --resume")
            rec = UnitRecord.from_json(js, where)
        except DifflensError as e:
            if bad is None:
                raise
            bad.append((str(js.get("unit_id")) if isinstance(js, dict) and js.get("unit_id") else unit_hint, str(e)))
            return
        by_id[rec.unit_id] = rec

    for i, js in enumerate(manifest.get("shards", [])):
        take(js, f"{root / MANIFEST} (shards entry {i})", f"shards[{i}]")
    units = root / UNITS_DIR
    if units.is_dir():
        for entry in sorted(os.scandir(units), key=lambda e: e.name):
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            try:
                with open(entry.path, encoding="utf-8") as f:
                    js = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                msg = (f"unit record {entry.path} is not valid JSON ({e}). Fix: run `difflens store repair {root}`, "
                       "then re-run the harvest with --resume to regenerate that unit")
                if bad is None:
                    raise DifflensError(msg) from None
                bad.append((entry.name[: -len(".json")], msg))
                continue
            take(js, entry.path, entry.name[: -len(".json")])  # the commit file is the source of truth
    return [by_id[k] for k in sorted(by_id)]


def consolidate(manifest: dict, records: list[UnitRecord], now: float | None = None) -> dict:
    m = dict(manifest)
    m["shards"] = [r.to_json() for r in records]
    m["num_rows"] = {s: sum(r.rows.get(s, 0) for r in records) for s in m["sites"]}
    if now is not None:
        m["finalized_at"] = now
    return m


def fingerprint(manifest: dict, records: list[UnitRecord]) -> str:
    """16 hex chars over everything that defines the content (not timestamps)."""
    content = {
        "format": manifest["format"],
        "schema_version": manifest["schema_version"],
        "dtype": manifest["dtype"],
        "sites": manifest["sites"],
        "configs": [{k: v for k, v in c.items() if k != "added_at"} for c in manifest["configs"]],
        "units": [[r.unit_id, r.sha256, r.rows, r.samples_sha256, r.images, r.config] for r in records],
    }
    blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
