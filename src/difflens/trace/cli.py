"""`difflens trace`: activation patching over sites x step windows x CFG branches."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from difflens.cli_options import add_model_options, add_out_option, add_seed_option, add_steps_option
from difflens.errors import DifflensError

if TYPE_CHECKING:
    from difflens.models.base import Adapter


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "trace",
        help="find where a concept is decided: patch a source run's activations into a target, cell by cell",
        description="For prompt pairs differing in one factor, generate the target with the source run's "
        "activations patched in at one (site, step window, CFG branch) at a time and read the result: on a "
        "model with ground truth (the toy world) the factor reader; otherwise where the image lies between "
        "target and source in pixel space. Writes trace.png (heatmaps), trace.json (every cell) and trace.md.",
    )
    add_model_options(p)
    p.add_argument("--factors", default="color,object,position,bgcolor",
                   help="world factors to trace, comma-separated (ground-truth models; default color,object,position,bgcolor)")
    p.add_argument("--pair", action="append", default=None, metavar="'TARGET|SOURCE'",
                   help="a target and source prompt separated by '|' (repeatable); replaces --factors, pixel readout")
    p.add_argument("--pairs", type=int, default=8, help="prompt/seed pairs per factor (default 8)")
    p.add_argument("--sites", default=None, help="sites or globs to patch (default: every block's output, img and txt)")
    p.add_argument("--no-conditioning", action="store_true", help="do not trace the pooled-text/timestep conditioning vector")
    p.add_argument("--branches", default="both,cond,uncond", help="CFG branches to patch (default both,cond,uncond)")
    p.add_argument("--step-bin", type=int, default=1, help="steps per window of the grid (default 1: every step alone)")
    add_steps_option(p, help="denoising steps (default: the model's; toy 12)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per generation batch (default 64)")
    add_seed_option(p, help="seed of the pair choice (default 0)")
    add_out_option(p, kind="dir", help="output folder (trace.png, trace.json, trace.md)")
    p.set_defaults(func=run_trace_verb)


def _steps(adapter: Adapter, steps):
    if steps is not None and int(steps) < 1:
        raise DifflensError(f"--steps must be >= 1 (denoising steps), got {steps}")
    return int(adapter.default_steps if steps is None else steps)  # every Adapter declares its default


def run_trace_verb(args: argparse.Namespace) -> int:
    from difflens.models import load_adapter
    from difflens.trace import report
    from difflens.trace.readouts import PixelReadout
    from difflens.trace.run import Pair, trace
    from difflens.trace.world import trace_world
    from difflens.utils import write_json

    from difflens.cli_options import model_kwargs, out_dir

    if getattr(args, "quiet", False):
        os.environ["DIFFLENS_QUIET"] = "1"
    branches = [b.strip() for b in args.branches.split(",") if b.strip()]
    bad = [b for b in branches if b not in ("both", "cond", "uncond")]
    if bad or not branches:
        raise DifflensError(f"--branches {args.branches!r}: use some of both,cond,uncond")
    if args.pairs < 1:
        raise DifflensError("--pairs must be >= 1")
    out = out_dir(args.out)
    adapter = load_adapter(args.model, **model_kwargs(args))
    steps = _steps(adapter, args.steps)
    sites = adapter.resolve_sites(args.sites) if args.sites else None
    kw = dict(sites=sites, steps=steps, guidance=args.guidance, bin_size=args.step_bin, branches=branches,
              conditioning=not args.no_conditioning, batch_size=args.batch_size, show_progress=not getattr(args, "quiet", False))
    results, info = [], {}
    if args.pair:
        pairs = []
        for i, text in enumerate(args.pair):
            tgt, sep, src = text.partition("|")
            if not sep or not tgt.strip() or not src.strip():
                raise DifflensError(f"--pair {text!r}: write 'TARGET PROMPT|SOURCE PROMPT'")
            pairs.append(Pair(tgt.strip(), src.strip(), args.seed + i))
        results.append(trace(adapter, pairs, PixelReadout(), factor="pairs", **kw))
    else:
        factors = [f.strip() for f in args.factors.split(",") if f.strip()]
        for f, pairs, pinfo, readout in trace_world(adapter, factors, args.pairs, steps=steps, guidance=args.guidance,
                                                     seed=args.seed):
            info[f] = pinfo
            if not pairs:
                raise DifflensError(f"no {f} pair reads as prompted ({pinfo}); the model does not draw this factor")
            results.append(trace(adapter, pairs, readout, factor=f, **kw))
    out.mkdir(parents=True, exist_ok=True)
    images = sum(r.images for r in results)
    seconds = sum(r.seconds for r in results)
    write_json(out / "trace.json", {"model": adapter.model_id, "steps": steps, "guidance": args.guidance,
                                    "pair_selection": info, "images": images, "seconds": round(seconds, 1),
                                    "images_per_second": round(images / max(seconds, 1e-9), 2),
                                    "factors": [r.to_dict() for r in results]})
    md = report.markdown(results)
    (out / "trace.md").write_text(md, encoding="utf-8")
    png = report.heatmap(results, out / "trace.png")
    print(md)
    print(f"{images} images in {seconds:.0f} s ({images / max(seconds, 1e-9):.1f} images/s)")
    print(f"wrote {out / 'trace.json'}, {out / 'trace.md'}" + (f", {png}" if png else ""))
    return 0
