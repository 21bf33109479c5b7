"""The feature cache: per-feature statistics, top and quantile images with full token maps.

Built in up to three passes over whole images (every token of every recorded step):

A. calibration: each feature's max over `calib_samples` images (all by default) fixes its
   threshold thr_f = max(abs_threshold, rel_threshold * max_f);
B. statistics over all images: frequency, log-binned activation histogram, timestep profiles,
   per (image, feature) the max over tokens and steps, and whether the image *qualifies*: at
   some step >= `min_tokens` tokens exceed thr_f (Shabalin et al.: >= 6 tokens above a small
   threshold). With toy-world labels it also counts, per step and split, how often "token
   active" coincides with "token has concept c" (what the oracle explainer reads);
C. token maps [steps, tokens] of the chosen images (top-N per split, quantile samples) of the
   features that get maps, stored sparsely (non-zero entries only).

Images are split by prompt into an explain split (0) and a held-out judge split (1), so an
explanation is always judged on images it was not written from.

On disk: `cache.json` (description, config) + `cache.safetensors` (arrays); no pickle.

Longer than 500 lines on purpose: the cache's format (`FeatureCache`, `SparseMaps`) and the
passes that fill it (`_calibrate`, `_statistics`, `_select_examples`, `_token_maps`) change
together, so they live in one file, each pass its own function.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save

from difflens.errors import DifflensError
from difflens.interpret.concepts import CONCEPT_NAMES, concept_matrix
from difflens.interpret.features import FeatureSource
from difflens.interpret.sources import SampleSource, split_of
from difflens.utils import atomic_write_bytes, progress, write_json

CACHE_VERSION = 1


@dataclass
class CacheConfig:
    """How the cache selects and stores examples; saved in cache.json."""

    top_n: int = 10  # top images kept per split
    n_quantiles: int = 8  # images at evenly spaced quantiles of the per-image max
    min_tokens: int = 6  # an image qualifies when >= this many tokens exceed thr_f at some step
    rel_threshold: float = 0.1  # thr_f = max(abs_threshold, rel_threshold * calibrated max_f)
    abs_threshold: float = 0.0  # also what "active" means for the frequency
    calib_samples: int | None = None  # images used to calibrate max_f (None: all; cheaper for ITDA)
    explain_fraction: float = 0.5  # share of prompts in the explain split
    split_seed: int = 0
    rows_per_batch: int = 8192
    hist_bins_per_octave: int = 4
    hist_log2_min: int = -20
    hist_log2_max: int = 12

    def check(self) -> None:
        if self.top_n < 1 or self.n_quantiles < 0 or self.min_tokens < 1:
            raise DifflensError("cache config: top_n and min_tokens must be >= 1 and n_quantiles >= 0")
        if not 0 < self.explain_fraction < 1:
            raise DifflensError(f"explain_fraction must be in (0, 1), got {self.explain_fraction}")
        if self.rel_threshold < 0 or self.hist_log2_max <= self.hist_log2_min:
            raise DifflensError("cache config: rel_threshold must be >= 0 and hist_log2_max > hist_log2_min")

    @property
    def hist_edges(self) -> np.ndarray:
        n = (self.hist_log2_max - self.hist_log2_min) * self.hist_bins_per_octave
        return 2.0 ** (self.hist_log2_min + np.arange(n + 1) / self.hist_bins_per_octave)


class SparseMaps:
    """A dense array of shape `shape` kept as sorted (flat index, value) pairs of its non-zeros."""

    def __init__(self, shape: tuple[int, ...], idx: np.ndarray | None = None, val: np.ndarray | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.idx = np.zeros(0, np.int64) if idx is None else np.asarray(idx, np.int64)
        self.val = np.zeros(0, np.float32) if val is None else np.asarray(val, np.float32)
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []

    def _offset(self, prefix) -> tuple[int, int]:
        block = int(np.prod(self.shape[len(prefix):], dtype=np.int64))
        start = int(np.ravel_multi_index(tuple(prefix) + (0,) * (len(self.shape) - len(prefix)), self.shape)) if prefix else 0
        return start, block

    def put(self, prefix: tuple[int, ...], block: np.ndarray) -> None:
        start, size = self._offset(prefix)
        flat = np.asarray(block, np.float32).reshape(-1)
        if flat.size != size:
            raise ValueError(f"block of {flat.size} values for a slot of {size}")
        nz = np.flatnonzero(flat)
        self._parts.append((nz.astype(np.int64) + start, flat[nz]))

    def finish(self) -> SparseMaps:
        if self._parts:
            idx = np.concatenate([self.idx] + [p[0] for p in self._parts])
            val = np.concatenate([self.val] + [p[1] for p in self._parts])
            order = np.argsort(idx, kind="stable")
            self.idx, self.val = idx[order], val[order]
            self._parts = []
        return self

    def get(self, *prefix: int) -> np.ndarray:
        start, size = self._offset(prefix)
        lo, hi = np.searchsorted(self.idx, [start, start + size])
        out = np.zeros(size, np.float32)
        out[self.idx[lo:hi] - start] = self.val[lo:hi]
        return out.reshape(self.shape[len(prefix):])

    @property
    def nnz(self) -> int:
        return int(self.idx.size)


@dataclass
class Example:
    """One image of one feature: where it came from and its token maps at every recorded step."""

    feature: int
    sample_id: int
    value: float  # the feature's max over tokens at `step`
    step: int  # position in cache.steps of the map that qualified (the one shown)
    split: int
    maps_ST: np.ndarray | None  # [steps, tokens]
    threshold: float

    @property
    def map(self) -> np.ndarray:
        return self.maps_ST[self.step]


@dataclass
class FeatureCache:
    info: dict
    arrays: dict[str, np.ndarray]
    top_maps: SparseMaps
    quant_maps: SparseMaps
    config: CacheConfig = field(default_factory=CacheConfig)

    # ---- description -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info["source"]["name"]

    @property
    def num_features(self) -> int:
        return int(self.info["source"]["num_features"])

    @property
    def steps(self) -> list[int]:
        return list(self.info["steps"])

    @property
    def timesteps(self) -> list[float]:
        return list(self.info["timesteps"])

    @property
    def grid_hw(self) -> tuple[int, int]:
        return tuple(self.info["grid_hw"])

    @property
    def sample_ids(self) -> np.ndarray:
        return self.arrays["sample_ids"]

    @property
    def split(self) -> np.ndarray:
        return self.arrays["split"]

    @property
    def map_features(self) -> np.ndarray:
        return self.arrays["map_features"]

    @property
    def has_concepts(self) -> bool:
        return "concept_tp" in self.arrays

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def live(self) -> np.ndarray:
        return self.arrays["frequency"] > 0

    def map_row(self, f: int) -> int:
        mf = self.map_features
        i = int(np.searchsorted(mf, f))
        if i >= len(mf) or mf[i] != f:
            raise DifflensError(f"feature {f} of {self.name} has no token maps in this cache: rebuild with it in map_features")
        return i

    def has_maps(self, f: int) -> bool:
        mf = self.map_features
        i = int(np.searchsorted(mf, f))
        return bool(i < len(mf) and mf[i] == f)

    def top_examples(self, f: int, split: int | None = None, *, maps: bool = True) -> list[Example]:
        """Top images of feature f (best first): one split, or both merged by value."""
        splits = [0, 1] if split is None else [split]
        row = self.map_row(f) if maps else None
        out = []
        for k in splits:
            for r in range(self.config.top_n):
                sid = int(self["top_sample"][f, k, r])
                if sid < 0:
                    break
                m = self.top_maps.get(row, k, r) if row is not None else None
                out.append(Example(f, sid, float(self["top_value"][f, k, r]), int(self["top_step"][f, k, r]), k, m,
                                   float(self["threshold"][f])))
        out.sort(key=lambda e: -e.value)
        return out

    def quantile_examples(self, f: int, *, maps: bool = True) -> list[Example]:
        row = self.map_row(f) if maps else None
        out = []
        for q in range(self.config.n_quantiles):
            sid = int(self["quant_sample"][f, q])
            if sid < 0:
                continue
            m = self.quant_maps.get(row, q) if row is not None else None
            pos = int(np.searchsorted(self.sample_ids, sid))
            out.append(Example(f, sid, float(self["quant_value"][f, q]), int(self["quant_step"][f, q]),
                               int(self.split[pos]), m, float(self["threshold"][f])))
        return out

    def histogram(self, f: int) -> dict:
        """Counts of positive activations in log2 bins (trimmed), plus the non-positive count."""
        counts = self["hist_counts"][f]
        nz = np.flatnonzero(counts)
        edges = self.config.hist_edges
        if nz.size == 0:
            return {"edges": [], "counts": [], "nonpositive": int(self["hist_nonpos"][f])}
        a, b = nz[0], nz[-1] + 1
        return {"edges": [float(x) for x in edges[a : b + 1]], "counts": [int(x) for x in counts[a:b]],
                "nonpositive": int(self["hist_nonpos"][f])}

    def peak_step(self, f: int) -> int:
        return int(np.argmax(self["profile_mean"][f]))

    # ---- persistence -------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"a/{k}": np.ascontiguousarray(v) for k, v in self.arrays.items()}
        for name, sm in (("top_maps", self.top_maps), ("quant_maps", self.quant_maps)):
            tensors[f"{name}/idx"] = sm.idx
            tensors[f"{name}/val"] = sm.val
            tensors[f"{name}/shape"] = np.array(sm.shape, np.int64)
        tensors = {k: (v.astype(np.uint8) if v.dtype == bool else v) for k, v in tensors.items()}
        atomic_write_bytes(folder / "cache.safetensors", save(tensors, metadata={"format": "difflens-feature-cache"}))
        write_json(folder / "cache.json", {**self.info, "config": asdict(self.config), "bool_arrays": sorted(
            k for k, v in self.arrays.items() if v.dtype == bool)})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureCache:
        folder = Path(folder)
        if not (folder / "cache.json").exists():
            raise DifflensError(f"{folder} holds no feature cache (cache.json): build one with `difflens interpret cache`")
        info = json.loads((folder / "cache.json").read_text(encoding="utf-8"))
        if info.get("version") != CACHE_VERSION:
            raise DifflensError(f"feature cache {folder} has version {info.get('version')}, expected {CACHE_VERSION}: rebuild it")
        cfg = CacheConfig(**info.pop("config"))
        bools = set(info.pop("bool_arrays", []))
        t = load_file(str(folder / "cache.safetensors"))
        arrays = {k[2:]: (v.astype(bool) if k[2:] in bools else v) for k, v in t.items() if k.startswith("a/")}
        maps = {n: SparseMaps(tuple(t[f"{n}/shape"].tolist()), t[f"{n}/idx"], t[f"{n}/val"]) for n in ("top_maps", "quant_maps")}
        return cls(info, arrays, maps["top_maps"], maps["quant_maps"], cfg)


# ---- building -------------------------------------------------------------------------------------


def _encode(features: FeatureSource, acts_bSTD: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    b, S, T, D = acts_bSTD.shape
    t_rows = timesteps.repeat_interleave(T).repeat(b)
    codes = features(acts_bSTD.reshape(-1, D), t_rows)
    if codes.shape != (b * S * T, features.num_features):
        raise DifflensError(f"{features.name} returned codes of shape {tuple(codes.shape)}, expected [{b * S * T}, {features.num_features}]")
    return codes.float().reshape(b, S, T, -1)


@dataclass
class _Run:
    """What every pass of one cache build shares."""

    features: FeatureSource
    src: SampleSource
    cfg: CacheConfig
    sids: np.ndarray  # sorted sample ids
    ts: torch.Tensor  # the source's timesteps
    split: np.ndarray  # per sample: 0 explain, 1 judge

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(samples n, steps S, tokens T, features F)."""
        return len(self.sids), len(self.src.steps), self.src.num_tokens, self.features.num_features

    def batches(self, sids, desc: str):
        """(sample ids, codes [b, S, T, F]) over `sids`, with a progress bar."""
        bar = progress(total=len(sids), desc=f"{self.features.name}: {desc}", unit="img")
        for b_sids, acts in self.src.iter_acts(self.features.site, sids, self.cfg.rows_per_batch):
            yield b_sids, _encode(self.features, acts, self.ts)
            bar.update(len(b_sids))
        bar.close()


def build_cache(
    features: FeatureSource,
    data: SampleSource,
    *,
    config: CacheConfig | None = None,
    map_features=None,
    sample_ids=None,
    out: str | Path | None = None,
    seed: int = 0,
) -> FeatureCache:
    """Compute the cache of `features` over the images of `data` (see the module docstring).

    map_features: feature ids that get token maps (None: every live feature), or a function of
    the statistics arrays returning them. The result is saved to `out` when given.
    """
    cfg = config or CacheConfig()
    cfg.check()
    src = data
    sids = np.array(sorted(int(s) for s in (src.sample_ids() if sample_ids is None else sample_ids)), np.int64)
    if len(sids) == 0:
        raise DifflensError("no samples to build a feature cache from")
    run = _Run(features, src, cfg, sids, torch.tensor(src.timesteps, dtype=torch.float32),
               split_of(src.prompt_ids(sids), cfg.split_seed, cfg.explain_fraction))
    labels = src.token_labels(sids)

    thr, gmax = _calibrate(run, seed)
    arrays = _statistics(run, thr, labels)
    arrays["calib_max"] = gmax.numpy().astype(np.float32)
    arrays.update(_select_examples(run, arrays))
    arrays["map_features"] = _map_features(map_features, arrays, run.shape[3])
    top_maps, quant_maps = _token_maps(run, arrays)

    info = {
        "version": CACHE_VERSION,
        "source": features.describe(),
        "data": dict(src.description),
        "site": features.site,
        "steps": [int(s) for s in src.steps],
        "timesteps": [float(t) for t in src.timesteps],
        "grid_hw": list(src.grid_hw),
        "num_samples": int(len(sids)),
        "concepts": list(CONCEPT_NAMES) if labels is not None else None,
    }
    cache = FeatureCache(info, _ordered(arrays, labels is not None), top_maps, quant_maps, cfg)
    if out is not None:
        cache.save(out)
    return cache


def _ordered(arrays: dict[str, np.ndarray], with_concepts: bool) -> dict[str, np.ndarray]:
    """The arrays in the order the cache has always saved them (so files stay byte-identical)."""
    order = ["sample_ids", "split", "threshold", "calib_max", "max", "frequency", "frequency_thr", "profile_mean",
             "profile_max", "hist_counts", "hist_nonpos", "sample_score", "sample_step", "sample_qualifies", "sample_max",
             "sample_max_step"]
    if with_concepts:
        order += ["concept_tp", "concept_active", "concept_count", "image_concepts"]
    order += ["top_sample", "top_value", "top_step", "quant_sample", "quant_value", "quant_step", "map_features"]
    return {k: arrays[k] for k in order}


def _calibrate(run: _Run, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass A: each feature's max over the calibration images fixes its threshold; (thr, max)."""
    cfg, sids, F = run.cfg, run.sids, run.shape[3]
    calib = sids
    if cfg.calib_samples is not None and cfg.calib_samples < len(sids):
        calib = np.sort(np.random.default_rng(seed).choice(sids, size=cfg.calib_samples, replace=False))
    gmax = torch.full((F,), -math.inf)
    for _, codes in run.batches(calib, "calibrate"):
        gmax = torch.maximum(gmax, codes.amax((0, 1, 2)))
    thr = torch.where(gmax > 0, torch.clamp(cfg.rel_threshold * gmax, min=cfg.abs_threshold), torch.tensor(float(cfg.abs_threshold)))
    return thr, gmax


class _ConceptCounts:
    """Per step and split, how often "token active" coincides with "token has concept c"."""

    def __init__(self, labels: np.ndarray, S: int, F: int):
        self.cm_all = concept_matrix(labels)  # [n, T, C]
        C = self.cm_all.shape[-1]
        self.tp = torch.zeros(2, S, F, C, dtype=torch.float64)
        self.act_cnt = torch.zeros(2, S, F, dtype=torch.float64)
        self.con_cnt = torch.zeros(2, S, C, dtype=torch.float64)

    def add(self, rows: np.ndarray, split: np.ndarray, act: torch.Tensor) -> None:
        b, S, T, F = act.shape
        C = self.cm_all.shape[-1]
        L = torch.from_numpy(self.cm_all[rows].reshape(b * T, C)).float()  # [bT, C]
        row_split = torch.from_numpy(np.repeat(split[rows], T).astype(np.int64))
        act_SnF = act.permute(1, 0, 2, 3).reshape(S, b * T, F)
        if float(act.float().mean()) < 0.05:  # sparse features (SAE, ITDA): add label rows per active entry
            s_i, n_i, f_i = act_SnF.nonzero(as_tuple=True)
            slot = (row_split[n_i] * S + s_i) * F + f_i
            self.tp.view(-1, C).index_add_(0, slot, L[n_i].double())
            self.act_cnt.view(-1).index_add_(0, slot, torch.ones(len(slot), dtype=torch.float64))
        else:  # dense features (neurons, random directions): matrix products
            A = act_SnF.float()  # [S, bT, F]
            for k in (0, 1):
                mk = (row_split == k).float()
                if mk.any():
                    self.tp[k] += torch.einsum("snf,nc->sfc", A, L * mk[:, None]).double()
                    self.act_cnt[k] += (A * mk[None, :, None]).sum(1).double()
        for k in (0, 1):
            self.con_cnt[k] += L[row_split == k].sum(0).double()[None, :]

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "concept_tp": self.tp.float().numpy(),  # [2, S, F, C]
            "concept_active": self.act_cnt.float().numpy(),  # [2, S, F]
            "concept_count": self.con_cnt.float().numpy(),  # [2, S, C]
            "image_concepts": self.cm_all.any(1),  # [n, C]
        }


def _statistics(run: _Run, thr: torch.Tensor, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Pass B over all images: frequency, histogram, profiles, per-image scores (and concept counts)."""
    cfg = run.cfg
    n, S, T, F = run.shape
    pos_of = {int(s): i for i, s in enumerate(run.sids)}
    edges_lo, bpo = cfg.hist_log2_min, cfg.hist_bins_per_octave
    B = (cfg.hist_log2_max - cfg.hist_log2_min) * bpo
    n_pos = torch.zeros(F, dtype=torch.float64)
    n_act = torch.zeros(F, dtype=torch.float64)
    sum_SF = torch.zeros(S, F, dtype=torch.float64)
    maxsum_SF = torch.zeros(S, F, dtype=torch.float64)
    hist = torch.zeros(F * B, dtype=torch.int64)
    nonpos = torch.zeros(F, dtype=torch.int64)
    gmax_all = torch.full((F,), -math.inf)
    s_score = np.zeros((n, F), np.float32)
    s_step = np.zeros((n, F), np.int16)
    s_qual = np.zeros((n, F), bool)
    s_max = np.zeros((n, F), np.float32)
    s_max_step = np.zeros((n, F), np.int16)
    concepts = _ConceptCounts(labels, S, F) if labels is not None else None
    for b_sids, codes in run.batches(run.sids, "statistics"):  # codes [b, S, T, F]
        rows = np.array([pos_of[int(s)] for s in b_sids])
        gmax_all = torch.maximum(gmax_all, codes.amax((0, 1, 2)))
        pos = codes > cfg.abs_threshold
        act = codes > thr
        n_pos += pos.sum((0, 1, 2)).double()
        n_act += act.sum((0, 1, 2)).double()
        sum_SF += codes.sum((0, 2)).double()
        stepmax = codes.amax(2)  # [b, S, F]
        maxsum_SF += stepmax.sum(0).double()
        qual = act.sum(2) >= cfg.min_tokens  # [b, S, F]
        score, sstep = torch.where(qual, stepmax, torch.tensor(-math.inf)).max(1)
        q_any = qual.any(1)
        mx, mstep = stepmax.max(1)
        s_score[rows] = torch.where(q_any, score, torch.zeros(())).numpy()
        s_step[rows] = sstep.numpy()
        s_qual[rows] = q_any.numpy()
        s_max[rows] = mx.numpy()
        s_max_step[rows] = mstep.numpy()
        flat = codes.reshape(-1, F)
        nz = (flat > 0).nonzero()
        if nz.numel():
            v = flat[nz[:, 0], nz[:, 1]]
            bins = torch.floor((torch.log2(v) - edges_lo) * bpo).long().clamp_(0, B - 1)
            hist += torch.bincount(nz[:, 1] * B + bins, minlength=F * B)
        nonpos += (flat <= 0).sum(0)
        if concepts is not None:
            concepts.add(rows, run.split, act)

    total_tokens = float(n * S * T)
    arrays: dict[str, np.ndarray] = {
        "sample_ids": run.sids,
        "split": run.split,
        "threshold": thr.numpy().astype(np.float32),
        "max": gmax_all.numpy().astype(np.float32),
        "frequency": (n_pos / total_tokens).float().numpy(),
        "frequency_thr": (n_act / total_tokens).float().numpy(),
        "profile_mean": (sum_SF.T / (n * T)).float().numpy(),  # [F, S]
        "profile_max": (maxsum_SF.T / n).float().numpy(),  # [F, S]
        "hist_counts": hist.reshape(F, B).numpy(),
        "hist_nonpos": nonpos.numpy(),
        "sample_score": s_score,
        "sample_step": s_step,
        "sample_qualifies": s_qual,
        "sample_max": s_max,
        "sample_max_step": s_max_step,
    }
    if concepts is not None:
        arrays.update(concepts.arrays())
    return arrays


def _select_examples(run: _Run, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Top-N qualifying images per split and images at evenly spaced quantiles of the per-image max."""
    cfg, sids, split = run.cfg, run.sids, run.split
    F = run.shape[3]
    s_score, s_step, s_qual = arrays["sample_score"], arrays["sample_step"], arrays["sample_qualifies"]
    s_max, s_max_step = arrays["sample_max"], arrays["sample_max_step"]
    N, Q = cfg.top_n, cfg.n_quantiles
    top_sample = np.full((F, 2, N), -1, np.int64)
    top_value = np.zeros((F, 2, N), np.float32)
    top_step = np.zeros((F, 2, N), np.int16)
    for k in (0, 1):
        masked = np.where(s_qual & (split[:, None] == k), s_score, -np.inf)  # [n, F]
        order = np.argsort(-masked, axis=0, kind="stable")[:N]  # [<=N, F]
        vals = np.take_along_axis(masked, order, 0)
        r = order.shape[0]
        ok = np.isfinite(vals)
        top_sample[:, k, :r] = np.where(ok, sids[order], -1).T
        top_value[:, k, :r] = np.where(ok, vals, 0).T
        top_step[:, k, :r] = np.where(ok, np.take_along_axis(s_step, order, 0), 0).T
    quant_sample = np.full((F, Q), -1, np.int64)
    quant_value = np.zeros((F, Q), np.float32)
    quant_step = np.zeros((F, Q), np.int16)
    if Q:
        thr_np = arrays["threshold"]
        for f in range(F):
            cand = np.flatnonzero(s_max[:, f] > thr_np[f])
            if cand.size == 0:
                continue
            cand = cand[np.argsort(s_max[cand, f], kind="stable")]
            picks = np.unique(np.minimum((np.arange(Q) + 0.5) / Q * cand.size, cand.size - 1).astype(int))
            chosen = cand[picks]
            quant_sample[f, : len(chosen)] = sids[chosen]
            quant_value[f, : len(chosen)] = s_max[chosen, f]
            quant_step[f, : len(chosen)] = s_max_step[chosen, f]
    return dict(top_sample=top_sample, top_value=top_value, top_step=top_step,
                quant_sample=quant_sample, quant_value=quant_value, quant_step=quant_step)


def _map_features(map_features, arrays: dict[str, np.ndarray], F: int) -> np.ndarray:
    """The feature ids that get token maps: given, chosen from the statistics, or every live one."""
    if callable(map_features):
        map_features = map_features(arrays)
    if map_features is None:
        mf = np.flatnonzero(arrays["frequency"] > 0)
    else:
        mf = np.unique(np.asarray(list(map_features), np.int64))
        if mf.size and (mf.min() < 0 or mf.max() >= F):
            raise DifflensError(f"map_features must be feature ids in [0, {F})")
    return mf.astype(np.int64)


def _token_maps(run: _Run, arrays: dict[str, np.ndarray]) -> tuple[SparseMaps, SparseMaps]:
    """Pass C: token maps [steps, tokens] of the chosen images of the features that get maps."""
    _, S, T, _ = run.shape
    N, Q = run.cfg.top_n, run.cfg.n_quantiles
    mf, top_sample, quant_sample = arrays["map_features"], arrays["top_sample"], arrays["quant_sample"]
    top_maps = SparseMaps((len(mf), 2, N, S, T))
    quant_maps = SparseMaps((len(mf), Q, S, T))
    need: dict[int, list[tuple[int, int, int, int, int]]] = {}  # sid -> (which, row, a, r, feature)
    for m, f in enumerate(mf.tolist()):
        for k in (0, 1):
            for r in range(N):
                s = int(top_sample[f, k, r])
                if s >= 0:
                    need.setdefault(s, []).append((0, m, k, r, f))
        for q in range(Q):
            s = int(quant_sample[f, q])
            if s >= 0:
                need.setdefault(s, []).append((1, m, q, 0, f))
    if need:
        for b_sids, codes in run.batches(sorted(need), "token maps"):
            codes = codes.numpy()
            for i, s in enumerate(b_sids.tolist()):
                for which, m, a, r, f in need[s]:
                    if which == 0:
                        top_maps.put((m, a, r), codes[i, :, :, f])
                    else:
                        quant_maps.put((m, a), codes[i, :, :, f])
    return top_maps.finish(), quant_maps.finish()


def feature_maps(features: FeatureSource, data: SampleSource, want: dict[int, set[int] | list[int]], *,
                 rows_per_batch: int = 8192) -> dict[tuple[int, int], np.ndarray]:
    """{(feature, sample_id): [steps, tokens]} for the requested pairs, in one pass over those images
    (e.g. a feature's activation on the negatives of its test set)."""
    ts = torch.tensor(data.timesteps, dtype=torch.float32)
    out: dict[tuple[int, int], np.ndarray] = {}
    if not want:
        return out
    bar = progress(total=len(want), desc=f"{features.name}: maps of test images", unit="img")
    for b_sids, acts in data.iter_acts(features.site, sorted(want), rows_per_batch):
        codes = _encode(features, acts, ts).numpy()
        for i, s in enumerate(b_sids.tolist()):
            for f in want[s]:
                out[(int(f), s)] = np.ascontiguousarray(codes[i, :, :, int(f)])
        bar.update(len(b_sids))
    bar.close()
    return out
