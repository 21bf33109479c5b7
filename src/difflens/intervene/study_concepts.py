"""The concept study: edit, steer, ablate and transfer concepts through several dictionaries side
by side, at the site where the concept is decided, on the same prompts and seeds.

`difflens trace` shows that on an MM-DiT the object's colour and the background are decided in
the prompt's text tokens (block 0's text stream) and re-read by every later block, so this study
acts where a dictionary's concept features fire (`FiresOn`): on a text-stream dictionary, the
prompt's word. Every row shares one set of clean images (and one recording of each reference),
so rows and dictionaries differ only in the intervention. Readings come from the world's
classifier; a case counts when its clean image reads the prompted value.

Rows (per dictionary): colour and object *edits* (swap the codes of the prompt's concept features
for the target concept's features at their store maximum; on a text stream the object edit shifts
the codes of the object's whole context instead, `study_shift`), colour *steering* (add the target's
features, leaving the source; its own settings, `SteerRecipe`, and a random-direction control of
the same norm), colour *ablation* (with a random-feature control), and colour and
background *transfer* from a reference prompt that differs in that factor only (the object's
transfer takes every feature: no few features carry it). A dictionary's object rows can run on its
partner at another site (`object_dictionaries`; objects move more where the text enters block 0,
`context_embedder:txt`). Dictionary-free references (`study_references`): the
difference-of-means direction and a random direction of the same norm, added at the tokens of the
prompt's colour word, and the ceiling: the prompt itself changed (how often the classifier then
reads the new value, and keeps reading the other factors as before).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from difflens.errors import DifflensError
from difflens.hooks import Site
from difflens.utils import save_image, write_json
from difflens.intervene.base import FiresOn, default_steps
from difflens.intervene.edits import CodeEdit, CodeShift
from difflens.intervene.region import Window
from difflens.intervene.run import record_activations
from difflens.intervene.steer import feature_maxima
from difflens.intervene.study_concept_steer import SteerRecipe, SteerSetup, steer_interventions, steer_note
from difflens.intervene.study_items import ABSENT, Item, object_mask, object_region, progress_bar, study_classifier
from difflens.intervene.study_labels import label_features
from difflens.intervene.study_references import reference_rows
from difflens.intervene.study_shift import context_code_means, shift_delta, shift_ready
from difflens.intervene.transfer import Transfer
from difflens.intervene.truth import truth_of

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary
    from difflens.models.base import Adapter

ROWS = ("color edit", "color steer", "object edit", "color ablation", "color transfer", "object transfer (all features)",
        "background transfer")
QUICK_ROWS = ("color edit", "object edit", "color ablation", "color transfer", "background transfer")
REFERENCE_ROWS = ("difference of means", "random direction", "prompt changed: color", "prompt changed: object")
LABEL_FACTORS = ("color", "object", "bgcolor")
DEFAULT_SCALE = 1.5  # target features at 1.5 x their store maximum: colour edit 77% -> 79% (TopK, n=100; docs/intervene.md)
# The image-stream edit's target features (with image dictionaries), per factor: colour at 0.35 x
# their maximum (TopK colour edit 79% -> 88%, kept 78%; at 0.5: 89% but kept 64%), object at 1 x
# (object edit 13% -> 22%; at 0.5: 10%, at 2: objects vanish). docs/intervene.md has the sweep.
DEFAULT_IMAGE_SCALE = {"color": 0.35, "object": 1.0}
# The object edit on a text-stream dictionary (study_shift): per token from the object word on, the
# 8 features whose mean code differs most between the target's and the source's context, at 1.5 x
# that difference. docs/intervene.md has the sweep; None = the few-feature swap of the colour edit.
DEFAULT_OBJECT_SHIFT = (8, 1.5)


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


class _Readings:
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
    elig = _eligible(cases, clean, factor)
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


def _eligible(cases, clean: dict, factor: str) -> list[int]:
    """The cases a row about `factor` counts: the clean image reads the prompted value."""
    return [i for i, c in enumerate(cases) if clean[factor][i] == getattr(c, factor)]


def _mse(clean: np.ndarray, new: np.ndarray, masks: list[np.ndarray], which: Sequence[int]) -> tuple[float, float]:
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


def run_concept_study(
    adapter: Adapter,
    dictionaries: Mapping[str, Dictionary],
    store,
    out_dir: str | Path | None = None,
    *,
    n: int = 100,
    rows: Sequence[str] = ROWS,
    references: Sequence[str] = REFERENCE_ROWS,
    n_features: int = 3,
    scale: float = DEFAULT_SCALE,
    branch: str = "both",
    window: Window | None = None,
    image_dictionaries: Mapping[str, object] | None = None,
    object_dictionaries: Mapping[str, object] | None = None,
    image_scale: float | Mapping[str, float] | None = None,
    steer: SteerRecipe | None = None,
    steer_dictionaries: Mapping[str, object] | None = None,
    object_shift: tuple[int, float] | None = DEFAULT_OBJECT_SHIFT,
    steps: int | None = None,
    guidance: float | None = None,
    classifier=None,
    seed: int = 0,
    batch_size: int = 50,
    show_progress: bool = True,
) -> dict:
    """Run the study's rows for every dictionary (name -> dictionary) on the same n cases.

    `scale` multiplies the target features' store maximum (edits, steering); `branch` picks the CFG
    rows acted on, `window` the steps (default: every step). `image_dictionaries` (name -> an
    image-stream dictionary, e.g. at `transformer_blocks.1:img`, where the trace says objects are
    written) add to that name's colour and object edits the same swap of the factor's features
    inside the object's box, in both CFG branches, the target's at `image_scale` x their maximum
    (one number, or per factor; default DEFAULT_IMAGE_SCALE). `object_dictionaries` (name -> a
    dictionary at another site, e.g. `context_embedder:txt`, where objects move more) run that
    name's object rows instead; the table then says each row's site. `steer` sets the colour-steer row
    (scale, image-stream push, tokens, branch, window, features; default `SteerRecipe()`);
    `steer_dictionaries` (name -> a text dictionary at another site) add that row's push there too.
    `object_shift` (n features per token, scale) makes the object edit on a text-stream dictionary
    a code shift of the object's context (`study_shift`, conditional rows; no image-stream swap),
    None the few-feature swap. Returns (and writes to out_dir: concepts.json, concepts.md, concepts.png) every
    row's success rate, the share of cases whose other factors were kept, and pixel MSE inside and
    outside the object's box.
    """
    import time

    bad = [r for r in rows if r not in ROWS] + [r for r in references if r not in REFERENCE_ROWS]
    if bad:
        raise DifflensError(f"unknown study rows {bad}: choose from {', '.join(ROWS)} (references: {', '.join(REFERENCE_ROWS)})")
    if not dictionaries:
        raise DifflensError("the concept study needs at least one dictionary")
    truth = truth_of(adapter)
    clf = study_classifier(classifier, truth)
    steps = default_steps(adapter) if steps is None else int(steps)
    sites = {name: str(Site.parse(d.cfg.site)) for name, d in dictionaries.items()}
    image_dictionaries, object_dictionaries = dict(image_dictionaries or {}), dict(object_dictionaries or {})
    steer_dictionaries = dict(steer_dictionaries or {})
    for kind, paired in (("image", image_dictionaries), ("object", object_dictionaries), ("steer", steer_dictionaries)):
        extra = sorted(set(paired) - set(dictionaries))
        if extra:
            raise DifflensError(f"{kind} dictionaries {extra} pair with no dictionary: name them as the text-stream ones ({', '.join(dictionaries)})")
    missing = sorted({str(Site.parse(s)) for s in [*sites.values(), *(d.cfg.site for d in [*image_dictionaries.values(),
                      *object_dictionaries.values(), *steer_dictionaries.values()])] if str(Site.parse(s)) not in store.sites})
    if missing:
        raise DifflensError(f"store {store.root} lacks sites {missing} of the dictionaries: harvest them (labels come from it)")
    cases = make_cases(n, seed, truth=truth)
    read = _Readings(clf, cases, truth)
    gen_kw = dict(steps=steps, guidance=guidance)
    # each dictionary runs its rows, but a name with an object dictionary runs its object rows on that one
    units = [(name, d, [r for r in rows if name not in object_dictionaries or not r.startswith("object")])
             for name, d in dictionaries.items()]
    units += [(name, od, [r for r in rows if r.startswith("object")]) for name, od in object_dictionaries.items()]
    units = [u for u in units if u[2]]
    pairs = {(str(Site.parse(d.cfg.site)), r.split()[0]) for _, d, rs in units for r in rs if "transfer" in r}
    n_ref_sites = len(pairs) + len({r.split()[-1] for r in references if r.startswith("prompt")} - {f for _, f in pairs})
    per_dict = len(rows) + ("color ablation" in rows) + ("color steer" in rows)
    n_steer_refs = len([r for r in references if not r.startswith("prompt")])
    # the bar counts cases x rows; a case a row does not count is skipped, not generated, so the
    # images actually generated are shown beside it
    bar = progress_bar(n * (1 + n_ref_sites + len(dictionaries) * per_dict + n_steer_refs), "concept study", show_progress,
                       unit="case")
    t0 = time.time()
    from difflens.intervene.study_items import generate_items
    count = [0]

    def generate(make=None, factor: str | None = None):
        """Images of every case with make(k, j)'s interventions (k: the case, j: its row in the
        batch). Only cases that `factor`'s score counts (the clean image reads the prompted value)
        and that get an intervention are generated; the others keep their clean image."""
        if make is None:
            count[0] += n
            bar.set_postfix(images=count[0], refresh=False)
            return generate_items(adapter, cases, None, batch_size=batch_size, bar=bar, **gen_kw)
        todo = [k for k in range(n) if (factor is None or clean[factor][k] == getattr(cases[k], factor)) and make(k, 0)]
        bar.update(n - len(todo))
        out = clean_img.copy()
        if todo:
            count[0] += len(todo)
            bar.set_postfix(images=count[0], refresh=False)
            out[todo] = generate_items(adapter, [cases[k] for k in todo], lambda i, j: make(todo[i], j),
                                       batch_size=batch_size, bar=bar, **gen_kw)
        return out

    clean_img = generate()
    clean = read(clean_img)
    masks = [object_mask(c.position, truth) for c in cases]

    def judge(imgs, factor: str, mode: str = "reach") -> dict:
        """A row's score on its images, with the pixel change inside and outside the object's box."""
        entry = score(cases, clean, read(imgs), factor, mode=mode)
        entry["mse_inside_box"], entry["mse_outside_box"] = _mse(clean_img, imgs, masks, _eligible(cases, clean, factor))
        return entry

    refs: dict[tuple[str, str], list] = {}  # (site, factor) -> recordings, one per batch of cases

    def reference(site: str, factor: str):
        """Recordings at `site` of each case's prompt with `factor` moved to its target value (same seed)."""
        if (site, factor) not in refs:
            recs = []
            for a in range(0, n, batch_size):
                chunk = cases[a : a + batch_size]
                recs.append(record_activations(adapter, [with_value(c, factor, getattr(c, "to_" + factor), truth=truth) for c in chunk],
                                               [c.seed for c in chunk], site, **gen_kw))
                count[0] += len(chunk)
                bar.set_postfix(images=count[0], refresh=False)
                bar.update(len(chunk))
            refs[(site, factor)] = recs
        return refs[(site, factor)]

    def reference_images(factor: str) -> np.ndarray:
        """The prompts with `factor` changed: the images of a reference recording (made if needed)."""
        have = [recs for (_, f), recs in refs.items() if f == factor]
        recs = have[0] if have else reference(next(iter(sites.values())), factor)
        return np.concatenate([np.asarray(r.images) for r in recs])

    window = window or Window.all()
    steer = steer or SteerRecipe()
    image_scale = dict(DEFAULT_IMAGE_SCALE) if image_scale is None else (
        dict(image_scale) if isinstance(image_scale, Mapping) else {f: float(image_scale) for f in DEFAULT_IMAGE_SCALE})
    result: dict = {"n_cases": n, "steps": steps, "branch": branch, "scale": scale, "n_features": n_features,
                    "window": window.describe(), "image_dictionaries": {k: v.cfg.site for k, v in image_dictionaries.items()},
                    "image_scale": image_scale, "steer": {**steer.describe(), "also_at": {k: v.cfg.site for k, v in steer_dictionaries.items()}},
                    "clean_reads_prompt": {f: float(np.mean([clean[f][i] == getattr(c, f) for i, c in enumerate(cases)]))
                                           for f in ("color", "object", "bgcolor")},
                    "dictionaries": {}, "references": {}}
    shown: dict[str, np.ndarray] = {}
    for name, d, unit_rows in units:
        site = str(Site.parse(d.cfg.site))
        n_steer = max(n_features, steer.n_features or 0) if "color steer" in unit_rows else n_features
        steer_feats = concept_features(d, store, n_steer, truth=truth)
        feats = {c: fs[:n_features] for c, fs in steer_feats.items()}
        need = sorted({f for fs in steer_feats.values() for f in fs})
        fmax = feature_maxima(d, store, need) if need else {}
        rng = np.random.default_rng(seed + 7)
        info = {"site": site, "arch": d.cfg.arch, "width": int(d.num_latents)}
        res = result["dictionaries"].setdefault(name, {**info, "rows": {}})
        own = d is dictionaries[name]  # else the name's object dictionary
        info = res if own else res.setdefault("object_dictionary", info)

        img = image_dictionaries.get(name)
        if img is not None and any(r.endswith("edit") or r == "color steer" for r in unit_rows):
            img_feats = concept_features(img, store, n_steer, truth=truth)
            img_max = feature_maxima(img, store, sorted({f for fs in img_feats.values() for f in fs}))
        setup = SteerSetup(steer, d, store, steer_feats, fmax, tokenizer=shift_ready(adapter, d), truth=truth) if "color steer" in rows else None
        more = steer_dictionaries.get(name) if "color steer" in rows else None
        if more is not None:  # a second site of the steer: its own features, maxima and setup
            more_feats = concept_features(more, store, n_steer, truth=truth)
            more_max = feature_maxima(more, store, sorted({f for fs in more_feats.values() for f in fs}))
            more_setup = SteerSetup(steer, more, store, more_feats, more_max, tokenizer=shift_ready(adapter, more), truth=truth)

        def steered(k, j, control=False):
            return steer_interventions(steer, cases[k], j, text=d, feats=steer_feats, fmax=fmax, branch=branch, window=window,
                                       image=img, image_feats=img_feats if img is not None else None,
                                       image_max=img_max if img is not None else None, truth=truth,
                                       control=(seed + 1000 * k) if control else None, setup=setup) + ([] if more is None else
                steer_interventions(steer, cases[k], j, text=more, feats=more_feats, fmax=more_max, branch=branch, window=window,
                                    control=(seed + 1000 * k + 2) if control else None, setup=more_setup))

        tok = shift_ready(adapter, d) if object_shift and "object edit" in unit_rows else None
        means = context_code_means(d, store, "object", tok, truth=truth) if tok is not None else None

        def swap(factor, k, j):
            c = cases[k]
            if factor == "object" and means is not None:  # the object's context, not a few features
                delta = shift_delta(means, c.prompt, f"object={c.object}", f"object={c.to_object}", tok, truth=truth,
                                    n_features=object_shift[0], scale=object_shift[1])
                # no image-stream swap on top: it lowers the shift's success (TopK 62% -> 47%, docs/intervene.md)
                return [] if delta is None else [CodeShift(d, delta, branch="cond", window=window, samples=[j])]
            src, tgt = feats.get(f"{factor}={getattr(c, factor)}", []), feats.get(f"{factor}={getattr(c, 'to_' + factor)}", [])
            if not src or not tgt:
                return []
            ops = [("ablate", src, None)] + [("clamp", [f], scale * fmax[f]) for f in tgt]
            return [CodeEdit(d, ops, where=FiresOn(d, src), branch=branch, window=window, samples=[j])] + image_swap(factor, c, j)

        def image_swap(factor, c, j):  # where the object is drawn: the same swap in its box, both branches
            if img is None:
                return []
            src, tgt = img_feats.get(f"{factor}={getattr(c, factor)}", []), img_feats.get(f"{factor}={getattr(c, 'to_' + factor)}", [])
            if not src or not tgt:
                return []
            ops = [("ablate", src, None)] + [("clamp", [f], image_scale.get(factor, 1.0) * img_max[f]) for f in tgt]
            return [CodeEdit(img, ops, region=object_region(c.position, truth=truth), window=window, samples=[j])]

        for row in unit_rows:
            factor = {"color": "color", "object": "object", "background": "bgcolor"}[row.split()[0]]
            control, before = None, count[0]
            if row.endswith("edit"):
                imgs = generate(lambda k, j, f=factor: swap(f, k, j), factor)
                entry = judge(imgs, factor)
            elif row == "color steer":
                imgs = generate(steered, factor)
                entry = judge(imgs, factor)
                control = score(cases, clean, read(generate(lambda k, j: steered(k, j, True), factor)), factor)
            elif row == "color ablation":
                drawn: dict[int, list[int]] = {}  # each case's random features, drawn once

                def ablate(k, j, random=False):
                    src = feats.get(f"color={cases[k].color}", [])
                    if random and src:
                        if k not in drawn:
                            drawn[k] = sorted(rng.choice(d.num_latents, size=len(src), replace=False).tolist())
                        src = drawn[k]
                    return [CodeEdit(d, [("ablate", src, None)], branch=branch, samples=[j])] if src else []
                imgs = generate(ablate, factor)
                entry = judge(imgs, factor, mode="leave")
                control = score(cases, clean, read(generate(lambda k, j: ablate(k, j, True), factor)), factor, mode="leave")
            else:  # transfer: the factor's features (every value's top features), or all, from the reference
                tf = None if row.endswith("(all features)") else sorted(
                    {f for cpt, fs in feats.items() if cpt.startswith(factor + "=") for f in fs})
                recs = reference(site, factor)

                def transfer(k, j, tf=tf, recs=recs):  # case k is sample k % batch_size of its batch's recording
                    return [Transfer(d, (recs[k // batch_size], k % batch_size), tf, branch=branch, samples=[j])] if tf != [] else []
                imgs = generate(transfer, factor)
                entry = judge(imgs, factor)
            if row == "object edit" and means is not None:
                entry["recipe"] = f"code shift of the object's context: {object_shift[0]} features per token x {object_shift[1]:g}"
            elif (row.endswith("edit") or (row == "color steer" and steer.image_scale > 0)) and img is not None:
                entry["image_site"] = img.cfg.site
            entry["images"] = count[0] - before  # the row's cost (its control and reference recordings included)
            if not own:
                entry["site"] = site
            if control is not None:
                entry["control_random_direction" if row == "color steer" else "control_random_features"] = control
            res["rows"][row] = entry
            if name == next(iter(dictionaries)):
                shown[row] = imgs
        info["features"] = {c: fs for c, fs in feats.items() if fs}
    if references:
        site = result["reference_site"] = sites[next(iter(dictionaries))]
        result["references"] = reference_rows(adapter, store, site, cases, judge, generate, reference_images, seed, references)
    bar.close()
    result["images"] = count[0]
    result["seconds"] = round(time.time() - t0, 1)
    result["images_per_second"] = round(count[0] / max(time.time() - t0, 1e-9), 2)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "concepts.json", result)
        (out / "concepts.md").write_text(markdown(result), encoding="utf-8")
        result["files"] = {"table": str(out / "concepts.md"), "examples": _examples(out, cases, clean, clean_img, shown)}
        write_json(out / "concepts.json", result)
    return result


def _pct(r) -> str:
    return "-" if r is None else f"{100 * r:.0f}%"


def markdown(result: dict) -> str:
    names = list(result["dictionaries"])
    ds = result["dictionaries"]
    # with object dictionaries at another site, every row says its site instead of the header
    mixed = any("site" in e for n in names for e in ds[n]["rows"].values())
    head = "| intervention | " + " | ".join(n if mixed else f"{n} (`{ds[n]['site']}`)" for n in names) + " |"
    lines = [
        f"Concept study: {result['n_cases']} prompt/seed cases per row, {result['steps']} steps, CFG branch "
        f"{result['branch']}, {result.get('window', 'all steps')}, features at {result['scale']:g} x their store maximum"
        + "".join(f"; {n}'s edits also at `{s}` in the object's box (" + ", ".join(
                  f"{f} {v:g} x" for f, v in result["image_scale"].items()) + ")"
                  for n, s in result.get("image_dictionaries", {}).items())
        + steer_note(result.get("steer"), names, ds)
        + ". Cell: success (of n eligible) / other factors kept.",
        "",
        head,
        "|---|" + "---|" * len(names),
    ]
    rows = [r for r in ROWS if any(r in ds[n]["rows"] for n in names)]
    for row in rows:
        cells = []
        for n in names:
            e = ds[n]["rows"].get(row)
            cells.append("-" if e is None else f"{_pct(e['success_rate'])} ({e['eligible']}) / {_pct(e['kept_rate'])}")
        at = {ds[n]["rows"][row].get("site", ds[n]["site"]) for n in names if row in ds[n]["rows"]}
        lines.append(f"| {row}" + (" at " + ", ".join(f"`{a}`" for a in sorted(at)) if mixed else "") + " | " + " | ".join(cells) + " |")
        for r, key, what in (("color ablation", "control_random_features", "random features"),
                             ("color steer", "control_random_direction", "random direction of the same norm")):
            if row == r:
                cells = [_pct(ds[n]["rows"][row][key]["success_rate"]) if row in ds[n]["rows"] and key in ds[n]["rows"][row]
                         else "-" for n in names]
                lines.append(f"| {r}, {what} (control) | " + " | ".join(cells) + " |")
    for row, e in result.get("references", {}).items():
        if isinstance(e, dict):
            at = f" at `{result['reference_site']}`" if mixed and row in ("difference of means", "random direction") else ""
            lines.append(f"| {row} (no dictionary){at} | " + " | ".join(
                [f"{_pct(e['success_rate'])} ({e['eligible']}) / {_pct(e['kept_rate'])}"] * 1 + [""] * (len(names) - 1)) + " |")
    recipes = sorted({ds[n]["rows"]["object edit"]["recipe"] for n in names if "recipe" in ds[n]["rows"].get("object edit", {})})
    if recipes:
        lines += ["", "Object edit on a text stream: " + "; ".join(recipes) + " (conditional rows, no image-stream swap)."]
    lines += ["", "Pixel MSE outside the object's box (colour/object rows; [0,1] pixels): " + ", ".join(
        f"{n}: " + ", ".join(f"{r} {e['mse_outside_box']:.4f}" for r, e in ds[n]["rows"].items() if not r.startswith("background"))
        for n in names)]
    ceiling = {f: (result.get("references", {}).get(f"prompt changed: {f}") or {}).get("kept_rate") for f in ("color", "object")}
    if ceiling["color"]:
        lines.append(f"Kept against re-prompting (which keeps {_pct(ceiling['color'])} for colour): " + ", ".join(
            f"{n}: " + ", ".join(f"{r} {_pct(e['kept_rate'] / ceiling['color'])}" for r, e in ds[n]["rows"].items()
                                 if r.startswith("color") and e.get("kept_rate") is not None)
            for n in names) + ".")
    if result.get("images_per_second"):
        lines.append(f"{result['images']} images in {result['seconds']} s ({result['images_per_second']} images/s).")
    return "\n".join(lines) + "\n"


def _examples(out: Path, cases, clean, clean_img, shown) -> str | None:
    from difflens.viz import labelled_grid

    if not shown:
        return None
    idx = [i for i, c in enumerate(cases) if clean["color"][i] == c.color and clean["object"][i] == c.object][:5]
    idx = idx or list(range(min(5, len(cases))))
    imgs, labs = [], []
    for i in idx:
        c = cases[i]
        imgs.append(clean_img[i])
        labs.append(f"{c.color} {c.object} on {c.bgcolor}")
        for row, arr in shown.items():
            imgs.append(arr[i])
            to = {"color": c.to_color, "object": c.to_object, "background": c.to_bgcolor}[row.split()[0]]
            labs.append(f"{row}" + ("" if row.endswith("ablation") else f" -> {to}"))
    path = out / "concepts.png"
    save_image(path, labelled_grid(imgs, labs, cols=1 + len(shown), label_lines=3, title="concept study (first dictionary)"))
    return str(path)
