"""Ground-truth concept labels per image and per token (16x16 grid of 2x2-pixel tokens)."""

from __future__ import annotations

import numpy as np

from difflens.world import vocab as V
from difflens.world.scene import Rendered

BACKGROUND = -1


def token_owner(r: Rendered, min_cover: float = 0.5) -> np.ndarray:
    """int [16, 16]: index of the object a token shows (>= min_cover of its pixels), else BACKGROUND."""
    n = len(r.scene.objects)
    cover = r.object_masks.reshape(n, V.GRID, V.PATCH, V.GRID, V.PATCH).mean(axis=(2, 4))
    owner = np.where(cover.max(0) >= min_cover, cover.argmax(0), BACKGROUND)
    return owner.astype(np.int64)


def object_concepts(r: Rendered, i: int) -> list[str]:
    return [f"{k}={v}" for k, v in r.scene.objects[i].factors().items()]


def background_concepts(r: Rendered) -> list[str]:
    return [f"bgcolor={r.scene.bgcolor}", f"bg={r.scene.bg}"]


def concepts_to_mask(concepts) -> int:
    m = 0
    for c in concepts:
        m |= 1 << V.CONCEPT_ID[c]
    return m


def mask_to_concepts(mask: int) -> list[str]:
    return [c for i, c in enumerate(V.CONCEPTS) if (int(mask) >> i) & 1]


def image_concepts(r: Rendered) -> list[str]:
    out = []
    for i in range(len(r.scene.objects)):
        out += object_concepts(r, i)
    out += background_concepts(r)
    return sorted(set(out), key=V.CONCEPT_ID.get)


def token_label_masks(r: Rendered) -> np.ndarray:
    """int64 [256]: per image token (row-major over the 16x16 grid), a bitmask of its concepts."""
    owner = token_owner(r).reshape(-1)
    per_owner = {BACKGROUND: concepts_to_mask(background_concepts(r))}
    for i in range(len(r.scene.objects)):
        per_owner[i] = concepts_to_mask(object_concepts(r, i))
    return np.array([per_owner[int(o)] for o in owner], dtype=np.int64)


def concept_token_matrix(masks) -> np.ndarray:
    """bool [..., n_concepts] from int64 bitmasks [...]: the one place token bitmasks are decoded."""
    bits = np.arange(len(V.CONCEPTS), dtype=np.int64)
    return ((np.asarray(masks, dtype=np.int64)[..., None] >> bits) & 1).astype(bool)
