"""`difflens benchmark`: one table scoring dictionaries at a site of a store (docs/benchmark.md)."""

from __future__ import annotations

from difflens.benchmark.causal import FACTORS, MODES

CAUSAL_CASES = 8  # small: 8 cases x (1 + dictionaries x factors x modes x 2) images


def register(sub) -> None:
    from difflens.cli_options import add_data_option, add_model_options, add_out_option, add_seed_option, add_steps_option

    p = sub.add_parser("benchmark", help="score dictionaries: reconstruction, probing, absorption, spatial coherence, "
                       "autointerp, causal editing")
    p.add_argument("--dict", dest="dicts", action="append", default=[], metavar="DIR", required=True,
                   help="dictionary folder (repeat for several; all at one site)")
    add_data_option(p, help="activation store with every image token (as `difflens interpret` needs)")
    add_out_option(p, kind="dir")
    p.add_argument("--neuron-site", help="MLP hidden site for the neuron baseline (default: <block>.ff.net.0:img)")
    p.add_argument("--max-images", type=int, default=64, help="images for the token-level metrics (default 64)")
    p.add_argument("--probe-rows", type=int, default=8192, help="token rows per split for the probes (default 8192)")
    p.add_argument("--ks", default="1,4,16", help="latents per sparse probe (default 1,4,16)")
    p.add_argument("--recon-tokens", type=int, default=50_000, help="held-out rows for reconstruction (default 50000)")
    p.add_argument("--autointerp", default="oracle", choices=["oracle", "none"], help="oracle autointerp (toy world)")
    p.add_argument("--interp-run", metavar="DIR", help="read autointerp from an existing `difflens interpret` run")
    p.add_argument("--n-features", type=int, default=48, help="features sampled per source for autointerp (48)")
    p.add_argument("--concepts", help="comma list of concepts to probe (default: all with enough tokens), e.g. color=red,object=seven")
    add_seed_option(p)
    g = p.add_argument_group("causal editing (generates images with the model; needs its ground-truth classifier)")
    g.add_argument("--causal-cases", type=int, default=CAUSAL_CASES, metavar="N",
                   help=f"prompt/seed cases per edit (default {CAUSAL_CASES}; 0 skips causal editing)")
    g.add_argument("--causal-factors", default=",".join(FACTORS), help=f"factors to edit (default {','.join(FACTORS)})")
    g.add_argument("--causal-modes", default=",".join(MODES),
                   help="edit (swap the prompt value's features for the target's), ablation (features off); default both")
    g.add_argument("--causal-features", type=int, default=3, metavar="K", help="top features per concept (default 3)")
    g.add_argument("--causal-scale", type=float, default=1.0, metavar="S",
                   help="edits set the target's features to S x their store maximum (default 1)")
    add_steps_option(g, help="denoising steps of the edited generations (default: the model's own)")
    add_model_options(p, default=None, help_suffix="for causal editing; default: the model the store was harvested from")
    p.set_defaults(func=run)


def _names(text: str, allowed, flag: str) -> list[str]:
    from difflens.errors import DifflensError

    vals = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise DifflensError(f"{flag} {text!r}: use a comma list of {', '.join(allowed)}")
    return vals


def run(args) -> int:
    from difflens.benchmark.run import run_benchmark
    from difflens.cli_options import model_kwargs, out_dir, parse_int_list, say
    from difflens.errors import DifflensError

    if args.causal_cases < 0:
        raise DifflensError(f"--causal-cases must be >= 0 (0 skips causal editing), got {args.causal_cases}")
    if args.steps is not None and args.steps < 1:
        raise DifflensError(f"--steps must be >= 1 (denoising steps), got {args.steps}")
    if not args.causal_scale > 0:
        raise DifflensError(f"--causal-scale must be > 0 (a multiple of the features' store maximum), got {args.causal_scale}")
    if args.causal_features < 1:
        raise DifflensError(f"--causal-features must be >= 1, got {args.causal_features}")

    res = run_benchmark(args.dicts, args.data, out_dir(args.out), neuron_site=args.neuron_site, max_images=args.max_images,
                        probe_rows=args.probe_rows, ks=tuple(parse_int_list(args.ks, "--ks", minimum=1)),
                        recon_tokens=args.recon_tokens, autointerp=args.autointerp, interp_run=args.interp_run,
                        n_features=args.n_features, seed=args.seed,
                        concepts=[c.strip() for c in args.concepts.split(",")] if args.concepts else None,
                        causal_cases=args.causal_cases, causal_factors=_names(args.causal_factors, FACTORS, "--causal-factors"),
                        causal_modes=_names(args.causal_modes, MODES, "--causal-modes"), causal_features=args.causal_features,
                        causal_scale=args.causal_scale,
                        model=args.model, model_kwargs=model_kwargs(args), steps=args.steps,
                        show_progress=not getattr(args, "quiet", False))
    from pathlib import Path

    print((Path(args.out) / "benchmark.md").read_text(encoding="utf-8"))
    extra = ", causal.png" if (Path(args.out) / "causal.png").exists() and res.get("causal") else ""
    say(args, f"wrote {args.out}/benchmark.md, benchmark.json, fvu_by_timestep.png, probing.png{extra} ({res['seconds']['total']} s)")
    return 0
