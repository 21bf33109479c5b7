"""Harvest overhead on the toy model: time(generation + recording to disk) / time(plain generation).

Run: .venv/bin/python bench/harvest.py [--prompts 32] [--batch 16] [--repeats 3]
Prints a markdown table. Each repeat runs plain generation and then every case once, so slow
phases of a shared machine hit all rows alike; each row reports its best repeat. Every case runs
with the synchronous writer (write queue 0) and with the background writer (queue 2).
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
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queues", default="0,2", help="write queue sizes to compare (0 = synchronous)")
    ap.add_argument("--dir", default=None, help="folder for the temporary stores (default: the system temp dir)")
    args = ap.parse_args()

    from difflens.harvest import HarvestConfig, harvest
    from difflens.models.toy.adapter import ToyAdapter
    from difflens.world.prompts import world_prompts

    adapter = ToyAdapter.load()
    prompts, scenes = world_prompts(args.prompts, seed=1)
    seeds = list(range(args.prompts))

    def plain() -> float:
        t = time.perf_counter()
        for i in range(0, len(prompts), args.batch):
            adapter.generate(prompts[i : i + args.batch], seeds[i : i + args.batch], steps=args.steps)
        return time.perf_counter() - t

    def recorded(sites: list[str], tokens: int | None, queue: int) -> dict:
        root = tempfile.mkdtemp(prefix="bench_harvest_", dir=args.dir)
        try:
            cfg = HarvestConfig(sites=sites, steps=args.steps, batch_size=args.batch, seeds=[0], tokens_per_image=tokens,
                                dtype="bf16")
            t = time.perf_counter()
            out = harvest(os.path.join(root, "s"), cfg, prompts, scenes=scenes, adapter=adapter, write_queue=queue)
            out["total"] = time.perf_counter() - t
            return out
        finally:
            shutil.rmtree(root, ignore_errors=True)

    blocks = [s for s in adapter.sites() if s.endswith(":img") and ".ff." not in s and "act_mlp" not in s]
    cases = [
        ("one site, 64 tokens/image", [adapter.default_site()], 64),
        ("one site, all tokens", [adapter.default_site()], None),
        (f"all {len(blocks)} block outputs (img), all tokens", blocks, None),
    ]
    queues = [int(q) for q in args.queues.split(",")]
    plain()  # warm-up
    bases: list[float] = []
    runs: dict[tuple[int, int], list[dict]] = {}
    for _ in range(args.repeats):
        bases.append(plain())
        for c, (_, sites, tokens) in enumerate(cases):
            for q in queues:
                runs.setdefault((c, q), []).append(recorded(sites, tokens, q))
    base = min(bases)
    print(f"plain generation: {args.prompts} images x {args.steps} steps, best of {args.repeats}: {base:.2f} s "
          f"(all repeats: {', '.join(f'{b:.2f}' for b in bases)})\n")
    print("| recording | writer | rows | shard MB | seconds | overhead vs plain | writer busy s | writer MB/s | "
          "generation blocked s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, (name, _, _) in enumerate(cases):
        for q in queues:
            best = min(runs[(c, q)], key=lambda r: r["total"])
            mb = best["bytes_written"] / 1e6
            kind = "synchronous" if q == 0 else f"background (queue {q})"
            print(f"| {name} | {kind} | {best['rows_written']:,} | {mb:.1f} | {best['total']:.2f} | "
                  f"{best['total'] / base:.2f}x | {best['write_seconds']:.2f} | {mb / max(best['write_seconds'], 1e-9):.0f} | "
                  f"{best['write_wait_seconds']:.2f} |")


if __name__ == "__main__":
    main()
