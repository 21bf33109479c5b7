"""Measured interventions on the toy model: steering, ablation and transfer success rates.

Everything is judged by the factor classifier at the object's slot:

* steering  — for a feature labelled `factor=value` (colour or object), prompts that name another
  value; success = the classifier reads the target value after steering and did not before.
  Measured against the scale (at the default window) and the step window (at the best scale),
  plus how much the image changes outside the steered region (pixel MSE outside vs inside);
* ablation  — prompts naming colour c; ablate every feature labelled color=c; success = the
  colour read at the object is no longer c (it was before). A control ablates as many random
  features with no colour label;
* transfer  — target and reference differ only in the object's colour; the codes of all colour
  features (and, as a reference point, all features) are taken from the reference inside the
  object's box; success = the target now reads the reference's colour.

Labels come from the interpretation stage (`{feature_id: "color=red"}`) or from
`label_features`, a best-F1 match between each feature's firing and the store's per-token
ground-truth concepts. `run_intervention_study` (CLI: `difflens intervene-study`) runs it all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.intervene.core import CodeEdit, Steer, Transfer, default_steps, generate_with
from difflens.intervene.region import Region, Window
from difflens.utils import progress, save_image, write_json
from difflens.world import vocab as V
from difflens.viz import save_figure

STUDY_FACTORS = ("color", "object")
STUDY_OBJECTS = ("circle", "square", "triangle", "two", "five", "seven")
MARGIN_PX = 2  # object jitter around its position's centre


# ---- labelling features from the store's ground truth -----------------------------------------
def label_features(
    dictionary,
    store,
    *,
    factors: Sequence[str] = STUDY_FACTORS,
    min_f1: float = 0.2,
    max_rows: int = 60000,
    steps: Sequence[int] | None = None,
    seed: int = 0,
    return_scores: bool = False,
    show_progress: bool = True,
):
    """{feature: "factor=value"} for features whose firing best matches a concept with F1 >= min_f1.

    A feature fires on a token when its code is > 0; a concept holds on a token per the store's
    `labels` column (toy-world ground truth). F1 is computed for every (feature, concept) pair
    of the chosen factors over (up to `max_rows`) image-token rows; each feature takes its best
    concept. Labels are ordered by F1, best first. With `return_scores`, also returns
    {"f1": {f: score}, "by_concept": {concept: [[f, f1], ...top 10]}, "rows": n}.
    """
    from difflens.world.labels import concept_token_matrix

    site = dictionary.cfg.site
    if site not in store.sites:
        raise DifflensError(f"store {store.root} has no site {site!r} (the dictionary's): harvest it first")
    bad = [f for f in factors if f not in V.FACTORS]
    if bad:
        raise DifflensError(f"unknown factors {bad}; use some of {', '.join(V.FACTORS)}")
    meta = store.meta(site, ["timestep", "step", "stream", "labels"])
    keep = meta["stream"] == 0
    if steps is not None:
        keep &= np.isin(meta["step"], np.asarray(list(steps)))
    rows = np.nonzero(keep)[0]
    if rows.size == 0:
        raise DifflensError(f"no image-token rows at {site} in {store.root} (for the chosen steps)")
    rng = np.random.default_rng(seed)
    if rows.size > max_rows:
        rows = np.sort(rng.choice(rows, size=max_rows, replace=False))
    concepts = [c for c in V.CONCEPTS if V.concept_factor(c) in factors]
    cols = np.array([V.CONCEPT_ID[c] for c in concepts])
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
        y = torch.from_numpy(concept_token_matrix(meta["labels"][idx])[:, cols]).double()
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


def features_by_concept(feature_labels: Mapping[int, str], factors: Sequence[str] = STUDY_FACTORS) -> dict[str, list[int]]:
    """concept -> its features, in the labels' order (best first when they come from label_features)."""
    out: dict[str, list[int]] = {}
    for f, c in feature_labels.items():
        c = str(c).strip()
        if "=" not in c or c.split("=", 1)[0] not in factors:
            continue
        if c not in V.CONCEPT_ID:
            continue
        out.setdefault(c, []).append(int(f))
    return out


# ---- prompts and regions ------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One study prompt: a single large object with known factors."""

    prompt: str
    seed: int
    color: str
    object: str
    position: str
    bgcolor: str

    @property
    def factors(self) -> dict[str, str]:
        return {"color": self.color, "object": self.object, "position": self.position}


def make_item(color: str, obj: str, position: str, bgcolor: str, seed: int) -> Item:
    prompt = f"a large {color} {obj} in the {position} on a {bgcolor} plain background"
    return Item(prompt, int(seed), color, obj, position, bgcolor)


def study_items(factor: str, value: str, n: int, rng: np.random.Generator, *, has: bool, seed0: int = 0) -> list[Item]:
    """n single-object prompts that do (has=True) or do not name `factor=value`."""
    colors = [c for c in V.COLORS if (c == value) == has] if factor == "color" else list(V.COLORS)
    objects = [o for o in STUDY_OBJECTS if (o == value) == has] if factor == "object" else list(STUDY_OBJECTS)
    if factor == "object" and has and value not in STUDY_OBJECTS:
        objects = [value]
    if not colors or not objects:
        raise DifflensError(f"no study prompts for {factor}={value} (has={has})")
    out = []
    for i in range(n):
        out.append(
            make_item(
                str(rng.choice(colors)),
                str(rng.choice(objects)),
                V.POSITIONS[i % len(V.POSITIONS)],
                V.BG_COLORS[(i // len(V.POSITIONS)) % len(V.BG_COLORS)],
                seed0 + i,
            )
        )
    return out


def object_region(position: str, size: str = "large", margin: int = MARGIN_PX) -> Region:
    """The pixel box an object of this size at this position can cover (with jitter margin)."""
    cy, cx = V.POSITION_CENTER[position]
    half = V.SIZE_PIXELS[size] // 2 + margin
    lo_x, lo_y = max(0, cx - half), max(0, cy - half)
    hi_x, hi_y = min(V.IMAGE_SIZE, cx + half), min(V.IMAGE_SIZE, cy + half)
    return Region(box=(lo_x, lo_y, hi_x, hi_y), units="px", label=f"{position} object box")


def _classifier(classifier):
    if classifier is not None:
        return classifier
    from difflens.world.classifier import default_classifier

    try:
        return default_classifier()
    except DifflensError as e:
        raise DifflensError(f"the intervention study judges images with the factor classifier: {e}") from None


ABSENT = "(none)"  # the reading when the classifier sees no object at the slot


def read_at(classifier, images, factor: str, positions: Sequence[str]) -> list[str]:
    """The factor read at each image's own object position, or ABSENT when no object is there
    (presence <= 0.5): an edit that erases the object must not count as changing its colour."""
    from difflens.world.classifier import PRESENCE_THRESHOLD

    readings = classifier.classify(np.asarray(images))
    out = []
    for r, p in zip(readings, positions):
        slot = r["slots"][p]
        out.append(slot[factor] if slot["p"] > PRESENCE_THRESHOLD else ABSENT)
    return out


def success_rate(before: Sequence[str], after: Sequence[str], target: Sequence[str], *, mode: str = "reach") -> dict:
    """Over cases with an object before the intervention:
    mode "reach": success = after == target, among cases where before != target;
    mode "leave": success = after is another value (object still there), among cases where
    before == target. `vanished` counts eligible cases whose object disappeared."""
    before, after, target = list(before), list(after), list(target)
    present = [i for i in range(len(before)) if before[i] != ABSENT]
    if mode == "reach":
        eligible = [i for i in present if before[i] != target[i]]
        hits = [i for i in eligible if after[i] == target[i]]
    elif mode == "leave":
        eligible = [i for i in present if before[i] == target[i]]
        hits = [i for i in eligible if after[i] not in (target[i], ABSENT)]
    else:
        raise ValueError(mode)
    n = len(eligible)
    vanished = sum(1 for i in eligible if after[i] == ABSENT)
    return {
        "success_rate": (len(hits) / n) if n else None,
        "successes": len(hits),
        "eligible": n,
        "total": len(before),
        "vanished": vanished,
    }


def _pixel_change(clean: np.ndarray, new: np.ndarray, masks: Sequence[np.ndarray]) -> dict:
    """Mean squared pixel change ([0,1] scale) inside and outside each image's region."""
    d = ((new.astype(np.float64) - clean.astype(np.float64)) / 255.0) ** 2
    d = d.mean(-1)  # [B, H, W]
    ins = [float(d[i][m].mean()) if m.any() else 0.0 for i, m in enumerate(masks)]
    outs = [float(d[i][~m].mean()) if (~m).any() else 0.0 for i, m in enumerate(masks)]
    mi, mo = float(np.mean(ins)), float(np.mean(outs))
    return {"mse_inside": mi, "mse_outside": mo, "outside_over_inside": (mo / mi) if mi > 0 else None}


# ---- batched generation ---------------------------------------------------------------------------
def generate_items(
    adapter,
    items: Sequence[Item],
    make: Callable[[int, int], list] | None = None,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 32,
    bar=None,
) -> np.ndarray:
    """Images for `items`; `make(k, j)` gives the interventions of item k as sample j of its batch."""
    out = []
    for a in range(0, len(items), batch_size):
        chunk = items[a : a + batch_size]
        ivs = []
        if make is not None:
            for j in range(len(chunk)):
                ivs += make(a + j, j)
        gen = generate_with(adapter, [it.prompt for it in chunk], [it.seed for it in chunk], ivs, steps=steps, guidance=guidance)
        out.append(np.asarray(gen.images))
        if bar is not None:
            bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, V.IMAGE_SIZE, V.IMAGE_SIZE, 3), np.uint8)


def default_windows(steps: int) -> dict[str, Window]:
    """The Flux recipe (first ~5/7 of the steps) and its neighbours: all, early, late."""
    first = max(1, round(steps * 5 / 7))
    half = max(1, steps // 2)
    return {
        f"0:{first} (first 5/7)": Window.range(0, first),
        "all": Window.all(),
        f"0:{half} (early half)": Window.range(0, half),
        f"{half}: (late half)": Window.range(half, None),
    }


def _bar(total: int, desc: str, show: bool):
    return progress(total=total, desc=desc, unit="img", **({} if show else {"disable": True}))


# ---- steering ------------------------------------------------------------------------------------
def run_steering_study(
    adapter,
    dictionary,
    feature_labels: Mapping[int, str],
    out_dir: str | Path | None = None,
    *,
    factors: Sequence[str] = STUDY_FACTORS,
    scales: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    mode: str = "token-norm",
    windows: Mapping[str, Window] | None = None,
    window_scale: float | None = None,
    features_per_concept: int = 1,
    prompts_per_feature: int = 6,
    use_region: bool = True,
    branch: str = "both",
    compare_branches: Sequence[str] = (),
    steps: int | None = None,
    guidance: float | None = None,
    stats=None,
    classifier=None,
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Steering success rate against scale and step window (see the module docstring).

    The scale sweep uses the first window (default: the first 5/7 of the steps); the window sweep
    uses `window_scale` (default: the scale with the best success rate in the scale sweep).
    """
    clf = _classifier(classifier)
    steps = default_steps(adapter) if steps is None else int(steps)
    windows = dict(windows or default_windows(steps))
    by_concept = features_by_concept(feature_labels, factors)
    if not by_concept:
        raise DifflensError(
            f"no feature is labelled with a {'/'.join(factors)} concept (labels like 'color=red'): "
            "label features first (label_features or the interpretation stage)"
        )
    rng = np.random.default_rng(seed)
    cases = []  # (feature, concept, item)
    for concept, feats in sorted(by_concept.items()):
        factor, value = concept.split("=", 1)
        items = study_items(factor, value, prompts_per_feature, rng, has=False, seed0=seed * 1000)
        for f in feats[:features_per_concept]:
            cases += [(f, concept, it) for it in items]
    items = [c[2] for c in cases]
    targets = [c[1].split("=", 1)[1] for c in cases]
    factor_of = [c[1].split("=", 1)[0] for c in cases]
    regions = [object_region(it.position) if use_region else None for it in items]
    masks = [
        (r.pixel_mask((V.IMAGE_SIZE, V.IMAGE_SIZE), (V.GRID, V.GRID)) if r is not None else np.ones((V.IMAGE_SIZE,) * 2, bool))
        for r in regions
    ]
    window_names = list(windows)
    compare_branches = [b for b in compare_branches if b != branch]
    n_configs = len(scales) * (1 + len(compare_branches)) + len(window_names) - 1
    bar = _bar(len(items) * (1 + n_configs), "steering study", show_progress)
    clean = generate_items(adapter, items, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)

    def readings(images):
        out = [None] * len(items)
        for fac in set(factor_of):
            idx = [i for i in range(len(items)) if factor_of[i] == fac]
            vals = read_at(clf, images[idx], fac, [items[i].position for i in idx])
            for i, v in zip(idx, vals):
                out[i] = v
        return out

    before = readings(clean)

    def run(scale: float, window: Window, branch: str = branch):
        def make(k, j):
            return [Steer(dictionary, [cases[k][0]], scale, mode=mode, window=window, region=regions[k], samples=[j],
                          stats=stats, branch=branch)]

        imgs = generate_items(adapter, items, make, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
        after = readings(imgs)
        res = success_rate(before, after, targets)
        per_factor = {}
        for fac in sorted(set(factor_of)):
            idx = [i for i in range(len(items)) if factor_of[i] == fac]
            per_factor[fac] = success_rate([before[i] for i in idx], [after[i] for i in idx], [targets[i] for i in idx])
        res["by_factor"] = per_factor
        res.update(_pixel_change(clean, imgs, masks))
        return res, imgs, after

    first = window_names[0]
    by_scale, scale_imgs = [], {}
    for s in scales:
        res, imgs, after = run(float(s), windows[first])
        by_scale.append({"scale": float(s), "window": first, **res})
        scale_imgs[float(s)] = (imgs, after)
    rated = [r for r in by_scale if r["success_rate"] is not None]
    best_scale = (
        float(window_scale)
        if window_scale is not None
        else (max(rated, key=lambda r: (r["success_rate"], -abs(r["scale"])))["scale"] if rated else float(scales[0]))
    )
    by_window = []
    for name in window_names:
        if name == first and best_scale in scale_imgs:
            r = next(r for r in by_scale if r["scale"] == best_scale)
            by_window.append({**r, "window": name})
            continue
        res, _, _ = run(best_scale, windows[name])
        by_window.append({"scale": best_scale, "window": name, **res})
    by_branch = {}
    for b in compare_branches:
        by_branch[b] = []
        for sc in scales:
            res, _, _ = run(float(sc), windows[first], b)
            by_branch[b].append({"scale": float(sc), "window": first, "branch": b, **res})
    bar.close()
    result = {
        "mode": mode,
        "branch": branch,
        "region": "object box" if use_region else "all tokens",
        "steps": steps,
        "n_cases": len(items),
        "features": {c: feats[:features_per_concept] for c, feats in sorted(by_concept.items())},
        "before_target_rate": float(np.mean([b == t for b, t in zip(before, targets)])) if items else None,
        "by_scale": by_scale,
        "window_scale": best_scale,
        "by_window": by_window,
        "by_scale_other_branches": by_branch,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["files"] = _steering_files(out, result, items, cases, clean, scale_imgs, before, targets)
        write_json(out / "steering.json", result)
    return result


def _steering_files(out: Path, result, items, cases, clean, scale_imgs, before, targets) -> dict:
    from difflens.viz import labelled_grid

    files = {}
    # Example sweep: the case whose success spans the most scales (else the first), per factor.
    scales = sorted(scale_imgs)
    rows_img, rows_lab = [], []
    for fac in ("color", "object"):
        idx = [i for i, c in enumerate(cases) if c[1].startswith(fac + "=") and before[i] != targets[i]][:3]
        for i in idx:
            rows_img.append(clean[i])
            rows_lab.append(f"clean: {items[i].color} {items[i].object} -> {cases[i][1]} (f{cases[i][0]})")
            for s in scales:
                imgs, after = scale_imgs[s]
                rows_img.append(imgs[i])
                rows_lab.append(f"x{s:g}: reads {after[i]}")
    if rows_img:
        path = out / "steering_examples.png"
        save_image(path, labelled_grid(rows_img, rows_lab, cols=1 + len(scales), label_lines=3,
                                       title=f"steering sweep ({result['mode']}, {result['by_scale'][0]['window']})"))
        files["examples"] = str(path)
    path = out / "steering_success.png"
    if _plot_steering(result, path):
        files["plot"] = str(path)
    return files


def _plot_steering(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = [r["scale"] for r in result["by_scale"]]
    for key, label in (("success_rate", "all"),):
        axes[0].plot(xs, [r[key] if r[key] is not None else np.nan for r in result["by_scale"]], "o-", label=label)
    for fac in ("color", "object"):
        ys = [r["by_factor"].get(fac, {}).get("success_rate") for r in result["by_scale"]]
        if any(y is not None for y in ys):
            axes[0].plot(xs, [np.nan if y is None else y for y in ys], "s--", label=fac)
    for b, rs in result.get("by_scale_other_branches", {}).items():
        axes[0].plot([r["scale"] for r in rs], [np.nan if r["success_rate"] is None else r["success_rate"] for r in rs],
                     "^:", label=f"all, {b} branch only")
    axes[0].set_xscale("log" if all(x > 0 for x in xs) else "linear")
    axes[0].set_xlabel(f"scale ({result['mode']})")
    axes[0].set_ylabel("steering success rate")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    names = [r["window"] for r in result["by_window"]]
    axes[1].bar(range(len(names)), [r["success_rate"] or 0 for r in result["by_window"]])
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, rotation=20, fontsize=7)
    axes[1].set_ylim(0, 1)
    axes[1].set_title(f"by step window (scale {result['window_scale']:g})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return True


# ---- ablation ------------------------------------------------------------------------------------
ABLATION_VARIANTS: tuple[tuple[str, str, float | None, str], ...] = (
    ("ablate", "ablate", None, "both"),
    ("ablate, cond branch", "ablate", None, "cond"),
    ("invert (x-1)", "scale", -1.0, "both"),
    ("invert (x-1), cond branch", "scale", -1.0, "cond"),
)


def run_ablation_study(
    adapter,
    dictionary,
    feature_labels: Mapping[int, str],
    out_dir: str | Path | None = None,
    *,
    factor: str = "color",
    concept_features: Mapping[str, Sequence[int]] | None = None,
    features_per_value: int = 5,
    prompts_per_value: int = 6,
    variants: Sequence[tuple[str, str, float | None, str]] = ABLATION_VARIANTS,
    window: Window | None = None,
    control: bool = True,
    steps: int | None = None,
    guidance: float | None = None,
    classifier=None,
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Remove the features of the prompt's own colour (object, ...): how often does it change?

    For concept c the features are the top `features_per_value` of `concept_features[c]` (a
    ranking by F1 for c, as `label_features(..., return_scores=True)["by_concept"]` gives —
    a colour is often spread over features shared with neighbouring colours), else the features
    labelled c. Each variant is (name, op, value, branch): op "ablate" sets the codes to 0, op
    "scale" multiplies them (−1 inverts); branch "cond" edits only the conditional CFG rows, which
    guidance then amplifies. Success = the object no longer reads c, among images that read c
    before. The control applies the same edit to as many random features labelled with no value
    of the factor.
    """
    clf = _classifier(classifier)
    steps = default_steps(adapter) if steps is None else int(steps)
    by_concept = features_by_concept(feature_labels, (factor,))
    if concept_features:
        ranked = {c: [int(f) for f in fs][:features_per_value] for c, fs in concept_features.items()
                  if c.startswith(factor + "=") and c in V.CONCEPT_ID}
        by_concept = {c: fs for c, fs in ranked.items() if fs}
    else:
        by_concept = {c: fs[:features_per_value] for c, fs in by_concept.items()}
    if not by_concept:
        raise DifflensError(f"no feature is labelled with a {factor} concept: label features first")
    if not variants:
        raise DifflensError("run_ablation_study needs at least one variant (name, op, value, branch)")
    rng = np.random.default_rng(seed + 1)
    labelled = {f for f, c in feature_labels.items() if str(c).startswith(factor + "=")}
    labelled |= {f for fs in by_concept.values() for f in fs}
    pool = np.array([f for f in range(dictionary.num_latents) if f not in labelled])
    cases = []
    for concept, feats in sorted(by_concept.items()):
        value = concept.split("=", 1)[1]
        for it in study_items(factor, value, prompts_per_value, rng, has=True, seed0=seed * 1000 + 500):
            ctrl = sorted(rng.choice(pool, size=min(len(feats), len(pool)), replace=False).tolist()) if control and len(pool) else []
            cases.append((concept, feats, ctrl, it))
    items = [c[3] for c in cases]
    values = [c[0].split("=", 1)[1] for c in cases]
    positions = [it.position for it in items]
    bar = _bar(len(items) * (1 + len(variants) * (1 + int(control))), "ablation study", show_progress)
    win = window or Window.all()
    clean = generate_items(adapter, items, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
    before = read_at(clf, clean, factor, positions)

    def edit(which: int, op: str, value, branch: str):
        def make(k, j):
            feats = cases[k][which]
            return [CodeEdit(dictionary, [(op, feats, value)], window=win, branch=branch, samples=[j])] if feats else []

        return generate_items(adapter, items, make, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)

    res = {
        "factor": factor,
        "window": win.describe(),
        "features": {c: list(f) for c, f in sorted(by_concept.items())},
        "feature_source": "ranked by F1 per concept" if concept_features else "labelled features",
        "n_cases": len(items),
        "before_correct_rate": float(np.mean([b == v for b, v in zip(before, values)])) if items else None,
        "variants": {},
    }
    shown = {}
    for name, op, value, branch in variants:
        imgs = edit(1, op, value, branch)
        after = read_at(clf, imgs, factor, positions)
        entry = success_rate(before, after, values, mode="leave")
        entry["became"] = _counts([a for a, b, v in zip(after, before, values) if b == v and a != v])
        if control:
            ctrl = read_at(clf, edit(2, op, value, branch), factor, positions)
            entry["control_random_features"] = success_rate(before, ctrl, values, mode="leave")
        res["variants"][name] = entry
        shown[name] = (imgs, after)
    first = variants[0][0]
    res["ablation"] = {k: v for k, v in res["variants"][first].items() if k in ("success_rate", "successes", "eligible", "total", "vanished")}
    if control:
        res["control_random_features"] = res["variants"][first]["control_random_features"]
    bar.close()
    if out_dir is not None:
        from difflens.viz import labelled_grid

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        idx = [i for i in range(len(items)) if before[i] == values[i]][:6] or list(range(min(6, len(items))))
        imgs, labs = [], []
        for i in idx:
            imgs.append(clean[i])
            labs.append(f"clean {items[i].color} {items[i].object}: reads {before[i]}")
            for name in shown:
                imgs.append(shown[name][0][i])
                labs.append(f"{name}: {shown[name][1][i]}")
        path = out / "ablation_examples.png"
        save_image(path, labelled_grid(imgs, labs, cols=1 + len(shown), label_lines=3,
                                       title=f"removing the prompt's {factor} features ({features_per_value} per value)"))
        res["files"] = {"examples": str(path)}
        write_json(out / "ablation.json", res)
    return res


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ---- transfer ------------------------------------------------------------------------------------
def run_transfer_study(
    adapter,
    dictionary,
    feature_labels: Mapping[int, str],
    out_dir: str | Path | None = None,
    *,
    factor: str = "color",
    n_pairs: int = 12,
    mode: str = "tokens",
    steps: int | None = None,
    guidance: float | None = None,
    classifier=None,
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict:
    """Transfer a factor from a reference that differs only in it, inside the object's box."""
    clf = _classifier(classifier)
    steps = default_steps(adapter) if steps is None else int(steps)
    feats = sorted({f for f, c in feature_labels.items() if str(c).startswith(factor + "=")})
    if not feats:
        raise DifflensError(f"no feature is labelled with a {factor} concept: label features first")
    rng = np.random.default_rng(seed + 2)
    pairs = []
    values = list(V.FACTORS[factor]) if factor != "object" else list(STUDY_OBJECTS)
    for i in range(n_pairs):
        a, b = rng.choice(values, size=2, replace=False)
        base = dict(color=str(rng.choice(V.COLORS)), obj=str(rng.choice(STUDY_OBJECTS)),
                    position=V.POSITIONS[i % len(V.POSITIONS)], bgcolor=V.BG_COLORS[i % len(V.BG_COLORS)])
        key = "obj" if factor == "object" else factor
        tgt = make_item(**{**base, key: str(a)}, seed=seed * 1000 + 700 + i)
        # Same seed: the pair differs only in the factor, so codes that carry the noise state agree too.
        ref = make_item(**{**base, key: str(b)}, seed=seed * 1000 + 700 + i)
        pairs.append((tgt, ref))
    targets = [t for t, _ in pairs]
    refs = [r for _, r in pairs]
    positions = [t.position for t in targets]
    want = [getattr(r, "object" if factor == "object" else factor) for r in refs]
    bar = _bar(len(pairs) * 6, "transfer study", show_progress)
    clean = generate_items(adapter, targets, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
    ref_imgs = generate_items(adapter, refs, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
    before = read_at(clf, clean, factor, positions)
    ref_read = read_at(clf, ref_imgs, factor, positions)
    res = {
        "factor": factor, "mode": mode, "n_pairs": len(pairs), "features": feats,
        "reference_correct_rate": float(np.mean([r == w for r, w in zip(ref_read, want)])),
        "mse_inside_reference_vs_target": _pixel_change(clean, ref_imgs, [
            object_region(p).pixel_mask((V.IMAGE_SIZE, V.IMAGE_SIZE), (V.GRID, V.GRID)) for p in positions])["mse_inside"],
    }
    examples = {}
    for name, chosen in ((f"{factor} features", feats), ("all features", None)):
        def make(k, j, chosen=chosen):
            return [Transfer(dictionary, (refs[k].prompt, refs[k].seed), chosen, mode=mode, region=object_region(positions[k]), samples=[j])]

        imgs = generate_items(adapter, targets, make, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
        bar.update(len(pairs))  # the reference generations inside Transfer.prepare
        after = read_at(clf, imgs, factor, positions)
        ok = [i for i in range(len(pairs)) if ref_read[i] == want[i]]  # the reference shows what we transfer
        res[name] = success_rate([before[i] for i in ok], [after[i] for i in ok], [want[i] for i in ok])
        # Did the box become the reference, or just something the classifier reads as its colour?
        boxes = [object_region(p).pixel_mask((V.IMAGE_SIZE, V.IMAGE_SIZE), (V.GRID, V.GRID)) for p in positions]
        res[name]["mse_inside_to_reference"] = _pixel_change(ref_imgs, imgs, boxes)["mse_inside"]
        res[name]["mse_inside_to_target"] = _pixel_change(clean, imgs, boxes)["mse_inside"]
        examples[name] = (imgs, after)
    bar.close()
    if out_dir is not None:
        from difflens.viz import labelled_grid

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        imgs, labs = [], []
        for i in range(min(6, len(pairs))):
            imgs += [clean[i], ref_imgs[i]] + [examples[n][0][i] for n in examples]
            labs += [f"target: {before[i]}", f"reference: {ref_read[i]}"] + [f"{n}: {examples[n][1][i]}" for n in examples]
        path = out / "transfer_examples.png"
        save_image(path, labelled_grid(imgs, labs, cols=2 + len(examples), label_lines=3, title=f"{factor} transfer ({mode})"))
        res["files"] = {"examples": str(path)}
        write_json(out / "transfer.json", res)
    return res


# ---- everything ----------------------------------------------------------------------------------
def run_intervention_study(
    adapter,
    dictionary,
    out_dir: str | Path,
    *,
    store=None,
    feature_labels: Mapping[int, str] | None = None,
    quick: bool = False,
    classifier=None,
    steps: int | None = None,
    guidance: float | None = None,
    mode: str = "token-norm",
    scales: Sequence[float] | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Label features (unless labels are given), then the steering, ablation and transfer studies.

    Writes out_dir/{labels,steering,ablation,transfer,summary}.json, summary.md and PNGs.
    `quick` shrinks everything (fewer prompts and scales) for the demo.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clf = _classifier(classifier)
    label_info = None
    if feature_labels is None:
        if store is None:
            raise DifflensError("feature labels needed: pass a store (--data) to label features from, or a labels JSON (--labels)")
        feature_labels, label_info = label_features(dictionary, store, return_scores=True, show_progress=show_progress)
        write_json(out / "labels.json", {"labels": {str(k): v for k, v in feature_labels.items()}, **label_info})
    if guidance is None and store is not None:
        g = (store.manifest.get("harvest_config") or {}).get("guidance")
        guidance = float(g) if g is not None else None
    stats = None
    if store is not None and mode == "token-norm" and dictionary.cfg.site in store.sites:
        stats = store.stats(dictionary.cfg.site)
    n = 3 if quick else 6
    scales = tuple(scales) if scales is not None else ((0.5, 1.0, 2.0) if quick else (0.25, 0.5, 1.0, 2.0, 4.0))
    common = dict(steps=steps, guidance=guidance, classifier=clf, seed=seed, show_progress=show_progress)
    summary: dict = {"labelled_features": len(feature_labels), "dictionary": {"arch": dictionary.cfg.arch, "width": dictionary.cfg.width, "site": dictionary.cfg.site}}
    summary["steering"] = run_steering_study(
        adapter, dictionary, feature_labels, out, scales=scales, mode=mode, prompts_per_feature=n, stats=stats,
        compare_branches=() if quick else ("cond",), **common
    )
    ranking = {c: [f for f, _ in fs] for c, fs in label_info["by_concept"].items()} if label_info else None
    summary["ablation"] = run_ablation_study(
        adapter, dictionary, feature_labels, out, prompts_per_value=n, concept_features=ranking,
        variants=ABLATION_VARIANTS[:1] + ABLATION_VARIANTS[3:] if quick else ABLATION_VARIANTS, **common
    )
    summary["transfer"] = run_transfer_study(adapter, dictionary, feature_labels, out, n_pairs=2 * n, **common)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def summary_markdown(s: dict) -> str:
    st, ab, tr = s["steering"], s["ablation"], s["transfer"]
    lines = [
        "# Intervention study (toy model)",
        "",
        f"Dictionary: {s['dictionary']['arch']} width {s['dictionary']['width']} at `{s['dictionary']['site']}`; "
        f"{s['labelled_features']} labelled features.",
        "",
        f"## Steering ({st['mode']}, {st['region']}, {st['n_cases']} cases)",
        "",
        "| scale | window | CFG branch | success | n | object gone | pixel MSE inside | outside |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [dict(r, branch=st.get("branch", "both")) for r in st["by_scale"] + st["by_window"][1:]]
    for b, rs in st.get("by_scale_other_branches", {}).items():
        rows += rs
    for r in rows:
        lines.append(
            f"| {r['scale']:g} | {r['window']} | {r['branch']} | {_pct(r['success_rate'])} | {r['eligible']} | "
            f"{r.get('vanished', 0)} | {r['mse_inside']:.4f} | {r['mse_outside']:.4f} |"
        )
    lines += [
        "",
        "Success: the classifier reads the target value at the object after steering and did not before "
        "(object gone: the classifier sees no object at the slot any more).",
        "",
        f"## Removing the prompt's {ab['factor']} features ({ab['window']}; {ab.get('feature_source', '')})",
        "",
        "| edit | changed (object kept) | n | object gone | control: random features |",
        "|---|---|---|---|---|",
    ]
    for name, r in ab.get("variants", {"ablate": ab["ablation"]}).items():
        c = r.get("control_random_features")
        lines.append(
            f"| {name} | {_pct(r['success_rate'])} | {r['eligible']} | {r.get('vanished', 0)} | "
            f"{_pct(c['success_rate']) if c else '-'} |"
        )
    lines += ["", f"## Transfer of {tr['factor']} from a reference ({tr['mode']}, object box)", ""]
    for k in (f"{tr['factor']} features", "all features"):
        r = tr[k]
        lines.append(
            f"- {k}: {_pct(r['success_rate'])} of {r['eligible']}; pixel MSE in the box to the reference "
            f"{r['mse_inside_to_reference']:.4f}, to the clean target {r['mse_inside_to_target']:.4f} "
            f"(reference vs target: {tr['mse_inside_reference_vs_target']:.4f})"
        )
    return "\n".join(lines) + "\n"


def save_labels(path: str | Path, labels: Mapping[int, str], extra: dict | None = None) -> None:
    write_json(path, {"labels": {str(k): v for k, v in labels.items()}, **(extra or {})})


def run_demo(out_dir: str | Path, adapter, dictionary, store=None, *, feature_labels=None, classifier=None, show_progress: bool = True) -> dict:
    """The demo's intervention stage: a quick study; returns the few numbers and pictures to show."""
    s = run_intervention_study(
        adapter, dictionary, out_dir, store=store, feature_labels=feature_labels, quick=True,
        classifier=classifier, show_progress=show_progress,
    )
    st, ab, tr = s["steering"], s["ablation"], s["transfer"]
    r3 = lambda x: None if x is None else round(float(x), 3)  # noqa: E731
    return {
        "labelled_features": s["labelled_features"],
        "steering_sweep": st.get("files", {}).get("examples"),
        "steering_plot": st.get("files", {}).get("plot"),
        "steering_success_by_scale": {f"{r['scale']:g}": r3(r["success_rate"]) for r in st["by_scale"]},
        "steering_success_by_window": {r["window"]: r3(r["success_rate"]) for r in st["by_window"]},
        "steering_pixel_mse_outside_vs_inside": {f"{r['scale']:g}": [r3(r["mse_outside"]), r3(r["mse_inside"])] for r in st["by_scale"]},
        "ablation_example": ab.get("files", {}).get("examples"),
        "ablation_success": r3(ab["ablation"]["success_rate"]),
        "ablation_control_random": r3(ab.get("control_random_features", {}).get("success_rate")),
        "transfer_success": {k: r3(tr[k]["success_rate"]) for k in (f"{tr['factor']} features", "all features")},
        "summary": str(Path(out_dir) / "summary.md"),
    }
