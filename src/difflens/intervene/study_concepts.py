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

This module validates the arguments, runs each dictionary's rows and assembles and writes the
result; the rows themselves are `study_concept_rows`, the state they share (cases, clean images,
readings, reference recordings) `study_concept_run`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from difflens.errors import DifflensError
from difflens.hooks import Site
from difflens.utils import save_image, write_json
from difflens.intervene.base import default_steps
from difflens.intervene.region import Window
from difflens.intervene.study_concept_rows import DictionaryRows, RowSettings
# the cases, scoring and feature helpers live with the run; they stay importable from here
from difflens.intervene.study_concept_run import (  # noqa: F401
    LABEL_FACTORS, Case, ConceptRun, concept_features, make_cases, score, with_value,
)
from difflens.intervene.study_concept_steer import SteerRecipe, steer_note
from difflens.intervene.study_items import progress_bar, study_classifier
from difflens.intervene.study_references import reference_rows
from difflens.intervene.truth import truth_of

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary
    from difflens.models.base import Adapter

ROWS = ("color edit", "color steer", "object edit", "color ablation", "color transfer", "object transfer (all features)",
        "background transfer")
QUICK_ROWS = ("color edit", "object edit", "color ablation", "color transfer", "background transfer")
REFERENCE_ROWS = ("difference of means", "random direction", "prompt changed: color", "prompt changed: object")
DEFAULT_SCALE = 1.5  # target features at 1.5 x their store maximum: colour edit 77% -> 79% (TopK, n=100; docs/intervene.md)
# The image-stream edit's target features (with image dictionaries), per factor: colour at 0.35 x
# their maximum (TopK colour edit 79% -> 88%, kept 78%; at 0.5: 89% but kept 64%), object at 1 x
# (object edit 13% -> 22%; at 0.5: 10%, at 2: objects vanish). docs/intervene.md has the sweep.
DEFAULT_IMAGE_SCALE = {"color": 0.35, "object": 1.0}
# The object edit on a text-stream dictionary (study_shift): per token from the object word on, the
# 8 features whose mean code differs most between the target's and the source's context, at 1.5 x
# that difference. docs/intervene.md has the sweep; None = the few-feature swap of the colour edit.
DEFAULT_OBJECT_SHIFT = (8, 1.5)


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
    _check_partners(dictionaries, store, sites, image=image_dictionaries, object=object_dictionaries, steer=steer_dictionaries)
    cases = make_cases(n, seed, truth=truth)
    units = _units(dictionaries, object_dictionaries, rows)
    bar = progress_bar(_bar_total(n, units, rows, references, len(dictionaries)), "concept study", show_progress, unit="case")
    t0 = time.time()
    run = ConceptRun(adapter, cases, clf, truth, bar, batch_size=batch_size, steps=steps, guidance=guidance,
                     reference_site=next(iter(sites.values())))
    settings = RowSettings(n_features, scale, branch, window or Window.all(), _image_scale(image_scale), steer or SteerRecipe(),
                           object_shift, seed)
    result = _header(run, settings, image_dictionaries, steer_dictionaries)
    shown: dict[str, np.ndarray] = {}  # the first dictionary's images per row, for the examples
    for name, d, unit_rows in units:
        dict_rows = DictionaryRows(run, d, unit_rows, settings, store, image=image_dictionaries.get(name),
                                   more=steer_dictionaries.get(name))
        _run_unit(result, dict_rows, name, own=d is dictionaries[name], first=name == next(iter(dictionaries)), shown=shown)
    if references:
        site = result["reference_site"] = sites[next(iter(dictionaries))]
        result["references"] = reference_rows(adapter, store, site, cases, run.judge, run.generate, run.reference_images,
                                              seed, references)
    bar.close()
    result["images"] = run.images
    result["seconds"] = round(time.time() - t0, 1)
    result["images_per_second"] = round(run.images / max(time.time() - t0, 1e-9), 2)
    if out_dir is not None:
        _write(Path(out_dir), result, run, shown)
    return result


def _check_partners(dictionaries, store, sites: dict, **partners: dict) -> None:
    """Every image/object/steer dictionary pairs with a named dictionary, and the store holds every
    dictionary's site (features are labelled from it)."""
    for kind, paired in partners.items():
        extra = sorted(set(paired) - set(dictionaries))
        if extra:
            raise DifflensError(f"{kind} dictionaries {extra} pair with no dictionary: name them as the text-stream ones ({', '.join(dictionaries)})")
    others = [d.cfg.site for paired in partners.values() for d in paired.values()]
    missing = sorted({str(Site.parse(s)) for s in [*sites.values(), *others] if str(Site.parse(s)) not in store.sites})
    if missing:
        raise DifflensError(f"store {store.root} lacks sites {missing} of the dictionaries: harvest them (labels come from it)")


def _units(dictionaries, object_dictionaries: dict, rows) -> list[tuple[str, object, list[str]]]:
    """(name, dictionary, its rows): each dictionary runs the rows, but a name with an object
    dictionary runs its object rows on that one (after every name's own rows)."""
    units = [(name, d, [r for r in rows if name not in object_dictionaries or not r.startswith("object")])
             for name, d in dictionaries.items()]
    units += [(name, od, [r for r in rows if r.startswith("object")]) for name, od in object_dictionaries.items()]
    return [u for u in units if u[2]]


def _bar_total(n: int, units, rows, references, n_dictionaries: int) -> int:
    """The progress bar's length: cases x (clean + reference recordings + rows and controls + steering
    references). A case a row does not count is skipped, not generated, so the bar shows the images
    actually generated beside it."""
    pairs = {(str(Site.parse(d.cfg.site)), r.split()[0]) for _, d, rs in units for r in rs if "transfer" in r}
    n_ref_sites = len(pairs) + len({r.split()[-1] for r in references if r.startswith("prompt")} - {f for _, f in pairs})
    per_dict = len(rows) + ("color ablation" in rows) + ("color steer" in rows)
    n_steer_refs = len([r for r in references if not r.startswith("prompt")])
    return n * (1 + n_ref_sites + n_dictionaries * per_dict + n_steer_refs)


def _image_scale(image_scale) -> dict[str, float]:
    """The image-stream edit's scale per factor (one number for every factor; None: the defaults)."""
    if image_scale is None:
        return dict(DEFAULT_IMAGE_SCALE)
    return dict(image_scale) if isinstance(image_scale, Mapping) else {f: float(image_scale) for f in DEFAULT_IMAGE_SCALE}


def _header(run: ConceptRun, settings: RowSettings, image_dictionaries: dict, steer_dictionaries: dict) -> dict:
    """The result's settings and how often the clean images read the prompt; rows fill it in."""
    cases, clean = run.cases, run.clean
    return {"n_cases": run.n, "steps": run.gen_kw["steps"], "branch": settings.branch, "scale": settings.scale,
            "n_features": settings.n_features, "window": settings.window.describe(),
            "image_dictionaries": {k: v.cfg.site for k, v in image_dictionaries.items()}, "image_scale": settings.image_scale,
            "steer": {**settings.steer.describe(), "also_at": {k: v.cfg.site for k, v in steer_dictionaries.items()}},
            "clean_reads_prompt": {f: float(np.mean([clean[f][i] == getattr(c, f) for i, c in enumerate(cases)]))
                                   for f in ("color", "object", "bgcolor")},
            "dictionaries": {}, "references": {}}


def _run_unit(result: dict, dict_rows: DictionaryRows, name: str, *, own: bool, first: bool, shown: dict) -> None:
    """One dictionary's rows into result["dictionaries"][name] (an object dictionary's under its
    name's "object_dictionary", its rows beside the name's own); the first name's images to `shown`."""
    d = dict_rows.d
    info = {"site": dict_rows.site, "arch": d.cfg.arch, "width": int(d.num_latents)}
    res = result["dictionaries"].setdefault(name, {**info, "rows": {}})
    info = res if own else res.setdefault("object_dictionary", info)
    for row in dict_rows.rows:
        res["rows"][row], imgs = dict_rows.row(row, own=own)
        if first:
            shown[row] = imgs
    info["features"] = dict_rows.features()


def _write(out: Path, result: dict, run: ConceptRun, shown: dict) -> None:
    """concepts.json, concepts.md and the examples grid (concepts.png) in `out`; result["files"] says where."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "concepts.json", result)
    (out / "concepts.md").write_text(markdown(result), encoding="utf-8")
    result["files"] = {"table": str(out / "concepts.md"), "examples": _examples(out, run.cases, run.clean, run.clean_img, shown)}
    write_json(out / "concepts.json", result)


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
