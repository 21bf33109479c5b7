"""Labelling dictionary features with ground-truth concepts (best F1 against per-token labels)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.utils import progress
from difflens.intervene.truth import concept_ids, store_truth, truth_of

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary

STUDY_FACTORS = ("color", "object")

# ---- labelling features from the store's ground truth -----------------------------------------
def label_features(
    dictionary: Dictionary,
    store,
    *,
    factors: Sequence[str] = STUDY_FACTORS,
    min_f1: float = 0.2,
    max_rows: int = 60000,
    steps: Sequence[int] | None = None,
    seed: int = 0,
    return_scores: bool = False,
    show_progress: bool = True,
    truth=None,
):
    """{feature: "factor=value"} for features whose firing best matches a concept with F1 >= min_f1.

    A feature fires on a token when its code is > 0; a concept holds on a token per the store's
    `labels` column (the world's ground truth). F1 is computed for every (feature, concept) pair
    of the chosen factors over (up to `max_rows`) rows of the site's stream (image tokens, or the
    prompt's words on a text stream); each feature takes its best
    concept. Labels are ordered by F1, best first. With `return_scores`, also returns
    {"f1": {f: score}, "by_concept": {concept: [[f, f1], ...top 10]}, "rows": n}.
    Concepts and label bitmasks are read through `truth` (default: the store's model's world).
    """
    truth = store_truth(store, truth)
    site = dictionary.cfg.site
    if site not in store.sites:
        raise DifflensError(f"store {store.root} has no site {site!r} (the dictionary's): harvest it first")
    bad = [f for f in factors if f not in truth.factors]
    if bad:
        raise DifflensError(f"unknown factors {bad}; use some of {', '.join(truth.factors)}")
    from difflens.store.format import STREAMS
    from difflens.hooks import Site

    meta = store.meta(site, ["timestep", "step", "stream", "labels"])
    keep = meta["stream"] == STREAMS[Site.parse(site).stream]
    if steps is not None:
        keep &= np.isin(meta["step"], np.asarray(list(steps)))
    rows = np.nonzero(keep)[0]
    if rows.size == 0:
        raise DifflensError(f"no rows at {site} in {store.root} (for the chosen steps)")
    rng = np.random.default_rng(seed)
    if rows.size > max_rows:
        rows = np.sort(rng.choice(rows, size=max_rows, replace=False))
    ids = concept_ids(truth)
    concepts = [c for c in truth.concepts if c.split("=", 1)[0] in factors]
    cols = np.array([ids[c] for c in concepts])
    F = dictionary.num_latents
    batch = int(max(64, min(4096, 2**24 // max(F, 1))))
    tp = torch.zeros(F, len(concepts), dtype=torch.float64)
    fired = torch.zeros(F, dtype=torch.float64)
    pos = torch.zeros(len(concepts), dtype=torch.float64)
    dictionary.eval()
    dev = dictionary.device
    chunks = range(0, rows.size, batch)
    for a in progress(chunks, desc="label features", unit="batch", **({} if show_progress else {"disable": True})):
        idx = rows[a : a + batch]
        x = store.read_rows(site, idx).to(dev, dictionary.param_dtype)
        t = torch.from_numpy(meta["timestep"][idx]).float().to(dev)
        with torch.no_grad():
            act = (dictionary.encode(x, t) > 0).double().cpu()
        y = torch.from_numpy(truth.decode(meta["labels"][idx])[:, cols]).double()
        tp += act.T @ y
        fired += act.sum(0)
        pos += y.sum(0)
    f1 = 2 * tp / (fired[:, None] + pos[None, :]).clamp_min(1)
    score, best = f1.max(dim=1)
    order = torch.argsort(score, descending=True).tolist()
    labels = {int(f): concepts[int(best[f])] for f in order if float(score[f]) >= min_f1}
    if not return_scores:
        return labels
    by_concept = {}
    for j, c in enumerate(concepts):
        top = torch.argsort(f1[:, j], descending=True)[:10].tolist()
        by_concept[c] = [[int(f), round(float(f1[f, j]), 4)] for f in top]
    scores = {"f1": {int(f): round(float(score[f]), 4) for f in labels}, "by_concept": by_concept, "rows": int(rows.size)}
    return labels, scores


def read_labels(path: str | Path) -> dict[int, str]:
    """A labels JSON: {"feature id": "factor=value"} (or {"labels": {...}}); ids become ints."""
    from difflens.utils import read_json

    try:
        js = read_json(path)
    except (OSError, ValueError) as e:
        raise DifflensError(f"cannot read feature labels {path} ({e}); write JSON like {{\"12\": \"color=red\"}}") from None
    if isinstance(js, dict) and isinstance(js.get("labels"), dict):
        js = js["labels"]
    if not isinstance(js, dict):
        raise DifflensError(f"{path} must hold an object {{feature id: \"factor=value\"}}")
    out = {}
    for k, v in js.items():
        if isinstance(v, dict):
            v = v.get("label") or v.get("concept")
        try:
            out[int(k)] = str(v)
        except ValueError:
            raise DifflensError(f"{path}: feature id {k!r} is not an integer") from None
    return out


def features_by_concept(feature_labels: Mapping[int, str], factors: Sequence[str] = STUDY_FACTORS, *,
                        truth=None) -> dict[str, list[int]]:
    """concept -> its features, in the labels' order (best first when they come from label_features);
    labels that are not concepts of `truth` are skipped."""
    known = set(truth_of(None, truth).concepts)
    out: dict[str, list[int]] = {}
    for f, c in feature_labels.items():
        c = str(c).strip()
        if "=" not in c or c.split("=", 1)[0] not in factors:
            continue
        if c not in known:
            continue
        out.setdefault(c, []).append(int(f))
    return out
