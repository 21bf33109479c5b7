"""`difflens interpret`: visual autointerp of dictionary features vs MLP-neuron and random baselines.

    difflens interpret --dict DIR --data STORE --judge oracle|openai --out DIR   # the whole pipeline
    difflens interpret cache --dict DIR --data STORE --out DIR                   # just a feature cache (+ heatmaps)
    difflens interpret report --run DIR                                          # re-render a run's report
"""

from __future__ import annotations

import json

from difflens.cli_options import (
    add_data_option,
    add_generation_options,
    add_model_options,
    add_out_option,
    add_seed_option,
    generation_kwargs,
    load_model,
    say,
)
from difflens.errors import DifflensError
from difflens.interpret.judges import BACKENDS, backend_names


def _add_cache_options(p) -> None:
    g = p.add_argument_group("feature cache")
    g.add_argument("--top-n", type=int, default=10, help="top images kept per split (default 10)")
    g.add_argument("--quantiles", type=int, default=8, help="quantile images kept per feature (default 8)")
    g.add_argument("--min-tokens", type=int, default=6, help="an image qualifies when >= this many tokens exceed the threshold (6)")
    g.add_argument("--rel-threshold", type=float, default=0.1, help="threshold = max(abs, rel x feature max) (0.1)")
    g.add_argument("--abs-threshold", type=float, default=0.0, help="absolute threshold floor; also 'active' for frequency (0)")
    g.add_argument("--calib-samples", type=int, default=None, help="images used to calibrate feature maxima (default: all)")
    g.add_argument("--batch-rows", type=int, default=8192, help="activation rows encoded at once (memory knob)")
    g.add_argument("--no-topk", action="store_true",
                   help="re-encode the store for calibration even when it holds a matching streamed top-k cache "
                   "of the dictionary (harvest --dict --topk); the result is the same, it only costs a pass")


def _add_data_options(p) -> None:
    g = p.add_argument_group("data")
    add_data_option(g, required=False, help="activation store with every image token (harvest without --tokens-per-image)")
    g.add_argument("--generate", type=int, metavar="N",
                   help="instead of --data: generate N images afresh (prompts from the model's ground-truth world unless --prompts)")
    g.add_argument("--prompts", metavar="FILE|hf:DATASET[:SPLIT]",
                   help="for --generate on a real model: the first N prompts of a .txt (one a line) or .jsonl file, or "
                   "of a Hugging Face dataset (needs the datasets extra; DiT: class ids or names)")
    g.add_argument("--prompt-column", default=None, help="column/field holding the prompt (jsonl, datasets)")
    g.add_argument("--branch", choices=["cond", "uncond"], default="cond",
                   help="CFG branch read from a --data store harvested with --both-branches (default cond)")
    g.add_argument("--seeds", default="0", help="comma-separated noise seeds for --generate")
    g.add_argument("--prompt-seed", type=int, default=1, help="seed of the ground-truth world's prompt sampler for --generate")
    add_model_options(p, help_suffix="for --generate")
    add_generation_options(p)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "interpret",
        help="feature caches, heatmaps and automated interpretation scores (VLM or toy-world oracle) vs baselines",
        description="Visual autointerp (Shabalin et al. 2025): per feature, an explainer sees its top images with "
        "heatmaps and names the pattern; a judge scores held-out positives and other features' top images. "
        "Dictionaries are compared with MLP neurons and random directions at the same site. See docs/interpret.md.",
    )
    p.add_argument("--dict", dest="dicts", action="append", default=[], metavar="DIR",
                   help="dictionary folder, training run folder or hf:ORG/REPO[/SUB][@REV] (repeat for several)")
    _add_data_options(p)
    add_out_option(p, kind="dir", required=False)
    p.add_argument("--judge", default="oracle", choices=backend_names(),
                   help="; ".join(f"{n}: {BACKENDS[n].help}" for n in backend_names()))
    p.add_argument("--explainer", default=None, choices=backend_names(), help="default: the same as --judge")
    p.add_argument("--baselines", default="neurons,random", help="comma list of neurons,random or 'none'")
    p.add_argument("--site", help="site to interpret (default: the first dictionary's)")
    p.add_argument("--neuron-site", help="MLP hidden site for the neuron baseline (default: <block>.ff.net.0:img)")
    p.add_argument("--n-features", type=int, default=64, help="live features sampled and scored per source (64)")
    p.add_argument("--n-explain", type=int, default=5)
    p.add_argument("--n-pos", type=int, default=5)
    p.add_argument("--n-neg", type=int, default=5)
    add_seed_option(p)
    p.add_argument("--evidence", default="split", choices=["split", "top"],
                   help="oracle explainer reads the whole explain split (default) or only the top images a VLM sees")
    p.add_argument("--negative-overlay", default="feature", choices=["feature", "other"],
                   help="negatives show the evaluated feature's activation (default) or the other feature's map")
    p.add_argument("--chance-controls", default=None, metavar="all|N|none",
                   help="permutation baseline per feature: each shown map judged over other test images (default: all "
                        "pairs for the oracle, 1 per test item for a VLM; 'none' reports raw scores)")
    p.add_argument("--no-reuse", action="store_true", help="rebuild feature caches even if a matching one is in --out")
    p.add_argument("--adherent-only", action="store_true", help="only samples whose image the classifier read as the prompt")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the per-feature PNG grids")
    _add_cache_options(p)
    v = p.add_argument_group("VLM (--judge/--explainer openai)")
    v.add_argument("--vlm-base-url", help="OpenAI-compatible base URL (env DIFFLENS_VLM_BASE_URL; default api.openai.com/v1)")
    v.add_argument("--vlm-model", help="model name (env DIFFLENS_VLM_MODEL)")
    v.add_argument("--api-key-env", default=None, metavar="NAME",
                   help="environment variable holding the API key (default DIFFLENS_VLM_API_KEY, then OPENAI_API_KEY)")
    v.add_argument("--concurrency", type=int, default=4)
    v.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    v.add_argument("--max-retries", type=int, default=5)
    v.add_argument("--max-tokens", type=int, default=200)
    v.add_argument("--price-input", type=float, default=0.0, help="USD per 1M prompt tokens, for the cost tally")
    v.add_argument("--price-output", type=float, default=0.0, help="USD per 1M completion tokens")
    v.add_argument("--explainer-prompt", metavar="FILE", help="explainer template ({n_images} is substituted)")
    v.add_argument("--judge-prompt", metavar="FILE", help="judge template ({explanation} is substituted)")
    v.add_argument("--vlm-cache", metavar="DIR", help="response cache (default <out>/vlm_cache)")
    p.set_defaults(func=run)

    sub = p.add_subparsers(dest="interpret_cmd", metavar="[cache|report]")
    c = sub.add_parser("cache", help="build one feature cache (+ heatmap grids) without scoring")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--dict", dest="cache_dict", metavar="DIR", help="dictionary folder")
    src.add_argument("--neurons", metavar="SITE", help="the MLP hidden units of SITE as features")
    src.add_argument("--random", type=int, metavar="N", help="N random unit directions at --site")
    _add_data_options(c)
    c.add_argument("--site", help="site (for --random; default: the store's first image site)")
    add_seed_option(c)
    add_out_option(c, kind="dir", help="cache folder")
    c.add_argument("--heatmaps", type=int, default=16, metavar="N", help="write grids for N live features (0: none)")
    _add_cache_options(c)
    c.set_defaults(func=run_cache)
    r = sub.add_parser("report", help="re-render report.md, tables and plots of a finished run")
    r.add_argument("--run", required=True, help="output folder of `difflens interpret`")
    r.set_defaults(func=run_report)


def _cache_config(args):
    from difflens.interpret.cache import CacheConfig

    return CacheConfig(top_n=args.top_n, n_quantiles=args.quantiles, min_tokens=args.min_tokens,
                       rel_threshold=args.rel_threshold, abs_threshold=args.abs_threshold,
                       calib_samples=args.calib_samples, rows_per_batch=args.batch_rows)


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DifflensError(f"--seeds must be comma-separated integers, got {text!r}") from None


def _data(args, sites: list[str]):
    """The store path, or generated samples recording `sites` (+ the block's MLP site)."""
    if (args.data is None) == (args.generate is None):
        raise DifflensError("pass exactly one of --data STORE or --generate N")
    if args.data is not None:
        if args.prompts:
            raise DifflensError("--prompts goes with --generate N; a --data store already holds its prompts")
        return args.data
    if args.generate < 1:
        raise DifflensError(f"--generate must be >= 1 (images to generate), got {args.generate}")
    from difflens.groundtruth import world_prompts_of
    from difflens.interpret.features import neuron_site_for
    from difflens.interpret.sources import generate_samples

    gk = generation_kwargs(args)
    adapter = load_model(args)
    steps = gk["steps"] or adapter.default_steps  # the Adapter contract
    sites = [s for s in sites if s] or [adapter.default_site()]
    extra = [neuron_site_for(s, adapter.sites()) for s in sites]
    if args.prompts:
        from difflens.harvest.config import read_prompts

        prompts, scenes = read_prompts(args.prompts, args.prompt_column)[: args.generate], None
    else:
        prompts, scenes = world_prompts_of(adapter, args.generate, args.prompt_seed, model=args.model,
                                           option="--generate N without --prompts",
                                           instead="--prompts FILE (.txt/.jsonl) or --prompts hf:DATASET")
    return generate_samples(adapter, prompts, sorted(set(sites + [e for e in extra if e])), seeds=_seeds(args.seeds),
                            steps=steps, scenes=scenes, guidance=gk["guidance"],
                            height=gk["height"], width=gk["width"])


def _dict_sites(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        try:
            with open(f"{p}/cfg.json", encoding="utf-8") as f:
                out.append(json.load(f).get("site") or "")
        except OSError:
            pass
    return out


def run(args) -> int:
    if not args.out:
        raise DifflensError("--out is required: the folder for caches, heatmaps, scores and the report")
    from difflens.outdir import claim_out_dir

    claim_out_dir(args.out, "interpret", accept_if=lambda p: (p / "run.json").is_file())
    from difflens.dictionaries.io import expand_dict_paths
    from difflens.interpret.pipeline import run_pipeline

    paths = expand_dict_paths(args.dicts) if args.dicts else []
    baselines = [] if args.baselines.strip().lower() == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    client_config = None
    if any(BACKENDS[n].needs_client for n in (args.judge, args.explainer or args.judge)):
        import os

        from difflens.interpret.client import ClientConfig

        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise DifflensError(f"environment variable {args.api_key_env} is empty: export the API key there")
        client_config = ClientConfig.from_env(args.vlm_base_url, args.vlm_model, key, timeout=args.timeout,
                                              max_retries=args.max_retries, concurrency=args.concurrency,
                                              max_tokens=args.max_tokens, price_input=args.price_input,
                                              price_output=args.price_output)
    from pathlib import Path

    from difflens.dictionaries.hub import display_name

    names = {}
    for p in paths:
        base = display_name(p) or Path(p).name or "dict"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names[name] = p
    data = _data(args, [args.site] + _dict_sites(paths))
    report = run_pipeline(
        names, data, args.out, judge=args.judge, explainer=args.explainer, baselines=baselines,
        neuron_site=args.neuron_site, site=args.site, n_features=args.n_features, cache_config=_cache_config(args),
        n_explain=args.n_explain, n_pos=args.n_pos, n_neg=args.n_neg, seed=args.seed, client_config=client_config,
        explainer_prompt=args.explainer_prompt, judge_prompt=args.judge_prompt, vlm_cache=args.vlm_cache,
        grids=not args.no_heatmaps, adherent_only=args.adherent_only, evidence=args.evidence,
        negative_overlay=args.negative_overlay, reuse_caches=not args.no_reuse, chance_controls=args.chance_controls,
        branch=args.branch, use_topk=not args.no_topk,
    )
    from difflens.interpret.report import markdown_table

    print(markdown_table(report["table"]))
    say(args, f"report: {Path(args.out) / 'report.md'}")
    return 0


def run_cache(args) -> int:
    from pathlib import Path

    from difflens.interpret.cache_build import build_cache
    from difflens.interpret.features import NeuronFeatures, RandomDirections, as_feature_source
    from difflens.interpret.heatmap import write_feature_grids
    from difflens.interpret.pipeline import SampleImages
    from difflens.interpret.sources import open_source

    if args.cache_dict:
        fs = as_feature_source(args.cache_dict)
        data = _data(args, [fs.site])
        src = open_source(data, sites=[fs.site], branch=args.branch)
    elif args.neurons:
        data = _data(args, [args.neurons])
        src = open_source(data, sites=[args.neurons], branch=args.branch)
        fs = NeuronFeatures(args.neurons, src.d(args.neurons))
    else:
        data = _data(args, [args.site] if args.site else [])
        src = open_source(data, sites=[args.site] if args.site else None, branch=args.branch)
        site = args.site or src.sites[0]
        fs = RandomDirections(site, src.d(site), args.random, seed=args.seed, center=src.site_mean(site))
    config = _cache_config(args)
    calibration = None
    if args.cache_dict and not args.no_topk:
        from difflens.interpret.topk_use import streamed_max

        calibration, note = streamed_max(fs, src, src.sample_ids(), config)
        if note:
            say(args, note)
    cache = build_cache(fs, src, config=config, out=args.out, seed=args.seed, calibration=calibration)
    live = cache.live()
    say(args, f"{fs.name}: {cache.num_features} features, {int(live.sum())} live, {cache.info['num_samples']} images -> {args.out}")
    # feature pages the browser reads (explanations empty until a judge runs); generated samples keep
    # their images and prompts in <out>/samples, which browse export reads like a store
    from difflens.interpret.report import export_features

    export_features(cache, [], Path(args.out) / "features")
    data = args.data
    if data is None:
        from difflens.interpret.sample_folder import save_samples

        data = save_samples(src, Path(args.out) / "samples")
    if args.cache_dict:
        say(args, f"feature pages: browse them with `difflens browse export --dict {args.cache_dict} --interp "
                  f"{Path(args.out).parent} --data {data}` (the cache folder named like the dictionary folder)")
    if args.heatmaps:
        from difflens.interpret.features import sample_live_features

        feats = sample_live_features(cache["frequency"], args.heatmaps, args.seed)
        paths = write_feature_grids(cache, feats, SampleImages(src), Path(args.out) / "heatmaps")
        say(args, f"{len(paths)} heatmap grids in {Path(args.out) / 'heatmaps'}")
    return 0


def run_report(args) -> int:
    from difflens.interpret.pipeline import render_report
    from difflens.interpret.report import markdown_table

    report = render_report(args.run)
    print(markdown_table(report["table"]))
    return 0


__all__ = ["register", "run"]
