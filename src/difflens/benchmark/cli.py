"""`difflens benchmark`: one table scoring dictionaries at a site of a store (docs/benchmark.md)."""

from __future__ import annotations


def register(sub) -> None:
    from difflens.cli_options import add_data_option, add_out_option, add_seed_option

    p = sub.add_parser("benchmark", help="score dictionaries: reconstruction, probing, absorption, spatial coherence, autointerp")
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
    p.set_defaults(func=run)


def run(args) -> int:
    from difflens.benchmark.run import run_benchmark
    from difflens.cli_options import out_dir, parse_int_list, say

    res = run_benchmark(args.dicts, args.data, out_dir(args.out), neuron_site=args.neuron_site, max_images=args.max_images,
                        probe_rows=args.probe_rows, ks=tuple(parse_int_list(args.ks, "--ks", minimum=1)),
                        recon_tokens=args.recon_tokens, autointerp=args.autointerp, interp_run=args.interp_run,
                        n_features=args.n_features, seed=args.seed,
                        concepts=[c.strip() for c in args.concepts.split(",")] if args.concepts else None, show_progress=not getattr(args, "quiet", False))
    from pathlib import Path

    print((Path(args.out) / "benchmark.md").read_text(encoding="utf-8"))
    say(args, f"wrote {args.out}/benchmark.md, benchmark.json, fvu_by_timestep.png, probing.png ({res['seconds']['total']} s)")
    return 0
