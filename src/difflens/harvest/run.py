"""The harvest loop: prompts x seeds in units of `batch_size` samples, recorded into a store.

Units are numbered deterministically, so `--resume` skips committed ones and an interrupted
harvest (kill -9 included) ends with no duplicated and no missing rows. Under torchrun, rank r
takes units r, r + world, ...; rank 0 finalises the manifest after a barrier.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflens.errors import DifflensError
from difflens.harvest.config import HarvestConfig
from difflens.harvest.record import UnitRecorder
from difflens.hooks import HookSet, Site
from difflens.utils import progress


@dataclass
class Sample:
    sample_id: int
    prompt_id: int
    prompt: str
    seed: int
    scene: object | None = None  # the toy world's reference scene, when known


def world_prompts(n: int, seed: int) -> tuple[list[str], list]:
    """n fully specified prompts sampled from the toy world, with the scenes they describe."""
    from difflens.world.prompts import scene_to_prompt
    from difflens.world.scene import sample_scene

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return [scene_to_prompt(s) for s in scenes], scenes


def plan_samples(prompts: list[str], seeds: list[int], scenes: list | None, is_toy: bool) -> list[Sample]:
    out = []
    for pid, prompt in enumerate(prompts):
        for j, seed in enumerate(seeds):
            scene = scenes[pid] if scenes else None
            if scene is None and is_toy:
                scene = _scene_for_prompt(prompt, seed)
            out.append(Sample(pid * len(seeds) + j, pid, prompt, int(seed), scene))
    return out


def _scene_for_prompt(prompt: str, seed: int):
    """A reference scene consistent with a toy-world prompt (unspecified factors drawn from the seed)."""
    from difflens.world.prompts import parse_prompt
    from difflens.world.scene import sample_scene

    try:
        spec = parse_prompt(prompt)
    except DifflensError:
        return None
    return sample_scene(np.random.default_rng(seed), spec)


def _png(img) -> bytes:
    from PIL import Image

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
    from difflens.models import load_adapter
    from difflens.store import StoreWriter

    cfg.validate()
    rank, world = _dist_info()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    adapter = adapter or load_adapter(cfg.model, dtype=cfg.model_dtype)
    is_toy = adapter.name == "toy"
    sites = [Site.parse(s) for s in cfg.sites]
    dims = {str(s): adapter.site_dim(s) for s in sites}
    out = Path(out)
    # Every rank checks before any rank creates the store (else late ranks see rank 0's fresh
    # manifest and refuse), and nobody writes until all have opened it (opening cleans temp files).
    _barrier(world)
    writer = StoreWriter.open(out, model=adapter.model_id, sites=dims, dtype=cfg.dtype, harvest_config=cfg.to_json(), append=append, resume=resume)
    _barrier(world)
    done = writer.done_units()

    samples = plan_samples(prompts, cfg.seeds, scenes, is_toy)
    for s in samples:  # an appended configuration's samples follow the store's existing ones
        s.sample_id += writer.first_sample_id
    units = [samples[i : i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
    mine = [(u, batch) for u, batch in enumerate(units) if u % world == rank and writer.unit_id(u) not in done]
    text_tok = getattr(getattr(adapter, "model", None), "tokenizer", None)

    rows_written = 0
    t0 = time.time()
    bar = progress(total=sum(len(b) for _, b in mine), desc=f"harvest{f' rank {rank}' if world > 1 else ''}", unit="img")
    for n_units, (u, batch) in enumerate(mine):
        if stop_after_units is not None and n_units >= stop_after_units:
            break
        token_labels, text_labels, records = _labels_and_records(batch, is_toy, text_tok)
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
        hooks = HookSet()
        for s in sites:
            hooks.add(s, rec.hook_for(s))
        gen = adapter.generate([s.prompt for s in batch], [s.seed for s in batch], steps=cfg.steps, guidance=cfg.guidance, hooks=hooks,
                               **_size_kwargs(cfg))
        if is_toy:
            _add_readings(records, gen.images)
        images = {s.sample_id: _png(img) for s, img in zip(batch, gen.images)}
        rows = rec.rows()
        writer.write_unit(writer.unit_id(u), rows, samples=records, images=images)
        rows_written += sum(a.shape[0] for a, _ in rows.values())
        bar.update(len(batch))
        bar.set_postfix(rows=rows_written, img_s=f"{bar.n / max(time.time() - t0, 1e-9):.2f}")
    bar.close()
    _barrier(world)
    manifest = writer.finalize() if rank == 0 else None
    return {
        "store": str(out),
        "rank": rank,
        "units_written": min(len(mine), stop_after_units) if stop_after_units is not None else len(mine),
        "rows_written": rows_written,
        "seconds": time.time() - t0,
        "manifest": manifest,
    }


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _labels_and_records(batch: list[Sample], is_toy: bool, tokenizer):
    records = []
    token_labels: dict[int, np.ndarray] | None = {} if is_toy else None
    text_labels: dict[int, np.ndarray] | None = {} if is_toy and tokenizer is not None else None
    for s in batch:
        rec = {"sample_id": s.sample_id, "prompt_id": s.prompt_id, "prompt": s.prompt, "seed": s.seed}
        if is_toy and s.scene is not None:
            from difflens.world.labels import image_concepts, token_label_masks
            from difflens.world.scene import render

            r = render(s.scene)
            labels = token_label_masks(r)
            token_labels[s.sample_id] = labels
            rec["scene"] = s.scene.to_dict()
            rec["concepts"] = image_concepts(r)
            rec["token_labels"] = [int(x) for x in labels]
            if text_labels is not None:
                text_labels[s.sample_id] = text_token_labels(s.prompt, tokenizer)
        records.append(rec)
    return token_labels, text_labels, records


def text_token_labels(prompt: str, tokenizer) -> np.ndarray:
    """Per text token, the concept its word names (a colour word -> color=red, ...); 0 otherwise."""
    from difflens.world import vocab as V
    from difflens.world.labels import concepts_to_mask

    ids, _ = tokenizer([prompt])
    words = tokenizer.words(ids[0])
    out = np.zeros(len(words), np.int64)
    for i, w in enumerate(words):
        concept = None
        for f in ("color", "object", "size", "bgcolor", "bg"):
            if w in V.FACTORS[f]:
                concept = f"{f}={w}"
                break
        if concept is None and w in ("top", "bottom", "left", "right", "center"):
            nxt = words[i + 1] if i + 1 < len(words) else ""
            prv = words[i - 1] if i > 0 else ""
            for pos in V.POSITIONS:
                if pos in (f"{w} {nxt}", f"{prv} {w}", w):
                    concept = f"position={pos}"
                    break
        if concept:
            out[i] = concepts_to_mask([concept])
    return out


def _add_readings(records: list[dict], images) -> None:
    """The classifier's reading of each generated image, so later stages can trust labels per sample."""
    from difflens.world.classifier import adherence, classify

    readings = classify(images)
    scored = [i for i, r in enumerate(records) if "scene" in r]
    per_prompt = adherence([records[i]["prompt"] for i in scored], images[scored])["per_prompt"] if scored else []
    for rec, reading in zip(records, readings):
        rec["reading"] = {k: reading[k] for k in ("main", "bgcolor", "bg") if k in reading}
    for i, scores in zip(scored, per_prompt):
        records[i]["adherent"] = bool(scores.get("prompt", 0.0) == 1.0)


def _size_kwargs(cfg) -> dict:
    """--height/--width reach generate() only when set (the toy adapter has one size)."""
    h, w = getattr(cfg, "height", None), getattr(cfg, "width", None)
    return {"height": h, "width": w} if (h or w) else {}
