"""`difflens evaluate`: reconstruction metrics of trained dictionaries (and optionally splice)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from difflens.cli_options import (
    add_data_option,
    add_json_option,
    emit_json,
    add_model_options,
    add_out_option,
    add_step_window,
    load_model,
    out_dir,
    say,
)
from difflens.dictionaries.io import expand_dict_paths
from difflens.errors import DifflensError
from difflens.utils import json_safe


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="reconstruction metrics (FVU, EV, cosine, L0, dead) of dictionaries on a store",
        description="Evaluate dictionaries on an activation store: overall and per timestep. Writes the JSON, "
        "a markdown table and PNG plots next to it. See docs/training.md for the metric definitions.",
    )
    p.add_argument("--dict", dest="dicts", action="append", required=True, metavar="DIR",
                   help="a dictionary folder or hf:ORG/REPO[/SUB][@REV] (repeat for several; a training run folder adds all its "
                   "dictionaries)")
    add_data_option(p)
    add_out_option(p, kind="dir", help="output folder: eval.json, eval.md, eval_*.png (and splice/ with --splice)")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens per dictionary")
    p.add_argument("--split", choices=["auto", "heldout", "all"], default="auto",
                   help="auto (default): the held-out samples when the dictionary was trained on this store, else all rows")
    p.add_argument("--timestep-range", help="only timesteps lo:hi (inclusive)")
    add_step_window(p, help="only these denoising step indices: 0,1,2 or 0:3")
    p.add_argument("--dead-window", type=int, help="N of 'dead = no activation over the last N tokens' (default: all evaluated)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass (default 4096)")
    p.add_argument("--splice", action="store_true", help="also splice the reconstructions into generation (needs --model)")
    p.add_argument("--splice-window", metavar="A:B",
                   help="denoising step indices a:b during which the reconstruction replaces the activation")
    add_model_options(p, default=None, help_suffix="for --splice")
    add_json_option(p)
    p.set_defaults(func=run)


def _splice_module():
    try:
        return importlib.import_module("difflens.evaluate.splice")
    except ModuleNotFoundError as e:
        if e.name == "difflens.evaluate.splice":
            raise DifflensError(
                "splice evaluation isn't available in this installation (difflens.evaluate.splice is missing); "
                "run without --splice"
            ) from None
        raise


def _ours(folder: Path) -> bool:
    """An evaluate output written before output markers existed."""
    return (folder / "eval.json").is_file() and (folder / "eval.md").is_file()


def parse_splice_steps(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise DifflensError(f"--splice-window {text!r}: write a:b (step indices, end excluded), e.g. 0:5") from None
    if not 0 <= a < b:
        raise DifflensError(f"--splice-window {text!r}: need 0 <= a < b")
    return a, b


def run(args: argparse.Namespace) -> int:
    from difflens.evaluate import report
    from difflens.evaluate.reconstruction import evaluate, load_items
    from difflens.train.cli import parse_range, parse_steps
    from difflens.train.data import Filters
    from difflens.train.trainer import open_store
    from difflens.utils import write_json

    if args.splice and not args.model:
        raise DifflensError("--splice needs --model (the model the dictionaries were trained on)")
    if (args.model or args.splice_window) and not args.splice:
        raise DifflensError("--model/--splice-window only apply with --splice; add --splice or drop them")
    splice_steps = parse_splice_steps(args.splice_window)
    out_folder = out_dir(args.out, kind="evaluate", accept_if=_ours)
    splice = _splice_module() if args.splice else None  # fail before the long part
    store = open_store(args.data)
    items = load_items(expand_dict_paths(args.dicts), store)
    filters = Filters(
        parse_range(args.timestep_range) if args.timestep_range else None,
        tuple(parse_steps(args.step_window)) if args.step_window else None,
    )
    result = evaluate(
        items,
        store,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        split=args.split,
        filters=filters,
        dead_window=args.dead_window,
        show_progress=not args.quiet,
    )
    from difflens.outdir import claim_out_dir

    claim_out_dir(out_folder, "evaluate", accept_if=_ours)
    out = out_folder / "eval.json"
    if splice is not None:
        adapter = load_model(args)
        result["splice"] = splice.evaluate_splice(
            {it.name: it.module for it in items},  # the same names as the reconstruction table
            store,
            adapter,
            steps=splice_steps,
            max_tokens=args.max_tokens,
            out_dir=out_folder / "splice",
            show_progress=not args.quiet,
        )
    result = json_safe(result)
    write_json(out, result)
    written = report.write_reports(result, out)
    if args.json:
        emit_json(result)
    else:
        print(report.text_table(result))  # the result: stdout; messages go to stderr
    say(args, f"wrote {out}, " + ", ".join(written.values()))
    return 0
