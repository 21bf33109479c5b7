"""Concept directions without a dictionary: the difference of means between tokens that carry a
concept and tokens that do not — the baseline a dictionary's concept features are measured against.

    d = concept_direction(store, "transformer_blocks.1:img", "color=red")
    Steer(direction=d, site="transformer_blocks.1:img", scale=0.8)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from difflens.errors import DifflensError


def concept_direction(store, site: str, concept: str, *, against: Sequence[str] | None = None, steps: Sequence[int] | None = None,
                      max_rows: int = 60000, seed: int = 0, truth=None) -> torch.Tensor:
    """mean(x | concept) − mean(x | not concept) over the store's labelled tokens at `site` ([D], unnormalised).

    `against` restricts the negatives to tokens carrying one of those concepts (e.g. the other
    colours, so the direction is "red rather than another colour", not "object rather than
    background"). Labels are the store's per-token concept bitmasks (ground-truth worlds only),
    read through `truth` (default: the world of the store's model, `intervene.truth.store_truth`)."""
    from difflens.intervene.truth import concept_ids, store_truth

    if site not in store.sites:
        raise DifflensError(f"store {store.root} has no site {site!r}: harvest it first")
    ids = concept_ids(store_truth(store, truth))
    if concept not in ids:
        raise DifflensError(f"unknown concept {concept!r}: write factor=value, e.g. color=red")
    meta = store.meta(site, ["step", "labels"])
    if "labels" not in meta or meta["labels"] is None:
        raise DifflensError(f"store {store.root} has no token labels: difference-of-means directions need a ground-truth world")
    labels = np.asarray(meta["labels"], np.int64)
    keep = np.ones(len(labels), bool)
    if steps is not None:
        keep &= np.isin(meta["step"], np.asarray(list(steps)))
    has = ((labels >> ids[concept]) & 1).astype(bool)
    if against:
        neg_mask = np.zeros(len(labels), bool)
        for c in against:
            if c not in ids:
                raise DifflensError(f"unknown concept {c!r} in against")
            neg_mask |= ((labels >> ids[c]) & 1).astype(bool)
        neg_mask &= ~has
    else:
        neg_mask = ~has
    rng = np.random.default_rng(seed)

    def mean_of(mask):
        rows = np.nonzero(mask & keep)[0]
        if rows.size == 0:
            raise DifflensError(f"no tokens {'with' if mask is has else 'without'} {concept} at {site} in {store.root}")
        if rows.size > max_rows:
            rows = np.sort(rng.choice(rows, size=max_rows, replace=False))
        return store.read_rows(site, rows).float().mean(0)

    return mean_of(has) - mean_of(neg_mask)
