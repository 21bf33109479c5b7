"""`difflens world sample`: write scenes with their factors, masks and token labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from difflens.cli_options import add_out_option, add_seed_option, say
from difflens.errors import DifflensError
from difflens.utils import atomic_write_text, progress, save_image


def register(sub) -> None:
    p = sub.add_parser("world", help="the procedural toy world (scenes, prompts, masks)")
    wsub = p.add_subparsers(dest="world_verb", metavar="<action>")
    s = wsub.add_parser("sample", help="write N scenes as PNG + JSON (factors, prompt, masks, token labels)")
    s.add_argument("--n", type=int, required=True, help="number of scenes")
    add_out_option(s, kind="dir")
    add_seed_option(s)
    s.add_argument("--prompt", default=None, help="constrain scenes to a (partial) prompt")
    s.set_defaults(func=run_sample)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def write_scenes(out: str | Path, n: int, seed: int = 0, prompt: str | None = None) -> list[Path]:
    from difflens.world.labels import image_concepts, token_label_masks, token_owner
    from difflens.world.prompts import parse_prompt, scene_to_prompt
    from difflens.world.scene import render, sample_scene

    if n < 1:
        raise DifflensError(f"--n must be >= 1, got {n}")
    if seed < 0:
        raise DifflensError(f"--seed must be >= 0, got {seed}")
    spec = parse_prompt(prompt) if prompt else None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DifflensError(f"--out {out} exists and is not a folder; choose a folder path")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in progress(range(n), desc="scenes"):
        scene = sample_scene(rng, spec)
        r = render(scene)
        stem = out / f"scene_{i:05d}"
        save_image(stem.with_suffix(".png"), r.image)
        record = {
            "index": i,
            "seed": seed,
            "prompt": scene_to_prompt(scene),
            "scene": scene.to_dict(),
            "concepts": image_concepts(r),
            "token_owner": token_owner(r).tolist(),  # 16x16: object index or -1 (background)
            "token_labels": [int(m) for m in token_label_masks(r)],  # bitmask over CONCEPTS
            "object_masks": [np.packbits(m).tolist() for m in r.object_masks],  # packed 32x32 bools
        }
        atomic_write_text(stem.with_suffix(".json"), json.dumps(record) + "\n")
        paths.append(stem.with_suffix(".png"))
    from difflens.world.vocab import CONCEPTS

    atomic_write_text(out / "concepts.json", json.dumps(list(CONCEPTS), indent=1) + "\n")
    return paths


def run_sample(args) -> int:
    paths = write_scenes(args.out, args.n, args.seed, args.prompt)
    say(args, f"wrote {len(paths)} scenes to {args.out}")
    return 0
