"""Harvest overhead on the toy model: time(generation + recording to disk) / time(plain generation).

Run: .venv/bin/python bench/harvest.py [--prompts 64] [--batch 32]
Prints a markdown table; all rows are measured in the same run (best of --repeats).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("DIFFLENS_QUIET", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from difflens.harvest import HarvestConfig, harvest
    from difflens.world.prompts import world_prompts
    from difflens.models.toy.adapter import ToyAdapter

    adapter = ToyAdapter.load()
    prompts, scenes = world_prompts(args.prompts, seed=1)
    seeds = list(range(args.prompts))

    def plain() -> float:
        t = time.perf_counter()
        for i in range(0, len(prompts), args.batch):
            adapter.generate(prompts[i : i + args.batch], seeds[i : i + args.batch], steps=args.steps)
        return time.perf_counter() - t

    def recorded(sites: list[str], tokens: int | None) -> tuple[float, int]:
        root = tempfile.mkdtemp(prefix="bench_harvest_")
        try:
            cfg = HarvestConfig(sites=sites, steps=args.steps, batch_size=args.batch, seeds=[0], tokens_per_image=tokens, dtype="bf16")
            t = time.perf_counter()
            out = harvest(os.path.join(root, "s"), cfg, prompts, scenes=scenes, adapter=adapter)
            return time.perf_counter() - t, out["rows_written"]
        finally:
            shutil.rmtree(root, ignore_errors=True)

    blocks = [s for s in adapter.sites() if s.endswith(":img") and ".ff." not in s and "act_mlp" not in s]
    cases = [
        ("one site, 64 tokens/image", [adapter.default_site()], 64),
        ("one site, all tokens", [adapter.default_site()], None),
        (f"all {len(blocks)} block outputs (img), all tokens", blocks, None),
    ]
    plain()  # warm-up
    base = min(plain() for _ in range(args.repeats))
    print(f"plain generation: {args.prompts} images x {args.steps} steps in {base:.2f} s\n")
    print("| recording | rows written | seconds | overhead vs plain |")
    print("|---|---|---|---|")
    for name, sites, tokens in cases:
        best, rows = min(recorded(sites, tokens) for _ in range(args.repeats))
        print(f"| {name} | {rows:,} | {best:.2f} | {best / base:.2f}x |")


if __name__ == "__main__":
    main()
