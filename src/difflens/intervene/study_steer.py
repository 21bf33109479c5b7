"""Steering study: success rate against scale, step window and CFG branch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from difflens.errors import DifflensError
from difflens.utils import write_json
from difflens.intervene.base import default_steps
from difflens.intervene.region import Window
from difflens.intervene.steer import Steer
from difflens.intervene.study_items import (
    default_windows,
    generate_items,
    object_region,
    pixel_change,
    progress_bar,
    read_at,
    study_classifier,
    study_items,
    success_rate,
)
from difflens.intervene.study_labels import STUDY_FACTORS, features_by_concept
from difflens.intervene.study_plots import steering_files
from difflens.intervene.truth import truth_of

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary
    from difflens.models.base import Adapter

# ---- steering ------------------------------------------------------------------------------------
def run_steering_study(
    adapter: Adapter,
    dictionary: Dictionary,
    feature_labels: Mapping[int, str],
    out_dir: str | Path | None = None,
    *,
    factors: Sequence[str] = STUDY_FACTORS,
    scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    mode: str = "token-norm",
    windows: Mapping[str, Window] | None = None,
    window_scale: float | None = None,
    features_per_concept: int = 1,
    prompts_per_feature: int = 6,
    use_region: bool = True,
    branch: str = "both",
    compare_branches: Sequence[str] = (),
    steps: int | None = None,
    guidance: float | None = None,
    stats=None,
    classifier=None,
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Steering success rate against scale and step window (see the module docstring).

    The scale sweep uses the first window (default: the first 5/7 of the steps); the window sweep
    uses `window_scale` (default: the scale with the best success rate in the scale sweep).
    """
    truth = truth_of(adapter)
    clf = study_classifier(classifier, truth)
    steps = default_steps(adapter) if steps is None else int(steps)
    windows = dict(windows or default_windows(steps))
    by_concept = features_by_concept(feature_labels, factors, truth=truth)
    if not by_concept:
        raise DifflensError(
            f"no feature is labelled with a {'/'.join(factors)} concept (labels like 'color=red'): "
            "label features first (label_features or the interpretation stage)"
        )
    rng = np.random.default_rng(seed)
    cases = []  # (feature, concept, item)
    for concept, feats in sorted(by_concept.items()):
        factor, value = concept.split("=", 1)
        items = study_items(factor, value, prompts_per_feature, rng, has=False, seed0=seed * 1000, truth=truth)
        for f in feats[:features_per_concept]:
            cases += [(f, concept, it) for it in items]
    items = [c[2] for c in cases]
    targets = [c[1].split("=", 1)[1] for c in cases]
    factor_of = [c[1].split("=", 1)[0] for c in cases]
    regions = [object_region(it.position, truth=truth) if use_region else None for it in items]
    size, grid = (truth.image_size,) * 2, (truth.grid,) * 2
    masks = [(r.pixel_mask(size, grid) if r is not None else np.ones(size, bool)) for r in regions]
    window_names = list(windows)
    compare_branches = [b for b in compare_branches if b != branch]
    n_configs = len(scales) * (1 + len(compare_branches)) + len(window_names) - 1
    bar = progress_bar(len(items) * (1 + n_configs), "steering study", show_progress)
    clean = generate_items(adapter, items, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)

    def readings(images):
        out = [None] * len(items)
        for fac in set(factor_of):
            idx = [i for i in range(len(items)) if factor_of[i] == fac]
            vals = read_at(clf, images[idx], fac, [items[i].position for i in idx], truth=truth)
            for i, v in zip(idx, vals):
                out[i] = v
        return out

    before = readings(clean)

    def run(scale: float, window: Window, branch: str = branch):
        def make(k, j):
            return [Steer(dictionary, [cases[k][0]], scale, mode=mode, window=window, region=regions[k], samples=[j],
                          stats=stats, branch=branch)]

        imgs = generate_items(adapter, items, make, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
        after = readings(imgs)
        res = success_rate(before, after, targets)
        per_factor = {}
        for fac in sorted(set(factor_of)):
            idx = [i for i in range(len(items)) if factor_of[i] == fac]
            per_factor[fac] = success_rate([before[i] for i in idx], [after[i] for i in idx], [targets[i] for i in idx])
        res["by_factor"] = per_factor
        res.update(pixel_change(clean, imgs, masks))
        return res, imgs, after

    first = window_names[0]
    by_scale, scale_imgs = [], {}
    for s in scales:
        res, imgs, after = run(float(s), windows[first])
        by_scale.append({"scale": float(s), "window": first, **res})
        scale_imgs[float(s)] = (imgs, after)
    rated = [r for r in by_scale if r["success_rate"] is not None]
    best_scale = (
        float(window_scale)
        if window_scale is not None
        else (max(rated, key=lambda r: (r["success_rate"], -abs(r["scale"])))["scale"] if rated else float(scales[0]))
    )
    by_window = []
    for name in window_names:
        if name == first and best_scale in scale_imgs:
            r = next(r for r in by_scale if r["scale"] == best_scale)
            by_window.append({**r, "window": name})
            continue
        res, _, _ = run(best_scale, windows[name])
        by_window.append({"scale": best_scale, "window": name, **res})
    by_branch = {}
    for b in compare_branches:
        by_branch[b] = []
        for sc in scales:
            res, _, _ = run(float(sc), windows[first], b)
            by_branch[b].append({"scale": float(sc), "window": first, "branch": b, **res})
    bar.close()
    result = {
        "mode": mode,
        "branch": branch,
        "region": "object box" if use_region else "all tokens",
        "steps": steps,
        "n_cases": len(items),
        "features": {c: feats[:features_per_concept] for c, feats in sorted(by_concept.items())},
        "before_target_rate": float(np.mean([b == t for b, t in zip(before, targets)])) if items else None,
        "by_scale": by_scale,
        "window_scale": best_scale,
        "by_window": by_window,
        "by_scale_other_branches": by_branch,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["files"] = steering_files(out, result, items, cases, clean, scale_imgs, before, targets)
        write_json(out / "steering.json", result)
    return result
