"""StoreWriter: commits units of harvest work so that a kill at any moment leaves a consistent store.

Protocol per unit: images, samples part and shard are each written to a temp name, fsynced
and renamed; only then is units/<unit_id>.json written (same way). That record is the commit.
Files of a unit without a record are invisible to readers and are overwritten when the unit is
redone. Writers of different units never touch the same file, so ranks can write concurrently.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.store import stats as stats_mod
from difflens.store.format import (
    ACT_DTYPES,
    COLUMNS,
    FORMAT_NAME,
    IMAGES_DIR,
    LOCK_FILE,
    MANIFEST,
    NUMPY_TO_ST,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SAMPLES_DIR,
    SCHEMA_VERSION,
    SHARDS_DIR,
    STATS_JSON,
    STATS_TENSORS,
    UNITS_DIR,
    check_unit_id,
    image_rel,
    samples_rel,
    shard_rel,
    stats_tensor_name,
    tensor_name,
    unit_record_rel,
)
from difflens.store.fsio import (
    clean_temp_files,
    dumps,
    is_temp_name,
    locked,
    write_bytes_atomic,
    write_json_atomic,
)
from difflens.store.manifest import (
    StoreConfig,
    UnitRecord,
    configs_of,
    consolidate,
    fingerprint,
    load_manifest,
    load_records,
    new_manifest,
)
from difflens.store.shardfile import write_safetensors

_SUBDIRS = (UNITS_DIR, SHARDS_DIR, SAMPLES_DIR, IMAGES_DIR)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config_diff(old: StoreConfig, new: StoreConfig) -> str:
    """Exactly which settings differ, with both values: 'harvest_config.steps: 4 -> 6; dtype: ...'."""
    parts = []
    for f in old.differences(new):
        a, b = getattr(old, f), getattr(new, f)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if a.get(k, "<unset>") != b.get(k, "<unset>"):
                    parts.append(f"{f}.{k}: stored {a.get(k, '<unset>')!r}, requested {b.get(k, '<unset>')!r}")
        else:
            parts.append(f"{f}: stored {a!r}, requested {b!r}")
    return "; ".join(parts)


class StoreWriter:
    """Writes units into a store directory; one instance per process (rank)."""

    def __init__(self, root: Path, config: StoreConfig, config_index: int, first_sample_id: int = 0):
        self.root = root
        self.config = config
        self.config_index = config_index
        self.first_sample_id = first_sample_id  # > 0 for a configuration appended to a store
        self.act = ACT_DTYPES[config.dtype]

    def unit_id(self, u: int) -> str:
        """The id of unit number `u` of this configuration; appended configurations get fresh ids."""
        return f"u{int(u):07d}" if self.config_index == 0 else f"c{self.config_index}-u{int(u):07d}"

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        model: str,
        sites: dict[str, int],
        dtype: str,
        harvest_config: dict,
        append: bool = False,
        resume: bool | None = None,
    ) -> StoreWriter:
        """Create a store, or reopen one to resume; another config needs append=True.

        resume=False (a plain rerun) refuses a store that already holds units; a store with a
        manifest but no unit (a run that failed before its first commit) is taken over afresh.
        resume=None keeps the old behaviour (reopen whatever matches).
        """
        cfg = StoreConfig.build(model, sites, dtype, harvest_config)
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise DifflensError(f"{root} is a file, not a store folder: choose another output path")
        try:
            root.mkdir(parents=True, exist_ok=True)
            return cls._open_locked(root, cfg, append, resume)
        except OSError as e:
            from difflens.outdir import os_error_message

            raise DifflensError(os_error_message(e, root)) from None

    @classmethod
    def _open_locked(cls, root: Path, cfg: StoreConfig, append: bool, resume: bool | None) -> StoreWriter:
        with locked(root / LOCK_FILE):
            manifest = load_manifest(root)
            fresh = False
            if (manifest is not None and not append and len(manifest["configs"]) == 1
                    and cfg not in configs_of(manifest) and not load_records(root, manifest)):
                manifest, fresh = None, True  # a run that failed before its first commit: nothing to keep
            if manifest is None:
                strays = sorted(p.name for p in root.iterdir() if p.name != LOCK_FILE and not is_temp_name(p.name))
                if strays and not fresh:
                    raise DifflensError(
                        f"{root} is not empty ({', '.join(strays[:5])}) and holds no {MANIFEST}: "
                        "harvest into a new or empty folder"
                    )
                write_json_atomic(root / MANIFEST, new_manifest(cfg, time.time()))
                index, first = 0, 0
            else:
                if resume is False and not append and load_records(root, manifest):
                    raise DifflensError(
                        f"{root} already holds a store with committed units: pass --resume to continue that "
                        "harvest, --append to add another configuration, or choose a new --out"
                    )
                index = cls._admit(root, manifest, cfg, append)
                first = int(load_manifest(root)["configs"][index].get("first_sample_id", 0))
            for d in _SUBDIRS:
                (root / d).mkdir(exist_ok=True)
        clean_temp_files(root, _SUBDIRS)
        return cls(root, cfg, index, first)

    @staticmethod
    def _admit(root: Path, manifest: dict, cfg: StoreConfig, append: bool) -> int:
        known = configs_of(manifest)
        if cfg in known:
            return known.index(cfg)
        if not append:
            raise DifflensError(
                f"{root} already holds a store with a different {', '.join(cfg.differences(known[-1]))} "
                f"({_config_diff(known[-1], cfg)}). "
                "Fix: repeat the stored settings to resume, harvest into a new folder, or pass append=True "
                "(--append) to add units with this configuration to the same store"
            )
        if cfg.dtype != manifest["dtype"]:
            raise DifflensError(
                f"{root} stores {manifest['dtype']} activations; appending {cfg.dtype} would mix dtypes. "
                f"Fix: use dtype={manifest['dtype']!r} or a new folder"
            )
        for s, d in cfg.sites.items():
            if s in manifest["sites"] and manifest["sites"][s] != d:
                raise DifflensError(
                    f"site {s} has d={manifest['sites'][s]} in {root} but d={d} was requested: "
                    "a site's width cannot change; use a new folder"
                )
        records = load_records(root, manifest)
        first = max((_max_sample_id(root, r) for r in records), default=-1) + 1
        manifest["configs"].append({**cfg.to_json(), "added_at": time.time(), "first_sample_id": first})
        manifest["sites"] = dict(sorted({**manifest["sites"], **cfg.sites}.items()))
        manifest["num_rows"] = {s: manifest.get("num_rows", {}).get(s, 0) for s in manifest["sites"]}
        write_json_atomic(root / MANIFEST, manifest)
        return len(manifest["configs"]) - 1

    def done_units(self) -> set[str]:
        """Ids of committed units (by any process): skip these when resuming."""
        manifest = load_manifest(self.root) or {}
        return {r.unit_id for r in load_records(self.root, manifest)} if manifest else set()

    # ---- writing one unit -------------------------------------------------------------------

    def write_unit(
        self,
        unit_id: str,
        rows: dict[str, tuple],
        samples: list[dict] | None = None,
        images: dict[int, bytes] | None = None,
    ) -> UnitRecord:
        """Write a unit's shard, samples and images, then commit it; returns the commit record."""
        try:
            return self._write_unit(unit_id, rows, samples, images)
        except OSError as e:  # a full disk or a folder turned read-only: the unit is simply not committed
            from difflens.outdir import os_error_message

            raise DifflensError(os_error_message(e, self.root)) from None

    def _write_unit(self, unit_id: str, rows: dict, samples, images) -> UnitRecord:
        check_unit_id(unit_id)
        record_path = self.root / unit_record_rel(unit_id)
        if record_path.exists():
            raise DifflensError(
                f"unit {unit_id} is already committed in {self.root}: skip the ids in done_units() when resuming"
            )
        if not isinstance(rows, dict):
            raise DifflensError(f"unit {unit_id}: rows must be a dict {{site: (acts_ND, meta)}}, got {type(rows).__name__}")
        tensors: list[tuple[str, np.ndarray, str]] = []
        counts: dict[str, int] = {}
        for site in sorted(rows):
            tensors += self._site_tensors(unit_id, site, rows[site], counts)
        sample_lines = _check_samples(unit_id, samples, images)
        image_ids = _check_images(unit_id, images)

        for sid in image_ids:
            write_bytes_atomic(self.root / image_rel(sid), images[sid])
        samples_path = samples_sha = None
        if sample_lines:
            blob = "".join(line + "\n" for line in sample_lines).encode("utf-8")
            samples_path = samples_rel(unit_id)
            write_bytes_atomic(self.root / samples_path, blob)
            samples_sha = hashlib.sha256(blob).hexdigest()
        nbytes, sha = write_safetensors(
            self.root / shard_rel(unit_id),
            tensors,
            {"format": FORMAT_NAME, "schema_version": str(SCHEMA_VERSION), "unit_id": unit_id, "dtype": self.act.name},
        )
        record = UnitRecord(
            unit_id=unit_id,
            shard=shard_rel(unit_id),
            bytes=nbytes,
            sha256=sha,
            rows=counts,
            samples=samples_path,
            samples_sha256=samples_sha,
            num_samples=len(sample_lines),
            images=image_ids,
            config=self.config_index,
            written_at=time.time(),
        )
        self._commit(record_path, record)
        return record

    def _commit(self, record_path: Path, record: UnitRecord) -> None:
        write_json_atomic(record_path, record.to_json())

    def _site_tensors(self, unit_id: str, site: str, pair, counts: dict[str, int]) -> list:
        where = f"unit {unit_id}, site {site}"
        if site not in self.config.sites:
            raise DifflensError(f"{where}: unknown site; this store's sites are {sorted(self.config.sites)}")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[1], dict):
            raise DifflensError(f"{where}: expected a pair (acts_ND, meta dict), got {type(pair).__name__}")
        acts, meta = pair
        raw_ND, values_ND = _convert_acts(acts, self.config.sites[site], self.config.dtype, where)
        n = raw_ND.shape[0]
        cols = _check_meta(meta, n, where)
        counts[site] = n
        out = [(tensor_name(site, "acts"), raw_ND, self.act.st)]
        out += [(tensor_name(site, c), a, NUMPY_TO_ST[a.dtype]) for c, a in cols.items()]
        part = stats_mod.partial_sums(values_ND, cols["timestep"])
        out += [(stats_tensor_name(site, p), a, NUMPY_TO_ST[a.dtype]) for p, a in part.items()]
        return out

    # ---- consolidation ----------------------------------------------------------------------

    def finalize(self, *, prune: bool = False) -> dict:
        """Consolidate records into manifest.json and write stats; safe to call while others write.

        prune=True also deletes every temp file and uncommitted shard: only when no writer runs.
        """
        with locked(self.root / LOCK_FILE):
            manifest = load_manifest(self.root)
            records = load_records(self.root, manifest)
            fp = fingerprint(manifest, records)
            site_stats = list(stats_mod.collect(self.root, manifest["sites"], records, show_progress=True).values())
            tensors = [t for st in site_stats for t in st.tensors()]
            write_safetensors(self.root / STATS_TENSORS, tensors, {"fingerprint": fp})
            write_json_atomic(
                self.root / STATS_JSON,
                {"schema_version": SCHEMA_VERSION, "fingerprint": fp, "sites": {st.site: st.to_json() for st in site_stats}},
            )
            consolidated = consolidate(manifest, records, time.time())
            consolidated["fingerprint"] = fp
            write_json_atomic(self.root / MANIFEST, consolidated)
            if prune:
                clean_temp_files(self.root, _SUBDIRS, everything=True)
                _prune_orphans(self.root, {r.unit_id for r in records})
            else:
                clean_temp_files(self.root, _SUBDIRS)
        return consolidated


def _max_sample_id(root: Path, rec: UnitRecord) -> int:
    """The largest sample id a unit holds (from its samples file, else its images), -1 if none."""
    best = max(rec.images, default=-1)
    if rec.samples:
        try:
            from difflens.store.fsio import inside

            for line in inside(root, rec.samples, "samples path").read_text(encoding="utf-8").splitlines():
                if line.strip():
                    best = max(best, int(json.loads(line)["sample_id"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return best


def _prune_orphans(root: Path, committed: set[str]) -> None:
    for sub, suffix in ((SHARDS_DIR, ".safetensors"), (SAMPLES_DIR, ".jsonl")):
        for p in (root / sub).glob(f"*{suffix}"):
            if p.name[: -len(suffix)] not in committed:
                p.unlink(missing_ok=True)


def _convert_acts(acts, d: int, dtype: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (raw bytes-as-numpy in the store dtype, float32 values as stored) for [N, d] acts."""
    if isinstance(acts, torch.Tensor):
        t = acts.detach().cpu()
    elif isinstance(acts, np.ndarray):
        if acts.dtype.kind != "f":
            raise DifflensError(f"{where}: acts must be floating point, got numpy dtype {acts.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(acts))
    else:
        raise DifflensError(f"{where}: acts must be a torch.Tensor or numpy array, got {type(acts).__name__}")
    if not t.dtype.is_floating_point:
        raise DifflensError(f"{where}: acts must be floating point, got {t.dtype}")
    if t.ndim != 2 or t.shape[1] != d:
        raise DifflensError(f"{where}: acts have shape {tuple(t.shape)}; expected [N, {d}] (rows x site width)")
    if dtype == "bf16":
        stored = t.to(torch.bfloat16).contiguous()
        raw = stored.view(torch.int16).numpy().view(np.uint16)
    else:
        stored = t.to(torch.float32).contiguous()
        raw = stored.numpy()
    if not bool(torch.isfinite(stored).all()):
        bad = int((~torch.isfinite(stored)).any(1).sum())
        raise DifflensError(f"{where}: {bad} rows contain NaN/inf after conversion to {dtype}; check the model's numerics")
    return raw, stored.float().numpy()


def _check_meta(meta: dict, n: int, where: str) -> dict[str, np.ndarray]:
    missing = [c for c in REQUIRED_COLUMNS if c not in meta]
    unknown = [c for c in meta if c not in COLUMNS]
    if missing or unknown:
        raise DifflensError(
            f"{where}: metadata columns wrong (missing {missing}, unknown {unknown}); "
            f"required {list(REQUIRED_COLUMNS)}, optional {list(OPTIONAL_COLUMNS)}"
        )
    out: dict[str, np.ndarray] = {}
    for c in COLUMNS:
        if c not in meta:
            continue
        v = meta[c]
        arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise DifflensError(f"{where}: column {c} has shape {arr.shape}; expected ({n},), one value per row")
        target = COLUMNS[c]
        if target.kind == "f":
            if arr.dtype.kind not in "fiu":
                raise DifflensError(f"{where}: column {c} must be numeric, got dtype {arr.dtype}")
            arr = arr.astype(target)
            if n and not np.isfinite(arr).all():
                raise DifflensError(f"{where}: column {c} contains NaN/inf")
        else:
            if arr.dtype.kind not in "iu":
                raise DifflensError(f"{where}: column {c} must be integers ({target}), got dtype {arr.dtype}")
            info = np.iinfo(target)
            if n and (int(arr.min()) < info.min or int(arr.max()) > info.max):
                raise DifflensError(f"{where}: column {c} has values outside {target} range [{info.min}, {info.max}]")
            arr = arr.astype(target)
        out[c] = np.ascontiguousarray(arr)
    if n:
        s, h, w = out["stream"], out["h"], out["w"]
        if not np.isin(s, (0, 1)).all():
            raise DifflensError(f"{where}: column stream must be 0 (image token) or 1 (text token)")
        if ((s == 1) & ((h != -1) | (w != -1))).any() or ((s == 0) & ((h < 0) | (w < 0))).any():
            raise DifflensError(f"{where}: h and w must be -1 for text tokens (stream=1) and >= 0 for image tokens")
        for c in ("step", "token"):
            if (out[c] < 0).any():
                raise DifflensError(f"{where}: column {c} must be >= 0")
        for c in ("branch", "attn_mask"):
            if c in out and not np.isin(out[c], (0, 1)).all():
                raise DifflensError(f"{where}: column {c} must hold only 0 and 1")
    return out


def _check_samples(unit_id: str, samples, images) -> list[str]:
    if samples is None:
        return []
    if not isinstance(samples, (list, tuple)):
        raise DifflensError(f"unit {unit_id}: samples must be a list of dicts, got {type(samples).__name__}")
    seen: set[int] = set()
    lines = []
    for i, s in enumerate(samples):
        sid = s.get("sample_id") if isinstance(s, dict) else None
        if isinstance(sid, (bool, np.bool_)) or not isinstance(sid, (int, np.integer)):
            raise DifflensError(f"unit {unit_id}: sample #{i} needs an integer 'sample_id' (got {sid!r})")
        sid = int(sid)
        if sid in seen:
            raise DifflensError(f"unit {unit_id}: sample_id {sid} appears twice in this unit's samples")
        seen.add(sid)
        rec = dict(s, sample_id=sid)
        if images and sid in images and "image" not in rec:
            rec["image"] = image_rel(sid)
        try:
            lines.append(dumps(rec, indent=None))
        except (TypeError, ValueError) as e:
            raise DifflensError(f"unit {unit_id}: sample {sid} is not JSON-serialisable ({e})") from None
    return lines


def _check_images(unit_id: str, images) -> list[int]:
    if not images:
        return []
    if not isinstance(images, dict):
        raise DifflensError(f"unit {unit_id}: images must be a dict {{sample_id: png_bytes}}")
    ids = []
    for sid, data in images.items():
        if isinstance(sid, (bool, np.bool_)) or not isinstance(sid, (int, np.integer)):
            raise DifflensError(f"unit {unit_id}: image keys must be integer sample ids, got {sid!r}")
        if not isinstance(data, (bytes, bytearray)) or not bytes(data[:8]) == _PNG_MAGIC:
            raise DifflensError(f"unit {unit_id}: image for sample {sid} is not PNG bytes; encode it as PNG first")
        ids.append(int(sid))
    return sorted(ids)
