"""The concept study's dictionary-free reference rows: what a dictionary's colour steering is
measured against (the difference of means and a random direction of its norm, at the prompt's
colour word) and the ceiling (the prompt itself changed). Kept apart from `study_concepts`, which
runs the dictionaries' rows; the study passes in how it generates and scores images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.hooks import Site
from difflens.intervene.directions import concept_direction
from difflens.intervene.steer import Steer

if TYPE_CHECKING:
    from difflens.models.base import Adapter


def reference_rows(adapter: Adapter, store, site: str, cases, judge: Callable, generate: Callable, reference_images: Callable,
                   seed: int, which: Sequence[str]) -> dict:
    """The rows of `which` over `cases` (the study's `Case`s): "prompt changed: color/object" reads
    the images of the re-prompted reference recordings; "difference of means" steers at the colour
    word's tokens by the target colour's mean `site` activation minus the source colour's, at its
    own norm, and "random direction" by a random direction of that norm. `judge(images, factor)`
    scores a row, `generate(make, factor)` makes its images (the study's own)."""
    out: dict = {}
    for factor in ("color", "object"):
        if f"prompt changed: {factor}" in which:
            out[f"prompt changed: {factor}"] = judge(reference_images(factor), factor)
    steer_rows = [(r, r == "random direction") for r in ("difference of means", "random direction") if r in which]
    if not steer_rows:
        return out
    truth = adapter.ground_truth()
    tok = adapter.text_tokenizer()
    if truth is None or tok is None or Site.parse(site).stream != "txt":
        out["skipped"] = "difference of means and random direction need a ground-truth world and a text-stream site"
        return out
    cid = {c: i for i, c in enumerate(truth.concepts)}
    words = []
    for c in cases:
        lab = truth.text_labels(c.prompt, tok)
        words.append(np.flatnonzero((lab >> cid[f"color={c.color}"]) & 1).tolist())
    dirs: dict[tuple[str, str], torch.Tensor | None] = {}
    gen = torch.Generator().manual_seed(seed)

    def direction(c, random: bool):
        key = (c.color, c.to_color)
        if key not in dirs:
            try:
                dirs[key] = concept_direction(store, site, f"color={c.to_color}", against=[f"color={c.color}"], truth=truth)
            except DifflensError:  # the store has no token of one of the two colours
                dirs[key] = None
        v = dirs[key]
        if v is None:
            return None, 0.0
        return torch.randn(v.shape, generator=gen) if random else v, float(v.norm())

    for row, random in steer_rows:
        def make(k, j, random=random):
            v, norm = direction(cases[k], random) if words[k] else (None, 0.0)
            if v is None:
                return []
            return [Steer(direction=v, site=site, scale=norm, mode="absolute", tokens=words[k], samples=[j])]
        entry = judge(generate(make, "color"), "color")
        entry["color_pairs_without_direction"] = sum(v is None for v in dirs.values())
        out[row] = entry
    return out
