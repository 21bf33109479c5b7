"""Store: read-only access to a store directory (finalized or still being written).

One file (over 500 lines) on purpose: every read path (rows, metadata columns, shuffled batches,
statistics, a store still being written) goes through the same unit index and checksum checks;
splitting it would make those internals public.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.store import stats as stats_mod
from difflens.store.format import (
    ACT_DTYPES,
    BRANCHES,
    COLUMNS,
    INDEX_COLUMN,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    STATS_JSON,
    STATS_TENSORS,
    damaged_shard_error,
    image_rel,
    tensor_name,
)
from difflens.store.fsio import inside
from difflens.store.integrity import check_columns, header_layout, manifest_blame, scan_shard
from difflens.store.manifest import UnitRecord, consolidate, fingerprint, load_manifest, load_records
from difflens.store.shardfile import SafetensorsFile, sha256_file
from difflens.store.shuffle import (
    BUFFER_BYTES,
    CHUNK_BYTES,
    GAP_BYTES,
    BatchSpec,
    acts_to_torch,
    coalesce,
    make_chunks,
    rank_bounds,
    rank_pieces,
    shuffled_batches,
)
from difflens.utils import progress


class BatchStream:
    """An iterable of batches; iterating again replays the same deterministic stream."""

    def __init__(self, store: Store, site: str, spec: BatchSpec, selection: list, rows_this_rank: int):
        self._store, self.site, self.spec, self._selection = store, site, spec, selection
        self.rows_per_epoch = rows_this_rank  # for this rank
        B = spec.batch_size
        self.batches_per_epoch = rows_this_rank // B if spec.drop_last else -(-rows_this_rank // B)

    def __len__(self) -> int:
        if self.spec.epochs is None:
            raise TypeError("an endless batch stream (epochs=None) has no length")
        return self.batches_per_epoch * self.spec.epochs

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._store._iterate(self.site, self.spec, self._selection)


class Store:
    """Read a store: metadata, rows by index, shuffled batches, statistics, integrity checks."""

    def __init__(self, path: str | os.PathLike, *, check_data: bool = True):
        self.root = Path(path)
        self.check_data = check_data  # checksum + finite values once per shard per process
        if not self.root.is_dir():
            raise DifflensError(f"store {self.root} does not exist: harvest one first or fix the path")
        self.refresh()

    @classmethod
    def from_parts(cls, root: Path, manifest: dict, records: list[UnitRecord]) -> Store:
        """A reader over an already loaded manifest and record list (used by repair)."""
        self = cls.__new__(cls)
        self.root, self.check_data = Path(root), True
        self._reset(manifest, records)
        return self

    def refresh(self) -> None:
        """Re-read the manifest and unit records (pick up units committed since opening)."""
        m = load_manifest(self.root)
        if m is None:
            raise DifflensError(f"{self.root} is not a difflens store (no manifest.json): point to a harvest output folder")
        self._reset(m, load_records(self.root, m))

    def _reset(self, m: dict, records: list[UnitRecord]) -> None:
        self._manifest = m
        self._records: list[UnitRecord] = records
        self._files: dict[int, SafetensorsFile] = {}
        self._checked: set[tuple[int, str]] = set()
        self._offsets: dict[str, np.ndarray] = {}
        self._samples: list[dict] | None = None
        self._stats: dict[str, stats_mod.SiteStats] = {}

    def __repr__(self) -> str:
        rows = {s: self.num_rows(s) for s in self.sites}
        return f"Store({str(self.root)!r}, model={self._manifest['model']!r}, dtype={self.dtype}, units={len(self._records)}, rows={rows})"

    # ---- description -----------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        m = consolidate(self._manifest, self._records)
        m["fingerprint"] = self.fingerprint()
        return m

    @property
    def records(self) -> list[UnitRecord]:
        return list(self._records)

    @property
    def sites(self) -> list[str]:
        return list(self._manifest["sites"])

    @property
    def dtype(self) -> str:
        return self._manifest["dtype"]

    def d(self, site: str) -> int:
        return self._manifest["sites"][self._site(site)]

    def num_rows(self, site: str) -> int:
        return int(self._site_offsets(site)[-1])

    def fingerprint(self) -> str:
        return fingerprint(self._manifest, self._records)

    def _site(self, site: str) -> str:
        if site not in self._manifest["sites"]:
            raise DifflensError(f"site {site!r} is not in store {self.root}; it has {self.sites}")
        return site

    def _site_offsets(self, site: str) -> np.ndarray:
        if site not in self._offsets:
            self._site(site)
            counts = [r.rows.get(site, 0) for r in self._records]
            self._offsets[site] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        return self._offsets[site]

    # ---- shard access ----------------------------------------------------------------------

    def _file(self, i: int, site: str) -> SafetensorsFile:
        """Shard i, checked once per process (checksum, finite activations) and per site (header, columns)."""
        rec = self._records[i]
        if i not in self._files:
            self._files[i] = self._open(i)
        f = self._files[i]
        if (i, site) not in self._checked:
            n, d = rec.rows.get(site, 0), self.d(site)
            acts = f.info(tensor_name(site, "acts"))
            if acts.shape != (n, d) or acts.st_dtype != ACT_DTYPES[self.dtype].st:
                blame = self._blame_manifest(site)
                if blame is not None:
                    raise blame
                raise damaged_shard_error(
                    f.path, f"{site} acts are {acts.st_dtype}{list(acts.shape)}, record says {ACT_DTYPES[self.dtype].st}[{n}, {d}]"
                )
            for c in REQUIRED_COLUMNS:
                t = f.info(tensor_name(site, c))
                if t.shape != (n,) or t.np_dtype != COLUMNS[c]:
                    raise damaged_shard_error(f.path, f"column {site}/{c} is {t.st_dtype}{list(t.shape)}, expected {n} rows")
            if self.check_data:
                check_columns(f, site, n, self._steps_of(rec))
            self._checked.add((i, site))
        return f

    def _open(self, i: int) -> SafetensorsFile:
        rec = self._records[i]
        f = SafetensorsFile(inside(self.root, rec.shard, "shard path"), rec.bytes)
        if self.check_data:
            sites = [s for s in rec.rows if rec.rows[s] and tensor_name(s, "acts") in f.tensors]
            scan_shard(f, rec.sha256, sites)
        return f

    def _open_many(self, indices) -> None:
        """Open several shards at once: their first-use checks (hashing) run in parallel threads."""
        todo = [int(i) for i in indices if int(i) not in self._files]
        if len(todo) < 2:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(4, len(todo))) as pool:
            for i, f in zip(todo, pool.map(self._open, todo)):
                self._files[i] = f

    def _steps_of(self, rec: UnitRecord) -> int | None:
        """The number of denoising steps the unit's harvest ran (None when the config does not say)."""
        try:
            steps = self._manifest["configs"][rec.config]["harvest_config"].get("steps")
        except (IndexError, KeyError, TypeError, AttributeError):
            return None
        return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None

    def _blame_manifest(self, site: str) -> DifflensError | None:
        layouts = []
        for rec in self._records:
            if not rec.rows.get(site, 0):
                continue
            try:
                layouts.append(header_layout(SafetensorsFile(inside(self.root, rec.shard, "shard path")), site))
            except DifflensError:
                layouts.append(None)
        return manifest_blame(self.root, site, self.dtype, self.d(site), layouts)

    def _columns_for(self, site: str, columns) -> list[str]:
        """Validate requested metadata columns; optional ones must exist in every shard of the site."""
        self._open_many(i for i, r in enumerate(self._records) if r.rows.get(site, 0))
        have_opt = [
            c
            for c in OPTIONAL_COLUMNS
            if all(tensor_name(site, c) in self._file(i, site).tensors for i, r in enumerate(self._records) if r.rows.get(site, 0))
        ]
        if columns is None:
            return list(REQUIRED_COLUMNS) + have_opt
        cols = list(columns)
        for c in cols:
            if c in REQUIRED_COLUMNS or c in have_opt or c == INDEX_COLUMN:
                continue
            if c in OPTIONAL_COLUMNS:
                raise DifflensError(f"column {c!r} is missing from some units of site {site}: harvest with labels for all units")
            raise DifflensError(f"unknown column {c!r}; columns are {list(COLUMNS)} (+ {INDEX_COLUMN!r})")
        return cols

    # ---- metadata, rows, samples -----------------------------------------------------------

    def meta(self, site: str, columns=None) -> dict[str, np.ndarray]:
        """All rows' metadata for a site, in store order (units sorted by id, rows as written)."""
        cols = self._columns_for(self._site(site), columns)
        offs = self._site_offsets(site)
        self._open_many(i for i, r in enumerate(self._records) if r.rows.get(site, 0))
        parts: dict[str, list[np.ndarray]] = {c: [] for c in cols}
        for i, rec in enumerate(self._records):
            if not rec.rows.get(site, 0):
                continue
            f = self._file(i, site)
            for c in cols:
                if c == INDEX_COLUMN:
                    parts[c].append(np.arange(offs[i], offs[i + 1], dtype=np.int64))
                else:
                    parts[c].append(f.read(tensor_name(site, c)))
        return {
            c: np.concatenate(v) if v else np.zeros(0, np.int64 if c == INDEX_COLUMN else COLUMNS[c])
            for c, v in parts.items()
        }

    def read_rows(self, site: str, indices) -> torch.Tensor:
        """Rows by global index as float32 [len(indices), d]; neighbouring rows are read together."""
        d, n = self.d(site), self.num_rows(site)
        idx = (indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)).reshape(-1)
        if idx.size and idx.dtype.kind not in "iu":
            raise DifflensError(f"read_rows: indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DifflensError(f"read_rows: indices must be in [0, {n}) for site {site}; got {idx.min()}..{idx.max()}")
        act = ACT_DTYPES[self.dtype]
        out = np.empty((len(idx), d), act.storage)
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        offs = self._site_offsets(site)
        shard_of = np.searchsorted(offs, sidx, side="right") - 1
        max_gap = GAP_BYTES // (d * act.storage.itemsize)
        self._open_many(np.unique(shard_of).tolist())
        for s in np.unique(shard_of):
            m = shard_of == s
            rows = sidx[m] - offs[s]
            runs, pos = coalesce(rows, max_gap)
            data = self._file(int(s), site).read_runs(tensor_name(site, "acts"), runs)
            out[order[m]] = data if pos is None else data[pos]
        return acts_to_torch(out, act.st)

    def samples(self) -> list[dict]:
        """Per-sample records (prompt, seed, factors, image, ...), sorted by sample_id."""
        if self._samples is None:
            by_id: dict[int, tuple[str, dict]] = {}
            for rec in self._records:
                if not rec.samples:
                    continue
                path = inside(self.root, rec.samples, "samples path")
                try:
                    blob = path.read_bytes()
                    if self.check_data and rec.samples_sha256 and hashlib.sha256(blob).hexdigest() != rec.samples_sha256:
                        raise ValueError("checksum mismatch: it changed after it was written")
                    lines = blob.decode("utf-8").splitlines()
                    items = [json.loads(line) for line in lines if line.strip()]
                except (OSError, ValueError) as e:
                    raise DifflensError(
                        f"samples file {path} is unreadable ({e}). Fix: run `difflens store repair {self.root}`, "
                        "then re-run the harvest with --resume"
                    ) from None
                for s in items:
                    sid = int(s["sample_id"])
                    if sid in by_id:
                        raise DifflensError(
                            f"sample_id {sid} appears in units {by_id[sid][0]} and {rec.unit_id} of {self.root}: "
                            "sample ids must be unique across units (fix the harvester's id assignment)"
                        )
                    by_id[sid] = (rec.unit_id, s)
            self._samples = [by_id[k][1] for k in sorted(by_id)]
        return [dict(s) for s in self._samples]

    def shards_of_samples(self, site: str, sample_ids) -> list[str]:
        """The shard files holding rows of these samples at `site` (for error messages)."""
        want = np.unique(np.asarray(sample_ids.cpu() if isinstance(sample_ids, torch.Tensor) else sample_ids).reshape(-1))
        out = []
        for i, rec in enumerate(self._records):
            if rec.rows.get(site, 0) and np.isin(self._file(i, site).read(tensor_name(site, "sample_id")), want).any():
                out.append(str(self.root / rec.shard))
        return out

    def image_path(self, sample_id: int) -> Path:
        p = inside(self.root, image_rel(sample_id), "image path")
        if not p.exists():
            raise DifflensError(f"no image for sample {sample_id} in {self.root}: harvest with images saved to get them")
        return p

    # ---- statistics and integrity ------------------------------------------------------------

    def stats(self, site: str) -> stats_mod.SiteStats:
        """Per-site statistics: from stats.json if it matches the content, else added up from shards."""
        self._site(site)
        if site not in self._stats:
            self._stats[site] = self._stats_from_files(site) or stats_mod.collect(
                self.root, {site: self.d(site)}, self._records
            )[site]
        return self._stats[site]

    def _stats_from_files(self, site: str) -> stats_mod.SiteStats | None:
        js_path, st_path = self.root / STATS_JSON, self.root / STATS_TENSORS
        if not (js_path.exists() and st_path.exists()):
            return None
        try:
            js = json.loads(js_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if js.get("fingerprint") != self.fingerprint() or site not in js.get("sites", {}):
            return None
        f = SafetensorsFile(st_path)
        if f.metadata.get("fingerprint") != js["fingerprint"]:
            return None
        return stats_mod.SiteStats.from_files(site, js["sites"][site], lambda name: f.read(name))

    def check_units(self, show_progress: bool = True) -> dict[str, list[str]]:
        """Re-hash every file of every committed unit; {unit_id: [problems]} for the damaged ones."""
        problems: dict[str, list[str]] = {}
        for i, rec in enumerate(progress(self._records, desc="verify store", unit="shard", **({} if show_progress else {"disable": True}))):
            bad = problems.setdefault(rec.unit_id, [])
            try:
                path = inside(self.root, rec.shard, "shard path")
            except DifflensError as e:
                bad.append(str(e))
                continue
            if not path.exists():
                bad.append(f"{path} (missing)")
            elif path.stat().st_size != rec.bytes:
                bad.append(f"{path} (size {path.stat().st_size} bytes, record says {rec.bytes}: truncated or overwritten)")
            elif sha256_file(path) != rec.sha256:
                bad.append(f"{path} (checksum mismatch: corrupt)")
            else:
                try:
                    self._files.pop(i, None)
                    self._checked = {k for k in self._checked if k[0] != i}
                    for site in rec.rows:
                        if site in self._manifest["sites"]:
                            self._file(i, site)
                except DifflensError as e:
                    bad.append(f"{path} ({e})")
            if rec.samples:
                try:
                    sp = inside(self.root, rec.samples, "samples path")
                    if not sp.exists():
                        bad.append(f"{sp} (missing)")
                    elif sha256_file(sp) != rec.samples_sha256:
                        bad.append(f"{sp} (checksum mismatch: corrupt)")
                except DifflensError as e:
                    bad.append(str(e))
            for sid in rec.images:
                try:
                    ip = inside(self.root, image_rel(sid), "image path")
                    if not ip.exists():
                        bad.append(f"{ip} (missing)")
                except DifflensError as e:
                    bad.append(str(e))
        return {u: v for u, v in problems.items() if v}

    def verify(self) -> dict:
        """Re-hash every file of every committed unit; raise naming each damaged file."""
        bad = self.check_units()
        if bad:
            problems = [p for v in bad.values() for p in v]
            shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise DifflensError(
                f"store {self.root} failed verification ({len(bad)} damaged units: {', '.join(sorted(bad)[:10])}): "
                f"{shown}. Fix: run `difflens store repair {self.root}` (it sets the damaged units aside), then "
                "re-run the harvest with --resume to regenerate them"
            )
        total = sum((self.root / r.shard).stat().st_size for r in self._records)
        return {
            "units": len(self._records),
            "bytes": total,
            "rows": {s: self.num_rows(s) for s in self.sites},
            "fingerprint": self.fingerprint(),
        }

    # ---- batches ---------------------------------------------------------------------------

    def batches(
        self,
        site: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        timestep_range: tuple[float, float] | None = None,
        steps=None,
        stream: str | None = None,
        branch: str | None = None,
        padding: bool = False,
        columns=("acts", "timestep"),
        drop_last: bool = False,
        epochs: int | None = 1,
        start_epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_rows: int | None = None,
        chunk_rows: int | None = None,
        prefetch: bool = True,
        io_threads: int = 4,
    ) -> BatchStream:
        """Batches of dicts of tensors (acts float32 [B, d]); each selected row once per epoch.

        Filters: timestep_range is inclusive on the timestep value; steps are step indices;
        stream is "img" or "txt". rank/world_size split every epoch into disjoint parts.
        branch: a store recorded with both CFG branches needs an explicit "cond", "uncond" or
        "both" (else DifflensError); stores with one branch take None. Text padding tokens
        (attn_mask 0) are left out unless padding=True.
        """
        spec = BatchSpec(
            batch_size=batch_size,
            shuffle=bool(shuffle),
            seed=seed,
            timestep_range=None if timestep_range is None else (float(timestep_range[0]), float(timestep_range[1])),
            steps=None if steps is None else tuple(int(s) for s in steps),
            stream=stream,
            columns=tuple(columns),
            drop_last=drop_last,
            epochs=epochs,
            start_epoch=start_epoch,
            rank=rank,
            world_size=world_size,
            buffer_rows=buffer_rows,
            chunk_rows=chunk_rows,
            prefetch=prefetch,
            io_threads=io_threads,
            branch=self._branch_choice(site, branch),
            padding=bool(padding),
        )
        spec.check()
        self._site(site)
        self._columns_for(site, [c for c in spec.columns if c != "acts"])
        selection = self._select(site, spec)
        total = sum(s if isinstance(s, int) else len(s) for s in selection)
        if total == 0:
            raise DifflensError(self._empty_message(site, spec))
        lo, hi = rank_bounds(total, spec)
        return BatchStream(self, site, spec, selection, hi - lo)

    def branches(self, site: str) -> set[str]:
        """The CFG branches a site holds: {'cond'} unless the harvest recorded both."""
        found: set[int] = set()
        self._open_many(i for i, r in enumerate(self._records) if r.rows.get(site, 0))
        for i, rec in enumerate(self._records):
            if rec.rows.get(site, 0):
                f = self._file(i, site)
                name = tensor_name(site, "branch")
                found |= set(np.unique(f.read(name)).tolist()) if name in f.tensors else {0}
        return {b for b, code in BRANCHES.items() if code in found}

    def _branch_choice(self, site: str, branch: str | None) -> str:
        if branch is not None:
            if branch not in ("cond", "uncond", "both"):
                raise DifflensError(f"branch must be 'cond', 'uncond' or 'both', got {branch!r}")
            return branch
        if self.branches(site) == {"cond", "uncond"}:
            raise DifflensError(
                f"site {site} of {self.root} holds both CFG branches (harvested with --both-branches): choose one "
                "explicitly with branch='cond' (what the image follows), 'uncond' or 'both'"
            )
        return "all"

    def _select(self, site: str, spec: BatchSpec) -> list:
        """Per shard: its row count if every row is selected, else the selected local rows."""
        fcols = spec.filter_columns()
        self._open_many(i for i, r in enumerate(self._records) if r.rows.get(site, 0))
        out: list = []
        for i, rec in enumerate(self._records):
            n = rec.rows.get(site, 0)
            if n == 0:
                out.append(n)
                continue
            f = self._file(i, site)
            mask = spec.mask({c: f.read(tensor_name(site, c)) for c in fcols}) if fcols else np.ones(n, bool)
            if spec.branch in ("cond", "uncond"):
                name = tensor_name(site, "branch")
                code = f.read(name) if name in f.tensors else np.zeros(n, np.int8)
                mask &= code == BRANCHES[spec.branch]
            name = tensor_name(site, "attn_mask")
            if not spec.padding and name in f.tensors:
                mask &= f.read(name) == 1
            out.append(n if mask.all() else np.flatnonzero(mask))
        return out

    def _empty_message(self, site: str, spec: BatchSpec) -> str:
        if self.num_rows(site) == 0:
            return f"site {site} of store {self.root} has no rows yet: harvest first"
        m = self.meta(site, ["timestep", "step"])
        ts = np.unique(m["timestep"])
        return (
            f"no rows of site {site} match timestep_range={spec.timestep_range}, steps={spec.steps}, "
            f"stream={spec.stream}, branch={spec.branch}: the store has branches {sorted(self.branches(site))}, timesteps {ts.min():g}..{ts.max():g} and steps "
            f"{sorted(set(np.unique(m['step']).tolist()))}; widen the filters"
        )

    def _iterate(self, site: str, spec: BatchSpec, selection: list) -> Iterator[dict[str, torch.Tensor]]:
        act, d = ACT_DTYPES[self.dtype], self.d(site)
        row_bytes = d * act.storage.itemsize
        chunk_rows = spec.chunk_rows or max(1, CHUNK_BYTES // row_bytes)
        buffer_rows = max(spec.buffer_rows or max(1, BUFFER_BYTES // row_bytes), spec.batch_size)
        max_gap = GAP_BYTES // row_bytes
        offs = self._site_offsets(site)
        chunks = make_chunks(selection, chunk_rows)

        # Metadata columns are small: hold them in memory (one sequential read per shard) so a
        # chunk costs a single read request, for its activations.
        meta_cols = [c for c in spec.columns if c in COLUMNS]
        used = [i for i, sel in enumerate(selection) if (sel if isinstance(sel, int) else len(sel))]
        self._open_many(used)
        files = {i: self._file(i, site) for i in used}  # headers checked here, not in I/O threads
        held = {i: {c: files[i].read(tensor_name(site, c)) for c in meta_cols} for i in used}

        acts_name = tensor_name(site, "acts")

        def read_acts(piece, out: np.ndarray) -> None:
            f = files[piece.shard]
            if piece.rows is None:
                f.read_runs(acts_name, np.array([[piece.start, piece.stop]]), out=out)
                return
            runs, pos = coalesce(piece.rows.astype(np.int64), max_gap)
            if pos is None:
                f.read_runs(acts_name, runs, out=out)
            else:
                np.take(f.read_runs(acts_name, runs), pos, axis=0, out=out)

        def read_into(piece, buf: dict[str, np.ndarray], at: int) -> None:
            dest = slice(at, at + len(piece))
            for c, arr in buf.items():
                if c == "acts":
                    read_acts(piece, arr[dest])
                elif c == INDEX_COLUMN:
                    arr[dest] = offs[piece.shard] + piece.local_rows()
                else:
                    col = held[piece.shard][c]
                    arr[dest] = col[piece.start : piece.stop] if piece.rows is None else col[piece.rows]

        shapes = {
            c: ((d,), act.storage) if c == "acts" else ((), COLUMNS.get(c, np.dtype(np.int64)))
            for c in spec.columns
        }

        def alloc(capacity: int) -> dict[str, np.ndarray]:
            return {c: np.empty((capacity, *shape), dtype) for c, (shape, dtype) in shapes.items()}

        def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return {k: acts_to_torch(v, act.st) if k == "acts" else torch.from_numpy(v) for k, v in batch.items()}

        first = spec.start_epoch
        epochs = itertools.count(first) if spec.epochs is None else range(first, first + spec.epochs)
        for e in epochs:
            pieces = rank_pieces(chunks, spec, e)
            yield from shuffled_batches(spec, e, pieces, read_into, alloc, buffer_rows, chunk_rows, to_torch)
