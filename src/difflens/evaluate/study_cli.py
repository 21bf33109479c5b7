"""`difflens study`: the command line of the studies (today one: `dictionaries`, in `study.py`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difflens.cli_options import add_data_option, add_out_option, add_seed_option
from difflens.dictionaries.config import NORMALIZATIONS
from difflens.errors import DifflensError
from difflens.evaluate.study import StudyConfig, run_study
from difflens.evaluate.study_report import markdown


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="reproducible comparisons (e.g. TopK vs TIDE vs ITDA at one block)",
        description="Studies that train, evaluate and write a report in one command.",
    )
    p.set_defaults(func=_no_study)
    sub = p.add_subparsers(dest="study", metavar="<study>")
    d = sub.add_parser(
        "dictionaries",
        help="TopK SAE vs TIDE (equal width and k) vs ITDA (same L0) at one site",
        description="Train a TopK SAE and a TIDE SAE at equal width and k and build ITDA at the same L0, in lockstep "
        "on one site; evaluate on held-out samples (overall and per timestep bucket), record held-out FVU against "
        "wall time, and write study.json, study.md and study.png to --out. See docs/training.md.",
    )
    add_data_option(d)
    d.add_argument("--site", required=True, help="the site (e.g. transformer_blocks.1:img)")
    add_out_option(d, kind="dir", help="output folder (the trained dictionaries go to OUT/run/)")
    d.add_argument("--width", type=int, default=1024, help="SAE latents (default 1024)")
    d.add_argument("--k", type=int, default=16, help="active latents per token, and ITDA's L0 (default 16)")
    d.add_argument("--train-steps", type=int, default=1000, help="optimizer steps (default 1000)")
    d.add_argument("--batch-size", type=int, default=1024, help="tokens per step (default 1024)")
    d.add_argument("--lr", type=float, default=2e-4, help="base lr, times the width's lr scale (default 2e-4)")
    d.add_argument("--warmup-steps", type=int, default=100, help="linear lr warm-up steps (default 100)")
    d.add_argument("--eval-every", type=int, help="steps between held-out FVU points (default steps/20)")
    d.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens, whole samples (default 8192)")
    d.add_argument("--init-tokens", type=int, default=16384, help="rows for data-dependent init (default 16384)")
    d.add_argument("--dead-after-tokens", type=int, default=100_000,
                   help="training-time dead-latent window for AuxK (default 100000)")
    d.add_argument("--normalization", choices=list(NORMALIZATIONS), default="scalar",
                   help="input normalisation of all three (default scalar)")
    d.add_argument("--itda-cap", type=int, default=0, help="ITDA atom cap (default 0 = 50,000)")
    d.add_argument("--itda-tau", type=float, default=0.3, help="ITDA's add-atom loss threshold τ (default 0.3)")
    d.add_argument("--itda-tokens", type=int, default=0,
                   help="build ITDA from the first N training tokens, then freeze it (default 0 = all)")
    d.add_argument("--fvu-targets", default="0.5,0.3,0.2,0.1",
                   help="extra held-out FVU targets for the time-to-FVU table (comma list)")
    add_seed_option(d)
    d.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="time axis of the time-to-FVU table and plot: process CPU seconds (default; robust on a "
                   "shared machine) or wall seconds; both are recorded")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier study in --out")
    d.set_defaults(func=run)


def _no_study(args: argparse.Namespace) -> int:
    raise DifflensError("choose a study: `difflens study dictionaries --help`")


def _targets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"--fvu-targets {text!r}: write numbers separated by commas, e.g. 0.5,0.2") from None
    if any(not v > 0 for v in values):
        raise DifflensError(f"--fvu-targets {text!r}: targets must be positive")
    return values


def run(args: argparse.Namespace) -> int:
    cfg = StudyConfig(
        site=args.site, width=args.width, k=args.k, steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, eval_every=args.eval_every, eval_tokens=args.eval_tokens, init_tokens=args.init_tokens,
        dead_after_tokens=args.dead_after_tokens, normalization=args.normalization, itda_cap=args.itda_cap,
        itda_tau=args.itda_tau, itda_tokens=args.itda_tokens, fvu_targets=_targets(args.fvu_targets), seed=args.seed, clock=args.clock,
        progress=not getattr(args, "quiet", False),
    )
    if not args.lr > 0:
        raise DifflensError(f"--lr must be positive (got {args.lr})")
    from difflens.train.trainer import Interrupted

    try:
        study = run_study(args.data, cfg, args.out, overwrite=args.overwrite)
    except Interrupted:
        print("difflens study: interrupted; the partial run is in OUT/run, start again with --overwrite", file=sys.stderr)
        return 130
    out = Path(args.out)
    print(markdown(study))
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}", file=sys.stderr)
    return 0
