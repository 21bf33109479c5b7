"""The streaming top-k feature cache of `harvest --dict DIR --topk N`, resumable and torchrun-safe.

Per dictionary, a hook at its site encodes every image token of the conditional rows at the
recorded steps into a fresh `TopKAccumulator` for the unit being generated. When the store writer
has committed that unit, the unit's accumulator is merged into the rank's running one, which is
snapshotted atomically to `<out>/topk/<name>/partial/rank-<r>.safetensors` together with the
units it holds — after every committed unit, or every `snapshot_every` units (`harvest
--topk-snapshot-every N`: a snapshot rewrites the whole accumulator, ~F x N x (maps + values)
bytes, which at GPU scale is tens of MB per unit) and once more when the harvest ends. So:

- a crash loses at most the units committed after the last snapshot; `--resume` regenerates
  those (feeding the cache only: their store rows are already there) and skips the rest;
- under torchrun each rank keeps its own snapshot of its own units; after the final barrier
  rank 0 merges every snapshot (ties broken by arrival order, so the result equals one process
  feeding every unit in order) and writes `topk.safetensors`, `topk.json` and the browser's
  feature pages.

A snapshot names the dictionary by a fingerprint of its weights (`FeatureSource.fingerprint`):
resuming with another dictionary or another N is refused instead of mixing two caches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difflens.errors import DifflensError
from difflens.utils import atomic_write_bytes

if TYPE_CHECKING:
    from difflens.models.base import Adapter

PARTIAL = "partial"


class TopKStream:
    """One dictionary's streaming top-k cache in one harvest process (one rank)."""

    def __init__(self, name: str, source, n: int, folder: Path, *, rank: int, sample_ids, batch_size: int,
                 record_steps, model_id: str, snapshot_every: int = 1):
        self.name, self.source, self.n, self.site = name, source, int(n), source.site
        self.folder = Path(folder)
        self.rank = int(rank)
        self.record_steps = set(record_steps) if record_steps is not None else None
        self.sample_ids = torch.as_tensor(list(sample_ids), dtype=torch.long)
        self.batch_size = int(batch_size)
        self.identity = {"name": name, "site": self.site, "n": self.n, "model": model_id,
                         "fingerprint": source.fingerprint(), "source": source.describe()}
        self.acc = None  # this rank's running accumulator (committed units only)
        self.fed: set[int] = set()  # units in this rank's snapshot
        self.fed_anywhere: set[int] = set()  # units in any rank's snapshot (this run's start)
        self.timesteps: dict[int, float] = {}
        self.grid_hw = None
        self.pending: dict[int, object] = {}  # unit -> its accumulator, until the unit is committed
        self.current = None
        self.snapshot_every = int(snapshot_every)
        self.unsaved = 0  # units folded in since the last snapshot
        self.snapshots_written = 0
        self._load_partials()

    # ---- snapshots ----------------------------------------------------------------------------
    def _partial(self, rank: int) -> Path:
        return self.folder / PARTIAL / f"rank-{rank}.safetensors"

    def _read(self, path: Path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["difflens"])
        mine = json.loads(json.dumps(self.identity))
        if {k: meta["identity"].get(k) for k in ("site", "n", "fingerprint")} != {k: mine[k] for k in ("site", "n", "fingerprint")}:
            raise DifflensError(
                f"{path} holds a top-k cache filled with another dictionary or --topk "
                f"(site {meta['identity'].get('site')}, N={meta['identity'].get('n')}, fingerprint "
                f"{meta['identity'].get('fingerprint')}; this run: {self.site}, N={self.n}, {mine['fingerprint']}): "
                "resume with the same --dict and --topk, or harvest into a new --out")
        return meta, load_file(str(path))

    def _load_partials(self) -> None:
        from difflens.interpret.topk import TopKAccumulator

        for path in sorted((self.folder / PARTIAL).glob("rank-*.safetensors")):
            meta, tensors = self._read(path)
            units = {int(u) for u in meta["units"]}
            self.fed_anywhere |= units
            if path == self._partial(self.rank):
                self.acc = TopKAccumulator.from_state(tensors)
                self.fed = units
                self.timesteps.update({int(k): float(v) for k, v in meta["timesteps"].items()})
                self.grid_hw = tuple(meta["grid_hw"]) if meta.get("grid_hw") else None

    def _snapshot(self) -> None:
        from safetensors.torch import save

        meta = {"identity": self.identity, "units": sorted(self.fed), "grid_hw": list(self.grid_hw or ()),
                "timesteps": {str(k): v for k, v in sorted(self.timesteps.items())}}
        tensors = {k: v.contiguous() for k, v in self.acc.state().items()}
        atomic_write_bytes(self._partial(self.rank), save(tensors, metadata={"difflens": json.dumps(meta)}))
        self.unsaved = 0
        self.snapshots_written += 1

    # ---- the harvest loop -----------------------------------------------------------------------
    def needs(self, unit: int) -> bool:
        """True when no snapshot holds `unit` yet (it must be generated for this cache)."""
        return int(unit) not in self.fed_anywhere

    def start_unit(self, unit: int) -> None:
        self.current = int(unit)
        self.pending[self.current] = None

    def hook(self, x_BND, ctx):
        from difflens.interpret.topk import TopKAccumulator

        if self.record_steps is not None and ctx.step not in self.record_steps:
            return None
        rows = torch.nonzero(ctx.is_cond).flatten()
        x = x_BND[rows]
        B, T, D = x.shape
        t = torch.full((B * T,), float(ctx.timestep), device=x.device)
        with torch.no_grad():
            codes = self.source(x.reshape(B * T, D).float(), t).reshape(B, T, -1)
        u = self.current
        if self.pending.get(u) is None:  # the unit's own accumulator, its timesteps and token grid
            self.pending[u] = (TopKAccumulator(codes.shape[-1], self.n, T), {}, tuple(ctx.grid_hw))
        part, timesteps, _ = self.pending[u]
        timesteps[int(ctx.step)] = float(ctx.timestep)
        local = ctx.sample_index[rows].cpu()
        part.update(codes, self.sample_ids[u * self.batch_size + local], ctx.step, unit=u)
        return None

    def commit(self, unit: int) -> None:
        """After the store committed `unit` (in the writer thread, units in order): fold it in, and
        snapshot every `snapshot_every` units. Only this thread touches the running accumulator
        until the writer is closed."""
        pending = self.pending.pop(int(unit), None)
        if pending is None:
            return
        part, timesteps, grid_hw = pending
        self.acc = part if self.acc is None else self.acc.merge(part)
        self.timesteps.update(timesteps)
        self.grid_hw = self.grid_hw or grid_hw
        self.fed.add(int(unit))
        self.unsaved += 1
        if self.unsaved >= self.snapshot_every:
            self._snapshot()

    def flush(self) -> None:
        """Snapshot the units folded in since the last snapshot (after the writer is closed)."""
        if self.unsaved:
            self._snapshot()

    # ---- after the last barrier (rank 0) --------------------------------------------------------
    def finalize(self, adapter: Adapter, n_units: int) -> Path | None:
        """Merge every rank's snapshot and write the cache and its feature pages; None if empty."""
        from difflens.interpret.topk import TopKAccumulator, export_features

        acc, units, timesteps, grid = None, set(), {}, None
        for path in sorted((self.folder / PARTIAL).glob("rank-*.safetensors")):
            meta, tensors = self._read(path)
            part = TopKAccumulator.from_state(tensors)
            acc = part if acc is None else acc.merge(part)
            units |= {int(u) for u in meta["units"]}
            timesteps.update({int(k): float(v) for k, v in meta["timesteps"].items()})
            grid = grid or (tuple(meta["grid_hw"]) if meta.get("grid_hw") else None)
        if acc is None:
            return None
        acc.save(self.folder, {**self.identity, "model": adapter.model_id, "grid_hw": list(grid),
                               "timesteps": {str(k): v for k, v in sorted(timesteps.items())},
                               "units": len(units), "units_total": int(n_units), "complete": len(units) == n_units,
                               "samples": int(acc.step_images[acc.steps()[0]]) if acc.steps() else 0})
        # the pages the browser reads: browse export --dict DICT --interp <out>/topk --data <out>
        export_features(acc, self.folder / "features", timesteps=[timesteps[s] for s in acc.steps()],
                        grid_hw=grid, source=self.source.describe(), site=self.site)
        return self.folder


def topk_streams(specs, adapter: Adapter, out: Path, *, rank: int, sample_ids, batch_size: int,
                 record_steps, snapshot_every: int = 1) -> list[TopKStream]:
    """A stream per (name, dictionary folder or feature source, N) of `harvest --dict --topk`."""
    if not specs:
        return []
    if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
        raise DifflensError(f"--topk-snapshot-every must be an integer >= 1 (committed units between snapshots), "
                            f"got {snapshot_every!r}")
    from difflens.interpret.features import as_feature_source

    streams = []
    for name, obj, n in specs:
        source = as_feature_source(obj, name=name)
        if not source.site.endswith(":img"):
            raise DifflensError(f"--topk reads image-token maps: {name} is at {source.site}, not an ':img' site")
        if source.site not in adapter.sites():
            raise DifflensError(f"{name} reads site {source.site}, which {adapter.model_id} does not have")
        streams.append(TopKStream(name, source, n, Path(out) / "topk" / name, rank=rank, sample_ids=sample_ids,
                                  batch_size=batch_size, record_steps=record_steps, model_id=adapter.model_id,
                                  snapshot_every=snapshot_every))
    return streams
