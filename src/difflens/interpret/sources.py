"""Whole images of activations, sample by sample: from a store or generated afresh with a recording hook.

The feature cache needs every image token of an image at every recorded step (a token map per
step), so it reads activations grouped by sample as [samples, steps, tokens, d], unlike the
trainer's shuffled token stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflens.errors import DifflensError
from difflens.generation import GenerationPlan, generate_batched
from difflens.groundtruth import ConceptVocabulary, GroundTruth, ground_truth_of
from difflens.harvest.run import labels_and_records, plan_samples
from difflens.hooks import HookSet, Site
from difflens.models.base import Adapter
from difflens.store import Store
from difflens.utils import progress


def split_of(prompt_ids: np.ndarray, seed: int, explain_fraction: float) -> np.ndarray:
    """0 = explain split, 1 = held-out (judge) split; by prompt so both seeds of a prompt stay together."""
    x = (np.asarray(prompt_ids, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(2**64 - 1)
    # splitmix64 finaliser: a cheap, stable hash (independent of which other samples exist)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) / float(2**53)
    return (u >= explain_fraction).astype(np.int8)


def _streamed_hint(root, site: str) -> str:
    """Where a harvest's streamed top-k caches of `site` already hold what a researcher reads first."""
    import json
    from pathlib import Path

    names = []
    for folder in sorted((Path(root) / "topk").glob("*/topk.json")):
        try:
            if json.loads(folder.read_text(encoding="utf-8")).get("site") == site:
                names.append(folder.parent.name)
        except (OSError, ValueError):
            continue
    if not names:
        return ""
    return (f". This store's streamed top-k cache ({', '.join(names)} in {Path(root) / 'topk'}) already holds the "
            f"top images, token maps, timestep profiles and histograms without every token: browse them with "
            f"`difflens browse export --dict DICT --interp {Path(root) / 'topk'} --data {root}`")


class SampleSource:
    """Interface: sample ids, their records/images/labels, and activations per site in sample batches."""

    steps: list[int]
    timesteps: list[float]
    grid_hw: tuple[int, int]
    description: dict

    @property
    def num_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    def sample_ids(self) -> np.ndarray:
        raise NotImplementedError

    def record(self, sid: int) -> dict:
        raise NotImplementedError

    def image(self, sid: int) -> np.ndarray:
        raise NotImplementedError

    def d(self, site: str) -> int:
        raise NotImplementedError

    @property
    def sites(self) -> list[str]:
        raise NotImplementedError

    def iter_acts(self, site: str, sample_ids: Sequence[int], rows_per_batch: int = 8192) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (sample ids [b], acts float32 [b, S, T, D]) covering `sample_ids` in order."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------
    def prompt_ids(self, sids) -> np.ndarray:
        return np.array([int(self.record(int(s)).get("prompt_id", s)) for s in sids], np.int64)

    def ground_truth(self) -> GroundTruth | None:
        """The world whose concepts the samples' token labels stand for (None: no ground truth)."""
        return None

    def site_mean(self, site: str) -> torch.Tensor | None:
        """The site's mean activation (random directions are centred on it), or None when unknown."""
        return None

    def vocabulary(self) -> ConceptVocabulary:
        """The concept vocabulary of the samples' token labels; an error names the fix when the
        samples carry labels but no world to read them with."""
        truth = self.ground_truth()
        if truth is None:
            raise DifflensError(f"the samples of {self.description} carry token labels but no ground-truth world to "
                                "read them: harvest them from a model with ground truth (its adapter's world_class)")
        return truth.vocabulary()

    def token_labels(self, sids) -> np.ndarray | None:
        """int64 [n, T] per-token concept bitmasks (ground truth), or None when some sample has none."""
        out = np.zeros((len(sids), self.num_tokens), np.int64)
        for i, s in enumerate(sids):
            lab = self.record(int(s)).get("token_labels")
            if lab is None or len(lab) != self.num_tokens:
                return None
            out[i] = np.asarray(lab, np.int64)
        return out

    def _batch_sizes(self, site: str, n: int, rows_per_batch: int) -> int:
        per_sample = len(self.steps) * self.num_tokens
        return max(1, min(n, rows_per_batch // max(per_sample, 1)))


class StoreSource(SampleSource):
    """Samples of an activation store that holds every image token of its images (no token subsampling).
    A store harvested with both CFG branches is read one branch at a time (`branch`, default the
    conditional rows, what the image follows)."""

    def __init__(self, store, *, sites: Sequence[str] | None = None, branch: str = "cond"):
        if branch not in ("cond", "uncond"):
            raise DifflensError(f"branch must be 'cond' or 'uncond', got {branch!r}")
        self.branch = branch
        self.store = store if isinstance(store, Store) else Store(store)
        self._records = {int(r["sample_id"]): r for r in self.store.samples()}
        self._rows: dict[str, dict[int, np.ndarray]] = {}
        self._steps: dict[str, tuple[list[int], list[float], tuple[int, int]]] = {}
        use = list(sites) if sites is not None else [s for s in self.store.sites if s.endswith(":img")]
        self._sites = use
        self.description = {"kind": "store", "path": str(self.store.root), "fingerprint": self.store.fingerprint()}
        if branch != "cond":
            self.description["branch"] = branch
        if not use:
            raise DifflensError(f"store {self.store.root} has no image-stream site: harvest an ':img' site")
        self._index(use[0])
        self.steps, self.timesteps, self.grid_hw = self._steps[use[0]]
        self._truth: list = []  # [GroundTruth | None] once resolved

    def ground_truth(self) -> GroundTruth | None:
        """The world of the model the store was harvested from (`models.ground_truth_for`)."""
        if not self._truth:
            from difflens.models import ground_truth_for

            self._truth.append(ground_truth_for(self.store.manifest["model"]))
        return self._truth[0]

    @property
    def sites(self) -> list[str]:
        return list(self._sites)

    def d(self, site: str) -> int:
        return self.store.d(site)

    def site_mean(self, site: str) -> torch.Tensor | None:
        return self.store.stats(site).mean_D

    def _index(self, site: str) -> None:
        """Group a site's rows by sample, ordered (step, token); insist on complete token maps."""
        if site in self._rows:
            return
        if site not in self.store.sites:
            raise DifflensError(f"site {site} is not in store {self.store.root}; it has {self.store.sites}")
        from difflens.store.format import BRANCHES

        held = self.store.branches(site)
        if self.branch not in held:
            raise DifflensError(f"site {site} of {self.store.root} holds no {self.branch} rows (branches: {sorted(held)}); "
                                "harvest with --both-branches to read the unconditional branch")
        cols = ["sample_id", "step", "timestep", "token", "h", "w", "stream", "index"]
        m = self.store.meta(site, cols + (["branch"] if len(held) > 1 else []))
        img = m["stream"] == 0
        if len(held) > 1:
            img &= m["branch"] == BRANCHES[self.branch]
        if not img.any():
            raise DifflensError(f"site {site} of {self.store.root} has no image-token rows; interpret an ':img' site")
        m = {k: v[img] for k, v in m.items()}
        steps = sorted(set(m["step"].tolist()))
        ts = [float(m["timestep"][np.flatnonzero(m["step"] == s)[0]]) for s in steps]
        grid = (int(m["h"].max()) + 1, int(m["w"].max()) + 1)
        T = grid[0] * grid[1]
        order = np.lexsort((m["token"], m["step"], m["sample_id"]))
        sid_sorted = m["sample_id"][order]
        bounds = np.flatnonzero(np.diff(sid_sorted)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(order)]])
        need = len(steps) * T
        rows: dict[int, np.ndarray] = {}
        step_pos = {s: i for i, s in enumerate(steps)}
        for a, b in zip(starts, ends):
            sid = int(sid_sorted[a])
            sel = order[a:b]
            if b - a != need or not (
                np.array_equal(m["token"][sel], np.tile(np.arange(T), len(steps)))
                and np.array_equal([step_pos[x] for x in m["step"][sel][::T]], list(range(len(steps))))
            ):
                raise DifflensError(
                    f"sample {sid} of site {site} in {self.store.root} has {b - a} image-token rows, not "
                    f"{len(steps)} steps x {T} tokens: the feature cache needs full token maps. Fix: harvest "
                    "a store without --tokens-per-image/--token-fraction (all tokens), or use --generate"
                    + _streamed_hint(self.store.root, site)
                )
            rows[sid] = m["index"][sel]
        self._rows[site] = rows
        self._steps[site] = (steps, ts, grid)

    def sample_ids(self) -> np.ndarray:
        return np.array(sorted(self._rows[self._sites[0]]), np.int64)

    def record(self, sid: int) -> dict:
        return self._records.get(int(sid), {"sample_id": int(sid)})

    def image(self, sid: int) -> np.ndarray:
        with Image.open(self.store.image_path(int(sid))) as im:
            return np.asarray(im.convert("RGB"), np.uint8)

    def iter_acts(self, site, sample_ids, rows_per_batch=8192):
        self._index(site)
        if self._steps[site][0] != self.steps or self._steps[site][2] != self.grid_hw:
            raise DifflensError(f"site {site} records other steps/grid than {self._sites[0]} in {self.store.root}")
        rows = self._rows[site]
        sids = [int(s) for s in sample_ids]
        missing = [s for s in sids if s not in rows]
        if missing:
            raise DifflensError(f"samples {missing[:5]} have no rows at site {site} in {self.store.root}")
        S, T = len(self.steps), self.num_tokens
        b = self._batch_sizes(site, len(sids), rows_per_batch)
        for i in range(0, len(sids), b):
            chunk = sids[i : i + b]
            idx = np.concatenate([rows[s] for s in chunk])
            acts = self.store.read_rows(site, idx).float()
            yield np.array(chunk, np.int64), acts.reshape(len(chunk), S, T, -1)


class MemorySource(SampleSource):
    """Samples held in memory, e.g. generated afresh by `generate_samples`."""

    def __init__(self, acts: dict[str, np.ndarray], records: list[dict], images: np.ndarray,
                 timesteps: list[float], steps: list[int] | None = None, description: dict | None = None,
                 ground_truth: GroundTruth | None = None, grid_hw: tuple[int, int] | None = None):
        first = next(iter(acts.values()))
        n, S, T, _ = first.shape
        g = int(round(T**0.5))
        if grid_hw is None and g * g != T:
            raise DifflensError(f"{T} image tokens is not a square grid; pass grid_hw explicitly")
        if grid_hw is not None and grid_hw[0] * grid_hw[1] != T:
            raise DifflensError(f"grid {grid_hw} does not hold the {T} image tokens recorded")
        self._acts = acts
        self._records = {int(r["sample_id"]): r for r in records}
        self._order = [int(r["sample_id"]) for r in records]
        self._images = {sid: np.asarray(images[i], np.uint8) for i, sid in enumerate(self._order)}
        self.steps = list(steps if steps is not None else range(S))
        self.timesteps = [float(t) for t in timesteps]
        self.grid_hw = tuple(int(x) for x in grid_hw) if grid_hw is not None else (g, g)
        self.description = description or {"kind": "memory"}
        self._ground_truth = ground_truth

    def ground_truth(self) -> GroundTruth | None:
        return self._ground_truth

    @property
    def sites(self) -> list[str]:
        return list(self._acts)

    def d(self, site):
        return int(self._acts[site].shape[-1])

    def site_mean(self, site: str) -> torch.Tensor | None:
        a = self._acts[site]
        return torch.from_numpy(a.reshape(-1, a.shape[-1]).mean(0))

    def sample_ids(self):
        return np.array(sorted(self._order), np.int64)

    def record(self, sid):
        return self._records.get(int(sid), {"sample_id": int(sid)})

    def image(self, sid):
        return self._images[int(sid)]

    def iter_acts(self, site, sample_ids, rows_per_batch=8192):
        if site not in self._acts:
            raise DifflensError(f"site {site} was not recorded; generated sites are {self.sites}")
        pos = {s: i for i, s in enumerate(self._order)}
        sids = [int(s) for s in sample_ids]
        b = self._batch_sizes(site, len(sids), rows_per_batch)
        for i in range(0, len(sids), b):
            chunk = sids[i : i + b]
            yield np.array(chunk, np.int64), torch.from_numpy(self._acts[site][[pos[s] for s in chunk]]).float()


def generate_samples(adapter: Adapter, prompts: list[str], sites: Sequence[str], *, seeds: Sequence[int] = (0,), steps: int | None = None,
                     scenes: list | None = None, batch_size: int = 8, guidance: float | None = None,
                     height: int | None = None, width: int | None = None) -> MemorySource:
    """Generate images afresh with a hook recording every image token of the conditional rows at
    every step, for when no full-token store exists. Samples, records and labels are planned as a
    harvest plans them (`harvest.run.plan_samples` / `labels_and_records`)."""
    truth = ground_truth_of(adapter)
    plan = plan_samples(list(prompts), [int(s) for s in seeds], scenes, truth)
    steps = adapter.resolve_steps(steps)
    sites = [str(Site.parse(s)) for s in sites]
    acts: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    images, records = [], []
    timesteps: list[float] = []
    bufs: dict[str, np.ndarray | None] = {}
    grid: list = []

    def hook_for(site, n):
        def hook(x_BND, ctx):
            rows = torch.nonzero(ctx.is_cond).flatten()
            if bufs[site] is None:
                bufs[site] = np.zeros((n, ctx.num_steps, x_BND.shape[1], x_BND.shape[2]), np.float32)
            for r in rows.tolist():
                bufs[site][int(ctx.sample_index[r]), ctx.step] = x_BND[r].detach().float().cpu().numpy()

        return hook

    def recorders(gen_plan: GenerationPlan) -> HookSet:
        bufs.update({s: None for s in sites})
        return HookSet([(s, hook_for(s, len(gen_plan.prompts))) for s in sites])

    bar = progress(total=-(-len(plan) // batch_size), desc="generate samples", unit="batch")
    for b in generate_batched(adapter, plan, recorders, steps=steps, guidance=guidance, batch_size=batch_size,
                              height=height, width=width, on_batch=lambda _b: bar.update(1)):
        timesteps = list(b.generation.timesteps)
        grid[:] = [tuple(b.generation.grid_hw)]
        for s in sites:
            acts[s].append(bufs[s])
        images.append(b.generation.images)
        records += labels_and_records(b.requests, truth, None)[2]
    bar.close()
    return MemorySource(
        {s: np.concatenate(v) for s, v in acts.items()}, records, np.concatenate(images), timesteps,
        description={"kind": "generated", "model": adapter.model_id, "prompts": len(prompts), "steps": steps},
        ground_truth=truth, grid_hw=grid[0],
    )


def open_source(data, sites: Sequence[str] | None = None, branch: str = "cond") -> SampleSource:
    """A SampleSource from a store path/Store (reading CFG `branch`) or an existing source."""
    if isinstance(data, SampleSource):
        return data
    if isinstance(data, (str, Path)) or hasattr(data, "samples"):
        return StoreSource(data, sites=sites, branch=branch)
    raise DifflensError(f"cannot read samples from {type(data).__name__}: pass a store folder")
