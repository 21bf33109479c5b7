"""Causal editing: does turning a concept's features off, or swapping them for another value's,
change the classifier's reading of that concept, and only of that concept? (docs/benchmark.md)

The cases, the features and the edits are the concept study's (`difflens.intervene.study_concepts`):
n prompts "a large <colour> <object> in the <position> on a <bgcolor> plain background", each with
its own seed and a target value per factor; a concept's features are its top `n_features`
features by token F1 against the store's labels at the dictionary's site. Per dictionary, factor
F and mode, every case is generated once unedited (shared by all rows) and once edited:

    edit      codes of the prompt value's features -> 0 and the target value's features -> their
              store maximum (x scale), at the tokens where the prompt value's features fire
    ablation  codes of the prompt value's features -> 0

and read by the world's classifier. Over the *eligible* cases (the unedited image reads the
prompted value of F):

    success       edit: F now reads the target; ablation: F reads another value (object still there)
    side effects  share of eligible cases where any other factor's reading differs from the
                  unedited image of the same seed
    specificity   success - side effects (1: every edit lands and nothing else moves; <= 0: the
                  edit moves other factors at least as often as the concept)

The random-feature control repeats each row with the same number of features drawn at random (not
the concept's), acting at the same tokens: what an edit of that size does without the concept.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from difflens.errors import DifflensError

if TYPE_CHECKING:
    from difflens.models.base import Adapter

FACTORS = ("color", "object", "bgcolor")
MODES = ("edit", "ablation")


def read_cases(classifier, images: np.ndarray, cases: Sequence, truth=None) -> dict[str, list[str]]:
    """The classifier's reading of colour and object at each case's position (ABSENT when no object
    is there, as the concept study reads them), and of the background colour (through
    `truth.read_at`; default: `intervene.truth.truth_of()`)."""
    from difflens.intervene.study_items import read_at
    from difflens.intervene.truth import truth_of

    truth = truth_of(None, truth)
    images = np.asarray(images)
    positions = [c.position for c in cases]
    return {"color": read_at(classifier, images, "color", positions, truth=truth),
            "object": read_at(classifier, images, "object", positions, truth=truth),
            "bgcolor": truth.read_at(images, positions, ("bgcolor",), reader=classifier)["bgcolor"]}


def score_row(cases: Sequence, clean: dict, after: dict, factor: str, mode: str) -> dict:
    """Success, side effects and specificity of one row (definitions in the module docstring)."""
    from difflens.intervene.study_items import ABSENT  # what the readings say where no object is seen

    others = [f for f in FACTORS if f != factor]
    elig = [i for i, c in enumerate(cases) if clean[factor][i] == getattr(c, factor)]
    if mode == "edit":
        hits = [i for i in elig if after[factor][i] == getattr(cases[i], "to_" + factor)]
    elif mode == "ablation":
        hits = [i for i in elig if after[factor][i] not in (getattr(cases[i], factor), ABSENT)]
    else:
        raise DifflensError(f"unknown causal mode {mode!r}: use one of {', '.join(MODES)}")
    moved = {f: [i for i in elig if after[f][i] != clean[f][i]] for f in others}
    side = [i for i in elig if any(i in moved[f] for f in others)]
    n = len(elig)
    succ = len(hits) / n if n else None
    se = len(side) / n if n else None
    return {"eligible": n, "successes": len(hits), "success_rate": _r(succ), "side_effect_rate": _r(se),
            "specificity": _r(None if n == 0 else succ - se),
            "side_effects_by_factor": {f: _r(len(v) / n) if n else None for f, v in moved.items()},
            "vanished": sum(after["object"][i] == ABSENT for i in elig)}


def _r(v):
    return None if v is None else round(float(v), 4)


def _generate(adapter: Adapter, cases, make, *, steps, guidance, batch_size: int, bar) -> tuple[np.ndarray, int, int]:
    """Images of `cases` with the interventions `make(k, j)` (case k is sample j of its batch),
    through the studies' one loop (`generate_items`, unbatched so each edit keeps its own log);
    also how many interventions were built and how many never acted (their features never fired)."""
    from difflens.intervene.study_items import generate_items

    made: list = []

    def collect(k, j):
        ivs = make(k, j)
        made.extend(ivs)
        return ivs

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="intervention never acted")
        images = generate_items(adapter, cases, None if make is None else collect, steps=steps, guidance=guidance,
                                batch_size=batch_size, bar=bar, batched=False)
    return images, len(made), sum(not iv.log for iv in made)


def causal_editing(adapter: Adapter, dictionaries: Mapping[str, object], store, *, n_cases: int = 16,
                   factors: Sequence[str] = FACTORS, modes: Sequence[str] = MODES, n_features: int = 3,
                   scale: float = 1.0, steps: int | None = None, guidance: float | None = None, classifier=None,
                   features: Mapping[str, Mapping[str, Sequence[int]]] | None = None, seed: int = 0,
                   batch_size: int = 50, show_progress: bool = True) -> dict:
    """Edit and ablate every factor's concept features of every dictionary (name -> dictionary) on
    the same `n_cases` cases; returns per dictionary, factor and mode the row's scores and its
    random-feature control. `features` (name -> {concept: [feature ids]}) replaces the labelling."""
    from difflens.intervene import CodeEdit, FiresOn, feature_maxima
    from difflens.intervene.study_concepts import concept_features, make_cases
    from difflens.intervene.study_items import progress_bar, study_classifier
    from difflens.intervene.truth import truth_of

    bad = [f for f in factors if f not in FACTORS] + [m for m in modes if m not in MODES]
    if bad:
        raise DifflensError(f"unknown causal factors/modes {bad}: factors are {', '.join(FACTORS)}, modes {', '.join(MODES)}")
    if n_cases < 1:
        raise DifflensError(f"causal editing needs at least one case, got {n_cases}")
    truth = truth_of(adapter)
    clf = study_classifier(classifier, truth)
    steps = adapter.default_steps if steps is None else int(steps)
    t0 = time.time()
    cases = make_cases(n_cases, seed, truth=truth)
    n_rows = len(dictionaries) * len(factors) * len(modes) * 2
    bar = progress_bar(n_cases * (1 + n_rows), "causal editing", show_progress)
    kw = dict(steps=steps, guidance=guidance, batch_size=batch_size, bar=bar)
    clean_img, _, _ = _generate(adapter, cases, None, **kw)
    clean = read_cases(clf, clean_img, cases, truth)
    images = n_cases
    result: dict = {"n_cases": n_cases, "steps": steps, "scale": scale, "n_features": n_features, "seed": seed,
                    "factors": list(factors), "modes": list(modes),
                    "clean_reads_prompt": {f: _r(np.mean([clean[f][i] == getattr(c, f) for i, c in enumerate(cases)]))
                                           for f in factors},
                    "dictionaries": {}}
    for name, d in dictionaries.items():
        feats = ({c: [int(f) for f in fs] for c, fs in features[name].items()} if features is not None
                 else concept_features(d, store, n_features, truth=truth))
        rng = np.random.default_rng([seed, 23])
        F = int(d.num_latents)
        # per (factor, case): the concept's source and target features and a random pair of the same sizes
        plan: dict[str, list[tuple[list[int], list[int], list[int], list[int]]]] = {}
        for factor in factors:
            rows = []
            for c in cases:
                src = list(feats.get(f"{factor}={getattr(c, factor)}", []))
                tgt = list(feats.get(f"{factor}={getattr(c, 'to_' + factor)}", []))
                pool = np.setdiff1d(np.arange(F), src + tgt)
                draw = rng.choice(pool, size=min(len(src) + len(tgt), len(pool)), replace=False).tolist()
                rows.append((src, tgt, sorted(draw[: len(src)]), sorted(draw[len(src):])))
            plan[factor] = rows
        need = sorted({f for rows in plan.values() for r in rows for f in r[1] + r[3]})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="features .* never fired")
            fmax = feature_maxima(d, store, need) if need and "edit" in modes else {}
        res: dict = {"site": str(d.cfg.site), "arch": str(d.cfg.arch), "width": F,
                     "features": {c: fs for c, fs in feats.items() if fs and c.split("=", 1)[0] in factors}, "rows": {}}

        for factor in factors:
            res["rows"][factor] = {}
            for mode in modes:
                without = sum(1 for s, t, _, _ in plan[factor] if not s or (mode == "edit" and not t))
                entry: dict = {}
                for control in (False, True):
                    def make(k, j, factor=factor, mode=mode, control=control):
                        src, tgt, rsrc, rtgt = plan[factor][k]
                        if not src or (mode == "edit" and not tgt):
                            return []  # no features for this value: the case counts as a failure
                        a, b = (rsrc, rtgt) if control else (src, tgt)
                        if mode == "ablation":
                            return [CodeEdit(d, [("ablate", a, None)], samples=[j])]
                        ops = [("ablate", a, None)] + [("clamp", [f], scale * fmax[f]) for f in b]
                        return [CodeEdit(d, ops, where=FiresOn(d, src), samples=[j])]

                    imgs, built, idle = _generate(adapter, cases, make, **kw)
                    images += n_cases
                    s = score_row(cases, clean, read_cases(clf, imgs, cases, truth), factor, mode)
                    s["edits_that_never_acted"] = idle
                    s["edits"] = built
                    used = [len(r[2 * control]) + (len(r[2 * control + 1]) if mode == "edit" else 0)
                            for r in plan[factor] if r[0] and (mode == "ablation" or r[1])]
                    s["features_per_edit"] = _r(np.mean(used)) if used else 0
                    if control:
                        entry["control_random_features"] = s
                    else:
                        entry.update(s)
                        entry["cases_without_features"] = without
                res["rows"][factor][mode] = entry
        res["summary"] = summarise(res["rows"])
        result["dictionaries"][name] = res
    bar.close()
    result["images"] = images
    result["seconds"] = round(time.time() - t0, 1)
    return result


def summarise(rows: Mapping[str, Mapping[str, dict]]) -> dict:
    """Per mode, the mean over factors (with eligible cases) of success, side effects, specificity
    and the control's success and side effects."""
    out = {}
    for mode in MODES:
        es = [r[mode] for r in rows.values() if mode in r and r[mode]["eligible"]]
        if not es:
            continue

        def mean(get):
            v = [get(e) for e in es]
            v = [x for x in v if x is not None]
            return _r(np.mean(v)) if v else None

        out[mode] = {"success": mean(lambda e: e["success_rate"]), "side_effects": mean(lambda e: e["side_effect_rate"]),
                     "specificity": mean(lambda e: e["specificity"]),
                     "control_success": mean(lambda e: e["control_random_features"]["success_rate"]),
                     "control_side_effects": mean(lambda e: e["control_random_features"]["side_effect_rate"]),
                     "factors": [f for f, r in rows.items() if mode in r and r[mode]["eligible"]]}
    return out


def benchmark_causal(dictionaries: Mapping[str, object], store, *, adapter: Adapter | None = None, model: str | None = None,
                     model_kwargs: Mapping | None = None, **kw) -> dict:
    """`causal_editing` for the benchmark: loads the store's model (or `model`) and returns
    {"skipped": reason} instead of failing when the model is unavailable or has no ground truth."""
    name = model or store.manifest.get("model")
    if adapter is None:
        from difflens.models import ground_truth_for, load_adapter

        try:
            truth = ground_truth_for(name)
        except Exception as e:  # noqa: BLE001 - an unresolvable model is a reason to skip, stated
            return {"skipped": f"cannot resolve the model {name!r} ({type(e).__name__}: {e}); pass --model"}
        if truth is None:
            return {"skipped": f"the model {name!r} has no ground truth (a real model): causal editing reads edited "
                               "images with a world's classifier"}
        try:
            adapter = load_adapter(name, **dict(model_kwargs or {}))
        except Exception as e:  # noqa: BLE001
            return {"skipped": f"the model {name!r} is not available ({type(e).__name__}: {e}); pass --model"}
    truth = adapter.ground_truth()
    if truth is None:
        return {"skipped": f"the model {name!r} has no ground truth (a real model): causal editing reads edited "
                           "images with a world's classifier"}
    factors = [f for f in kw.pop("factors", FACTORS) if f in truth.factors]
    if not factors:
        return {"skipped": f"the world {truth.name} has none of the factors {', '.join(FACTORS)}"}
    if kw.get("classifier") is None:
        try:
            truth.ready()
        except DifflensError as e:
            return {"skipped": f"no classifier to read images: {e}"}
    use, notes = {}, []
    for n, d in dictionaries.items():
        site = str(d.cfg.site)
        try:
            width = adapter.site_dim(site)
        except Exception as e:  # noqa: BLE001
            notes.append(f"{n}: the model has no site {site} ({e})")
            continue
        if int(width) != int(d.cfg.d_in):
            notes.append(f"{n}: {site} of the model {name} is {width} wide, the dictionary reads {d.cfg.d_in}")
            continue
        use[n] = d
    if not use:
        return {"skipped": "; ".join(notes) or "no dictionary"}
    out = causal_editing(adapter, use, store, factors=factors, **kw)
    out["model"] = name
    if notes:
        out["notes"] = notes
    return out


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def markdown_causal(causal: dict) -> list[str]:
    """The benchmark report's causal-editing section (per dictionary, factor and mode)."""
    if not causal:
        return []
    if "skipped" in causal:
        return [f"Causal editing skipped: {causal['skipped']}", ""]
    md = [f"## Causal editing ({causal['n_cases']} cases, {causal['steps']} steps, model {causal.get('model', '?')}, "
          f"targets at {causal.get('scale', 1.0):g} x their store maximum)", "",
          "Unedited images read the prompted value: " + ", ".join(f"{f} {_pct(v)}" for f, v in causal["clean_reads_prompt"].items())
          + ". Cell: success / side effects / specificity (eligible cases); control = the same with as many random features.",
          "", "| dictionary | factor | mode | eligible | success | side effects | specificity | control success | control side eff. |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, d in causal["dictionaries"].items():
        for factor, by_mode in d["rows"].items():
            for mode, e in by_mode.items():
                c = e["control_random_features"]
                md.append(f"| {name} | {factor} | {mode} | {e['eligible']} | {_pct(e['success_rate'])} | "
                          f"{_pct(e['side_effect_rate'])} | {_f(e['specificity'])} | {_pct(c['success_rate'])} | "
                          f"{_pct(c['side_effect_rate'])} |")
    md += ["", "Success: edit = the factor now reads the target value, ablation = it reads another value (object still "
           "there); side effects = share of eligible cases where another factor's reading differs from the unedited "
           "image of the same seed; specificity = success - side effects.", ""]
    for n in causal.get("notes", []):
        md.append(f"- {n}")
    return md


def _f(v) -> str:
    return "–" if v is None else f"{v:+.2f}"


def plot_causal(causal: dict, path) -> None:
    """Bars per dictionary and factor: success, side effects and the random control's success."""
    if not causal or "skipped" in causal or not causal.get("dictionaries"):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflens.viz import save_figure

    modes = causal["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False)
    names = list(causal["dictionaries"])
    for ax, mode in zip(axes[0], modes):
        labels, groups = [], []
        for n in names:
            for factor, by_mode in causal["dictionaries"][n]["rows"].items():
                e = by_mode.get(mode)
                if e is None:
                    continue
                labels.append(f"{n}\n{factor}")
                groups.append([e["success_rate"] or 0, e["side_effect_rate"] or 0,
                               e["control_random_features"]["success_rate"] or 0])
        x = np.arange(len(labels))
        g = np.array(groups).reshape(-1, 3)
        for i, (lab, col) in enumerate((("success", "tab:green"), ("side effects", "tab:red"), ("random control", "tab:gray"))):
            ax.bar(x + (i - 1) * 0.27, g[:, i], 0.27, label=lab, color=col)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"causal {mode}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
