"""`difflens steer | edit | transfer | intervene-study`: thin verbs over difflens.intervene.

Flags come from the shared vocabulary (`difflens.cli_options`): `--steps` is the number of
denoising steps, `--step-window` the step indices an intervention acts on, `--timestep-range`
scheduler timestep values, `--model-dtype` the model's dtype. Every verb writes the PNG asked for
(the clean image beside the changed one, or a labelled sweep grid) and a JSON next to it with
the settings, the steps the intervention acted on and, on a model with ground truth
(`adapter.ground_truth()`), the world's reading of each image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difflens.cli_options import (
    add_data_option,
    add_generation_options,
    add_json_option,
    add_model_options,
    add_out_option,
    add_seed_option,
    add_step_window,
    emit_json,
    generation_kwargs,
    load_model,
    say,
)
from difflens.errors import DifflensError
from difflens.groundtruth import ground_truth_of

WINDOW_HELP = ("denoising step indices to act on: a:b (b excluded; either side may be empty, ':5' = the first 5) "
               "or a list 0,2,4 (default: every step)")
SCALE_MODES = ["absolute", "token-norm", "feature-max"]


# ---- shared options --------------------------------------------------------------------------
def _model_options(p) -> None:
    add_model_options(p)
    p.add_argument("--dict", dest="dict_dir", required=True, metavar="DIR", help="dictionary folder (cfg.json + weights.safetensors)")
    p.add_argument("--site", default=None, help="site to act on (default: the dictionary's site)")


def _gen_options(p) -> None:
    p.add_argument("--prompt", required=True, help="the prompt")
    add_seed_option(p, help="noise seed (default 0)")
    add_generation_options(p)


def _where_options(p) -> None:
    add_step_window(p, help=WINDOW_HELP)
    p.add_argument("--timestep-range", default=None, metavar="LO:HI",
                   help="scheduler timestep values lo:hi (inclusive) to act on; combines with --step-window")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--region", default=None, help="box x0,y0,x1,y1 (x = column, y = row; x1/y1 excluded), in image pixels "
                   "unless --region-units tokens; a token is inside when its centre is")
    g.add_argument("--mask", default=None, help="PNG mask: white (or opaque) pixels are the region; any size, averaged per token")
    p.add_argument("--region-units", choices=["px", "tokens"], default="px", help="units of --region (default px)")
    p.add_argument("--branch", choices=["both", "cond", "uncond"], default="both",
                   help="CFG rows to act on: both (default), cond or uncond")


def _out_option(p) -> None:
    add_out_option(p, kind="file", help="output PNG (a .json with settings and readings is written next to it)")
    add_json_option(p)


def register(subparsers) -> None:
    from difflens.trace.cli import register as register_trace

    register_trace(subparsers)
    p = subparsers.add_parser(
        "steer",
        help="add a feature's decoder direction during generation (one scale or a sweep)",
        description="Steer generation by adding dictionary features' unit decoder directions at the site. "
        "Scales may be negative. Flux recipe: --scale 0.8 --scale-mode token-norm --step-window :5 --steps 7 with a region.",
    )
    _model_options(p)
    p.add_argument("--feature", required=True, help="feature id(s), comma-separated: 12 or 12,40")
    sc = p.add_mutually_exclusive_group(required=True)
    sc.add_argument("--scale", type=float, help="steering scale (see --scale-mode)")
    sc.add_argument("--scales", help="comma-separated scales for a sweep grid beside the unsteered image; write it with '=' when "
                    "the first is negative: --scales=-8,-4,0,4,8")
    p.add_argument("--scale-mode", choices=SCALE_MODES, default="token-norm",
                   help="token-norm (default): scale x mean image-token norm; absolute: raw units; "
                   "feature-max: scale x the feature's max activation in --data")
    add_data_option(p, required=False,
                    help="activation store: token norms per timestep (token-norm) and feature maxima (feature-max)")
    _gen_options(p)
    _where_options(p)
    _out_option(p)
    p.set_defaults(func=run_steer)

    p = subparsers.add_parser(
        "edit",
        help="ablate / clamp / scale features through the dictionary's codes (error term kept)",
        description="Encode the site's activations, change chosen codes, decode and add back the error term "
        "x - x_hat, so everything the edit does not touch stays as it was.",
    )
    _model_options(p)
    p.add_argument("--ablate", default=None, help="features to set to 0: F,F,...")
    p.add_argument("--clamp", default=None, help="features to set to a value: F=V,F=V,...")
    p.add_argument("--scale", default=None, help="features to multiply: F=S,F=S,... (-1 inverts)")
    p.add_argument("--only-active", action="store_true", help="--clamp only where the feature is already active")
    _gen_options(p)
    _where_options(p)
    _out_option(p)
    p.set_defaults(func=run_edit)

    p = subparsers.add_parser(
        "transfer",
        help="take features' codes from a reference generation into the target (style / attribute transfer)",
        description="Generate the reference, then generate the target with the chosen features' codes replaced "
        "by the reference's at every (selected) step, token by token or as the reference's mean code.",
    )
    _model_options(p)
    p.add_argument("--reference-prompt", required=True, help="prompt of the reference generation")
    p.add_argument("--reference-seed", type=int, default=0, help="seed of the reference generation")
    p.add_argument("--features", default="all", help="feature ids F,F,... to transfer, or 'all' (default)")
    p.add_argument("--mode", choices=["tokens", "mean"], default="tokens",
                   help="tokens: same positions (default); mean: the reference's mean code on every target token")
    _gen_options(p)
    _where_options(p)
    _out_option(p)
    p.set_defaults(func=run_transfer)

    p = subparsers.add_parser(
        "intervene-study",
        help="measure edit / steering / ablation / transfer success rates on a model with ground truth (the toy model)",
        description="--study concepts (default): for every --dict side by side, on the same prompt/seed cases, edit, "
        "steer, ablate and transfer colour, object and background where the dictionary's concept features fire "
        "(on a text-stream dictionary: the prompt's word), with a random-feature control and the dictionary-free "
        "difference-of-means and random-direction references. --study features: the earlier study of one "
        "image-stream dictionary: steering success vs scale and step window inside the object's box, ablation, "
        "colour transfer. Images are read by the model's ground truth (the toy world's factor classifier).",
    )
    add_model_options(p, help_suffix="one with ground truth: the study reads images with its classifier")
    p.add_argument("--dict", dest="dict_dir", required=True, action="append", metavar="DIR",
                   help="dictionary folder; repeat to compare several (--study concepts)")
    add_data_option(p, required=False,
                    help="activation store with token labels at the dictionaries' sites (to label features)")
    p.add_argument("--labels", default=None, help='feature labels JSON {"12": "color=red", ...} instead of labelling from --data (--study features)')
    add_out_option(p, kind="dir", help="output folder (summary JSON/markdown and plots)")
    p.add_argument("--study", choices=["concepts", "features"], default="concepts", help="which study (default concepts)")
    p.add_argument("--cases", type=int, default=100, help="prompt/seed cases per row (--study concepts; default 100)")
    p.add_argument("--rows", default=None, help="comma-separated rows of the concept study (default: all): "
                   "color edit, color steer, object edit, color ablation, color transfer, background transfer")
    p.add_argument("--image-dict", dest="image_dict_dir", action="append", default=None, metavar="DIR",
                   help="image-stream dictionary (e.g. at transformer_blocks.1:img) whose colour/object features the "
                   "colour and object edits also swap inside the object's box; one per --dict, in the same order (--study concepts)")
    p.add_argument("--image-scale", type=float, default=None,
                   help="the image-stream edit's target features at this multiple of their store maximum (default: colour 0.35, object 1)")
    p.add_argument("--scale", type=float, default=None,
                   help="target features at this multiple of their store maximum (concepts; default 1.5)")
    p.add_argument("--branch", choices=["both", "cond", "uncond"], default="both", help="CFG rows to act on (--study concepts; default both)")
    add_step_window(p, help="denoising steps the concept study's edits act on: a:b (b excluded) or 0,2,4 (default: every step)")
    p.add_argument("--quick", action="store_true", help="fewer prompts and scales (--study features)")
    p.add_argument("--scale-mode", choices=SCALE_MODES, default="token-norm", help="steering scale mode (--study features)")
    p.add_argument("--scales", default=None, help="comma-separated steering scales (--study features; default 0.25,0.5,1,2,4)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="denoising steps (default: the model's own)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    add_seed_option(p, help="seed of the study's prompt choice (default 0)")
    add_json_option(p)
    p.set_defaults(func=run_study)


# ---- parsing helpers -----------------------------------------------------------------------------
def parse_ids(text: str, what: str = "--feature") -> list[int]:
    try:
        ids = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"{what} {text!r}: give integer feature ids separated by commas, e.g. 12,40") from None
    if not ids:
        raise DifflensError(f"{what} names no feature; e.g. {what} 12")
    return ids


def parse_pairs(text: str, what: str) -> list[tuple[int, float]]:
    out = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        f, sep, v = part.partition("=")
        if not sep:
            raise DifflensError(f"{what} {text!r}: each entry needs =value, e.g. {what} 12=3.5,40=0")
        try:
            out.append((int(f), float(v)))
        except ValueError:
            raise DifflensError(f"{what} {text!r}: write F=V pairs separated by commas, e.g. {what} 12=3.5,40=0") from None
    if not out:
        raise DifflensError(f"{what} names no feature")
    return out


def parse_scales(text: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"--scales {text!r}: give numbers separated by commas, e.g. -8,-4,0,4,8") from None
    if not vals:
        raise DifflensError("--scales names no scale")
    return vals


def _where(args) -> dict:
    from difflens.intervene.region import Region, Window

    kw = {"window": Window.parse(args.step_window, args.timestep_range), "branch": args.branch}
    if args.region:
        kw["region"] = Region.parse(args.region, units=args.region_units)
    elif args.mask:
        kw["region"] = Region.from_png(args.mask)
    return kw


def _load(args):
    import difflens

    adapter = load_model(args)
    dictionary = difflens.load(args.dict_dir, device=str(adapter.device))
    return adapter, dictionary


def _readings(adapter, images) -> list[dict] | None:
    """The ground truth's reading of each image (the factors of its main object and the global
    ones); None for a model without ground truth or when its reader is missing."""
    import numpy as np

    truth = ground_truth_of(adapter)
    if truth is None:
        return None
    try:
        truth.ready()
        raw = truth.read_images(np.stack([np.asarray(im) for im in images]))
    except DifflensError:
        return None
    factors = list(truth.factors)
    out = []
    for r in raw:
        main = r.get("main") or {}
        reading = {"main": {f: main[f] for f in factors if f in main}}
        reading.update({k: v for k, v in r.items() if k in factors})
        out.append(reading)
    return out


def _caption(label: str, reading: dict | None) -> str:
    if not reading or not reading.get("main"):
        return label
    return f"{label}: " + " ".join(str(v) for v in reading["main"].values())


def _write(args, images, labels, title: str, meta: dict, cols: int | None = None) -> None:
    from difflens.utils import save_image, write_json
    from difflens.viz import labelled_grid

    path = Path(args.out)
    if path.suffix.lower() != ".png":
        raise DifflensError(f"--out {args.out!r}: write a .png file name")
    if path.is_dir():
        raise DifflensError(f"--out {args.out}: is a folder; give a file name ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(path, labelled_grid(list(images), labels, cols=cols, title=title[:90], label_lines=3))
    write_json(path.with_suffix(".json"), meta)
    if getattr(args, "json", False):
        emit_json({k: v for k, v in meta.items() if k != "readings"})
    say(args, f"wrote {path} and {path.with_suffix('.json')}")


def _store(path):
    if path is None:
        return None
    from difflens.store import Store

    return Store(path)


def _captioned(adapter, images, labels):
    readings = _readings(adapter, images)
    if readings:
        labels = [_caption(lab, r) for lab, r in zip(labels, readings)]
    return labels, readings


# ---- verbs -----------------------------------------------------------------------------------------
def run_steer(args: argparse.Namespace) -> int:
    from difflens.intervene.run import generate_with
    from difflens.intervene.steer import Steer
    from difflens.intervene.sweep import steer_sweep

    features = parse_ids(args.feature)
    where = _where(args)
    gk = generation_kwargs(args)
    adapter, dictionary = _load(args)
    store = _store(args.data)
    site = args.site or dictionary.cfg.site
    stats = store.stats(site) if (store is not None and args.scale_mode == "token-norm" and site in store.sites) else None
    steer_kw = dict(mode=args.scale_mode, stats=stats, store=store, site=args.site, **where)
    if args.scales is not None:
        scales = parse_scales(args.scales)
        if gk["height"] or gk["width"]:
            raise DifflensError("--scales sweeps use the model's default size: drop --height/--width or use --scale")
        res = steer_sweep(adapter, dictionary, features, scales, args.prompt, args.seed,
                          steps=gk["steps"], guidance=gk["guidance"], **steer_kw)
        images, labels = res["images"], res["labels"]
        desc = res["steer"]
    else:
        iv = Steer(dictionary, features, args.scale, **steer_kw)
        clean = generate_with(adapter, [args.prompt], [args.seed], [], **gk)
        steered = generate_with(adapter, [args.prompt], [args.seed], [iv], **gk)
        images = [clean.images[0], steered.images[0]]
        labels = ["unsteered", f"scale {args.scale:+g}"]
        desc = iv.describe()
    labels, readings = _captioned(adapter, images, labels)
    meta = {
        "verb": "steer", "prompt": args.prompt, "seed": args.seed, "features": features, "scale_mode": args.scale_mode,
        "scales": parse_scales(args.scales) if args.scales else [args.scale], "intervention": desc,
        "labels": labels, "readings": readings,
    }
    _write(args, images, labels, f"steer f{','.join(map(str, features))}: {args.prompt}", meta)
    return 0


def run_edit(args: argparse.Namespace) -> int:
    import numpy as np

    from difflens.intervene.edits import CodeEdit
    from difflens.intervene.run import generate_with

    ops = []
    if args.ablate:
        ops.append(("ablate", parse_ids(args.ablate, "--ablate"), None))
    for name, text in (("clamp", args.clamp), ("scale", args.scale)):
        if text:
            for f, v in parse_pairs(text, f"--{name}"):
                ops.append((name, [f], v))
    if not ops:
        raise DifflensError("edit needs at least one of --ablate F,.. / --clamp F=V,.. / --scale F=S,..")
    where = _where(args)
    gk = generation_kwargs(args)
    adapter, dictionary = _load(args)
    iv = CodeEdit(dictionary, ops, only_active=args.only_active, site=args.site, **where)
    clean = generate_with(adapter, [args.prompt], [args.seed], [], **gk)
    edited = generate_with(adapter, [args.prompt], [args.seed], [iv], **gk)
    images = [clean.images[0], edited.images[0]]
    labels, readings = _captioned(adapter, images, ["clean", "edited"])
    diff = float(np.abs(images[1].astype(int) - images[0].astype(int)).mean())
    meta = {
        "verb": "edit", "prompt": args.prompt, "seed": args.seed, "intervention": iv.describe(),
        "steps_applied": iv.steps_applied(), "mean_abs_pixel_change": diff, "labels": labels, "readings": readings,
    }
    _write(args, images, labels, f"edit: {args.prompt}", meta)
    return 0


def run_transfer(args: argparse.Namespace) -> int:
    from difflens.intervene.run import generate_with
    from difflens.intervene.transfer import Transfer

    features = None if str(args.features).strip().lower() == "all" else parse_ids(args.features, "--features")
    where = _where(args)
    gk = generation_kwargs(args)
    adapter, dictionary = _load(args)
    iv = Transfer(dictionary, (args.reference_prompt, args.reference_seed), features, mode=args.mode, site=args.site, **where)
    clean = generate_with(adapter, [args.prompt], [args.seed], [], **gk)
    moved = generate_with(adapter, [args.prompt], [args.seed], [iv], **gk)
    images = [clean.images[0], iv.reference_image, moved.images[0]]
    labels, readings = _captioned(adapter, images, ["target", "reference", "transferred"])
    meta = {
        "verb": "transfer", "prompt": args.prompt, "seed": args.seed, "reference_prompt": args.reference_prompt,
        "reference_seed": args.reference_seed, "intervention": iv.describe(), "steps_applied": iv.steps_applied(),
        "labels": labels, "readings": readings,
    }
    _write(args, images, labels, f"transfer: {args.reference_prompt} -> {args.prompt}", meta)
    return 0


def run_study(args: argparse.Namespace) -> int:
    import difflens
    from difflens.cli_options import out_dir
    from difflens.intervene.study import run_intervention_study, summary_markdown
    from difflens.intervene.study_labels import read_labels

    if args.data is None and args.labels is None:
        raise DifflensError("intervene-study needs --data STORE (to label features) or --labels FILE.json")
    if args.steps is not None and args.steps < 1:
        raise DifflensError(f"--steps must be >= 1 (denoising steps), got {args.steps}")
    out = out_dir(args.out)
    adapter = load_model(args)
    if ground_truth_of(adapter) is None:
        raise DifflensError(f"intervene-study reads images with a ground-truth world's classifier, and {args.model} has none: "
                            "use a model trained on one (such as the default --model)")
    if args.study == "concepts":
        return _run_concept_study(args, adapter, out)
    if len(args.dict_dir) > 1:
        raise DifflensError("--study features takes one --dict; --study concepts compares several")
    dictionary = difflens.load(args.dict_dir[0], device=str(adapter.device))
    labels = read_labels(args.labels) if args.labels else None
    quiet = bool(getattr(args, "quiet", False))
    summary = run_intervention_study(
        adapter, dictionary, out, store=_store(args.data), feature_labels=labels, quick=args.quick,
        steps=args.steps, guidance=args.guidance, mode=args.scale_mode,
        scales=parse_scales(args.scales) if args.scales else None, seed=args.seed, show_progress=not quiet,
    )
    return _report(args, summary, summary_markdown, out)


def _run_concept_study(args: argparse.Namespace, adapter, out: Path) -> int:
    import difflens
    from difflens.intervene.region import Window
    from difflens.intervene.study_concepts import ROWS, markdown, run_concept_study

    if args.data is None:
        raise DifflensError("--study concepts labels features from a store: pass --data STORE (harvested at the dictionaries' sites)")
    rows = ROWS if args.rows is None else tuple(r.strip() for r in args.rows.split(",") if r.strip())
    names: dict[str, object] = {}
    for d in args.dict_dir:
        name = Path(d).name
        while name in names:
            name += "'"
        names[name] = difflens.load(d, device=str(adapter.device))
    images = {}
    if args.image_dict_dir:
        if len(args.image_dict_dir) != len(args.dict_dir):
            raise DifflensError(f"{len(args.image_dict_dir)} --image-dict for {len(args.dict_dir)} --dict: give one per --dict, in the same order")
        images = {n: difflens.load(d, device=str(adapter.device)) for n, d in zip(names, args.image_dict_dir)}
    extra = {k: v for k, v in (("scale", args.scale), ("image_scale", args.image_scale)) if v is not None}
    result = run_concept_study(
        adapter, names, _store(args.data), out, n=args.cases, rows=rows, branch=args.branch, image_dictionaries=images,
        window=Window.parse(args.step_window) if args.step_window else None, **extra,
        steps=args.steps, guidance=args.guidance, seed=args.seed, show_progress=not getattr(args, "quiet", False),
    )
    return _report(args, result, markdown, out)


def _report(args: argparse.Namespace, result: dict, to_markdown, out: Path) -> int:
    """A study's result on stdout (JSON with --json, else its markdown table) and where it was written."""
    if args.json:
        emit_json(result)
    else:
        print(to_markdown(result))
    say(args, f"wrote {out.resolve()}")
    return 0
