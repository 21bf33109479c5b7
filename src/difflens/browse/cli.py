"""`difflens browse export|serve`: the feature browser (static site; local server with a playground)."""

from __future__ import annotations

from pathlib import Path

from difflens.cli_options import add_data_option, add_model_options, add_out_option, load_model, out_dir, say
from difflens.errors import DifflensError


def _common(p) -> None:
    p.add_argument("--dict", dest="dicts", action="append", default=[], metavar="DIR", required=True,
                   help="dictionary folder (cfg.json + weights.safetensors) or hf:ORG/REPO[/SUB][@REV]; repeat for several")
    p.add_argument("--interp", metavar="DIR", help="interpretation folder (`difflens interpret --out`); default: "
                   "<dict>/../../interpret or <dict>/../interpret when it exists")
    p.add_argument("--eval", dest="evaluation", metavar="FILE", help="eval.json of `difflens evaluate`; default: "
                   "<interp>/../evaluate/eval.json when it exists")
    add_data_option(p, required=False, help="activation store with the images and prompts (default: the interpretation's)")
    p.add_argument("--neighbours", type=int, default=8, help="nearest features by decoder cosine per feature (8)")
    p.add_argument("--max-features", type=int, default=None, metavar="N",
                   help="at most N feature pages per dictionary (scored first, then the most frequent); default all")
    p.add_argument("--title", default="difflens feature browser", help="title of the index page")


def register(sub) -> None:
    p = sub.add_parser("browse", help="feature browser: export a static site, or serve it with a playground",
                       description="Browse dictionary features: `export` writes a static site that opens from the "
                       "file system; `serve` serves it on 127.0.0.1 with a generation/steering playground.")
    bsub = p.add_subparsers(dest="browse_cmd", metavar="<command>")
    e = bsub.add_parser("export", help="write a self-contained static site")
    _common(e)
    add_out_option(e, kind="dir", help="site folder to write (replaced if it is a previous export)")
    e.set_defaults(func=run_export)
    s = bsub.add_parser("serve", help="serve the site plus a playground (generate, inspect, steer)")
    _common(s)
    add_out_option(s, kind="dir", required=False, help="where to write the site (default: a temporary folder, removed on exit)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0 = pick a free one; default 8000)")
    add_model_options(s, help_suffix="of the playground")
    s.add_argument("--no-playground", action="store_true", help="serve the pages only, load no model")
    s.set_defaults(func=run_serve)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_export(args) -> int:
    from difflens.browse.export import export_site

    out = export_site(args.dicts, out_dir(args.out), interp=args.interp, evaluation=args.evaluation, store=args.data,
                      neighbours=args.neighbours, max_features=args.max_features, title=args.title)
    say(args, f"site: {(out / 'index.html').resolve()}")
    return 0


def run_serve(args) -> int:
    from difflens.browse.server import serve

    if not 0 <= args.port <= 65535:
        raise DifflensError(f"--port must be in 0..65535, got {args.port}")
    adapter = None if args.no_playground else load_model(args)
    serve(args.dicts, host=args.host, port=args.port, out=args.out, interp=args.interp, evaluation=args.evaluation,
          store=args.data, neighbours=args.neighbours, max_features=args.max_features, title=args.title,
          model=None if args.no_playground else args.model, device=args.device, adapter=adapter)
    return 0
