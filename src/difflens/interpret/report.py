"""Reports: score distributions, the comparison table, the paper checks, the timestep hierarchy, exports.

Claims from the literature are *tested* here, not assumed: whether SAE features beat MLP neurons
(difference of mean scores with a bootstrap CI and a Mann-Whitney U test, both from
scipy.stats), whether ITDA is
comparable to the SAE, and whether features form a coarse-to-fine hierarchy over timesteps (per
concept type, the timestep at which its best-matching features peak).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from difflens.interpret.cache import FeatureCache
from difflens.groundtruth import ConceptVocabulary
from difflens.utils import write_json
from difflens.viz import save_figure

HIGH = 0.8  # "share above 0.8"


def _r(x, nd=4):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def summarize(name: str, cache: FeatureCache, results: list[dict], selected, skipped: dict, *, seed: int = 0) -> dict:
    """One row of the comparison table (scores are chance-corrected; raw and chance beside them)."""
    scores = np.array([r["score"] for r in results if r["score"] is not None], np.float64)
    raw = np.array([r.get("raw_score") for r in results if r["score"] is not None and r.get("raw_score") is not None])
    chance = np.array([r.get("chance") for r in results if r["score"] is not None and r.get("chance") is not None])
    loc = [r["localisation"] for r in results if r["score"] is not None and r["localisation"] is not None]
    live = cache.live()
    sel = np.asarray(list(selected), np.int64)
    src = cache.info["source"]
    ci = mean_ci(scores, seed=seed)
    return {
        "name": name,
        "kind": src.get("kind"),
        "site": cache.info["site"],
        "features": cache.num_features,
        "live": int(live.sum()),
        "live_share": _r(live.mean()),
        "mean_frequency": _r(float(cache["frequency"][live].mean()) if live.any() else 0.0, 5),
        "sampled": int(len(sel)),
        "scored": int(len(scores)),
        "coverage": _r(len(scores) / len(sel)) if len(sel) else None,
        "mean": _r(scores.mean()) if len(scores) else None,
        "ci95": [_r(ci[0]), _r(ci[1])] if ci else None,
        "median": _r(np.median(scores)) if len(scores) else None,
        "share_above_0.8": _r((scores > HIGH).mean()) if len(scores) else None,
        # over every sampled feature, an unscored one counted at chance: corrects for coverage
        "mean_all": _r((scores.sum() + 0.5 * (len(sel) - len(scores))) / len(sel)) if len(sel) else None,
        "raw_mean": _r(raw.mean()) if len(raw) else None,
        "chance_mean": _r(chance.mean()) if len(chance) else None,
        "localisation": _r(np.mean(loc)) if loc else None,
        "skipped": len(skipped),
        "explain_failures": int(sum(not r["explanation_ok"] for r in results)),
        "judge_failures": int(sum(r["judge_failures"] for r in results)),
    }


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return "–" if None in v else f"{v[0]:.2f}..{v[1]:.2f}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


TABLE_COLS = [("name", "source"), ("kind", "kind"), ("site", "site"), ("features", "F"), ("live_share", "live"),
              ("sampled", "sampled"), ("scored", "scored"), ("coverage", "coverage"), ("mean", "mean"),
              ("ci95", "95% CI"), ("median", "median"), ("share_above_0.8", ">0.8"),
              ("mean_all", "mean (unscored = 0.5)"), ("raw_mean", "raw mean"), ("chance_mean", "chance"),
              ("localisation", "loc. IoU")]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in TABLE_COLS) + " |"
    sep = "|" + "|".join("---" for _ in TABLE_COLS) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in TABLE_COLS) + " |")
    return "\n".join(lines)


# ---- statistics (scipy.stats) ---------------------------------------------------------------------------


def mean_ci(x, *, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (None for fewer than 2 values)."""
    from scipy import stats

    x = np.asarray(x, float)
    if len(x) < 2:
        return None
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = stats.bootstrap((x,), np.mean, n_resamples=n, confidence_level=level, method="percentile",
                          random_state=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_diff(a, b, *, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95% percentile bootstrap interval (independent resampling of a and b)."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    d = float(a.mean() - b.mean())
    if np.all(a == a[0]) and np.all(b == b[0]):
        return d, d, d

    def stat(x, y, axis=-1):
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    res = stats.bootstrap((a, b), stat, n_resamples=n, method="percentile", paired=False,
                          random_state=np.random.default_rng(seed), vectorized=True)
    return d, float(res.confidence_interval.low), float(res.confidence_interval.high)


def mann_whitney(a, b) -> tuple[float, float]:
    """(U of a, two-sided p): normal approximation with tie correction, no continuity correction."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.all(np.concatenate([a, b]) == a[0]):
        return float(len(a) * len(b) / 2), 1.0
    r = stats.mannwhitneyu(a, b, alternative="two-sided", use_continuity=False, method="asymptotic")
    return float(r.statistic), float(r.pvalue)


def compare(name_a: str, a, name_b: str, b, seed: int = 0) -> dict | None:
    if len(a) < 2 or len(b) < 2:
        return None
    d, lo, hi = bootstrap_diff(a, b, seed=seed)
    _, p = mann_whitney(a, b)
    return {"a": name_a, "b": name_b, "mean_a": _r(np.mean(a)), "mean_b": _r(np.mean(b)), "diff": _r(d),
            "ci95": [_r(lo), _r(hi)], "mann_whitney_p": _r(p, 6), "n_a": len(a), "n_b": len(b)}


def paper_checks(scores: dict[str, list[float]], kinds: dict[str, str], seed: int = 0) -> dict:
    """SAE vs neurons, ITDA vs SAE (and every dictionary vs random), with numbers and a verdict."""
    by_kind: dict[str, str] = {}
    for n, k in kinds.items():
        by_kind.setdefault(k, n)
    out: dict = {}
    sae, neu, itda, rnd = (by_kind.get(k) for k in ("sae", "neurons", "itda", "random"))
    if sae and neu:
        c = compare(sae, scores[sae], neu, scores[neu], seed)
        if c:
            c["verdict"] = ("SAE features beat neurons" if c["ci95"][0] > 0 else
                            "neurons beat SAE features" if c["ci95"][1] < 0 else "no clear difference")
        out["sae_vs_neurons"] = c
    if itda and sae:
        c = compare(itda, scores[itda], sae, scores[sae], seed)
        if c:
            c["verdict"] = ("comparable (95% CI of the difference within ±0.05)" if c["ci95"][0] > -0.05 and c["ci95"][1] < 0.05
                            else "ITDA better" if c["ci95"][0] > 0 else "ITDA worse" if c["ci95"][1] < 0
                            else "inconclusive (CI wider than ±0.05 around 0)")
        out["itda_vs_sae"] = c
    if rnd:
        out["vs_random"] = {n: compare(n, scores[n], rnd, scores[rnd], seed) for n in scores if n != rnd}
    return out


# ---- timestep hierarchy ------------------------------------------------------------------------------


def hierarchy(cache: FeatureCache, vocab: ConceptVocabulary | None, *, top_k: int = 5, min_match: float = 0.2) -> dict | None:
    """Per concept type: its best-matching features (token MCC over both splits, best step) with
    the timesteps where their mean activation peaks and where they match their concept best,
    and the step at which one feature matches the type best."""
    if not cache.has_concepts or vocab is None:
        return None
    from difflens.interpret.oracle import mcc

    T = cache.grid_hw[0] * cache.grid_hw[1]
    tp = cache["concept_tp"].sum(0)  # [S, F, C]
    act = cache["concept_active"].sum(0)  # [S, F]
    cnt = cache["concept_count"].sum(0)  # [S, C]
    n_tok = float(len(cache.sample_ids) * T)
    m = mcc(tp, act[:, :, None], cnt[:, None, :], n_tok)  # [S, F, C]
    ts = np.asarray(cache.timesteps, float)
    live = cache.live()
    best_c = m.max(0).argmax(1)  # [F]
    best_m = m.max(0).max(1)
    names = vocab.names
    ctypes = np.array([vocab.type_of(c) for c in names])
    prof = cache["profile_mean"]
    out = {"timesteps": ts.tolist(), "top_k": top_k, "min_match": min_match, "metric": "token MCC", "types": {}}
    for t in vocab.types:
        cols = np.flatnonzero(ctypes == t)
        cand = np.flatnonzero(live & np.isin(best_c, cols) & (best_m >= min_match))
        cand = cand[np.argsort(-best_m[cand])][:top_k]
        curve = m[:, :, cols].max(axis=(1, 2))  # [S]
        entry = {"features": cand.tolist(), "match": [_r(best_m[f]) for f in cand],
                 "concepts": [names[best_c[f]] for f in cand],
                 "best_match_by_step": [_r(x) for x in curve], "best_match": _r(curve.max()),
                 "best_step_timestep": _r(ts[int(curve.argmax())], 2) if curve.max() > 0 else None}
        if len(cand):
            peaks = ts[prof[cand].argmax(1)]
            match_peaks = ts[m[:, cand, best_c[cand]].argmax(0)]
            norm = prof[cand] / np.maximum(np.abs(prof[cand]).max(1, keepdims=True), 1e-12)
            entry.update(peak_timesteps=[_r(p, 2) for p in peaks], median_peak_timestep=_r(np.median(peaks), 2),
                         median_match_timestep=_r(np.median(match_peaks), 2), mean_profile=[_r(x) for x in norm.mean(0)])
        out["types"][t] = entry
    out["coarse_to_fine"] = {k: _coarse_fine(out["types"], k, vocab) for k in ("median_peak_timestep", "median_match_timestep")}
    return out


def _coarse_fine(types: dict, key: str, vocab: ConceptVocabulary) -> dict:
    """Do coarse features (toy world: position/background) peak at noisier timesteps than fine
    ones (object identity, digits)?"""
    coarse = [types[t][key] for t in vocab.coarse_types if types[t].get(key) is not None]
    digit = types.get("digit", {}).get(key)
    fine = [types[t][key] for t in vocab.fine_types if types[t].get(key) is not None]
    res = {"coarse": _r(float(np.median(coarse)), 2) if coarse else None, "digit": digit,
           "fine": _r(float(np.median(fine)), 2) if fine else None}
    res["digit_later"] = None if res["coarse"] is None or digit is None else bool(res["coarse"] > digit)
    res["fine_later"] = None if res["coarse"] is None or res["fine"] is None else bool(res["coarse"] > res["fine"])
    if digit is None and "digit" in types:
        res["note"] = (f"untestable for digits: no feature matches a digit with token MCC >= the threshold "
                       f"(best {types['digit']['best_match']})")
    return res


def plot_hierarchy(hier: dict[str, dict], path: str | Path) -> Path | None:
    """One panel per source: mean normalised timestep profile of each type's best features."""
    hier = {k: v for k, v in hier.items() if v}
    if not hier:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(hier)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (name, h) in zip(axes[0], hier.items()):
        ts = np.asarray(h["timesteps"])
        for t, e in h["types"].items():
            if "mean_profile" not in e:
                continue
            ax.plot(ts, e["mean_profile"], marker="o", ms=3, label=f"{t} (peak {e['median_peak_timestep']:.0f})")
        ax.set_xlim(ts.max() + 20, ts.min() - 20)  # high noise on the left
        ax.set_xlabel("timestep (high noise → low)")
        ax.set_title(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no feature matches a concept", ha="center", transform=ax.transAxes, fontsize=8)
    axes[0][0].set_ylabel("normalised mean activation")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_scores(scores: dict[str, list[float]], path: str | Path, title: str = "autointerp scores") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    bins = np.linspace(0, 1, 21)
    for name, s in scores.items():
        if len(s):
            ax.hist(s, bins=bins, alpha=0.5, label=f"{name} (mean {np.mean(s):.2f}, n={len(s)})")
    ax.axvline(0.5, color="gray", ls=":", lw=1)
    ax.axvline(HIGH, color="k", ls="--", lw=1)
    ax.set_xlabel("score")
    ax.set_ylabel("features")
    ax.set_title(title)
    if any(len(s) for s in scores.values()):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no scored features", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return save_figure(fig, path)


# ---- per-feature export for the browser ----------------------------------------------------------------


def _rounded(a, sig: int = 4) -> list:
    a = np.asarray(a, np.float64)
    return [float(f"{x:.{sig}g}") for x in a.reshape(-1)]


def export_features(cache: FeatureCache, results: list[dict], folder: str | Path, *, n_maps: int = 10,
                    provenance: dict[str, np.ndarray] | None = None) -> Path:
    """folder/index.json (one summary row per live feature) and folder/<id>.json per mapped feature:
    explanation, score, frequency, timestep profile, peak timestep, histogram, top samples with
    their token maps (shown step; all steps for the best one), quantile samples, and for ITDA
    the atom's provenance (sample, step, token it was copied from)."""
    folder = Path(folder)
    by_f = {r["feature"]: r for r in results}
    ts = cache.timesteps
    index = []
    for f in np.flatnonzero(cache.live()).tolist():
        r = by_f.get(f, {})
        peak = cache.peak_step(f)
        row = {"feature": f, "frequency": _r(cache["frequency"][f], 6), "max": _r(cache["max"][f]),
               "peak_timestep": ts[peak], "explanation": r.get("explanation"), "score": _r(r.get("score")),
               "has_maps": cache.has_maps(f)}
        index.append(row)
        if not cache.has_maps(f):
            continue
        top = cache.top_examples(f)[:n_maps]
        detail = {
            **row,
            "concept": r.get("concept"), "level": r.get("level"), "localisation": _r(r.get("localisation")),
            "threshold": _r(cache["threshold"][f]), "frequency_above_threshold": _r(cache["frequency_thr"][f], 6),
            "timesteps": ts, "profile_mean": _rounded(cache["profile_mean"][f]), "profile_max": _rounded(cache["profile_max"][f]),
            "peak_step": peak, "histogram": cache.histogram(f), "grid_hw": list(cache.grid_hw),
            "top": [{"sample_id": e.sample_id, "value": _r(e.value), "step": e.step, "timestep": ts[e.step],
                     "split": "explain" if e.split == 0 else "heldout", "map": _rounded(e.map)} for e in top],
            "best_maps_by_step": [_rounded(m) for m in top[0].maps_ST] if top else [],
            "quantiles": [{"sample_id": e.sample_id, "value": _r(e.value), "timestep": ts[e.step], "map": _rounded(e.map)}
                          for e in cache.quantile_examples(f)],
            "test": r.get("test"),
        }
        if provenance:
            detail["provenance"] = {k: int(v[f]) for k, v in provenance.items() if f < len(v)}
        write_json(folder / f"{f}.json", detail)
    write_json(folder / "index.json", {"source": cache.info["source"], "site": cache.info["site"], "timesteps": ts,
                                       "features": index})
    return folder
