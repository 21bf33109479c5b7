"""Readouts of a patched image: how far did it move from the target towards the source?

Every readout maps (patched images, the clean target and source images of their pairs) to
per-image arrays: `source` in [0, 1] (1 = the patched image shows the source's value) and,
where the readout can tell, `kept` (1 = everything else still reads as in the clean target).

* `WorldReadout` — a model with ground truth (the toy world): the image reader says which value
  the factor shows; source = it reads the source's value, kept = every other factor reads as in
  the clean target.
* `PixelReadout` — any model: the projection of the patched image onto the line from the target
  image to the source image (0 at the target, 1 at the source), clipped to [0, 1].
* `FunctionReadout` — a user's scoring function `fn(images, target_images, source_images) -> [B]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from difflens.errors import DifflensError


class PixelReadout:
    """Where the patched image lies between target (0) and source (1), in pixel space."""

    name = "pixel"

    def __call__(self, images, target_images, source_images) -> dict[str, np.ndarray]:
        x = np.asarray(images, np.float64) / 255.0
        t = np.asarray(target_images, np.float64) / 255.0
        s = np.asarray(source_images, np.float64) / 255.0
        d = (s - t).reshape(len(x), -1)
        num = ((x - t).reshape(len(x), -1) * d).sum(1)
        den = (d * d).sum(1)
        pos = np.where(den > 1e-12, num / np.maximum(den, 1e-12), 0.0)
        return {"source": np.clip(pos, 0.0, 1.0)}


class FunctionReadout:
    """A user's scoring function: fn(images, target_images, source_images) -> scores [B] in [0, 1]."""

    name = "function"

    def __init__(self, fn: Callable) -> None:
        if not callable(fn):
            raise DifflensError("FunctionReadout needs a callable fn(images, target_images, source_images) -> [B] scores")
        self.fn = fn

    def __call__(self, images, target_images, source_images) -> dict[str, np.ndarray]:
        out = np.asarray(self.fn(images, target_images, source_images), np.float64).reshape(-1)
        if out.shape[0] != len(images):
            raise DifflensError(f"the readout function returned {out.shape[0]} scores for {len(images)} images")
        return {"source": out}


class WorldReadout:
    """Ground-truth readout: does the factor read the source's value, and do the others stay?

    `reader(images, factor) -> list[str]` reads one factor per image (the world's classifier);
    `source_values` / `target_values` are per image; `others` are the factors that must keep the
    clean target's reading."""

    name = "world"

    def __init__(self, reader: Callable[[np.ndarray, str], list[str]], factor: str, others: Sequence[str]) -> None:
        self.reader = reader
        self.factor = factor
        self.others = tuple(o for o in others if o != factor)

    def __call__(self, images, target_images, source_images, *, source_values: Sequence[str]) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        got = self.reader(images, self.factor)
        src = np.array([g == v for g, v in zip(got, source_values)], np.float64)
        kept = np.ones(len(images), np.float64)
        for f in self.others:
            now = self.reader(images, f)
            ref = self.reader(np.asarray(target_images), f)
            kept *= np.array([a == b for a, b in zip(now, ref)], np.float64)
        return {"source": src, "kept": kept, "reads": np.array(got, dtype=object)}
