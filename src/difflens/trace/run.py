"""The trace grid: for every (site, step window, CFG branch), how much of the source comes through?

`trace(adapter, pairs, ...)` patches each cell of the grid into the target of every pair (one
batched generation for many cells) and reads the result with a readout. Two reference cells
are always included: "no patch" (must read as the target) and "all sites" per branch (every
traced site and the conditioning vector at every step: must read as the source), so a grid
whose ends do not hold says so in its own output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from difflens.errors import DifflensError
from difflens.hooks import Site
from difflens.trace.patching import NO_PATCH, Cell, block_sites, conditioning_sites, patched_batches, record_source
from difflens.trace.readouts import WorldReadout
from difflens.utils import progress

if TYPE_CHECKING:
    from difflens.models.base import Adapter

ALL_SITES = "all sites"


@dataclass(frozen=True)
class Pair:
    """Target and source prompts (same seed) differing in one factor; values for world readouts."""

    target: str
    source: str
    seed: int
    factor: str = ""
    target_value: str = ""
    source_value: str = ""


@dataclass
class TraceResult:
    factor: str
    sites: list[str]
    windows: list[tuple[str, tuple[int, ...]]]
    branches: list[str]
    cells: list[dict] = field(default_factory=list)  # one per cell: label, site, stream, window, branch, scores
    pairs: list[dict] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    def cell(self, site: str, window: str, branch: str) -> dict:
        for c in self.cells:
            if c["site"] == site and c["window"] == window and c["branch"] == branch:
                return c
        raise KeyError((site, window, branch))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["windows"] = [[name, list(steps)] for name, steps in self.windows]
        return d


def step_windows(steps: int, bin_size: int = 1, *, include_all: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """Consecutive step bins ('0-1', '2-3', ...) and, optionally, 'all' steps."""
    if bin_size < 1:
        raise DifflensError(f"step bin size must be >= 1, got {bin_size}")
    out = []
    for a in range(0, steps, bin_size):
        b = min(steps, a + bin_size)
        out.append((f"{a}" if b - a == 1 else f"{a}-{b - 1}", tuple(range(a, b))))
    if include_all and len(out) > 1:
        out.append(("all", tuple(range(steps))))
    return out


def build_cells(sites: Sequence[str], windows, branches: Sequence[str], full_sites: Sequence[str],
                region: str | None = None) -> list[Cell]:
    """The grid's cells in a fixed order: no patch, then site x window x branch, then all sites per branch."""
    all_steps = tuple(sorted({s for _, st in windows for s in st}))
    cells = [NO_PATCH]
    for site in sites:
        for wname, st in windows:
            for br in branches:
                reg = region if (region and Site.parse(site).stream == "img") else None
                cells.append(Cell((site,), st, br, reg, f"{site} | {wname} | {br}"))
    for br in branches:
        cells.append(Cell(tuple(full_sites), all_steps, br, None, f"{ALL_SITES} | all | {br}"))
    return cells


def trace(
    adapter: Adapter,
    pairs: Sequence[Pair],
    readout,
    *,
    sites: Sequence[str] | None = None,
    steps: int,
    guidance: float | None = None,
    bin_size: int = 1,
    branches: Sequence[str] = ("both", "cond", "uncond"),
    conditioning: bool = True,
    regions: dict[str, np.ndarray] | None = None,
    region: str | None = None,
    batch_size: int = 64,
    pairs_per_group: int = 8,
    factor: str = "",
    show_progress: bool = True,
    **gen_kwargs,
) -> TraceResult:
    """Patch every cell into every pair's target; scores averaged over pairs per cell.

    `readout(images, target_images, source_images[, source_values=...])` -> {"source": [B], ...}
    (see difflens.trace.readouts). `regions[region]` ([pairs, image tokens] bool) restricts
    image-stream patches to those tokens (e.g. the object's box)."""
    if not pairs:
        raise DifflensError("trace needs at least one (target, source) prompt pair")
    sites = list(sites) if sites else block_sites(adapter)
    if not sites:
        raise DifflensError("no sites to trace: pass sites (see `difflens sites --model ...`)")
    for s in sites:
        adapter.site_dim(s)  # unknown sites fail before generating
    extra = conditioning_sites(adapter) if conditioning else {}
    traced = sites + [s for s in extra if s not in sites]
    windows = step_windows(steps, bin_size)
    cells = build_cells(traced, windows, branches, traced, region)
    world = isinstance(readout, WorldReadout)
    result = TraceResult(factor=factor, sites=traced, windows=windows, branches=list(branches))
    sums = [dict() for _ in cells]
    counts = np.zeros(len(cells))
    t0 = time.perf_counter()
    total = len(pairs) * len(cells)
    bar = progress(total=total, desc=f"trace {factor}".strip(), unit="img", **({} if show_progress else {"disable": True}))
    for g0 in range(0, len(pairs), pairs_per_group):
        group = list(pairs[g0 : g0 + pairs_per_group])
        source = record_source(adapter, [p.source for p in group], [p.seed for p in group], traced, steps=steps,
                               guidance=guidance, extra=extra, **gen_kwargs)
        items = [(k, c) for k in range(len(group)) for c in range(len(cells))]
        imgs = np.zeros((len(items),) + source.images.shape[1:], np.uint8)
        for a, batch in patched_batches(
                adapter, [group[k].target for k, _ in items], [group[k].seed for k, _ in items],
                [cells[c] for _, c in items], [k for k, _ in items], source, steps=steps, guidance=guidance,
                regions=None if regions is None else {n: m[g0 : g0 + len(group)] for n, m in regions.items()}, extra=extra,
                batch_size=batch_size, **gen_kwargs):
            imgs[a : a + len(batch)] = batch
            bar.update(len(batch))
        per_pair = imgs.reshape(len(group), len(cells), *imgs.shape[1:])
        clean = per_pair[:, 0]
        for c in range(len(cells)):
            kw = {"source_values": [p.source_value for p in group]} if world else {}
            scores = readout(per_pair[:, c], clean, source.images, **kw)
            for key, val in scores.items():
                if key == "reads":
                    continue
                sums[c][key] = sums[c].get(key, 0.0) + float(np.sum(val))
            counts[c] += len(group)
        for k, p in enumerate(group):
            entry = asdict(p)
            if world:
                entry["target_reads"] = str(readout(clean[k : k + 1], clean[k : k + 1], source.images[k : k + 1],
                                                    source_values=[p.source_value])["reads"][0])
            result.pairs.append(entry)
    bar.close()
    result.images = total + len(pairs)
    result.seconds = time.perf_counter() - t0
    for c, cell in enumerate(cells):
        site, wname, br = [x.strip() for x in cell.label.split(" | ")] if cell.label != NO_PATCH.label else ("none", "none", "both")
        entry = {"label": cell.label, "site": site, "stream": Site.parse(site).stream if site not in ("none", ALL_SITES) else "",
                 "window": wname, "steps": list(cell.steps), "branch": br, "region": cell.region, "n": int(counts[c])}
        for key, val in sums[c].items():
            entry[key] = val / counts[c]
        result.cells.append(entry)
    return result
