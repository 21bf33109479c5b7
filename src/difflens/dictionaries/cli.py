"""`difflens export` (to sparsify / SAELens folders) and `difflens push` (to the Hugging Face hub)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from difflens.cli_options import add_json_option

    p = sub.add_parser(
        "export",
        help="write a dictionary as a sparsify or SAELens folder (normalisation folded into the weights)",
        description="DICT may be a difflens folder, a sparsify/SAELens folder or hf:ORG/REPO[/SUB]. TIDE and "
        "per-timestep normalisation are refused (timestep-dependent); ITDA exports its atoms as a decoder with a note.",
    )
    p.add_argument("--format", required=True, choices=["sparsify", "saelens"], help="target folder format")
    p.add_argument("dict", metavar="DICT", help="dictionary to export")
    p.add_argument("out", metavar="OUT", help="new folder to write (must not exist or be empty)")
    p.add_argument("--weights-dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the written weights (default fp32)")
    add_json_option(p)
    p.set_defaults(func=run_export)

    q = sub.add_parser("push", help="upload a difflens dictionary with a model card to hf:ORG/REPO[/SUBFOLDER]")
    q.add_argument("dict", metavar="DICT", help="difflens dictionary folder (written by `difflens train`)")
    q.add_argument("target", metavar="hf:ORG/REPO[/SUBFOLDER]", help="where on the hub")
    q.add_argument("--revision", help="branch to push to (default main)")
    q.add_argument("--private", action="store_true", help="create the repository as private")
    add_json_option(q)
    q.set_defaults(func=run_push)


def run_export(args: argparse.Namespace) -> int:
    import torch

    import difflens
    from difflens.cli_options import emit_json, say
    from difflens.dictionaries import interop

    d = difflens.load(args.dict)
    out = interop.export(d, args.out, args.format, dtype=torch.bfloat16 if args.weights_dtype == "bf16" else torch.float32)
    note = (out / interop.NOTE_NAME).read_text(encoding="utf-8").strip() if (out / interop.NOTE_NAME).exists() else None
    if note:
        say(args, f"note: {note}")
    say(args, f"wrote {args.format} folder {out}")
    if getattr(args, "json", False):
        emit_json({"out": str(out), "format": args.format, "architecture": d.arch, "note": note})
    return 0


def run_push(args: argparse.Namespace) -> int:
    from difflens.cli_options import emit_json, say
    from difflens.dictionaries import hub

    url = hub.push(args.dict, args.target, revision=args.revision, private=args.private)
    say(args, f"pushed {args.dict} -> {args.target} ({url})")
    if getattr(args, "json", False):
        emit_json({"target": args.target, "commit": url})
    return 0
