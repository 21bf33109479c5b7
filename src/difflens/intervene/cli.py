"""`difflens <intervention> | intervene-study`: thin verbs over difflens.intervene.

One verb per registered intervention (`intervene/registry.py`; steer, edit and transfer declare
theirs in their own modules): this module adds the shared flags and runs them all through
`run_intervention`. Flags come from the shared vocabulary (`difflens.cli_options`): `--steps` is
the number of denoising steps, `--step-window` the step indices an intervention acts on,
`--timestep-range` scheduler timestep values, `--model-dtype` the model's dtype. Every verb
writes the PNG asked for (the clean image beside the changed one, or a labelled sweep grid) and a
JSON next to it with the settings, the steps the intervention acted on and, on a model with
ground truth (`adapter.ground_truth()`), the world's reading of each image.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from difflens.cli_options import (
    add_data_option,
    add_generation_options,
    add_json_option,
    add_model_options,
    add_out_option,
    add_seed_option,
    add_step_window,
    add_steps_option,
    emit_json,
    generation_kwargs,
    load_model,
    say,
)
from difflens.errors import DifflensError
from difflens.groundtruth import ground_truth_of
from difflens.intervene.registry import parse_ids, parse_pairs, parse_scales  # noqa: F401 - the verbs' parsers, re-exported

if TYPE_CHECKING:
    from difflens.models.base import Adapter

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
    from difflens.intervene.registry import intervention_specs
    from difflens.trace.cli import register as register_trace

    register_trace(subparsers)
    for spec in intervention_specs():
        if spec.name in subparsers.choices:
            raise DifflensError(f"intervention {spec.name!r} clashes with the verb `difflens {spec.name}`: rename it")
        p = subparsers.add_parser(spec.name, help=spec.help, description=spec.description or spec.help)
        _model_options(p)
        spec.add_arguments(p)
        _gen_options(p)
        _where_options(p)
        _out_option(p)
        p.set_defaults(func=run_intervention, intervention_verb=spec.name)

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
    p.add_argument("--object-dict", dest="object_dict_dir", action="append", default=None, metavar="DIR",
                   help="dictionary at another site (e.g. context_embedder:txt, where objects move more) that runs the "
                   "object rows instead of its --dict; one per --dict, in the same order (--study concepts)")
    p.add_argument("--image-scale", type=float, default=None,
                   help="the image-stream edit's target features at this multiple of their store maximum (default: colour 0.35, object 1)")
    p.add_argument("--scale", type=float, default=None,
                   help="target features at this multiple of their store maximum (concepts; default 1.5)")
    p.add_argument("--branch", choices=["both", "cond", "uncond"], default="both", help="CFG rows to act on (--study concepts; default both)")
    p.add_argument("--object-shift", default=None, metavar="N,SCALE",
                   help="object edit on a text-stream dictionary: per token from the object word on, the N features whose mean "
                   "code differs most between target and source object, at SCALE x that difference (default 8,1.5); "
                   "'off': the few-feature swap of the colour edit (--study concepts)")
    add_step_window(p, help="denoising steps the concept study's edits act on: a:b (b excluded) or 0,2,4 (default: every step)")
    p.add_argument("--references", default=None,
                   help="comma-separated dictionary-free reference rows, or 'none' (--study concepts; default all): "
                   "difference of means, random direction, prompt changed: color, prompt changed: object")
    g = p.add_argument_group("colour steer row (--study concepts; the target's features added, the prompt's colour left)")
    g.add_argument("--steer-scale", type=float, default=None,
                   help="the text push's multiplier (default 2.5; of what: --steer-mode)")
    g.add_argument("--steer-mode", choices=["feature-max", "token-norm", "feature-mean", "equal-norm", "code-means"], default=None,
                   help="feature-max: each feature at --steer-scale x its store maximum; token-norm: at "
                   "--steer-scale x the row's mean token norm; feature-mean: x its mean code at the colour's word; "
                   "equal-norm: feature-max rescaled to the same norm for every colour; code-means (default): per token, the "
                   "8 features whose mean code for the target colour exceeds the other colours' most, at that excess")
    g.add_argument("--steer-image-scale", type=float, default=None,
                   help="with --image-dict, also add the target colour's image-stream features in the object's box at this "
                   "multiple of their maximum (0: text only)")
    g.add_argument("--steer-tokens", choices=["fires", "all", "after", "phrase"], default=None,
                   help="fires: the tokens where the prompt colour's features fire (default); all: every text token; "
                   "after: the colour word and every later token but the background's words; phrase: the colour word up "
                   "to the first background word")
    g.add_argument("--steer-branch", choices=["both", "cond", "uncond"], default=None, help="CFG rows of the text push (default cond)")
    g.add_argument("--steer-window", default=None, metavar="W", help="steps of the steer: a:b or 0,2,4 (default: --step-window)")
    g.add_argument("--steer-dict", dest="steer_dict_dir", action="append", default=None, metavar="DIR",
                   help="a text dictionary at another site (e.g. context_embedder:txt), one per --dict: the steer adds the "
                   "target colour there too, same settings (its site must be in --data)")
    g.add_argument("--steer-features", type=int, default=None, metavar="N", help="target features per colour (default 3)")
    p.add_argument("--quick", action="store_true", help="fewer prompts and scales (--study features)")
    p.add_argument("--scale-mode", choices=SCALE_MODES, default="token-norm", help="steering scale mode (--study features)")
    p.add_argument("--scales", default=None, help="comma-separated steering scales (--study features; default 0.25,0.5,1,2,4)")
    add_steps_option(p, help="denoising steps (default: the model's own)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    add_seed_option(p, help="seed of the study's prompt choice (default 0)")
    add_json_option(p)
    p.set_defaults(func=run_study)


# ---- helpers -----------------------------------------------------------------------------------------
def _where(args) -> dict:
    from difflens.intervene.region import Region, Window

    kw = {"window": Window.parse(args.step_window, args.timestep_range), "branch": args.branch}
    if args.region:
        kw["region"] = Region.parse(args.region, units=args.region_units)
    elif args.mask:
        kw["region"] = Region.from_png(args.mask)
    return kw


def _readings(adapter: Adapter, images) -> list[dict] | None:
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


def _captioned(adapter: Adapter, images, labels):
    readings = _readings(adapter, images)
    if readings:
        labels = [_caption(lab, r) for lab, r in zip(labels, readings)]
    return labels, readings


# ---- verbs -----------------------------------------------------------------------------------------
def run_intervention(args: argparse.Namespace) -> int:
    """Any registered intervention: build it from its flags (dictionary on the CPU, before the model
    loads, so bad flags fail fast), generate clean and changed (one batch for a sweep), write PNG + JSON."""
    import numpy as np

    import difflens
    from difflens.intervene.registry import get_intervention, sweep_or_single
    from difflens.intervene.run import generate_with
    from difflens.intervene.sweep import generate_sweep

    spec = get_intervention(args.intervention_verb)
    where = _where(args)
    gk = generation_kwargs(args)
    dictionary = difflens.load(args.dict_dir)
    variants = sweep_or_single(spec.build(args, dictionary, where))
    adapter = load_model(args)
    dictionary.to(adapter.device)
    fields = vars(args)
    ivs = [iv for _, iv in variants]
    if variants[0][0] is None:  # one intervention: clean, then changed (unbatched, as the studies)
        clean = generate_with(adapter, [args.prompt], [args.seed], [], **gk)
        changed = generate_with(adapter, [args.prompt], [args.seed], ivs, **gk)
        extras = list(spec.extra_images(ivs[0])) if spec.extra_images else []
        images = [clean.images[0], *(im for _, im in extras), changed.images[0]]
        labels = [spec.labels[0].format(**fields), *(lab for lab, _ in extras), spec.labels[1].format(**fields)]
    else:  # a sweep: one batch, the clean image as sample 0 and variant i as sample i + 1
        images = list(generate_sweep(adapter, args.prompt, args.seed, ivs, **gk).images)
        labels = [spec.labels[0].format(**fields), *(str(lab) for lab, _ in variants)]
    labels, readings = _captioned(adapter, images, labels)
    meta = {"verb": spec.name, "prompt": args.prompt, "seed": args.seed, **(spec.meta(args) if spec.meta else {}),
            "intervention": ivs[0].describe(), "steps_applied": ivs[0].steps_applied()}
    if len(ivs) == 1:
        meta["mean_abs_pixel_change"] = float(np.abs(images[-1].astype(int) - images[0].astype(int)).mean())
    meta.update(labels=labels, readings=readings)
    _write(args, images, labels, spec.title.format(**fields), meta)
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


def _run_concept_study(args: argparse.Namespace, adapter: Adapter, out: Path) -> int:
    import difflens
    from difflens.intervene.region import Window
    from difflens.intervene.study_concepts import ROWS, markdown, run_concept_study

    if args.data is None:
        raise DifflensError("--study concepts labels features from a store: pass --data STORE (harvested at the dictionaries' sites)")
    rows = ROWS if args.rows is None else tuple(r.strip() for r in args.rows.split(",") if r.strip())
    if args.references is not None:
        extra_refs = {"references": () if args.references.strip().lower() == "none"
                      else tuple(r.strip() for r in args.references.split(",") if r.strip())}
    else:
        extra_refs = {}
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
    objects = {}
    if args.object_dict_dir:
        if len(args.object_dict_dir) != len(args.dict_dir):
            raise DifflensError(f"{len(args.object_dict_dir)} --object-dict for {len(args.dict_dir)} --dict: give one per --dict, in the same order")
        objects = {n: difflens.load(d, device=str(adapter.device)) for n, d in zip(names, args.object_dict_dir)}
    if args.steer_dict_dir:
        if len(args.steer_dict_dir) != len(args.dict_dir):
            raise DifflensError(f"{len(args.steer_dict_dir)} --steer-dict for {len(args.dict_dir)} --dict: give one per --dict, in the same order")
        extra_refs["steer_dictionaries"] = {n: difflens.load(d, device=str(adapter.device)) for n, d in zip(names, args.steer_dict_dir)}
    extra = {k: v for k, v in (("scale", args.scale), ("image_scale", args.image_scale)) if v is not None}
    extra["steer"] = _steer_recipe(args)
    if args.object_shift is not None:
        extra["object_shift"] = _object_shift(args.object_shift)
    extra.update(extra_refs)
    result = run_concept_study(
        adapter, names, _store(args.data), out, n=args.cases, rows=rows, branch=args.branch, image_dictionaries=images,
        object_dictionaries=objects,
        window=Window.parse(args.step_window) if args.step_window else None, **extra,
        steps=args.steps, guidance=args.guidance, seed=args.seed, show_progress=not getattr(args, "quiet", False),
    )
    return _report(args, result, markdown, out)


def _object_shift(text: str):
    """--object-shift 'N,SCALE' or 'off'."""
    if text.strip().lower() == "off":
        return None
    try:
        n, scale = text.split(",")
        n, scale = int(n), float(scale)
    except ValueError:
        raise DifflensError(f"--object-shift {text!r}: write N,SCALE (e.g. 8,1.5) or off") from None
    if n < 1 or scale <= 0:
        raise DifflensError(f"--object-shift {text!r}: N must be >= 1 and SCALE > 0")
    return (n, scale)


def _steer_recipe(args: argparse.Namespace):
    """The colour-steer row's settings from --steer-* (unset ones keep `SteerRecipe`'s defaults)."""
    from difflens.intervene.region import Window
    from difflens.intervene.study_concept_steer import SteerRecipe

    given = {"scale": args.steer_scale, "mode": args.steer_mode, "image_scale": args.steer_image_scale, "tokens": args.steer_tokens,
             "branch": args.steer_branch, "n_features": args.steer_features,
             "window": Window.parse(args.steer_window, steps_flag="--steer-window") if args.steer_window else None}
    if given["image_scale"] and not args.image_dict_dir:
        raise DifflensError("--steer-image-scale adds image-stream features: give --image-dict (one per --dict)")
    return SteerRecipe(**{k: v for k, v in given.items() if v is not None})


def _report(args: argparse.Namespace, result: dict, to_markdown, out: Path) -> int:
    """A study's result on stdout (JSON with --json, else its markdown table) and where it was written."""
    if args.json:
        emit_json(result)
    else:
        print(to_markdown(result))
    say(args, f"wrote {out.resolve()}")
    return 0
