"""One concept-study run (`study_concepts`): its cases, how their images are read and scored, and
the state every row of every dictionary shares.

Kept apart from the rows (`study_concept_rows`) and from the study's entry point and table
(`study_concepts`) so that each can be read alone: this module knows nothing of dictionaries. A
row hands `ConceptRun.generate` a function giving each case's interventions and gets back every
case's image; the clean images, their readings and each reference recording are made once per
run, so rows and dictionaries differ only in the intervention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from difflens.intervene.run import record_activations
from difflens.intervene.study_items import ABSENT, Item, generate_items, object_mask
from difflens.intervene.study_labels import label_features
from difflens.intervene.truth import truth_of

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary
    from difflens.models.base import Adapter

LABEL_FACTORS = ("color", "object", "bgcolor")


@dataclass(frozen=True)
class Case(Item):
    """One prompt of the study (an `Item`) and the values it is moved to."""

    to_color: str
    to_object: str
    to_bgcolor: str


def make_cases(n: int, seed: int = 0, *, truth=None) -> list[Case]:
    """n cases, the values from `truth.factors` (default: `intervene.truth.truth_of()`)."""
    truth = truth_of(None, truth)
    values = truth.factors
    colors, positions, bg_colors = values["color"], values["position"], values["bgcolor"]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c, o = str(rng.choice(colors)), str(rng.choice(truth.study_objects))
        p, b = positions[i % len(positions)], bg_colors[(i // len(positions)) % len(bg_colors)]
        out.append(Case(
            truth.describe({"color": c, "object": o, "position": p, "bgcolor": b}), 10_000 + seed * 1000 + i, c, o, p, b,
            str(rng.choice([x for x in colors if x != c])),
            str(rng.choice([x for x in truth.study_objects if x != o])),
            str(rng.choice([x for x in bg_colors if x != b])),
        ))
    return out


def with_value(case: Case, factor: str, value: str, *, truth=None) -> str:
    """The case's prompt with one factor changed (the world's one template, so text tokens line up)."""
    values = {"color": case.color, "object": case.object, "position": case.position, "bgcolor": case.bgcolor}
    return truth_of(None, truth).describe({**values, factor: value})


class Readings:
    """The classifier's reading of colour/object at each case's position and of the background
    (through `truth.read_at`; ABSENT where no object is seen)."""

    def __init__(self, classifier, cases: Sequence[Case], truth=None):
        self.clf, self.cases, self.truth = classifier, list(cases), truth_of(None, truth)

    def __call__(self, images: np.ndarray) -> dict[str, list[str]]:
        got = self.truth.read_at(np.asarray(images), [c.position for c in self.cases], ("color", "object", "bgcolor"),
                                 reader=self.clf)
        return {f: [ABSENT if v is None else v for v in vs] for f, vs in got.items()}


def score(cases, clean: dict, after: dict, factor: str, *, mode: str = "reach") -> dict:
    """Success over cases whose clean image reads the prompted `factor`:
    reach: the factor now reads the case's target value; leave: it reads another value (object kept).
    `kept`: of those cases, the share whose other factors still read as in the clean image."""
    others = [f for f in ("color", "object", "bgcolor") if f != factor]
    elig = eligible(cases, clean, factor)
    if mode == "reach":
        hits = [i for i in elig if after[factor][i] == getattr(cases[i], "to_" + factor)]
    else:
        hits = [i for i in elig if after[factor][i] not in (getattr(cases[i], factor), ABSENT)]
    kept = [i for i in elig if all(after[f][i] == clean[f][i] for f in others)]
    n = len(elig)
    return {"success_rate": len(hits) / n if n else None, "successes": len(hits), "eligible": n,
            "kept_rate": len(kept) / n if n else None, "misses": [f"{getattr(cases[i], factor)}->{getattr(cases[i], 'to_' + factor)}:"
                                                                  f"{after[factor][i]}" for i in elig if i not in hits],
            "vanished": sum(after["object"][i] == ABSENT for i in elig)}


def eligible(cases, clean: dict, factor: str) -> list[int]:
    """The cases a row about `factor` counts: the clean image reads the prompted value."""
    return [i for i, c in enumerate(cases) if clean[factor][i] == getattr(c, factor)]


def pixel_mse(clean: np.ndarray, new: np.ndarray, masks: list[np.ndarray], which: Sequence[int]) -> tuple[float, float]:
    """Mean squared pixel change ([0,1] pixels) inside and outside the object's box, over cases `which`."""
    if not which:
        return 0.0, 0.0
    d = (((new.astype(np.float64) - clean.astype(np.float64)) / 255.0) ** 2).mean(-1)
    ins = [float(d[i][masks[i]].mean()) for i in which]
    outs = [float(d[i][~masks[i]].mean()) for i in which]
    return float(np.mean(ins)), float(np.mean(outs))


def concept_features(dictionary: Dictionary, store, n_features: int, *, min_f1: float = 0.05, show_progress: bool = False, truth=None):
    """{concept: its top features by F1} for the study's factors, from the store's ground truth."""
    _, info = label_features(dictionary, store, factors=LABEL_FACTORS, return_scores=True, show_progress=show_progress,
                             truth=truth)
    return {c: [f for f, s in fs[:n_features] if s >= min_f1] for c, fs in info["by_concept"].items()}


class ConceptRun:
    """What every row of one study shares: the adapter and generation settings, the cases, their
    clean images (made on construction) and readings, the progress bar, the count of images made
    (each row's cost is the count's change) and the reference recordings, one per (site, factor)."""

    def __init__(self, adapter: Adapter, cases: Sequence[Case], classifier, truth, bar, *, batch_size: int,
                 steps: int, guidance: float | None, reference_site: str):
        self.adapter, self.cases, self.truth, self.bar = adapter, list(cases), truth, bar
        self.n, self.batch_size, self.reference_site = len(self.cases), batch_size, reference_site
        self.read = Readings(classifier, self.cases, truth)
        self.gen_kw = dict(steps=steps, guidance=guidance)
        self.images = 0
        self.refs: dict[tuple[str, str], list] = {}  # (site, factor) -> recordings, one per batch of cases
        self.clean_img = self.generate()
        self.clean = self.read(self.clean_img)
        self.masks = [object_mask(c.position, truth) for c in self.cases]

    def _made(self, k: int) -> None:
        """Count k more images (shown beside the bar, which counts cases x rows, skipped ones too)."""
        self.images += k
        self.bar.set_postfix(images=self.images, refresh=False)

    def generate(self, make: Callable | None = None, factor: str | None = None) -> np.ndarray:
        """Images of every case with make(k, j)'s interventions (k: the case, j: its row in the
        batch). Only cases that `factor`'s score counts (the clean image reads the prompted value)
        and that get an intervention are generated; the others keep their clean image."""
        n, cases = self.n, self.cases
        if make is None:
            self._made(n)
            return generate_items(self.adapter, cases, None, batch_size=self.batch_size, bar=self.bar, **self.gen_kw)
        todo = [k for k in range(n) if (factor is None or self.clean[factor][k] == getattr(cases[k], factor)) and make(k, 0)]
        self.bar.update(n - len(todo))
        out = self.clean_img.copy()
        if todo:
            self._made(len(todo))
            out[todo] = generate_items(self.adapter, [cases[k] for k in todo], lambda i, j: make(todo[i], j),
                                       batch_size=self.batch_size, bar=self.bar, **self.gen_kw)
        return out

    def score(self, imgs: np.ndarray, factor: str, mode: str = "reach") -> dict:
        """`score` of the images' readings against the clean ones (a control row's entry)."""
        return score(self.cases, self.clean, self.read(imgs), factor, mode=mode)

    def judge(self, imgs: np.ndarray, factor: str, mode: str = "reach") -> dict:
        """A row's score on its images, with the pixel change inside and outside the object's box."""
        entry = self.score(imgs, factor, mode)
        entry["mse_inside_box"], entry["mse_outside_box"] = pixel_mse(self.clean_img, imgs, self.masks,
                                                                      eligible(self.cases, self.clean, factor))
        return entry

    def reference(self, site: str, factor: str) -> list:
        """Recordings at `site` of each case's prompt with `factor` moved to its target value (same
        seed), one per batch of cases: case k is sample k % batch_size of recording k // batch_size."""
        if (site, factor) not in self.refs:
            recs = []
            for a in range(0, self.n, self.batch_size):
                chunk = self.cases[a : a + self.batch_size]
                recs.append(record_activations(self.adapter, [with_value(c, factor, getattr(c, "to_" + factor), truth=self.truth)
                                                              for c in chunk], [c.seed for c in chunk], site, **self.gen_kw))
                self._made(len(chunk))
                self.bar.update(len(chunk))
            self.refs[(site, factor)] = recs
        return self.refs[(site, factor)]

    def reference_images(self, factor: str) -> np.ndarray:
        """The prompts with `factor` changed: the images of a reference recording (made at the
        reference site if no row recorded one)."""
        have = [recs for (_, f), recs in self.refs.items() if f == factor]
        recs = have[0] if have else self.reference(self.reference_site, factor)
        return np.concatenate([np.asarray(r.images) for r in recs])
