"""`difflens demo` (what `make demo` runs): the whole pipeline on the embedded toy model.

Each stage adds itself here as it lands; the demo ends with a summary and the output path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from difflens.utils import atomic_write_text, save_image

DEMO_PROMPTS = [
    "a small red circle in the top left on a black plain background",
    "a large blue square in the center on a gray plain background",
    "a large yellow triangle in the bottom right on a navy stripes background",
    "a small green seven in the top right on a black dots background",
    "a large white three in the bottom left on a navy plain background",
    "a large magenta circle in the center on a gray stripes background",
    "a small cyan two in the bottom right and a large red square in the top left on a black plain background",
    "a large green triangle in the top right and a small yellow five in the bottom left on a gray dots background",
]


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on the embedded toy model")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.set_defaults(func=run)


def stage_generate(out: Path, summary: dict) -> None:
    from difflens.models.toy.adapter import ToyAdapter
    from difflens.viz import labelled_grid
    from difflens.world.classifier import adherence

    adapter = ToyAdapter.load()
    seeds = list(range(len(DEMO_PROMPTS)))
    gen = adapter.generate(DEMO_PROMPTS, seeds)
    path = out / "generate" / "grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(path, labelled_grid(list(gen.images), DEMO_PROMPTS, cols=4, label_lines=5))
    acc = adherence(DEMO_PROMPTS, gen.images)
    summary["generate"] = {
        "grid": str(path),
        "prompt_adherence (classifier)": {k: round(v, 3) for k, v in acc["accuracy"].items() if v is not None},
    }


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    t0 = time.time()
    for name, stage in [("generate", stage_generate)]:
        t = time.time()
        print(f"== demo: {name}", flush=True)
        stage(out, summary)
        summary.setdefault("seconds", {})[name] = round(time.time() - t, 1)
    summary["seconds"]["total"] = round(time.time() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"demo outputs: {out.resolve()}")
    return 0
