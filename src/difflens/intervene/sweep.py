"""Steering sweeps: one prompt/seed at several scales, beside the unsteered image, in one batch.

The whole sweep is a single generate() call: sample 0 is unsteered and sample i+1 carries a
`Steer` restricted to it (`samples=[i+1]`), so the sweep costs one batched generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from difflens.intervene.run import generate_with
from difflens.intervene.steer import Steer


def steer_sweep(
    adapter,
    dictionary,
    features: Sequence[int] | int,
    scales: Sequence[float],
    prompt: str,
    seed: int,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    classifier=None,
    read: tuple[str, str | None] | None = None,
    **steer_kwargs,
) -> dict:
    """Images [1 + len(scales), H, W, 3] (unsteered first) with captions.

    `read=(factor, position)` adds the factor classifier's reading to each caption (toy model).
    Extra keyword arguments go to every `Steer` (mode, window, region, branch, stats, ...).
    """
    scales = [float(s) for s in scales]
    n = len(scales) + 1
    ivs = [Steer(dictionary, features, s, samples=[i + 1], **steer_kwargs) for i, s in enumerate(scales)]
    gen = generate_with(adapter, [prompt] * n, [int(seed)] * n, ivs, steps=steps, guidance=guidance)
    labels = ["unsteered"] + [f"scale {s:+g}" for s in scales]
    readings = None
    if read is not None:
        factor, position = read
        readings = read_factor_safe(gen.images, factor, position, classifier)
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


def read_factor_safe(images, factor: str, position: str | None, classifier=None) -> list[str] | None:
    """The classifier's reading, or None when no classifier weights are available."""
    from difflens.errors import DifflensError
    from difflens.world.classifier import read_factor

    try:
        return read_factor(images, factor, position, classifier=classifier)
    except DifflensError:
        if classifier is not None:
            raise
        return None
