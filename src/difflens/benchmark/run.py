"""`difflens benchmark`: score dictionaries at one site of a store on everything a ground-truth world can check.

One pass over whole images per source (dictionaries, the MLP neurons of the same block, the raw
activations) gives a subsample of token rows (probing, absorption, concept matching) and streamed
feature maps (Moran's I, localisation). Reconstruction comes from `evaluate` (its metrics, its
held-out split), autointerp from the interpret pipeline's oracle. Metrics that need labels are
skipped, with the reason, on stores without ground truth. The world is reached only through the
ground-truth interface (`difflens.groundtruth`): its concept vocabulary labels tokens and names
the absorption hierarchy; causal editing reads images with its classifier.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from difflens.benchmark.absorption import absorption
from difflens.benchmark.probing import probe, sparse_probe
from difflens.benchmark.spatial import SpatialAccumulator
from difflens.errors import DifflensError
from difflens.utils import progress, write_json

if TYPE_CHECKING:
    from difflens.models.base import Adapter

KS = (1, 4, 16)


class _Raw:
    """The raw activations as a 'source' (probing reference only)."""

    def __init__(self, site: str, d: int):
        self.name, self.site, self.num_features, self.kind = "raw", site, d, "raw"

    def __call__(self, x_ND, t_N=None):
        return x_ND.float()


def _items(dicts, store):
    from difflens.evaluate.reconstruction import load_items

    if isinstance(dicts, Mapping):
        items = load_items([str(p) for p in dicts.values()], store)
        for it, name in zip(items, dicts):
            it.name = str(name)
        return items
    return load_items([str(p) for p in dicts], store)


def _vocabulary(store, notes: list[str]):
    """The `ConceptVocabulary` of the world of the model the store was harvested from (through the
    ground-truth interface, `models.ground_truth_for`), or None for a model without one."""
    from difflens.models import ground_truth_for

    model = store.manifest.get("model")
    try:
        truth = ground_truth_for(model)
    except DifflensError as e:
        notes.append(f"cannot tell whether the store's model {model!r} has ground truth ({e}): no labelled metrics")
        return None
    return None if truth is None else truth.vocabulary()


def _pick_rows(n_split_imgs: int, S: int, T: int, want: int, rng) -> float:
    total = n_split_imgs * S * T
    return 1.0 if total <= want else want / total


def token_pass(fs, src, sids, split, labels_nTC, *, probe_rows: int, seed: int, spatial: bool, rows_per_batch: int = 8192):
    """Codes of a probe-row subsample (both splits) and, if `spatial`, a SpatialAccumulator."""
    S, T = len(src.steps), src.num_tokens
    rng = np.random.default_rng([seed, 11])
    frac = [_pick_rows(int((split == k).sum()), S, T, probe_rows, rng) for k in (0, 1)]
    ts = torch.tensor(src.timesteps, dtype=torch.float32)
    pos = {int(s): i for i, s in enumerate(sids)}
    C = 0 if labels_nTC is None else labels_nTC.shape[-1]
    acc = SpatialAccumulator(fs.num_features, src.grid_hw, C) if spatial else None
    rows_x, rows_y, rows_split, rows_step = [], [], [], []
    bar = progress(total=len(sids), desc=f"benchmark {fs.name}", unit="img")
    for b_sids, acts in src.iter_acts(fs.site, sids, rows_per_batch):
        b = acts.shape[0]
        x = acts.reshape(-1, acts.shape[-1])
        codes = fs(x, ts.repeat_interleave(T).repeat(b)).float().numpy().reshape(b, S, T, -1)
        idx = [pos[int(s)] for s in b_sids]
        for i, j in enumerate(idx):
            keep = rng.random((S, T)) < frac[int(split[j])]
            rows_x.append(codes[i][keep])
            rows_step.append(np.nonzero(keep)[0])
            rows_split.append(np.full(int(keep.sum()), split[j], np.int8))
            if labels_nTC is not None:
                rows_y.append(np.broadcast_to(labels_nTC[j][None], (S, T, C))[keep])
        if acc is not None:
            maps = codes.reshape(b * S, T, -1)
            cm = None if labels_nTC is None else np.repeat(labels_nTC[idx], S, axis=0)
            acc.add(maps, maps > 0, cm)
        bar.update(b)
    bar.close()
    return {"x": np.concatenate(rows_x), "y": np.concatenate(rows_y) if rows_y else None,
            "split": np.concatenate(rows_split), "step": np.concatenate(rows_step), "spatial": acc}


def probing_table(rows, concepts: list[int], names, *, ks=KS, min_pos: int = 20, all_dims: bool = False) -> dict:
    """Per concept, the sparse probe at each k (or one probe on all dimensions for the raw activations)."""
    tr, te = rows["split"] == 0, rows["split"] == 1
    out = {}
    for c in concepts:
        y = rows["y"][:, c]
        if y[tr].sum() < min_pos or y[te].sum() < min_pos or (~y[tr]).sum() < min_pos:
            continue
        if all_dims:
            out[names[c]] = {"all": probe(rows["x"][tr], y[tr], rows["x"][te], y[te])}
        else:
            out[names[c]] = {str(k): v for k, v in sparse_probe(rows["x"][tr], rows["x"][te], y[tr], y[te], ks).items()}
    return out


def _mean_over(per_concept: dict, key: str, metric: str):
    v = [r[key][metric] for r in per_concept.values() if key in r]
    return round(float(np.mean(v)), 4) if v else None


def run_benchmark(dicts, data, out_dir, *, neuron_site: str | None = None, max_images: int = 64, probe_rows: int = 8192,
                  ks=KS, recon_tokens: int | None = 50_000, autointerp: str = "oracle", interp_run=None,
                  n_features: int = 48, min_match: float = 0.2, seed: int = 0, concepts=None,
                  causal_cases: int = 0, causal_factors=None, causal_modes=None, causal_features: int = 3, causal_scale: float = 1.0,
                  adapter: Adapter | None = None, model: str | None = None, model_kwargs=None,
                  steps: int | None = None, classifier=None,
                  show_progress: bool = True) -> dict:
    """Benchmark dictionaries (paths, or name -> path) on a store; writes benchmark.json/.md and plots.

    concepts: the concept names to probe (default: every concept of the world with >= 20 tokens per split).
    causal_cases: prompt/seed cases of the causal-editing metric (0 skips it; it generates images with
    `adapter`, or the store's model / `model` loaded with `model_kwargs`, and reads them with the
    world's classifier or `classifier`); causal_factors / causal_modes default to all (causal.py)."""
    from difflens.store import Store

    t0 = time.time()
    if autointerp not in ("oracle", "none"):
        raise DifflensError(f"--autointerp must be 'oracle' or 'none', got {autointerp!r}")
    store = data if isinstance(data, Store) else Store(data)
    notes: list[str] = []
    vocab = _vocabulary(store, notes)  # the concepts of the store's model's world (None: a real model)
    world = _concept_indices(vocab, concepts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = _items(dicts, store)
    if not items:
        raise DifflensError("benchmark needs at least one dictionary (--dict DIR)")
    sites = sorted({it.site for it in items})
    if len(sites) > 1:
        raise DifflensError(f"dictionaries at several sites {sites}: benchmark one site at a time")
    site = sites[0]
    timings: dict[str, float] = {}

    t = time.time()
    recon, rows = _reconstruction(items, store, recon_tokens, show_progress)
    timings["reconstruction"] = round(time.time() - t, 1)
    from difflens.interpret.features import neuron_site_for

    neuron_site = neuron_site or neuron_site_for(site, store.sites)
    has_neurons = neuron_site in store.sites
    baselines: dict[str, dict] = {}
    tokens = _token_metrics(items, store, site, neuron_site if has_neurons else None, vocab, world, rows, baselines,
                            notes, timings, max_images=max_images, probe_rows=probe_rows, ks=ks, min_match=min_match,
                            seed=seed)
    if tokens.labels is not None and autointerp == "oracle":
        t = time.time()
        _autointerp(items, store, out, neuron_site if has_neurons else None, rows, baselines, notes,
                    interp_run=interp_run, n_features=n_features, seed=seed)
        timings["autointerp"] = round(time.time() - t, 1)

    causal = None  # causal editing generates images: it needs the model and a world's classifier
    if causal_cases and causal_cases > 0:
        from difflens.benchmark.causal import FACTORS, MODES, benchmark_causal

        t = time.time()
        causal = benchmark_causal({it.name: it.module for it in items}, store, adapter=adapter, model=model,
                                  model_kwargs=model_kwargs, n_cases=causal_cases, factors=causal_factors or FACTORS,
                                  modes=causal_modes or MODES, n_features=causal_features, scale=causal_scale, steps=steps,
                                  classifier=classifier, seed=seed, show_progress=show_progress)
        if "skipped" in causal:
            notes.append(f"causal editing skipped: {causal['skipped']}")
        for name, d in causal.get("dictionaries", {}).items():
            rows[name]["causal"] = d["summary"]
        timings["causal"] = round(time.time() - t, 1)
    else:
        notes.append("causal editing not run (--causal-cases 0)")

    result = {"site": site, "neuron_site": neuron_site if has_neurons else None, "store": str(store.root),
              "store_fingerprint": store.fingerprint(), "images": tokens.images,
              "probe_rows_per_split": probe_rows, "ks": list(ks), "min_match": min_match, "seed": seed,
              "labels": tokens.labels is not None, "dictionaries": list(rows.values()), "baselines": list(baselines.values()),
              "notes": notes, "seconds": timings, "causal": causal}
    result["seconds"]["total"] = round(time.time() - t0, 1)
    _write(result, recon, causal, out)
    return result


def _concept_indices(vocab, concepts) -> list[int]:
    """Indices of the concepts to probe in the world's vocabulary (all when `concepts` is None)."""
    names = tuple(vocab.names) if vocab is not None else ()
    if concepts is None:
        return list(range(len(names)))
    unknown = [c for c in concepts if c not in names]
    if unknown:
        raise DifflensError(f"unknown concept(s) {unknown}: " + (f"use names like {', '.join(names[:3])}" if names else
                            "the store's model has no ground-truth concepts, so drop --concepts"))
    return [names.index(c) for c in concepts]


def _reconstruction(items, store, recon_tokens, show_progress) -> tuple[dict, dict[str, dict]]:
    """evaluate's reconstruction metrics (its definitions and held-out split) and a row per dictionary."""
    from difflens.evaluate.reconstruction import evaluate

    recon = evaluate(items, store, max_tokens=recon_tokens, show_progress=show_progress)
    rows = {it.name: {"name": it.name, "arch": str(getattr(it.module.cfg, "arch", "?")),
                      "width": int(it.module.num_latents), "k": getattr(it.module.cfg, "k", None)} for it in items}
    for d in recon["dictionaries"]:
        m = d["metrics"]
        rows[d["name"]].update(fvu=m.get("fvu"), cosine=m.get("cosine"), l0=m.get("l0"), dead_fraction=m.get("dead_fraction"),
                               fvu_by_timestep=[{"timestep": r.get("timestep"), "fvu": r.get("fvu")} for r in m.get("by_timestep", [])])
    return recon, rows


@dataclass
class TokenMetrics:
    """What the token pass leaves for the later stages: the label matrix (None without ground
    truth) and how many images it read."""

    labels: np.ndarray | None
    images: int


def _token_metrics(items, store, site, neuron_site, vocab, world, rows, baselines, notes, timings, *, max_images,
                   probe_rows, ks, min_match, seed) -> TokenMetrics:
    """Probing, Moran's I, localisation and absorption over whole images, for every dictionary and
    the neuron / raw-activation baselines; fills `rows` and `baselines` in place."""
    from difflens.interpret.features import DictionaryFeatures, NeuronFeatures
    from difflens.interpret.sources import StoreSource, split_of

    try:
        src = StoreSource(store, sites=[site] + ([neuron_site] if neuron_site else []))
    except DifflensError as e:
        notes.append(f"token-map metrics skipped (probing, absorption, Moran's I, localisation): {e}")
        return TokenMetrics(None, 0)
    all_ids = src.sample_ids()
    rng = np.random.default_rng(seed)
    sids = np.sort(rng.choice(all_ids, size=min(max_images, len(all_ids)), replace=False))
    split = split_of(src.prompt_ids(sids), seed, 0.5)
    lab = src.token_labels(sids)
    labels = None if lab is None or vocab is None else vocab.matrix(lab)  # [n, T, C]
    if labels is None:
        notes.append("no ground-truth labels: probing, absorption, localisation and autointerp skipped "
                     "(reconstruction and Moran's I still run)")
    sources = [(it.name, DictionaryFeatures(it.module, name=it.name, site=site), True) for it in items]
    if neuron_site:
        sources.append(("neurons", NeuronFeatures(neuron_site, src.d(neuron_site)), True))
    else:
        notes.append(f"no MLP neuron site for {site} in the store: the neuron baseline is skipped")
    if labels is not None:
        sources.append(("raw", _Raw(site, src.d(site)), False))
    names = tuple(vocab.names) if vocab is not None else ()
    for name, fs, spatial in sources:
        t = time.time()
        r = token_pass(fs, src, sids, split, labels, probe_rows=probe_rows, seed=seed, spatial=spatial)
        row = rows.get(name) or baselines.setdefault(name, {"name": name, "arch": fs.kind, "width": fs.num_features})
        if spatial:
            moran = r["spatial"].moran()
            fin = moran[np.isfinite(moran)]
            row["moran_i"] = round(float(fin.mean()), 4) if len(fin) else None
            row["moran_i_median"] = round(float(np.median(fin)), 4) if len(fin) else None
            row["moran_features"] = int(len(fin))
        if labels is not None:
            _concept_metrics(row, r, name, world, names, vocab, ks=ks, min_match=min_match, spatial=spatial)
        timings[name] = round(time.time() - t, 1)
        del r
    return TokenMetrics(labels, int(len(sids)))


def _concept_metrics(row: dict, r: dict, name: str, world, names, vocab, *, ks, min_match: float, spatial: bool) -> None:
    """A source's ground-truth metrics: sparse probing (all dimensions for the raw baseline), and
    for feature sources each feature's best-matching concept's localisation and absorption."""
    from difflens.interpret.oracle import mcc

    y = r["y"]
    if name == "raw":
        pt = probing_table(r, world, names, all_dims=True)
        row["probe"] = {"all": {"f1": _mean_over(pt, "all", "f1"), "auc": _mean_over(pt, "all", "auc")}}
    else:
        pt = probing_table(r, world, names, ks=ks)
        row["probe"] = {str(k): {"f1": _mean_over(pt, str(k), "f1"), "auc": _mean_over(pt, str(k), "auc")} for k in ks}
    row["probe_concepts"] = pt
    if not spatial:
        return
    act = r["x"] > 0
    m = mcc(y.T.astype(np.float64) @ act.astype(np.float64), act.sum(0)[None, :].astype(np.float64),
            y.sum(0)[:, None].astype(np.float64), float(len(y)))  # [C, F]
    best_c, best_m = m.argmax(0), m.max(0)
    loc = r["spatial"].localisation(best_c)
    good = (best_m >= min_match) & np.isfinite(loc)
    row["matched_features"] = int(good.sum())
    row["localisation"] = round(float(loc[good].mean()), 4) if good.any() else None
    ab = absorption(act, y, vocab)
    row["absorption"] = ab
    vals = [v["mean_absorption"] for v in ab.values() if v.get("mean_absorption") is not None]
    row["mean_absorption"] = round(float(np.mean(vals)), 4) if vals else None


def _autointerp(items, store, out: Path, neuron_site, rows, baselines, notes, *, interp_run, n_features: int,
                seed: int) -> None:
    """The oracle autointerp columns: read from an earlier `difflens interpret` run, or run it."""
    if interp_run is not None:
        import json

        p = Path(interp_run) / "comparison.json"
        if not p.exists():
            raise DifflensError(f"--interp-run {interp_run} holds no comparison.json: run `difflens interpret` there first")
        table = json.loads(p.read_text(encoding="utf-8"))["rows"]
        notes.append(f"autointerp read from {p}")
    else:
        from difflens.interpret import run_oracle_pipeline

        table = run_oracle_pipeline({it.name: it.module for it in items}, store, out / "autointerp",
                                    neuron_site=neuron_site, baselines=("neurons", "random") if neuron_site else ("random",),
                                    n_features=n_features, seed=seed, grids=False)["table"]
    for r in table:
        row = rows.get(r["name"]) or baselines.setdefault(r["name"], {"name": r["name"], "arch": r.get("kind")})
        row["autointerp"] = {k: r.get(k) for k in ("mean", "ci95", "share_above_0.8", "coverage", "raw_mean", "chance_mean")}


def _write(result: dict, recon: dict, causal, out: Path) -> None:
    """benchmark.json / .md, reconstruction.json and the plots."""
    write_json(out / "benchmark.json", result)
    write_json(out / "reconstruction.json", recon)
    (out / "benchmark.md").write_text(markdown(result), encoding="utf-8")
    plots(result, recon, out)
    if causal and "skipped" not in causal:
        from difflens.benchmark.causal import plot_causal

        plot_causal(causal, out / "causal.png")


def _f(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(res: dict) -> str:
    ks = res["ks"]
    head = (["source", "arch", "width", "FVU", "L0", "dead %"] + [f"probe F1@{k}" for k in ks] + [f"AUC@{k}" for k in ks]
            + ["absorption", "Moran's I", "loc. IoU", "autointerp (95% CI)", ">0.8", "edit success", "side eff.",
               "specificity", "random ctrl"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["dictionaries"] + res["baselines"]:
        pr = r.get("probe") or {}
        if "all" in pr:
            f1s = [_f(pr["all"]["f1"])] + ["(all d)"] * (len(ks) - 1)
            aucs = [_f(pr["all"]["auc"])] + ["(all d)"] * (len(ks) - 1)
        else:
            f1s = [_f((pr.get(str(k)) or {}).get("f1")) for k in ks]
            aucs = [_f((pr.get(str(k)) or {}).get("auc")) for k in ks]
        ai = r.get("autointerp") or {}
        ci = ai.get("ci95")
        ai_s = "–" if ai.get("mean") is None else f"{ai['mean']:.3f}" + (f" ({ci[0]:.2f}..{ci[1]:.2f})" if ci and None not in ci else "")
        dead = r.get("dead_fraction")
        ce = (r.get("causal") or {}).get("edit") or (r.get("causal") or {}).get("ablation") or {}
        lines.append("| " + " | ".join([r["name"], str(r.get("arch", "")), _f(r.get("width")), _f(r.get("fvu"), 4), _f(r.get("l0"), 1),
                                         "–" if dead is None else f"{100 * dead:.1f}"] + f1s + aucs
                                        + [_f(r.get("mean_absorption")), _f(r.get("moran_i")), _f(r.get("localisation")), ai_s,
                                           _f(ai.get("share_above_0.8"), 2), _f(ce.get("success"), 2),
                                           _f(ce.get("side_effects"), 2), _f(ce.get("specificity"), 2),
                                           _f(ce.get("control_success"), 2)]) + " |")
    md = [f"# Benchmark at `{res['site']}`", "",
          f"Store `{res['store']}` ({res['store_fingerprint']}); {res['images']} images for the token metrics; "
          f"probes on {res['probe_rows_per_split']} token rows per split (split by prompt).", "", *lines, ""]
    md += ["Columns: FVU / L0 / dead from `evaluate` (held-out rows); probe F1/AUC = mean over concepts of a logistic "
           "probe on the best k latents (raw: all dimensions); absorption = mean over digit/shape/colour parents of the "
           "share of a child's tokens where the parent latent is silent and a child latent fires; Moran's I = mean over "
           "features of the spatial autocorrelation of their maps (rook adjacency, maps with >= 2 active tokens); "
           "loc. IoU = mean IoU of active tokens with the best-matching concept (features with token MCC >= "
           f"{res['min_match']}); autointerp = the oracle's chance-corrected score (0.5 = chance); edit success / "
           "side eff. / specificity / random ctrl = causal editing, mean over factors (edit mode; ablation if edits "
           "were not run), below.", ""]
    from difflens.benchmark.causal import markdown_causal

    md += markdown_causal(res.get("causal"))
    if res["notes"]:
        md += ["Notes:", ""] + [f"- {n}" for n in res["notes"]] + [""]
    md += ["Seconds: " + ", ".join(f"{k} {v}" for k, v in res["seconds"].items()), ""]
    return "\n".join(md)


def plots(res: dict, recon: dict, out: Path) -> None:
    from difflens.evaluate.report import plot_timestep

    plot_timestep(recon, out / "fvu_by_timestep.png")
    srcs = [r for r in res["dictionaries"] + res["baselines"] if r.get("probe")]
    if not srcs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflens.viz import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in srcs:
        for ax, metric in zip(axes, ("f1", "auc")):
            if "all" in r["probe"]:
                ax.axhline(r["probe"]["all"][metric], color="k", ls=":", lw=1, label=f"{r['name']} (all d)")
            else:
                ks = [int(k) for k in r["probe"]]
                ax.plot(ks, [r["probe"][str(k)][metric] for k in ks], marker="o", label=r["name"])
    for ax, metric in zip(axes, ("probe F1", "probe AUC")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("latents in the probe (k)")
        ax.set_ylabel(metric + " (mean over concepts)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "probing.png")
