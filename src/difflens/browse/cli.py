"""`difflens browse export|serve`: the feature browser (static site; local server with a playground)."""

from __future__ import annotations

from pathlib import Path

from difflens.cli_options import add_data_option, add_json_option, add_model_options, add_out_option, load_model, out_dir, say
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
    n = bsub.add_parser("neuronpedia", help="one JSON per feature for feature dashboards (docs/feature-export.md)",
                        description="Export an interpretation's features as one JSON file per feature (activations "
                        "on the top images, explanation and score, frequency, timestep profile), in the "
                        "`difflens.feature/1` schema of docs/feature-export.md, close to Neuronpedia's feature fields.")
    n.add_argument("--interp", metavar="DIR", required=True, help="interpretation folder (`difflens interpret --out`)")
    n.add_argument("--source", action="append", default=[], metavar="NAME",
                   help="export only this source of the interpretation (repeat; default all)")
    add_data_option(n, required=False, help="store with prompts and images (default: the interpretation's)")
    n.add_argument("--no-images", action="store_true", help="do not copy the top images into OUT/img")
    add_out_option(n, kind="dir", help="folder to write: <source>/<feature>.json, <source>/index.json, img/")
    add_json_option(n)
    n.set_defaults(func=run_neuronpedia)
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
    for line in export_warnings(out):
        say(args, line)
    say(args, f"site: {(out / 'index.html').resolve()}")
    return 0


def export_warnings(site: Path) -> list[str]:
    """What a user should know about an exported site: dictionaries whose pages carry no explanation
    (with the command that adds them), then the export's other notes."""
    import json

    from difflens.browse.export import SITE_MARKER

    manifest = json.loads((site / SITE_MARKER).read_text(encoding="utf-8"))
    out = []
    for d in manifest.get("dictionaries", []):
        if d.get("interp") is None:
            out.append(f"warning: {d['name']}: no interpretation, so its {d['features']} feature pages say "
                       f"'(no explanation)'. Add explanations with `difflens interpret --dict {d['path']} --data STORE "
                       f"--out INTERP` and export again with --interp INTERP")
    out += [f"note: {n}" for n in manifest.get("notes", []) if not n.startswith("no interpretation found")]
    return out


def run_neuronpedia(args) -> int:
    from difflens.browse.neuronpedia import KIND, export_neuronpedia
    from difflens.cli_options import emit_json

    summary = export_neuronpedia(args.interp, out_dir(args.out, kind=KIND), sources=args.source or None, data=args.data,
                                 copy_images=not args.no_images)
    for name, s in summary["sources"].items():
        if s["explained"] == 0:
            say(args, f"warning: {name}: none of its {s['features']} features has an explanation; run `difflens "
                      "interpret` with a judge (e.g. --judge oracle on the toy model) to add them")
    for note in summary["notes"]:
        say(args, f"note: {note}")
    if getattr(args, "json", False):
        emit_json(summary)
    say(args, f"wrote {sum(s['features'] for s in summary['sources'].values())} feature files to {args.out}")
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
