"""Steering sweeps: one prompt/seed at several scales, beside the unsteered image, in one batch.

The whole sweep is a single generate() call (`generate_sweep`): sample 0 is unsteered and sample
i+1 carries a `Steer` restricted to it (`samples=[i+1]`), so the sweep costs one batched generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from difflens.errors import DifflensError
from difflens.groundtruth import ground_truth_of
from difflens.intervene.run import generate_with
from difflens.intervene.steer import Steer

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary
    from difflens.models.base import Adapter


def steer_sweep(
    adapter: Adapter,
    dictionary: Dictionary,
    features: Sequence[int] | int,
    scales: Sequence[float],
    prompt: str,
    seed: int,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    read: tuple[str, str | None] | None = None,
    **steer_kwargs,
) -> dict:
    """Images [1 + len(scales), H, W, 3] (unsteered first) with captions.

    `read=(factor, position)` adds the model's ground-truth reading of that factor to each caption
    (models with a ground-truth world, e.g. the toy model; nothing otherwise).
    Extra keyword arguments go to every `Steer` (mode, window, region, branch, stats, ...).
    """
    scales = [float(s) for s in scales]
    ivs = [Steer(dictionary, features, s, **steer_kwargs) for s in scales]
    gen = generate_sweep(adapter, prompt, seed, ivs, steps=steps, guidance=guidance)
    labels = ["unsteered"] + [f"scale {s:+g}" for s in scales]
    readings = None
    if read is not None:
        factor, position = read
        readings = read_factor_safe(adapter, gen.images, factor, position)
        if readings is not None:
            labels = [f"{lab}: {r}" for lab, r in zip(labels, readings)]
    return {
        "images": np.asarray(gen.images),
        "labels": labels,
        "scales": [None] + scales,
        "readings": readings,
        "timesteps": list(gen.timesteps),
        "steer": ivs[0].describe() if ivs else None,
    }


def generate_sweep(adapter: Adapter, prompt: str, seed: int, interventions: Sequence, **gen_kwargs):
    """One generation of len(interventions) + 1 samples of one prompt and seed: sample 0 clean,
    intervention i restricted to sample i + 1 (its `samples` is set here). Used by `steer_sweep`
    and by every CLI verb whose build returns a sweep."""
    interventions = list(interventions)
    for i, iv in enumerate(interventions):
        iv.samples = (i + 1,)
    n = len(interventions) + 1
    return generate_with(adapter, [prompt] * n, [int(seed)] * n, interventions, **gen_kwargs)


def read_factor_safe(adapter: Adapter, images, factor: str, position: str | None) -> list[str] | None:
    """The ground truth's reading of one factor per image, or None when the model has no
    ground-truth world or its reader is missing (no classifier weights)."""
    truth = ground_truth_of(adapter)
    if truth is None:
        return None
    try:
        truth.ready()
        return truth.read_factor(np.asarray(images), factor, position)
    except DifflensError:
        return None
