"""The harvest loop: prompts x seeds in units of `batch_size` samples, recorded into a store.

Units are numbered deterministically, so `--resume` skips committed ones and an interrupted
harvest (kill -9 included) ends with no duplicated and no missing rows. Under torchrun, rank r
takes units r, r + world, ...; rank 0 finalises the manifest after a barrier.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from difflens.errors import DifflensError
from difflens.generation import GenerationPlan, generate_batched
from difflens.groundtruth import GroundTruth, ground_truth_of
from difflens.harvest.config import HarvestConfig
from difflens.harvest.record import UnitRecorder
from difflens.hooks import HookSet, Site
from difflens.models import load_adapter
from difflens.store import StoreWriter
from difflens.utils import progress


@dataclass
class Sample:
    sample_id: int
    prompt_id: int
    prompt: str
    seed: int
    scene: object | None = None  # the ground-truth world's reference scene, when known


def plan_samples(prompts: list[str], seeds: list[int], scenes: list | None, ground_truth: GroundTruth | None) -> list[Sample]:
    """Every prompt with every seed; with ground truth, each sample's reference scene (the given
    one, else one consistent with the prompt and drawn from the seed)."""
    out = []
    for pid, prompt in enumerate(prompts):
        for j, seed in enumerate(seeds):
            scene = scenes[pid] if scenes else None
            if scene is None and ground_truth is not None:
                scene = ground_truth.scene_for(prompt, seed)
            out.append(Sample(pid * len(seeds) + j, pid, prompt, int(seed), scene))
    return out


def _png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def harvest(
    out: str | Path,
    cfg: HarvestConfig,
    prompts: list[str],
    *,
    scenes: list | None = None,
    adapter=None,
    resume: bool = False,
    append: bool = False,
    stop_after_units: int | None = None,
) -> dict:
    """Run the harvest; returns a summary. `stop_after_units` exists for crash/resume tests."""
    cfg.validate()
    rank, world = _dist_info()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    adapter = adapter or load_adapter(cfg.model, dtype=cfg.model_dtype)
    if cfg.steps is None:
        cfg = dataclasses.replace(cfg, steps=adapter.default_steps)
        cfg.validate()
    truth = ground_truth_of(adapter)
    sites = [Site.parse(s) for s in cfg.sites]
    dims = {str(s): adapter.site_dim(s) for s in sites}
    out = Path(out)
    # Every rank checks before any rank creates the store (else late ranks see rank 0's fresh
    # manifest and refuse), and nobody writes until all have opened it (opening cleans temp files).
    _barrier(world)
    writer = StoreWriter.open(out, model=adapter.model_id, sites=dims, dtype=cfg.dtype, harvest_config=cfg.to_json(), append=append, resume=resume)
    _barrier(world)
    done = writer.done_units()

    samples = plan_samples(prompts, cfg.seeds, scenes, truth)
    for s in samples:  # an appended configuration's samples follow the store's existing ones
        s.sample_id += writer.first_sample_id
    n_units = -(-len(samples) // cfg.batch_size)
    mine = [u for u in range(n_units) if u % world == rank and writer.unit_id(u) not in done]
    if stop_after_units is not None:
        mine = mine[: max(stop_after_units, 0)]
    todo = set(mine)
    text_tok = getattr(getattr(adapter, "model", None), "tokenizer", None)
    units: dict[int, tuple[UnitRecorder, list[dict]]] = {}

    def unit_hooks(plan: GenerationPlan) -> HookSet:
        """The recorder of the unit about to run, with the ground truth's labels of its samples."""
        u = plan.batch_index
        batch = samples[u * cfg.batch_size : (u + 1) * cfg.batch_size]
        token_labels, text_labels, records = labels_and_records(batch, truth, text_tok)
        rec = UnitRecorder(
            sample_ids=np.array([s.sample_id for s in batch]),
            prompt_ids=np.array([s.prompt_id for s in batch]),
            seeds=np.array([s.seed for s in batch]),
            keep=cfg.tokens_kept,
            record_steps=set(cfg.record_steps) if cfg.record_steps is not None else None,
            cond_only=cfg.cond_only,
            token_seed=cfg.token_seed,
            token_labels=token_labels,
            text_labels=text_labels,
        )
        units[u] = (rec, records)
        return HookSet([(s, rec.hook_for(s)) for s in sites])

    rows_written = 0
    t0 = time.time()
    bar = progress(total=sum(len(samples[u * cfg.batch_size : (u + 1) * cfg.batch_size]) for u in mine),
                   desc=f"harvest{f' rank {rank}' if world > 1 else ''}", unit="img")
    if mine:
        for b in generate_batched(adapter, samples, unit_hooks, steps=cfg.steps, guidance=cfg.guidance,
                                  batch_size=cfg.batch_size, height=cfg.height, width=cfg.width, only=todo.__contains__):
            rec, records = units.pop(b.index)
            if truth is not None:
                _add_readings(records, b.generation.images, truth)
            images = {s.sample_id: _png(img) for s, img in zip(b.requests, b.generation.images)}
            rows = rec.rows()
            writer.write_unit(writer.unit_id(b.index), rows, samples=records, images=images)
            rows_written += sum(a.shape[0] for a, _ in rows.values())
            bar.update(len(b.requests))
            bar.set_postfix(rows=rows_written, img_s=f"{bar.n / max(time.time() - t0, 1e-9):.2f}")
    bar.close()
    _barrier(world)
    manifest = writer.finalize() if rank == 0 else None
    return {
        "store": str(out),
        "rank": rank,
        "units_written": len(mine),
        "rows_written": rows_written,
        "seconds": time.time() - t0,
        "manifest": manifest,
    }


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def labels_and_records(batch: list[Sample], truth: GroundTruth | None, tokenizer):
    """Each sample's record; with ground truth also its scene's fields and per-token labels."""
    records = []
    token_labels: dict[int, np.ndarray] | None = {} if truth is not None else None
    text_labels: dict[int, np.ndarray] | None = {} if truth is not None and tokenizer is not None else None
    for s in batch:
        rec = {"sample_id": s.sample_id, "prompt_id": s.prompt_id, "prompt": s.prompt, "seed": s.seed}
        if truth is not None and s.scene is not None:
            fields, labels = truth.label_scene(s.scene)
            token_labels[s.sample_id] = labels
            rec.update(fields)
            if text_labels is not None:
                text_labels[s.sample_id] = truth.text_labels(s.prompt, tokenizer)
        records.append(rec)
    return token_labels, text_labels, records


def _add_readings(records: list[dict], images, truth: GroundTruth) -> None:
    """The ground truth's reading of each generated image, so later stages can trust labels per sample."""
    readings = truth.read_images(images)
    scored = [i for i, r in enumerate(records) if "scene" in r]
    per_prompt = truth.adherence([records[i]["prompt"] for i in scored], images[scored])["per_prompt"] if scored else []
    for rec, reading in zip(records, readings):
        rec["reading"] = reading
    for i, scores in zip(scored, per_prompt):
        records[i]["adherent"] = bool(scores.get("prompt", 0.0) == 1.0)
