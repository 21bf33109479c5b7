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
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from difflens.errors import DifflensError
from difflens.generation import GenerationPlan, generate_batched
from difflens.groundtruth import GroundTruth, ground_truth_of
from difflens.harvest.config import HarvestConfig
from difflens.harvest.record import UnitRecorder
from difflens.harvest.topk_stream import topk_streams
from difflens.hooks import HookSet, Site
from difflens.models import load_adapter
from difflens.store import StoreWriter
from difflens.store.background import BackgroundWriter
from difflens.utils import progress

if TYPE_CHECKING:
    from difflens.models.base import Adapter


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
    adapter: Adapter | None = None,
    resume: bool = False,
    append: bool = False,
    stop_after_units: int | None = None,
    write_queue: int = 2,
    topk: list | None = None,
    topk_snapshot_every: int = 1,
) -> dict:
    """Run the harvest; returns a summary. `stop_after_units` exists for crash/resume tests.

    write_queue: finished units waiting for the background writer thread (PNG encoding, row
    concatenation and the store write overlap with generating the next units); 0 writes each
    unit synchronously. Either way a unit is committed whole or not at all.
    topk: [(name, feature source or dictionary folder, N)]: a streaming top-k feature cache per
    dictionary (`interpret.topk`), filled from every image token of the conditional rows at the
    recorded steps and saved to <out>/topk/<name>/; snapshotted per rank after every
    `topk_snapshot_every` committed units and at the end, so it resumes and runs under torchrun
    like the store (`harvest.topk_stream`)."""
    cfg.validate()
    if int(write_queue) < 0:
        raise DifflensError(f"--write-queue must be >= 0 (units waiting for the store writer), got {write_queue}")
    if topk and append:
        raise DifflensError("harvest --topk cannot --append: an appended configuration would mix into the cache; "
                            "harvest into a new --out")
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
    streams = topk_streams(topk, adapter, out, rank=rank, sample_ids=[s.sample_id for s in samples],
                           batch_size=cfg.batch_size, record_steps=cfg.record_steps, snapshot_every=topk_snapshot_every)
    # a unit is generated when the store lacks it, or when a top-k cache lacks it (a crash between
    # the store's commit and the cache's snapshot, or a cache added on --resume): then cache only
    mine = [u for u in range(n_units) if u % world == rank
            and (writer.unit_id(u) not in done or any(t.needs(u) for t in streams))]
    if stop_after_units is not None:
        mine = mine[: max(stop_after_units, 0)]
    todo = set(mine)
    cache_only = {u for u in mine if writer.unit_id(u) in done}
    _barrier(world)  # every rank has read the snapshots before any rank writes its own
    text_tok = adapter.text_tokenizer()
    units: dict[int, tuple[UnitRecorder, list[dict]]] = {}

    def unit_hooks(plan: GenerationPlan) -> HookSet:
        """The recorder of the unit about to run, with the ground truth's labels of its samples."""
        u = plan.batch_index
        live = [t for t in streams if t.needs(u)]
        for t in live:
            t.start_unit(u)
        if u in cache_only:
            return HookSet([(t.site, t.hook) for t in live])
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
        return HookSet([(s, rec.hook_for(s)) for s in sites] + [(t.site, t.hook) for t in live])

    rows_written = 0
    t0 = time.time()
    writes = BackgroundWriter(write_queue)
    bar = progress(total=sum(len(samples[u * cfg.batch_size : (u + 1) * cfg.batch_size]) for u in mine),
                   desc=f"harvest{f' rank {rank}' if world > 1 else ''}", unit="img")
    with writes:
        for b in (generate_batched(adapter, samples, unit_hooks, steps=cfg.steps, guidance=cfg.guidance,
                                   batch_size=cfg.batch_size, height=cfg.height, width=cfg.width,
                                   only=todo.__contains__) if mine else ()):
            if b.index in cache_only:
                writes.submit(_commit_job(None, streams, b.index))
            else:
                rec, records = units.pop(b.index)
                writes.submit(_commit_job(_unit_job(writer, writer.unit_id(b.index), rec, records, b, truth), streams, b.index))
                rows_written += sum(a.shape[0] for parts in rec.parts.values() for a, _ in parts)
            bar.update(len(b.requests))
            bar.set_postfix(rows=rows_written, img_s=f"{bar.n / max(time.time() - t0, 1e-9):.2f}")
    bar.close()
    for t in streams:  # the writer thread is done: snapshot what the last interval folded in
        t.flush()
    _barrier(world)
    manifest = writer.finalize() if rank == 0 else None
    if rank == 0:
        for t in streams:
            t.finalize(adapter, n_units)
    return {
        "store": str(out),
        "rank": rank,
        "units_written": len(mine) - len(cache_only),
        "units_regenerated_for_topk": len(cache_only),  # already in the store, missing from a top-k cache
        "topk_snapshots": {t.name: t.snapshots_written for t in streams},  # this rank's snapshot writes
        "rows_written": rows_written,
        "seconds": time.time() - t0,
        "write_seconds": writes.busy_seconds,  # spent encoding and writing units (overlapped when write_queue > 0)
        "write_wait_seconds": writes.wait_seconds,  # generation blocked on a full write queue
        "bytes_written": sum(r.bytes for r in writes.results if r is not None),
        "manifest": manifest,
    }


def _unit_job(writer: StoreWriter, unit_id: str, rec: UnitRecorder, records: list[dict], batch, truth):
    """The writer thread's share of one unit: readings, PNGs, rows, then the atomic write + commit."""

    def job():
        images_u8 = batch.generation.images
        if truth is not None:
            _add_readings(records, images_u8, truth)
        images = {s.sample_id: _png(img) for s, img in zip(batch.requests, images_u8)}
        return writer.write_unit(unit_id, rec.rows(), samples=records, images=images)

    return job


def _commit_job(job, streams, unit: int):
    """The unit's store write (if any), then its top-k caches fold it in: a cache never holds a
    unit the store has not committed."""

    def run():
        result = job() if job is not None else None
        for t in streams:
            t.commit(unit)
        return result

    return run


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
            rec["token_labels"] = [int(x) for x in labels]  # what interpretation reads, whatever the world's fields
            if text_labels is not None:
                text_labels[s.sample_id] = truth.text_labels(s.prompt, tokenizer)
        records.append(rec)
    return token_labels, text_labels, records


def _add_readings(records: list[dict], images, truth: GroundTruth) -> None:
    """The ground truth's reading of each generated image, so later stages can trust labels per sample."""
    readings = truth.read_images(images)
    scored = [i for i, r in enumerate(records) if "token_labels" in r]  # samples with a reference scene
    per_prompt = truth.adherence([records[i]["prompt"] for i in scored], images[scored])["per_prompt"] if scored else []
    for rec, reading in zip(records, readings):
        rec["reading"] = reading
    for i, scores in zip(scored, per_prompt):
        records[i]["adherent"] = bool(scores.get("prompt", 0.0) == 1.0)
