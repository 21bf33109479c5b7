"""Prompt adherence of the toy model, read by the factor classifier on held-out seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from difflens.generation import generate_batched, requests_of
from difflens.models.toy.adapter import ToyAdapter
from difflens.utils import atomic_write_text, progress, save_image
from difflens.viz import labelled_grid
from difflens.world.prompts import scene_to_prompt
from difflens.world.scene import sample_scene


def adherence_prompts(n: int, *, objects: int, seed: int) -> list[str]:
    """Fully specified prompts of a given form, from a seed disjoint from training's (seed 0)."""
    rng = np.random.default_rng(seed)
    return [scene_to_prompt(sample_scene(rng, two_object_prob=1.0 if objects == 2 else 0.0)) for _ in range(n)]


def evaluate_adherence(
    model_folder: str | None = None,
    *,
    n: int = 200,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 10_000,
    batch_size: int = 50,
    out: str | Path | None = None,
) -> dict:
    """Generate n single-object and n two-object prompts and score them with the classifier."""
    adapter = ToyAdapter.load(folder=model_folder)
    truth = adapter.ground_truth()
    report: dict = {"n": n, "steps": steps or adapter.default_steps,
                    "guidance": guidance if guidance is not None else adapter.model.cfg.guidance_default, "seed": seed}
    table = {}
    for objects in (1, 2):
        prompts = adherence_prompts(n, objects=objects, seed=seed + objects)
        seeds = [seed + objects * 100_000 + i for i in range(n)]
        bar = progress(total=n, desc=f"adherence ({objects}-object)", unit="img")
        images = np.concatenate([
            b.generation.images
            for b in generate_batched(adapter, requests_of(prompts, seeds), steps=steps, guidance=guidance,
                                      batch_size=batch_size, on_batch=lambda b: bar.update(len(b.requests)))
        ])
        bar.close()
        res = truth.adherence(prompts, images)
        key = "single_object" if objects == 1 else "two_object"
        table[key] = {k: v for k, v in res["accuracy"].items() if v is not None}
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            k = min(24, n)
            save_image(Path(out) / f"adherence_{key}.png", labelled_grid(list(images[:k]), prompts[:k], cols=8, label_lines=4))
    report["table"] = table
    if out:
        atomic_write_text(Path(out) / "adherence.json", json.dumps(report, indent=2) + "\n")
    return report
