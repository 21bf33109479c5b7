"""Ablation and transfer studies: remove a concept's features; take a factor from a reference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from difflens.errors import DifflensError
from difflens.utils import save_image, write_json
from difflens.intervene.base import default_steps
from difflens.intervene.edits import CodeEdit
from difflens.intervene.region import Window
from difflens.intervene.study_items import (
    generate_items,
    make_item,
    object_mask,
    object_region,
    pixel_change,
    progress_bar,
    read_at,
    study_classifier,
    study_items,
    success_rate,
)
from difflens.intervene.study_labels import features_by_concept
from difflens.intervene.transfer import Transfer
from difflens.intervene.truth import truth_of

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary
    from difflens.models.base import Adapter

# ---- ablation ------------------------------------------------------------------------------------
ABLATION_VARIANTS: tuple[tuple[str, str, float | None, str], ...] = (
    ("ablate", "ablate", None, "both"),
    ("ablate, cond branch", "ablate", None, "cond"),
    ("invert (x-1)", "scale", -1.0, "both"),
    ("invert (x-1), cond branch", "scale", -1.0, "cond"),
)


def run_ablation_study(
    adapter: Adapter,
    dictionary: Dictionary,
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
    truth = truth_of(adapter)
    clf = study_classifier(classifier, truth)
    steps = default_steps(adapter) if steps is None else int(steps)
    by_concept = features_by_concept(feature_labels, (factor,), truth=truth)
    if concept_features:
        ranked = {c: [int(f) for f in fs][:features_per_value] for c, fs in concept_features.items()
                  if c.startswith(factor + "=") and c in truth.concepts}
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
        for it in study_items(factor, value, prompts_per_value, rng, has=True, seed0=seed * 1000 + 500, truth=truth):
            ctrl = sorted(rng.choice(pool, size=min(len(feats), len(pool)), replace=False).tolist()) if control and len(pool) else []
            cases.append((concept, feats, ctrl, it))
    items = [c[3] for c in cases]
    values = [c[0].split("=", 1)[1] for c in cases]
    positions = [it.position for it in items]
    bar = progress_bar(len(items) * (1 + len(variants) * (1 + int(control))), "ablation study", show_progress)
    win = window or Window.all()
    clean = generate_items(adapter, items, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
    before = read_at(clf, clean, factor, positions, truth=truth)

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
        after = read_at(clf, imgs, factor, positions, truth=truth)
        entry = success_rate(before, after, values, mode="leave")
        entry["became"] = counts([a for a, b, v in zip(after, before, values) if b == v and a != v])
        if control:
            ctrl = read_at(clf, edit(2, op, value, branch), factor, positions, truth=truth)
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


def counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ---- transfer ------------------------------------------------------------------------------------
def run_transfer_study(
    adapter: Adapter,
    dictionary: Dictionary,
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
    truth = truth_of(adapter)
    clf = study_classifier(classifier, truth)
    steps = default_steps(adapter) if steps is None else int(steps)
    feats = sorted({f for f, c in feature_labels.items() if str(c).startswith(factor + "=")})
    if not feats:
        raise DifflensError(f"no feature is labelled with a {factor} concept: label features first")
    rng = np.random.default_rng(seed + 2)
    pairs = []
    values = list(truth.factors[factor]) if factor != "object" else list(truth.study_objects)
    colors, positions_, bg_colors = truth.factors["color"], truth.factors["position"], truth.factors["bgcolor"]
    for i in range(n_pairs):
        a, b = rng.choice(values, size=2, replace=False)
        base = dict(color=str(rng.choice(colors)), obj=str(rng.choice(truth.study_objects)),
                    position=positions_[i % len(positions_)], bgcolor=bg_colors[i % len(bg_colors)])
        key = "obj" if factor == "object" else factor
        tgt = make_item(**{**base, key: str(a)}, seed=seed * 1000 + 700 + i, truth=truth)
        # Same seed: the pair differs only in the factor, so codes that carry the noise state agree too.
        ref = make_item(**{**base, key: str(b)}, seed=seed * 1000 + 700 + i, truth=truth)
        pairs.append((tgt, ref))
    targets = [t for t, _ in pairs]
    refs = [r for _, r in pairs]
    positions = [t.position for t in targets]
    want = [getattr(r, "object" if factor == "object" else factor) for r in refs]
    bar = progress_bar(len(pairs) * 6, "transfer study", show_progress)
    clean = generate_items(adapter, targets, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
    ref_imgs = generate_items(adapter, refs, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
    before = read_at(clf, clean, factor, positions, truth=truth)
    ref_read = read_at(clf, ref_imgs, factor, positions, truth=truth)
    res = {
        "factor": factor, "mode": mode, "n_pairs": len(pairs), "features": feats,
        "reference_correct_rate": float(np.mean([r == w for r, w in zip(ref_read, want)])),
        "mse_inside_reference_vs_target": pixel_change(clean, ref_imgs, [object_mask(p, truth) for p in positions])["mse_inside"],
    }
    examples = {}
    for name, chosen in ((f"{factor} features", feats), ("all features", None)):
        def make(k, j, chosen=chosen):
            return [Transfer(dictionary, (refs[k].prompt, refs[k].seed), chosen, mode=mode, region=object_region(positions[k], truth=truth), samples=[j])]

        imgs = generate_items(adapter, targets, make, steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
        bar.update(len(pairs))  # the reference generations inside Transfer.prepare
        after = read_at(clf, imgs, factor, positions, truth=truth)
        ok = [i for i in range(len(pairs)) if ref_read[i] == want[i]]  # the reference shows what we transfer
        res[name] = success_rate([before[i] for i in ok], [after[i] for i in ok], [want[i] for i in ok])
        # Did the box become the reference, or just something the classifier reads as its colour?
        boxes = [object_mask(p, truth) for p in positions]
        res[name]["mse_inside_to_reference"] = pixel_change(ref_imgs, imgs, boxes)["mse_inside"]
        res[name]["mse_inside_to_target"] = pixel_change(clean, imgs, boxes)["mse_inside"]
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
