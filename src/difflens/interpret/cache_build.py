"""`build_cache`: run the cache passes (`difflens.interpret.cache_passes`) over a feature
source and a sample source and assemble the `FeatureCache` (format in `difflens.interpret.cache`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.interpret.cache import CACHE_VERSION, CacheConfig, FeatureCache
from difflens.interpret.cache_passes import (
    CacheRun,
    calibrate,
    choose_map_features,
    feature_maps,
    select_examples,
    statistics,
    thresholds,
    token_maps,
)
from difflens.interpret.features import FeatureSource
from difflens.interpret.sources import SampleSource, split_of

__all__ = ["build_cache", "feature_maps"]


def build_cache(
    features: FeatureSource,
    data: SampleSource,
    *,
    config: CacheConfig | None = None,
    map_features=None,
    sample_ids=None,
    out: str | Path | None = None,
    seed: int = 0,
    calibration: torch.Tensor | None = None,
) -> FeatureCache:
    """Compute the cache of `features` over the images of `data` (see the module docstring).

    map_features: feature ids that get token maps (None: every live feature), or a function of
    the statistics arrays returning them. The result is saved to `out` when given.
    calibration: each feature's max over every token of these samples, known already (a harvest's
    streamed top-k cache, `interpret.topk_use`): pass A is skipped, nothing else changes.
    """
    cfg = config or CacheConfig()
    cfg.check()
    src = data
    sids = np.array(sorted(int(s) for s in (src.sample_ids() if sample_ids is None else sample_ids)), np.int64)
    if len(sids) == 0:
        raise DifflensError("no samples to build a feature cache from")
    run = CacheRun(features, src, cfg, sids, torch.tensor(src.timesteps, dtype=torch.float32),
                   split_of(src.prompt_ids(sids), cfg.split_seed, cfg.explain_fraction))
    labels = src.token_labels(sids)
    vocabulary = src.vocabulary() if labels is not None else None  # the labels' world, never a model's name

    if calibration is None:
        thr, gmax = calibrate(run, seed)
    else:
        gmax = torch.as_tensor(calibration, dtype=torch.float32).reshape(-1)
        if gmax.shape[0] != run.shape[3] or cfg.calib_samples is not None:
            raise DifflensError(f"a calibration of {gmax.shape[0]} maxima cannot stand for {features.name}'s "
                                f"{run.shape[3]} features" + (" over a calibration subset" if cfg.calib_samples else ""))
        thr = thresholds(cfg, gmax)
    arrays = statistics(run, thr, labels, vocabulary)
    arrays["calib_max"] = gmax.numpy().astype(np.float32)
    arrays.update(select_examples(run, arrays))
    arrays["map_features"] = choose_map_features(map_features, arrays, run.shape[3])
    top_maps, quant_maps = token_maps(run, arrays)

    info = {
        "version": CACHE_VERSION,
        "source": features.describe(),
        "data": dict(src.description),
        "site": features.site,
        "steps": [int(s) for s in src.steps],
        "timesteps": [float(t) for t in src.timesteps],
        "grid_hw": list(src.grid_hw),
        "num_samples": int(len(sids)),
        "concepts": list(vocabulary.names) if vocabulary is not None else None,
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
