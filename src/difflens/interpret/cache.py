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

The format (`CacheConfig`, `SparseMaps`, `Example`, `FeatureCache`) lives here; the passes in
`difflens.interpret.cache_passes`; `difflens.interpret.cache_build.build_cache` runs them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from difflens.errors import DifflensError
from difflens.utils import atomic_write_bytes, write_json

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
