"""The rows one dictionary runs in the concept study (`study_concepts`): colour and object edits,
the colour steer and the colour ablation (each with its control), and transfer from a reference.

Each row family is one method of `DictionaryRows`, which holds what the rows of one dictionary
share: its concept features and their store maxima, its partners (an image-stream dictionary that
the edits also swap in the object's box, a second site of the steer) and the object edit's code
shift. The images are made, read and scored by the run (`study_concept_run.ConceptRun`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from difflens.hooks import Site
from difflens.intervene.base import FiresOn
from difflens.intervene.edits import CodeEdit, CodeShift
from difflens.intervene.region import Window
from difflens.intervene.steer import feature_maxima
from difflens.intervene.study_concept_run import ConceptRun, concept_features
from difflens.intervene.study_concept_steer import SteerRecipe, SteerSetup, steer_interventions
from difflens.intervene.study_items import object_region
from difflens.intervene.study_shift import context_code_means, shift_delta, shift_ready
from difflens.intervene.transfer import Transfer

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary

FACTOR_OF_ROW = {"color": "color", "object": "object", "background": "bgcolor"}  # a row's first word -> its factor


@dataclass(frozen=True)
class RowSettings:
    """The study's settings every dictionary's rows use (see `run_concept_study` for each)."""

    n_features: int
    scale: float
    branch: str
    window: Window
    image_scale: Mapping[str, float]
    steer: SteerRecipe
    object_shift: tuple[int, float] | None
    seed: int


class DictionaryRows:
    """One dictionary's rows on a run. `image` is the name's image-stream dictionary (or None);
    `more` a text dictionary at a second site of the steer (or None). The steer's setup and its
    second site are made only when these rows include the colour steer."""

    def __init__(self, run: ConceptRun, d: Dictionary, rows, settings: RowSettings, store, *, image=None, more=None):
        self.run, self.d, self.rows, self.cfg = run, d, list(rows), settings
        self.site = str(Site.parse(d.cfg.site))
        truth, adapter, steer = run.truth, run.adapter, settings.steer
        n_steer = max(settings.n_features, steer.n_features or 0) if "color steer" in self.rows else settings.n_features
        self.steer_feats = concept_features(d, store, n_steer, truth=truth)
        self.feats = {c: fs[:settings.n_features] for c, fs in self.steer_feats.items()}
        need = sorted({f for fs in self.steer_feats.values() for f in fs})
        self.fmax = feature_maxima(d, store, need) if need else {}
        self.rng = np.random.default_rng(settings.seed + 7)  # the ablation control's random features
        self.img, self.img_feats, self.img_max = image, None, None
        if image is not None and any(r.endswith("edit") or r == "color steer" for r in self.rows):
            self.img_feats = concept_features(image, store, n_steer, truth=truth)
            self.img_max = feature_maxima(image, store, sorted({f for fs in self.img_feats.values() for f in fs}))
        steering = "color steer" in self.rows
        self.setup = (SteerSetup(steer, d, store, self.steer_feats, self.fmax, tokenizer=shift_ready(adapter, d), truth=truth)
                      if steering else None)
        self.more = more = more if steering else None
        if more is not None:  # a second site of the steer: its own features, maxima and setup
            self.more_feats = concept_features(more, store, n_steer, truth=truth)
            self.more_max = feature_maxima(more, store, sorted({f for fs in self.more_feats.values() for f in fs}))
            self.more_setup = SteerSetup(steer, more, store, self.more_feats, self.more_max, tokenizer=shift_ready(adapter, more),
                                         truth=truth)
        self.tok = shift_ready(adapter, d) if settings.object_shift and "object edit" in self.rows else None
        self.means = context_code_means(d, store, "object", self.tok, truth=truth) if self.tok is not None else None

    def features(self) -> dict[str, list[int]]:
        """The concepts' features the rows used (concepts without any left out)."""
        return {c: fs for c, fs in self.feats.items() if fs}

    def row(self, row: str, *, own: bool = True) -> tuple[dict, np.ndarray]:
        """Run one row: its table entry (score, how it was made, its image cost, its control) and
        images. `own`: the name's own dictionary (else its object dictionary: the entry says its site)."""
        factor = FACTOR_OF_ROW[row.split()[0]]
        before = self.run.images
        if row.endswith("edit"):
            (entry, imgs), control = self.edit(factor), None
        elif row == "color steer":
            entry, imgs, control = self.color_steer()
        elif row == "color ablation":
            entry, imgs, control = self.color_ablation()
        else:
            entry, imgs = self.transfer(row, factor)
            control = None
        if row == "object edit" and self.means is not None:
            shift = self.cfg.object_shift
            entry["recipe"] = f"code shift of the object's context: {shift[0]} features per token x {shift[1]:g}"
        elif (row.endswith("edit") or (row == "color steer" and self.cfg.steer.image_scale > 0)) and self.img is not None:
            entry["image_site"] = self.img.cfg.site
        entry["images"] = self.run.images - before  # the row's cost (its control and reference recordings included)
        if not own:
            entry["site"] = self.site
        if control is not None:
            entry["control_random_direction" if row == "color steer" else "control_random_features"] = control
        return entry, imgs

    # ---- edits --------------------------------------------------------------------------------
    def edit(self, factor: str) -> tuple[dict, np.ndarray]:
        """The colour or object edit: each case's `factor` swapped to its target value."""
        imgs = self.run.generate(lambda k, j: self.swap(factor, k, j), factor)
        return self.run.judge(imgs, factor), imgs

    def swap(self, factor: str, k: int, j: int) -> list:
        """Case k's edit interventions (batch row j): on a text stream with `object_shift`, the
        object's context shifted; else the source value's features ablated where they fire and the
        target's clamped at `scale` x their store maximum (plus the image-stream swap)."""
        c, cfg = self.run.cases[k], self.cfg
        if factor == "object" and self.means is not None:  # the object's context, not a few features
            delta = shift_delta(self.means, c.prompt, f"object={c.object}", f"object={c.to_object}", self.tok, truth=self.run.truth,
                                n_features=cfg.object_shift[0], scale=cfg.object_shift[1])
            # no image-stream swap on top: it lowers the shift's success (TopK 62% -> 47%, docs/intervene.md)
            return [] if delta is None else [CodeShift(self.d, delta, branch="cond", window=cfg.window, samples=[j])]
        src = self.feats.get(f"{factor}={getattr(c, factor)}", [])
        tgt = self.feats.get(f"{factor}={getattr(c, 'to_' + factor)}", [])
        if not src or not tgt:
            return []
        ops = [("ablate", src, None)] + [("clamp", [f], cfg.scale * self.fmax[f]) for f in tgt]
        return [CodeEdit(self.d, ops, where=FiresOn(self.d, src), branch=cfg.branch, window=cfg.window, samples=[j])] + \
            self.image_swap(factor, c, j)

    def image_swap(self, factor: str, c, j: int) -> list:
        """Where the object is drawn: the same swap with the image-stream dictionary's features,
        inside the object's box, both CFG branches (nothing without an image dictionary)."""
        if self.img is None:
            return []
        src = self.img_feats.get(f"{factor}={getattr(c, factor)}", [])
        tgt = self.img_feats.get(f"{factor}={getattr(c, 'to_' + factor)}", [])
        if not src or not tgt:
            return []
        ops = [("ablate", src, None)] + [("clamp", [f], self.cfg.image_scale.get(factor, 1.0) * self.img_max[f]) for f in tgt]
        return [CodeEdit(self.img, ops, region=object_region(c.position, truth=self.run.truth), window=self.cfg.window,
                         samples=[j])]

    # ---- steer and ablation, each with its control --------------------------------------------
    def color_steer(self) -> tuple[dict, np.ndarray, dict]:
        """The colour steer (the target's features added, the source left) and its control, a
        random direction of the same norm."""
        imgs = self.run.generate(self.steered, "color")
        entry = self.run.judge(imgs, "color")
        control = self.run.score(self.run.generate(lambda k, j: self.steered(k, j, True), "color"), "color")
        return entry, imgs, control

    def steered(self, k: int, j: int, control: bool = False) -> list:
        """Case k's steer interventions (batch row j), at the dictionary's site and the second one."""
        cfg, case, seed = self.cfg, self.run.cases[k], self.cfg.seed
        ivs = steer_interventions(cfg.steer, case, j, text=self.d, feats=self.steer_feats, fmax=self.fmax, branch=cfg.branch,
                                  window=cfg.window, image=self.img, image_feats=self.img_feats, image_max=self.img_max,
                                  truth=self.run.truth, control=(seed + 1000 * k) if control else None, setup=self.setup)
        if self.more is None:
            return ivs
        return ivs + steer_interventions(cfg.steer, case, j, text=self.more, feats=self.more_feats, fmax=self.more_max,
                                         branch=cfg.branch, window=cfg.window,
                                         control=(seed + 1000 * k + 2) if control else None, setup=self.more_setup)

    def color_ablation(self) -> tuple[dict, np.ndarray, dict]:
        """The prompt colour's features ablated (success: the colour reads another value) and the
        control: as many random features, drawn once per case."""
        drawn: dict[int, list[int]] = {}

        def ablate(k, j, random=False):
            src = self.feats.get(f"color={self.run.cases[k].color}", [])
            if random and src:
                if k not in drawn:
                    drawn[k] = sorted(self.rng.choice(self.d.num_latents, size=len(src), replace=False).tolist())
                src = drawn[k]
            return [CodeEdit(self.d, [("ablate", src, None)], branch=self.cfg.branch, samples=[j])] if src else []

        imgs = self.run.generate(ablate, "color")
        entry = self.run.judge(imgs, "color", mode="leave")
        control = self.run.score(self.run.generate(lambda k, j: ablate(k, j, True), "color"), "color", mode="leave")
        return entry, imgs, control

    # ---- transfer -----------------------------------------------------------------------------
    def transfer(self, row: str, factor: str) -> tuple[dict, np.ndarray]:
        """Transfer from the reference prompt with `factor` changed: the factor's features (every
        value's top features), or all features for the "(all features)" row."""
        tf = None if row.endswith("(all features)") else sorted(
            {f for cpt, fs in self.feats.items() if cpt.startswith(factor + "=") for f in fs})
        recs, b = self.run.reference(self.site, factor), self.run.batch_size

        def make(k, j):  # case k is sample k % batch_size of its batch's recording
            return [Transfer(self.d, (recs[k // b], k % b), tf, branch=self.cfg.branch, samples=[j])] if tf != [] else []

        imgs = self.run.generate(make, factor)
        return self.run.judge(imgs, factor), imgs
