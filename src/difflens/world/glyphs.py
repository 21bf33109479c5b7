"""Digit glyphs from scikit-learn's bundled 8x8 digits (offline), a few typical instances per digit."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

INSTANCES_PER_DIGIT = 3


@lru_cache(maxsize=1)
def digit_glyphs() -> np.ndarray:
    """[10, INSTANCES, 8, 8] float in [0, 1]: the instances closest to each class mean (clean, legible)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    out = np.zeros((10, INSTANCES_PER_DIGIT, 8, 8), np.float32)
    for d in range(10):
        cls = images[data.target == d]
        dist = ((cls - cls.mean(0)) ** 2).sum(axis=(1, 2))
        out[d] = cls[np.argsort(dist)[:INSTANCES_PER_DIGIT]]
    return out


def glyph_mask(digit: int, instance: int, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a digit glyph upsampled bilinearly and thresholded."""
    g = digit_glyphs()[digit, instance]
    # Pixel centres of the target grid mapped into the 8x8 source grid.
    coords = (np.arange(size) + 0.5) * (8.0 / size) - 0.5
    c = np.clip(coords, 0, 7)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, 7)
    f = c - i0
    rows = g[i0] * (1 - f)[:, None] + g[i1] * f[:, None]
    up = rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]
    return up > 0.4
