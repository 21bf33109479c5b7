"""`difflens generate` and `difflens zoo`: make images, and train/evaluate the shipped toy models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from difflens.errors import DifflensError


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate images from prompts (toy model by default)")
    g.add_argument("--model", default="toy", help="'toy', a local diffusers folder or a hub id")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    g.add_argument("--seed", type=int, action="append", help="seed (repeat to match prompts; default 0,1,...)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (model default when omitted)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (model default when omitted)")
    g.add_argument("--grid", action="store_true", help="write one labelled grid instead of one file per prompt")
    g.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    g.add_argument("--device", default="cpu")
    g.add_argument("--out", required=True, help="output PNG path")
    g.set_defaults(func=run_generate)

    z = sub.add_parser("zoo", help="train or evaluate the shipped toy models (text-to-image, classifier)")
    zsub = z.add_subparsers(dest="zoo_verb", metavar="<action>")
    t = zsub.add_parser("train", help="train a zoo model from scratch")
    t.add_argument("what", choices=["toy", "classifier"])
    t.add_argument("--out", default=None, help="output folder (default runs/zoo/<what>)")
    t.add_argument("--steps", type=int, default=None, help="training steps (toy; default from ToyTrainConfig)")
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
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--seed", type=int, default=10_000, help="first seed (held out from training's seeds)")
    e.add_argument("--out", default=None, help="write the JSON report and a sample grid here")
    e.set_defaults(func=run_zoo_eval)
    z.set_defaults(func=lambda a: z.print_help() or 2)


def _out_path(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise DifflensError(f"--out {path!r} must end in .png")
    if out.parent and not out.parent.exists():
        raise DifflensError(f"folder {out.parent} does not exist; create it or choose another --out")
    return out


def run_generate(args) -> int:
    from difflens.models import load_adapter
    from difflens.utils import save_image
    from difflens.viz import labelled_grid

    out = _out_path(args.out)
    prompts = args.prompt
    seeds = args.seed or list(range(len(prompts)))
    if len(seeds) == 1 and len(prompts) > 1:
        seeds = seeds * len(prompts)
    if len(seeds) != len(prompts):
        raise DifflensError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one --seed per --prompt, or one for all")
    if any(s < 0 for s in seeds):
        raise DifflensError(f"seeds must be >= 0, got {seeds}")
    if args.steps is not None and args.steps < 1:
        raise DifflensError(f"--steps must be >= 1, got {args.steps}")
    adapter = load_adapter(args.model, dtype=args.dtype, device=args.device)
    gen = adapter.generate(prompts, seeds, steps=args.steps, guidance=args.guidance)
    if args.grid or len(prompts) == 1:
        if len(prompts) == 1 and not args.grid:
            save_image(out, gen.images[0])
        else:
            labels = [f"{p} (seed {s})" for p, s in zip(prompts, seeds)]
            save_image(out, labelled_grid(list(gen.images), labels, scale=4 if gen.images.shape[1] <= 64 else 1))
        print(out)
    else:
        for i, img in enumerate(gen.images):
            p = out.with_name(f"{out.stem}_{i}{out.suffix}")
            save_image(p, img)
            print(p)
    return 0


def run_zoo_train(args) -> int:
    if args.what == "toy":
        from dataclasses import replace

        from difflens.models.toy.model import ASSET_DIR
        from difflens.models.toy.train import ToyTrainConfig, train_toy

        cfg = ToyTrainConfig()
        if args.steps is not None:
            if args.steps < 1:
                raise DifflensError(f"--steps must be >= 1, got {args.steps}")
            cfg = replace(cfg, steps=args.steps)
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
        from difflens.world.classifier import default_folder, train_classifier

        target = default_folder()

        out = Path(args.out or "runs/zoo/classifier")
        train_classifier(out)
        files = [p.name for p in out.iterdir() if p.is_file()]
    if args.ship:
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            if (out / f).exists():
                shutil.copy2(out / f, target / f)
        print(f"installed {args.what} weights into {target}")
    print(f"trained {args.what}: {out}")
    return 0


def run_zoo_eval(args) -> int:
    from difflens.models.toy.quality import evaluate_adherence

    if args.n < 1:
        raise DifflensError(f"--n must be >= 1, got {args.n}")
    report = evaluate_adherence(args.model, n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed, out=args.out)
    print(json.dumps(report["table"], indent=2))
    return 0
