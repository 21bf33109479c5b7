"""Using a harvest's streamed top-k cache (`harvest --dict DIR --topk N`) in interpretation.

The feature cache calibrates each feature's threshold on its max over every token of every image
(pass A, a whole pass of encoding over the store). A complete streamed top-k cache of the same
dictionary over the same store already holds that max (`TopKAccumulator.max_all`), so
`interpret` takes it from there and skips the pass; every other array of the cache comes out the
same (tests/test_topk_use.py).

What the streamed cache cannot replace, and why: pass B needs, per image and feature, how many
tokens exceed the calibrated threshold at each step (only known after every image was seen), and
the concept counts need every token's labels; pass C needs the maps of every recorded step of the
chosen images, while the stream keeps one step's map per (image, step) entry. Both still read the
store.

`streamed_max` decides, and says why when it does not use a cache that is there:
- it must be filled with the same weights (fingerprint), at the same site, over every unit of
  the harvest, the conditional branch, the same recorded steps and exactly these samples;
- the store must keep activations at the precision the stream saw (fp32, or the model's dtype);
- calibration must use every image (no --calib-samples).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from difflens.interpret.cache import CacheConfig
from difflens.interpret.features import FeatureSource
from difflens.interpret.sources import SampleSource


def _candidates(root: Path, site: str) -> list[tuple[Path, dict]]:
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            info = json.loads((folder / "topk.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if info.get("site") == site:
            out.append((folder, info))
    return out


def streamed_max(features: FeatureSource, src: SampleSource, sids, cfg: CacheConfig) -> tuple[torch.Tensor | None, str | None]:
    """(each feature's max over every token, note) from a matching streamed top-k cache of the store
    `src` reads, or (None, why not) when there is one for this dictionary that cannot be used, or
    (None, None) when there is none."""
    desc = src.description
    if desc.get("kind") != "store" or features.kind in ("neurons", "random"):  # baselines: no harvest cache
        return None, None
    cands = _candidates(Path(desc["path"]) / "topk", features.site)
    if not cands:
        return None, None
    fp = features.fingerprint()
    match = [(f, i) for f, i in cands if i.get("fingerprint") == fp]
    if not match:
        same = [(f, i) for f, i in cands if int((i.get("source") or {}).get("num_features", -1)) == features.num_features]
        if same:  # a cache of this site and width, but of other weights: e.g. the dictionary was retrained
            listed = ", ".join(f"{f} ({i.get('fingerprint')})" for f, i in same)
            return None, (f"{features.name}: ignored the streamed top-k cache {listed}: filled with other weights than "
                          f"this dictionary's ({fp}); the store was re-encoded")
        return None, None
    folder, info = match[0]
    why = _unusable(info, src, sids, cfg)
    if why:
        return None, f"{features.name}: did not use the streamed top-k cache {folder}: {why}; the store was re-encoded"
    from safetensors import safe_open

    with safe_open(str(folder / "topk.safetensors"), "pt") as f:
        if "max_all" not in f.keys():
            return None, f"{features.name}: the streamed top-k cache {folder} predates per-feature maxima; re-harvest to use it"
        gmax = f.get_tensor("max_all")
    return gmax, f"{features.name}: thresholds calibrated from the streamed top-k cache {folder} (one store pass saved)"


def _unusable(info: dict, src: SampleSource, sids, cfg: CacheConfig) -> str | None:
    if cfg.calib_samples is not None:
        return "--calib-samples calibrates on a subset of images, the stream saw all of them"
    if not info.get("complete"):
        return f"it holds {info.get('units')} of {info.get('units_total')} harvest units (resume the harvest to complete it)"
    if getattr(src, "branch", "cond") != "cond":
        return "it was filled from the conditional rows, this run reads the unconditional branch"
    if [int(s) for s in info.get("steps", [])] != [int(s) for s in src.steps]:
        return f"it saw steps {info.get('steps')}, the store's rows are at steps {list(src.steps)}"
    n_all = len(src.sample_ids())
    if int(info.get("samples", -1)) != n_all or len(np.asarray(sids)) != n_all:
        return (f"it saw {info.get('samples')} images, this run uses {len(np.asarray(sids))} of the store's {n_all} "
                "(e.g. --adherent-only)")
    store = getattr(src, "store", None)
    if store is not None:
        hc = next((c.get("harvest_config") or {} for c in store.manifest.get("configs", [])[:1]), {})
        if store.dtype != "fp32" and store.dtype != hc.get("model_dtype"):
            return (f"the store keeps {store.dtype} activations of a {hc.get('model_dtype')} model, so re-encoding them "
                    "does not give the codes the stream saw")
    return None
