"""The intervention study end to end (labels, steering, ablation, transfer) and its summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING


from difflens.errors import DifflensError
from difflens.utils import write_json
from difflens.intervene.study_edits import ABLATION_VARIANTS, run_ablation_study, run_transfer_study
from difflens.intervene.study_items import study_classifier
from difflens.intervene.study_labels import label_features
from difflens.intervene.study_steer import run_steering_study
from difflens.intervene.truth import truth_of

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary
    from difflens.models.base import Adapter

# ---- everything ----------------------------------------------------------------------------------
def run_intervention_study(
    adapter: Adapter,
    dictionary: Dictionary,
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
    truth = truth_of(adapter)
    clf = study_classifier(classifier, truth)
    label_info = None
    if feature_labels is None:
        if store is None:
            raise DifflensError("feature labels needed: pass a store (--data) to label features from, or a labels JSON (--labels)")
        feature_labels, label_info = label_features(dictionary, store, return_scores=True, show_progress=show_progress,
                                                    truth=truth)
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
        "# Intervention study",
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
