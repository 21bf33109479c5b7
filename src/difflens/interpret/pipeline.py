"""The whole autointerp run over dictionaries and baselines at one site: cache -> heatmaps -> explain/judge -> report.

`run_pipeline` is what `difflens interpret` and the demo call; `run_oracle_pipeline` is the
offline toy-world version (ground-truth explainer and judge, no network).

Output folder:
    <out>/<source>/cache/            the feature cache (cache.json + cache.safetensors)
    <out>/<source>/heatmaps/         feature_<id>.png per scored feature
    <out>/<source>/features/         per-feature JSON for the browser (+ index.json)
    <out>/<source>/scores.json       per-feature explanations, judgements, scores; summary
    <out>/<source>/score_hist.png
    <out>/comparison.md / .json      the one table comparing all sources
    <out>/score_hist.png, hierarchy.png, hierarchy.json, report.md, run.json
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflens.errors import DifflensError
from difflens.interpret.cache import CacheConfig
from difflens.interpret.cache_build import build_cache
from difflens.interpret.features import (
    FeatureSource,
    NeuronFeatures,
    RandomDirections,
    as_feature_source,
    neuron_site_for,
    sample_live_features,
)
from difflens.interpret.judges import get_backend, make_backends
from difflens.interpret.report import (
    export_features,
    hierarchy,
    markdown_table,
    paper_checks,
    plot_hierarchy,
    plot_scores,
    summarize,
)
from difflens.interpret.scoring import Truth, build_tasks, score_features
from difflens.interpret.sources import SampleSource, StoreSource
from difflens.utils import read_json, write_json

BASELINES = ("neurons", "random")


class SampleImages:
    """Images by sample id, loaded once (explainer, judge and grids all reuse them)."""

    def __init__(self, source: SampleSource):
        self.source = source
        self._c: dict[int, np.ndarray] = {}

    def __call__(self, sid: int) -> np.ndarray:
        sid = int(sid)
        if sid not in self._c:
            self._c[sid] = self.source.image(sid)
        return self._c[sid]


def _reusable_cache(folder: Path, fs: FeatureSource, src: SampleSource, cfg: CacheConfig, sids):
    """The saved cache in `folder` if it was built from exactly these inputs, else None."""
    import json
    from dataclasses import asdict

    from difflens.interpret.cache import CACHE_VERSION, FeatureCache

    try:
        info = json.loads((folder / "cache.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = (info.get("version") == CACHE_VERSION and info.get("source") == json.loads(json.dumps(fs.describe()))
            and info.get("data") == json.loads(json.dumps(src.description)) and info.get("config") == asdict(cfg)
            and src.description.get("kind") == "store")  # generated samples differ run to run
    if not same:
        return None
    cache = FeatureCache.load(folder)
    return cache if np.array_equal(cache.sample_ids, np.sort(np.asarray(sids, np.int64))) else None


def _named_sources(dicts) -> list[FeatureSource]:
    items = dicts.items() if isinstance(dicts, Mapping) else [(None, d) for d in (dicts or [])]
    out, seen = [], set()
    for name, obj in items:
        fs = as_feature_source(obj, name)
        base, i = fs.name, 2
        while fs.name in seen or fs.name in BASELINES:
            fs.name = f"{base}-{i}"
            i += 1
        seen.add(fs.name)
        out.append(fs)
    return out


def run_pipeline(
    dicts,
    data,
    out_dir,
    *,
    judge: str = "oracle",
    explainer: str | None = None,
    baselines=BASELINES,
    neuron_site: str | None = None,
    site: str | None = None,
    n_features: int = 64,
    max_map_features: int = 4096,
    cache_config: CacheConfig | None = None,
    n_explain: int = 5,
    n_pos: int = 5,
    n_neg: int = 5,
    seed: int = 0,
    client_config=None,
    explainer_prompt=None,
    judge_prompt=None,
    vlm_cache=None,
    grids: bool = True,
    adherent_only: bool = False,
    evidence: str = "split",
    random_width: int | None = None,
    reuse_caches: bool = True,
    negative_overlay: str = "feature",
    chance_controls: int | str | None = None,
    branch: str = "cond",
    use_topk: bool = True,
) -> dict:
    """Score dictionaries (name -> Dictionary | checkpoint path) and baselines on the same images.

    n_features live features per source are sampled with `seed` and scored (the paper scores a
    random sample, not the best). Returns the report dict; its "table" holds one row per source.
    A cache already in <out>/<source>/cache built from the same features, data, samples and
    cache config is reused (re-judging with another backend costs no recomputation).
    chance_controls: the permutation baseline that measures each feature's chance level
    (scoring.py): None = the judge backend's `chance_controls` (every (map, image) pair of the test
    set for the oracle, one other image per test item for a VLM: 10 extra judgements per feature); "all", an int, or "none"
    (raw scores, for comparison only). branch: the CFG rows read from a store harvested with both.
    use_topk: calibrate a dictionary's thresholds from the store's streamed top-k cache of it, when
    one matches (`interpret.topk_use`), instead of a pass over the store; the result is the same.
    """
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inp = _inputs(dicts, data, site=site, baselines=baselines, neuron_site=neuron_site, branch=branch,
                  n_features=n_features, random_width=random_width, seed=seed, adherent_only=adherent_only)
    ex, ju, client = make_backends(judge, explainer, truth=inp.truth, image_of=inp.image_of, client_config=client_config,
                                   out_dir=out, explainer_prompt=explainer_prompt, judge_prompt=judge_prompt,
                                   vlm_cache=vlm_cache, evidence=evidence)
    cfg = cache_config or CacheConfig()
    chance = _chance_setting(chance_controls, judge)
    protocol = dict(n_features=n_features, max_map_features=max_map_features, n_explain=n_explain, n_pos=n_pos,
                    n_neg=n_neg, seed=seed, negative_overlay=negative_overlay, chance=chance, grids=grids,
                    reuse_caches=reuse_caches, use_topk=use_topk)
    scored = [_score_source(fs, inp, out / fs.name, cfg, ex, ju, **protocol) for fs in inp.sources]

    run = {
        "created": time.time(),
        "seconds": None,
        "site": inp.site,
        "neuron_site": inp.neuron_site if "neurons" in inp.baselines else None,
        "data": inp.src.description,
        "num_samples": int(len(inp.sids)),
        "judge": judge,
        "explainer": explainer or judge,
        "evidence": evidence if get_backend(explainer or judge, "explainer").uses_evidence else None,
        "n_features": n_features,
        "protocol": {"n_explain": n_explain, "n_pos": n_pos, "n_neg": n_neg, "seed": seed,
                     "negative_overlay": negative_overlay, "chance_controls": chance},
        "cache_config": cfg.__dict__,
        "table": [r.row for r in scored],
        "scores": {r.name: r.scores for r in scored},
        "scores_all": {r.name: r.scores_all for r in scored},
        "kinds": {r.name: r.kind for r in scored},
        "hierarchy": {r.name: r.hierarchy for r in scored},
        "notes": inp.notes,
        "vlm": None if client is None else {"config": client.config.public(), "tally": dict(client.tally)},
        "sources": {r.name: r.summary for r in scored},
    }
    if inp.src.description.get("kind") == "generated":  # images and prompts for the browser (no store holds them)
        from difflens.interpret.sample_folder import save_samples

        save_samples(inp.src, out / "samples")
    run["seconds"] = round(time.time() - t0, 1)
    write_json(out / "run.json", run)
    return render_report(out)


@dataclass
class PipelineInputs:
    """What every source is scored on: the samples, the feature sources (dictionaries, then the
    baselines), the ground truth if the data has one, and the notes the report repeats."""

    src: SampleSource
    sources: list[FeatureSource]
    site: str
    neuron_site: str | None
    baselines: list[str]
    sids: np.ndarray
    truth: Truth | None
    image_of: SampleImages
    notes: list[str]


def _inputs(dicts, data, *, site, baselines, neuron_site, branch, n_features, random_width, seed,
            adherent_only) -> PipelineInputs:
    """Resolve the dictionaries, the data and the baselines into the run's inputs; refuse what
    cannot be scored (no site, unknown baseline, a neuron site the data lacks) with the fix."""
    sources = _named_sources(dicts)
    site = site or (sources[0].site if sources else None)
    if site is None:
        raise DifflensError("no site to interpret: pass --dict DIR (its site is used) or --site")
    baselines = [b for b in (baselines or ()) if b]
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise DifflensError(f"unknown baseline(s) {bad}: use {', '.join(BASELINES)}")
    if isinstance(data, SampleSource):
        src, store = data, None
        avail = src.sites
    else:
        from difflens.store import Store

        store = data if isinstance(data, Store) else Store(data)
        avail = [s for s in store.sites if s.endswith(":img")]
        src = None
    notes = []
    if "neurons" in baselines:
        given = neuron_site
        neuron_site = neuron_site or neuron_site_for(site, avail)
        if neuron_site is None or neuron_site not in avail:
            if given:
                raise DifflensError(f"neuron site {given} is not in the data (sites: {avail}): harvest it alongside {site}")
            notes.append(f"neurons baseline skipped: the data has no MLP site for {site} (harvest e.g. "
                         f"{site.split(':')[0]}.ff.net.0:img alongside it)")
            baselines.remove("neurons")
    other_sites = sorted({fs.site for fs in sources} - {site})
    if other_sites:
        notes.append(f"dictionaries at other sites than {site}: {other_sites} (compare rows by site)")
    if src is None:
        need = [site] + other_sites + ([neuron_site] if "neurons" in baselines else [])
        src = StoreSource(store, sites=need, branch=branch)
    if "neurons" in baselines:
        sources.append(NeuronFeatures(neuron_site, src.d(neuron_site)))
    if "random" in baselines:
        d = src.d(site)
        sources.append(RandomDirections(site, d, random_width or max(n_features, d), seed=seed, center=src.site_mean(site)))
    if not sources:
        raise DifflensError("nothing to interpret: pass --dict and/or baselines")
    sids = src.sample_ids()
    if adherent_only:
        keep = [s for s in sids if src.record(int(s)).get("adherent", True)]
        notes.append(f"adherent-only: {len(keep)} of {len(sids)} samples")
        sids = np.array(keep, np.int64)
    truth = Truth(src) if src.token_labels(sids[:1]) is not None else None
    return PipelineInputs(src, sources, site, neuron_site, baselines, sids, truth, SampleImages(src), notes)


def _chance_setting(chance_controls, judge: str):
    """The permutation baseline's size: None (off), "all" or a count; None asks the judge backend."""
    if chance_controls is None:
        chance_controls = get_backend(judge).chance_controls
    chance = None if chance_controls in ("none", 0) else chance_controls
    if chance not in (None, "all") and (not str(chance).isdigit() or int(chance) < 1):
        raise DifflensError(f"chance_controls must be 'all', 'none' or a positive integer, got {chance_controls!r}")
    return chance if chance in (None, "all") else int(chance)


@dataclass
class SourceScores:
    """One source's outcome: its comparison-table row, scores and hierarchy, and where it was written."""

    name: str
    kind: str
    row: dict
    scores: list
    scores_all: list
    hierarchy: dict
    summary: dict


def _source_cache(fs: FeatureSource, inp: PipelineInputs, folder: Path, cfg: CacheConfig, *, n_features: int,
                  max_map_features: int, n_neg: int, seed: int, reuse_caches: bool, use_topk: bool):
    """The source's feature cache (reused when built from the same inputs) and the features to score."""
    chosen: dict = {}

    def pick(arrays):
        sel = sample_live_features(arrays["frequency"], n_features, seed)
        chosen["selected"] = sel
        live = np.flatnonzero(arrays["frequency"] > 0)
        if fs.kind in ("neurons", "random") or len(live) > max_map_features:
            # a few more than the scored ones, so every feature can find n_neg negatives
            extra = sample_live_features(arrays["frequency"], max(len(sel), 3 * (n_neg + 1)), seed + 1)
            return np.union1d(sel, extra)
        return live

    cache = _reusable_cache(folder / "cache", fs, inp.src, cfg, inp.sids) if reuse_caches else None
    if cache is not None and set(pick(cache.arrays).tolist()) <= set(cache.map_features.tolist()):
        inp.notes.append(f"{fs.name}: reused the feature cache in {folder / 'cache'}")
    else:
        calibration = None
        if use_topk:
            from difflens.interpret.topk_use import streamed_max

            calibration, note = streamed_max(fs, inp.src, inp.sids, cfg)
            if note:
                inp.notes.append(note)
        cache = build_cache(fs, inp.src, config=cfg, map_features=pick, sample_ids=inp.sids, out=folder / "cache",
                            seed=seed, calibration=calibration)
    return cache, chosen["selected"]


def _score_source(fs: FeatureSource, inp: PipelineInputs, folder: Path, cfg: CacheConfig, ex, ju, *, n_features: int,
                  max_map_features: int, n_explain: int, n_pos: int, n_neg: int, seed: int, negative_overlay: str,
                  chance, grids: bool, reuse_caches: bool, use_topk: bool) -> SourceScores:
    """Cache, explain and judge one source's sampled features; write its scores, plots, heatmaps
    and browser pages into `folder`."""
    cache, selected = _source_cache(fs, inp, folder, cfg, n_features=n_features, max_map_features=max_map_features,
                                    n_neg=n_neg, seed=seed, reuse_caches=reuse_caches, use_topk=use_topk)
    tasks, skipped = build_tasks(cache, selected, n_explain=n_explain, n_pos=n_pos, n_neg=n_neg, seed=seed,
                                 feature_fn=fs, source=inp.src, negative_overlay=negative_overlay,
                                 rows_per_batch=cfg.rows_per_batch)
    results = score_features(cache, tasks, ex, ju, truth=inp.truth, chance=chance, seed=seed)
    row = summarize(fs.name, cache, results, selected, skipped, seed=seed)
    scores = [r["score"] for r in results if r["score"] is not None]
    hier = hierarchy(cache, inp.truth.vocab if inp.truth is not None else None)
    write_json(folder / "scores.json", {"summary": row, "source": fs.describe(), "selected": [int(x) for x in selected],
                                        "skipped": {str(k): v for k, v in skipped.items()}, "results": results})
    plot_scores({fs.name: scores}, folder / "score_hist.png", title=f"{fs.name} scores")
    if grids:
        from difflens.interpret.heatmap import write_feature_grids

        titles = {r["feature"]: f"{fs.name} #{r['feature']}: {r['explanation'] or '(no explanation)'}"
                  + (f" [{r['score']:.2f}]" if r["score"] is not None else "") for r in results}
        write_feature_grids(cache, [r["feature"] for r in results], inp.image_of, folder / "heatmaps", titles=titles)
    prov = getattr(getattr(fs, "dictionary", None), "provenance", None)
    prov = {k: v.detach().cpu().numpy() for k, v in prov.items()} if isinstance(prov, dict) else None
    export_features(cache, results, folder / "features", provenance=prov)
    return SourceScores(fs.name, fs.kind, row, scores, scores + [0.5] * (len(selected) - len(scores)), hier,
                        {"folder": str(folder), "skipped": len(skipped)})


def run_oracle_pipeline(dicts, store_path, out_dir, *, baselines=BASELINES, neuron_site=None, n_features: int = 64, **kw) -> dict:
    """The offline toy-world pipeline: ground-truth explainer and judge; returns the report dict."""
    return run_pipeline(dicts, store_path, out_dir, judge="oracle", baselines=baselines, neuron_site=neuron_site,
                        n_features=n_features, **kw)


def _chance_text(chance) -> str:
    if chance is None:
        return "No chance correction (raw scores): 0.5 is NOT chance for sparse features."
    if chance == "unset":
        return "Run before the chance correction: raw scores, whose chance level is not 0.5 for sparse features."
    how = "every (map, image) pair of the test set" if chance == "all" else f"{chance} other test image(s) per shown map"
    return (f"Chance per feature = the raw score of the same explanation with each shown map laid over other test "
            f"images ({how}); score = 0.5 + 0.5 (raw - chance) / (1 - chance), so 0.5 = chance, 1 = perfect. "
            "Mean with a 95% bootstrap CI.")


def render_report(out_dir) -> dict:
    """(Re)write comparison.md/.json, report.md and the plots from <out>/run.json."""
    out = Path(out_dir)
    if not (out / "run.json").exists():
        raise DifflensError(f"{out} holds no interpret run (run.json): run `difflens interpret` first")
    run = read_json(out / "run.json")
    rows, scores, kinds = run["table"], run["scores"], run["kinds"]
    checks = paper_checks(scores, kinds, seed=run["protocol"]["seed"])
    checks_all = paper_checks(run.get("scores_all") or scores, kinds, seed=run["protocol"]["seed"])
    table_md = markdown_table(rows)
    write_json(out / "comparison.json", {"site": run["site"], "judge": run["judge"], "rows": rows, "checks": checks,
                                         "checks_unscored_at_chance": checks_all})
    (out / "comparison.md").write_text(table_md + "\n", encoding="utf-8")
    plot_scores(scores, out / "score_hist.png")
    hier = {k: v for k, v in run["hierarchy"].items() if v}
    write_json(out / "hierarchy.json", hier)
    plot_hierarchy(hier, out / "hierarchy.png")
    md = [f"# Autointerp report ({run['explainer']} explainer, {run['judge']} judge)", "",
          f"Site `{run['site']}`" + (f", neurons `{run['neuron_site']}`" if run.get("neuron_site") else "")
          + f"; {run['num_samples']} images from {run['data'].get('path') or run['data'].get('kind')}; "
          f"{run['n_features']} live features sampled per source (seed {run['protocol']['seed']}). "
          f"Raw score = mean(mean s on {run['protocol']['n_pos']} held-out top images, mean (1 - s) on "
          f"{run['protocol']['n_neg']} top images of other features). " + _chance_text(run["protocol"].get("chance_controls", "unset")), "",
          table_md, "", "![scores](score_hist.png)", "", "## Checks against the papers", ""]
    for key, label in (("sae_vs_neurons", "SAE vs MLP neurons"), ("itda_vs_sae", "ITDA vs SAE")):
        for which, ch in (("scored features", checks), ("all sampled features, unscored = 0.5", checks_all)):
            c = ch.get(key)
            if c:
                md.append(f"- **{label}** ({which}): {c['verdict']} — mean {c['mean_a']} vs {c['mean_b']}, difference "
                          f"{c['diff']} (95% CI {c['ci95'][0]}..{c['ci95'][1]}), Mann-Whitney p = {c['mann_whitney_p']} "
                          f"(n = {c['n_a']}, {c['n_b']})")
            else:
                md.append(f"- **{label}** ({which}): not enough scored features (or the source is missing) to compare")
    for n, c in (checks.get("vs_random") or {}).items():
        if c:
            md.append(f"- {n} vs random directions: difference {c['diff']} (95% CI {c['ci95'][0]}..{c['ci95'][1]})")
    md += ["", "## Timestep hierarchy", "",
           "Per concept type, its best-matching features (top 5 by token MCC with a concept of the type, >= 0.2): "
           "the median timestep at which their mean activation peaks, the median timestep at which they match "
           "their concept best, and the step at which any one feature matches the type best. Timesteps count "
           "down from 1000 (pure noise). Coarse-to-fine would mean position/background (coarse) peaking at higher "
           "timesteps than digit identity (and colour/shape: fine).", ""]
    for name, h in hier.items():
        md.append(f"**{name}**")
        md.append("")
        for key, what in (("median_peak_timestep", "activation peak"), ("median_match_timestep", "best match")):
            c = h.get("coarse_to_fine", {}).get(key)
            if c:
                md.append(f"- by {what}: coarse {c['coarse']}, digit {c['digit']}, fine (digit/shape/colour) {c['fine']} — "
                          f"digits later: {c['digit_later']}, fine later: {c['fine_later']}" + (f" ({c['note']})" if c.get("note") else ""))
        md += ["", "| type | features | activation peak (median t) | best match (median t) | best single-feature step t | best MCC |",
               "|---|---|---|---|---|---|"]
        for t, e in h["types"].items():
            md.append(f"| {t} | {len(e['features'])} | {e.get('median_peak_timestep', '–')} | {e.get('median_match_timestep', '–')} | "
                      f"{e.get('best_step_timestep') or '–'} | {e['best_match'] or 0:.3f} |")
        md.append("")
    md += ["![hierarchy](hierarchy.png)", ""]
    if run.get("vlm"):
        t = run["vlm"]["tally"]
        md += ["## VLM usage", "", f"model `{run['vlm']['config']['model']}`: {t['calls']} calls, {t['cached']} from cache, "
               f"{t['http_requests']} HTTP requests ({t['retries']} retries), {t['failures']} failures, "
               f"{t['prompt_tokens']} prompt + {t['completion_tokens']} completion tokens, ${t['cost_usd']:.4f}", ""]
    if run.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in run["notes"]] + [""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    report = {"table": rows, "checks": checks, "checks_unscored_at_chance": checks_all, "hierarchy": hier, "out_dir": str(out), "notes": run.get("notes", []),
              "vlm": run.get("vlm"), "seconds": run.get("seconds")}
    write_json(out / "report.json", report)
    return report
