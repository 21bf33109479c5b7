"""`difflens generate` and `difflens zoo`: make images, and train/evaluate the shipped toy models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from difflens.cli_options import (
    add_generation_options,
    add_json_option,
    add_model_options,
    add_out_option,
    add_seed_option,
    add_steps_option,
    emit_json,
    generation_kwargs,
    load_model,
    out_dir,
    out_file,
    parse_int_list,
    say,
)
from difflens.errors import DifflensError


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate images from prompts (toy model by default)",
                       description="Generate one image per prompt. Each image gets a JSON sidecar (same name, .json) "
                       "with its prompt, seed and settings. --out FILE.png writes one image (or the --grid); "
                       "--out DIR writes DIR/000.png, DIR/001.png, ... when there are several prompts.")
    add_model_options(g)
    add_generation_options(g)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    g.add_argument("--seed", action="append", help="noise seed(s): repeat, or a comma list, to match the prompts "
                   "(one seed applies to every prompt; default 0,1,...)")
    g.add_argument("--grid", action="store_true", help="write one labelled grid instead of one file per prompt")
    g.add_argument("--batch-size", type=int, default=8, help="images per model call (default 8)")
    add_out_option(g, kind="file-or-dir", help="FILE.png (one prompt, or --grid) or a folder (one PNG per prompt)")
    add_json_option(g)
    g.set_defaults(func=run_generate)

    z = sub.add_parser("zoo", help="train or evaluate the shipped toy models (text-to-image, classifier)")
    zsub = z.add_subparsers(dest="zoo_verb", metavar="<action>")
    t = zsub.add_parser("train", help="train a zoo model from scratch")
    t.add_argument("what", choices=["toy", "classifier"])
    add_out_option(t, kind="dir", required=False, help="output folder (default runs/zoo/<what>)")
    t.add_argument("--train-steps", type=int, default=None, help="optimizer steps (toy; default from ToyTrainConfig)")
    t.add_argument("--aux-object-weight", type=float, default=None,
                   help="toy: weight of the auxiliary per-token object loss (default from ToyTrainConfig; 0 turns it off)")
    t.add_argument("--object-pixel-weight", type=float, default=None,
                   help="toy: extra flow-loss weight on object pixels (default from ToyTrainConfig; 0 turns it off)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--ship", action="store_true", help="also install the result as the package's bundled weights")
    t.set_defaults(func=run_zoo_train)
    e = zsub.add_parser("eval", help="measure the toy model's prompt adherence with the factor classifier")
    e.add_argument("--model", default=None, help="toy model folder (default: the bundled weights)")
    e.add_argument("--n", type=int, default=200, help="prompts per form (single-object, two-object)")
    add_steps_option(e, help="denoising steps (default: the model's, 12)")
    e.add_argument("--guidance", type=float, default=None)
    add_seed_option(e, default=10_000, help="first seed (held out from training's seeds)")
    add_out_option(e, kind="dir", required=False, help="folder for the JSON report and sample grids")
    e.set_defaults(func=run_zoo_eval)
    z.set_defaults(func=lambda a: z.print_help() or 2)


def _seeds(values: list[str] | None, n: int) -> list[int]:
    if not values:
        return list(range(n))
    seeds = [v for text in values for v in parse_int_list(text, "--seed")]
    if len(seeds) == 1 and n > 1:
        seeds = seeds * n
    if len(seeds) != n:
        raise DifflensError(f"{n} prompts but {len(seeds)} seeds; give one --seed per --prompt, or one for all")
    return seeds


def _targets(out: str, n: int, grid: bool) -> tuple[Path | None, Path | None]:
    """(file, folder): one image or grid goes to FILE.png, several images into a folder."""
    path = Path(out)
    if path.suffix.lower() == ".png":
        if n > 1 and not grid:
            raise DifflensError(f"--out {out} is one file but there are {n} prompts: add --grid, or pass a folder "
                                "to get one PNG per prompt")
        out_file(path, ".png")
        if not path.parent.exists():
            raise DifflensError(f"folder {path.parent} does not exist; create it or choose another --out")
        return path, None
    if path.suffix:
        raise DifflensError(f"--out {out!r}: give FILE.png for one image or a grid, or a folder for one PNG per prompt")
    if n == 1 and not grid:
        raise DifflensError(f"--out {out!r} is a folder but there is one prompt: give a file name ending in .png")
    if grid:
        raise DifflensError(f"--grid writes one image: give --out a file name ending in .png, not {out!r}")
    return None, out_dir(path, kind="generate")


def run_generate(args) -> int:
    from difflens.generation import generate_batched, requests_of
    from difflens.utils import progress, save_image, write_json
    from difflens.viz import labelled_grid

    prompts = args.prompt
    seeds = _seeds(args.seed, len(prompts))
    if args.batch_size < 1:
        raise DifflensError(f"--batch-size must be >= 1, got {args.batch_size}")
    gk = generation_kwargs(args)
    file, folder = _targets(args.out, len(prompts), args.grid)
    adapter = load_model(args)
    images, timesteps = [], []
    bar = progress(total=len(prompts), desc="generate", unit="img")
    for b in generate_batched(adapter, requests_of(prompts, seeds), batch_size=args.batch_size, **gk):
        images.extend(b.generation.images)
        timesteps = b.generation.timesteps
        bar.update(len(b.generation.images))
    bar.close()
    settings = {
        "model": args.model, "model_id": adapter.model_id, "steps": len(timesteps),
        "guidance": args.guidance, "height": int(images[0].shape[0]), "width": int(images[0].shape[1]),
        "model_dtype": args.model_dtype, "device": args.device, "quantize": args.quantize,
        "max_text_length": args.max_text_length, "timesteps": [float(t) for t in timesteps],
    }
    written = []
    if file is not None:
        if args.grid:
            labels = [f"{p} (seed {s})" for p, s in zip(prompts, seeds)]
            save_image(file, labelled_grid(images, labels))
            meta = {"prompts": prompts, "seeds": seeds, **settings}
        else:
            save_image(file, images[0])
            meta = {"prompt": prompts[0], "seed": seeds[0], **settings}
        write_json(file.with_suffix(".json"), meta)
        written.append(str(file))
    else:
        from difflens.outdir import claim_out_dir

        claim_out_dir(folder, "generate")
        for i, (img, p, s) in enumerate(zip(images, prompts, seeds)):
            path = folder / f"{i:03d}.png"
            save_image(path, img)
            write_json(path.with_suffix(".json"), {"prompt": p, "seed": s, **settings})
            written.append(str(path))
    if args.json:
        emit_json({"images": written, **settings})
    for w in written:
        say(args, f"wrote {w} (+ .json)")
    return 0


def run_zoo_train(args) -> int:
    if args.what == "toy":
        from dataclasses import replace

        from difflens.models.toy.model import ASSET_DIR
        from difflens.models.toy.train import ToyTrainConfig, train_toy

        cfg = ToyTrainConfig()
        if args.train_steps is not None:
            if args.train_steps < 1:
                raise DifflensError(f"--train-steps must be >= 1, got {args.train_steps}")
            cfg = replace(cfg, steps=args.train_steps)
        if args.aux_object_weight is not None:
            if args.aux_object_weight < 0:
                raise DifflensError(f"--aux-object-weight must be >= 0, got {args.aux_object_weight}")
            cfg = replace(cfg, aux_object_weight=args.aux_object_weight)
        if args.object_pixel_weight is not None:
            if args.object_pixel_weight < 0:
                raise DifflensError(f"--object-pixel-weight must be >= 0, got {args.object_pixel_weight}")
            cfg = replace(cfg, object_pixel_weight=args.object_pixel_weight)
        out = Path(args.out or "runs/zoo/toy")
        train_toy(out, cfg, resume=args.resume)
        target = ASSET_DIR
        files = ["model.safetensors", "config.json", "train_info.json"]
    else:
        from difflens.world.classifier import default_folder
        from difflens.world.classifier_train import train_classifier

        target = default_folder()

        out = Path(args.out or "runs/zoo/classifier")
        train_classifier(out)
        files = [p.name for p in out.iterdir() if p.is_file()]
    if args.ship:
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            if (out / f).exists():
                shutil.copy2(out / f, target / f)
        say(args, f"installed {args.what} weights into {target}")
    say(args, f"trained {args.what}: {out}")
    return 0


def run_zoo_eval(args) -> int:
    from difflens.models.toy.quality import evaluate_adherence

    if args.n < 1:
        raise DifflensError(f"--n must be >= 1, got {args.n}")
    report = evaluate_adherence(args.model, n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed, out=args.out)
    print(json.dumps(report["table"], indent=2))
    return 0
