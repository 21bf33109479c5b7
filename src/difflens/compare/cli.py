"""`difflens compare`: ITDA Jaccard vs CKA vs SVCCA across sites, denoising steps or stores."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflens.errors import DifflensError

FILES = ("compare.json", "compare.md", "compare.png")


def register(subparsers) -> None:
    from difflens.cli_options import add_out_option, add_seed_option, add_step_window

    p = subparsers.add_parser(
        "compare",
        help="compare representations (sites, steps, models) with ITDA dictionaries, CKA and SVCCA",
        description="Build one ITDA dictionary per group on the same inputs and report the Jaccard index of their atoms "
        "(Leask et al. 2025) next to linear CKA and SVCCA of the activations, as matrices (compare.json, compare.md, "
        "compare.png in --out). Groups: --across sites (one store, several --sites), steps (one store, one site, "
        "each recorded denoising step or --step-window), stores (several --data, one site; e.g. two models harvested "
        "with the same prompts and seeds). See docs/dictionaries.md.",
    )
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="activation store; repeat for --across stores")
    p.add_argument("--across", choices=["sites", "steps", "stores"], required=True, help="what the groups are")
    p.add_argument("--sites", required=True, help="comma-separated sites (across sites: the groups; else one site)")
    add_step_window(p, help="denoising step indices: the groups across steps (default every recorded step); "
                    "otherwise only rows of these steps are used (a:b, b excluded, or 0,3,6)")
    add_out_option(p, kind="dir")
    p.add_argument("--k", type=int, default=16, help="ITDA's L0 (default 16)")
    p.add_argument("--tau", type=float, default=0.3, help="ITDA's add-atom loss threshold τ (default 0.3)")
    p.add_argument("--tokens", type=int, default=32768, help="inputs each dictionary is built from (default 32768)")
    p.add_argument("--metric-rows", type=int, default=4096, help="held-out inputs for CKA / SVCCA / FVU (default 4096)")
    add_seed_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from difflens.cli_options import parse_step_window
    from difflens.compare.run import CompareConfig, compare, markdown, plot
    from difflens.store import Store
    from difflens.outdir import check_out_dir, claim_out_dir
    from difflens.utils import atomic_write_text, write_json

    out = check_out_dir(args.out, "compare")  # before the work; claimed just before writing
    if not args.overwrite and any((out / f).exists() for f in FILES):
        raise DifflensError(f"{out} already holds a comparison; pass --overwrite or choose another --out")
    stores = []
    for d in args.data:
        if not (Path(d) / "manifest.json").exists():
            raise DifflensError(f"no activation store at {d} (no manifest.json); run `difflens harvest` first")
        stores.append(Store(d))
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    cfg = CompareConfig(axis=args.across, sites=sites, steps=parse_step_window(args.step_window), k=args.k, tau=args.tau,
                        tokens=args.tokens, metric_rows=args.metric_rows, seed=args.seed)
    result = compare(stores, cfg, progress=not getattr(args, "quiet", False))
    claim_out_dir(out, "compare")
    write_json(out / "compare.json", result)
    md = markdown(result)
    atomic_write_text(out / "compare.md", md)
    plot(result, out / "compare.png")
    if not getattr(args, "quiet", False):
        print(md)
        print(f"wrote {', '.join(str(out / f) for f in FILES)}")
    return 0
