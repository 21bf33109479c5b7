"""Splice evaluation: generate with a dictionary's reconstruction in place of the site's activations.

For each dictionary, prompts are generated three more ways besides the clean run:

  splice         x -> x̂ at the dictionary's site (all steps, or a window);
  mean ablation  x -> the mean activation at that timestep (the store's statistics; without a
                 store, the mean over the clean run's tokens at that step) — the "knows nothing"
                 baseline, computed once per site;
  splice + error x -> x̂ + (x − x̂): equal to x up to float rounding, so it must reproduce the
                 clean run; this checks that the hooks read and write the right tensors.

Compared with the clean images: pixel MSE (images in [0, 1]) and PSNR (dB, from the mean MSE);
with a ground-truth world (`Adapter.ground_truth()`) also its prompt adherence. "Fidelity recovered" is
1 − MSE(splice) / MSE(mean ablation): 1 = as good as clean, 0 = as bad as mean ablation
(negative = worse). The same normalisation is applied to adherence:
(adh(splice) − adh(mean)) / (adh(clean) − adh(mean)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.generation import batch_bounds, generate_batched, requests_of
from difflens.groundtruth import GroundTruth, ground_truth_of
from difflens.hooks import HookSet, Site
from difflens.intervene.edits import MeanAblate, Splice
from difflens.intervene.run import intervention_hooks
from difflens.intervene.region import Window
from difflens.models.base import Adapter
from difflens.store import Store
from difflens.utils import progress, save_image
from difflens.viz import labelled_grid

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary

DEFAULT_PROMPTS = 8
# The error-term check passes when the final latents agree to this and no pixel moves more than one level.
LATENT_TOLERANCE = 1e-3


def _names(dicts) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(dicts, Mapping):
        return [(str(k), v) for k, v in dicts.items()]
    if isinstance(dicts, torch.nn.Module):
        dicts = [dicts]
    out, seen = [], {}
    for d in dicts:
        cfg = d.cfg
        base = f"{cfg.arch}-w{cfg.width}" + (f"-k{cfg.k}" if getattr(cfg, "k", None) else "") + f"@{cfg.site}"
        seen[base] = seen.get(base, 0) + 1
        out.append((base if seen[base] == 1 else f"{base}#{seen[base]}", d))
    if not out:
        raise DifflensError("no dictionaries to splice: pass at least one")
    return out


def _as_store(obj):
    if isinstance(obj, Store):
        return obj
    if isinstance(obj, (str, Path)) and Path(obj).is_dir():
        return Store(obj)
    return None


def _prompts_from_store(store, n: int) -> tuple[list[str], list[int]]:
    samples = store.samples()
    if not samples:
        raise DifflensError(f"store {store.root} records no samples (prompts/seeds): pass prompts instead")
    pairs, seen = [], set()
    # Evenly spaced over the store's samples, so a few prompts still cover its variety.
    order = np.linspace(0, len(samples) - 1, num=min(len(samples), max(n * 4, n))).round().astype(int)
    for i in list(order) + list(range(len(samples))):
        s = samples[int(i)]
        key = (s["prompt"], int(s["seed"]))
        if key not in seen:
            seen.add(key)
            pairs.append(key)
        if len(pairs) >= n:
            break
    return [p for p, _ in pairs], [s for _, s in pairs]


def _window(window, steps) -> tuple[Window, int | None]:
    """Accept `steps` as the CLI passes it: an (a, b) tuple is a window, an int the step count."""
    if isinstance(steps, (tuple, list)):
        if window is not None:
            raise DifflensError("give the splice window once: window=(a, b), not also steps=(a, b)")
        window, steps = tuple(steps), None
    if window is None:
        w = Window.all()
    elif isinstance(window, Window):
        w = window
    elif isinstance(window, str):
        w = Window.parse(steps=window)
    else:
        a, b = window
        w = Window.range(a, b)
    return w, steps


def image_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image mean squared error of uint8 images scaled to [0, 1]."""
    d = a.astype(np.float64) / 255.0 - b.astype(np.float64) / 255.0
    return (d * d).reshape(len(a), -1).mean(1)


def psnr_db(mse: float) -> float:
    return float("inf") if mse <= 0 else float(10 * math.log10(1.0 / mse))


def _adherence(prompts, images, truth: GroundTruth | None):
    if truth is None:
        return None
    acc = truth.adherence(prompts, images)["accuracy"]
    return {k: (round(v, 4) if v is not None else None) for k, v in acc.items()}


def _ground_truth(adapter: Adapter, prompts, truth: GroundTruth | None) -> tuple[GroundTruth | None, str | None]:
    """The ground truth (given, else the adapter's) when it can judge these prompts; else None
    and a note saying why adherence is skipped."""
    truth = truth if truth is not None else ground_truth_of(adapter)
    if truth is None:
        return None, "the model has no ground-truth world: adherence skipped"
    if not truth.knows(prompts):
        return None, f"prompts are not {truth.name} prompts: adherence skipped"
    try:
        truth.ready()
    except DifflensError as e:
        return None, f"factor classifier unavailable ({e})"
    return truth, None


def _recovered(err_splice, err_mean):
    if err_splice is None or err_mean is None or err_mean <= 0:
        return None
    return float(1.0 - err_splice / err_mean)


def evaluate_splice(
    dicts,
    store_or_prompts,
    adapter: Adapter,
    *,
    n_prompts: int = DEFAULT_PROMPTS,
    seeds: Sequence[int] | None = None,
    steps: int | tuple[int, int] | None = None,
    window: Window | tuple[int, int] | str | None = None,
    guidance: float | None = None,
    ground_truth: GroundTruth | None = None,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
    max_tokens: int | None = None,  # accepted for the CLI's call; splicing runs whole images
) -> dict:
    """Splice each dictionary's reconstruction into generation and score it against clean and
    mean-ablated generations (see the module docstring). Returns a JSON-ready dict."""
    named = _names(dicts)
    win, steps = _window(window, steps)
    run_in = _splice_inputs(store_or_prompts, adapter, n_prompts=n_prompts, seeds=seeds, steps=steps, guidance=guidance)
    prompts, steps, guidance = run_in.prompts, run_in.steps, run_in.guidance
    win.check([float(t) for t in adapter.timesteps(steps)])
    truth, clf_note = _ground_truth(adapter, prompts, ground_truth)

    sites = []
    for _, d in named:
        s = str(Site.parse(d.cfg.site)) if d.cfg.site else None
        if s is None:
            raise DifflensError("a dictionary's cfg names no site: splice needs to know where it belongs")
        if s not in sites:
            sites.append(s)
    batches = batch_bounds(len(prompts), batch_size)
    bar = progress(
        total=len(batches) * (1 + len(sites) + 2 * len(named)), desc="splice", unit="gen", **({} if show_progress else {"disable": True})
    )

    requests = requests_of(prompts, run_in.seeds)

    def run(interventions, extra=None):
        """Images (and final latents) of every prompt with these interventions, batch by batch."""
        imgs, lats = [], []
        for b in generate_batched(adapter, requests, intervention_hooks(interventions, extra), steps=steps,
                                  guidance=guidance, batch_size=batch_size, on_batch=lambda _b: bar.update(1)):
            g = b.generation
            imgs.append(np.asarray(g.images))
            lats.append(g.latents.float().cpu() if g.latents is not None else None)
        lat = torch.cat(lats) if all(x is not None for x in lats) else None
        return np.concatenate(imgs), lat

    # Clean run; without store statistics it also records per-step means for mean ablation.
    stats = {s: _store_stats(run_in.store, s) for s in sites}
    need_record = [s for s in sites if stats[s] is None]
    sums: dict[str, dict] = {s: {} for s in need_record}
    rec_hooks = HookSet([(s, _mean_accumulator(sums[s])) for s in need_record])
    clean_imgs, clean_lat = run([], rec_hooks if need_record else None)
    means = {s: {step: tot / max(n, 1) for step, (tot, n) in sums[s].items()} for s in need_record}

    result: dict = {
        "n_prompts": len(prompts),
        "prompts": prompts,
        "seeds": [int(s) for s in run_in.seeds],
        "steps": steps,
        "window": win.describe(),
        "guidance": guidance,
        "definitions": DEFINITIONS,
        "classifier": "factor classifier (prompt adherence)" if truth is not None else clf_note,
        "clean": {"adherence": _adherence(prompts, clean_imgs, truth)},
        "mean_ablation": {},
        "dictionaries": [],
    }
    mean_imgs = {}
    for s in sites:
        iv = MeanAblate(s, stats=stats[s], window=win) if stats[s] is not None else MeanAblate(s, means_by_step=means[s], window=win)
        mean_imgs[s], _ = run([iv])
        result["mean_ablation"][s] = {
            "source": "store statistics (mean per timestep)" if stats[s] is not None else "clean run (mean per step over its tokens)",
            **_scored(mean_imgs[s], clean_imgs, prompts, truth)}

    grids = {}
    for name, d in named:
        site = str(Site.parse(d.cfg.site))
        sp_imgs, _ = run([Splice(d, window=win)])
        chk_imgs, chk_lat = run([Splice(d, keep_error=True, window=win)])
        result["dictionaries"].append(_splice_entry(name, d, site, sp_imgs, (chk_imgs, chk_lat), (clean_imgs, clean_lat),
                                                    result["clean"]["adherence"], result["mean_ablation"][site], prompts, truth))
        grids[name] = (sp_imgs, mean_imgs[site], chk_imgs)
    bar.close()
    if out_dir is not None:
        result["grids"] = _write_grids(Path(out_dir), prompts, clean_imgs, grids)
    return result


DEFINITIONS = (
    "mse: mean squared pixel error vs the clean image, pixels in [0,1]; psnr_db = 10 log10(1/mse); "
    "fidelity_recovered = 1 - mse(splice)/mse(mean ablation) (1 = clean, 0 = mean ablation); "
    "fidelity_recovered_adherence = (adh(splice) - adh(mean)) / (adh(clean) - adh(mean)) for whole prompts, "
    "and per factor where mean ablation loses adherence; "
    "error_term_check: splice with x - x_hat added back, must equal the clean run"
)


@dataclass
class SpliceInputs:
    """The generations every condition repeats: prompts and seeds, steps and guidance, and the
    store they came from (None for a prompt list)."""

    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float | None
    store: Store | None


def _splice_inputs(store_or_prompts, adapter: Adapter, *, n_prompts: int, seeds, steps, guidance) -> SpliceInputs:
    """Prompts and seeds from a store (its harvest's steps and guidance by default) or a prompt list."""
    store = _as_store(store_or_prompts)
    hc = {}
    if store is not None:
        prompts, store_seeds = _prompts_from_store(store, int(n_prompts))
        seeds = list(seeds) if seeds is not None else store_seeds
        hc = store.manifest.get("harvest_config") or {}
    else:
        if isinstance(store_or_prompts, str):
            raise DifflensError(
                f"{store_or_prompts!r} is neither a store folder nor a list of prompts: pass a Store, its folder, or [prompts]"
            )
        prompts = [str(p) for p in store_or_prompts][: int(n_prompts)]
        if not prompts:
            raise DifflensError("no prompts to splice: pass a store or a non-empty list of prompts")
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(seeds) != len(prompts):
        seeds = [seeds[i % len(seeds)] for i in range(len(prompts))]
    steps = int(steps if steps is not None else hc.get("steps") or adapter.default_steps)
    if guidance is None and hc.get("guidance") is not None:
        guidance = float(hc["guidance"])
    return SpliceInputs(prompts, seeds, steps, guidance, store)


def _scored(imgs, clean_imgs, prompts, truth) -> dict:
    """A condition's pixel error against the clean images and its prompt adherence."""
    mse = float(image_mse(imgs, clean_imgs).mean())
    return {"mse": mse, "psnr_db": psnr_db(mse), "adherence": _adherence(prompts, imgs, truth)}


def _splice_entry(name: str, d: Dictionary, site: str, sp_imgs, check, clean, clean_adherence, mean: dict, prompts,
                  truth) -> dict:
    """One dictionary's result: the splice scored against clean and mean ablation, and the error-term
    check (the splice with x - x_hat added back must reproduce the clean run)."""
    (chk_imgs, chk_lat), (clean_imgs, clean_lat) = check, clean
    splice = _scored(sp_imgs, clean_imgs, prompts, truth)
    rec_adh = _recovered_adherence(clean_adherence, mean["adherence"], splice["adherence"])
    rec_prompt = rec_adh.pop("prompt", None) if rec_adh else None
    pix = int(np.abs(chk_imgs.astype(int) - clean_imgs.astype(int)).max())
    lat_diff = float((chk_lat - clean_lat).abs().max()) if chk_lat is not None and clean_lat is not None else None
    return {
        "name": name,
        "site": site,
        "arch": d.cfg.arch,
        "width": int(d.cfg.width),
        "k": getattr(d.cfg, "k", None),
        "splice": splice,
        "fidelity_recovered": _recovered(splice["mse"], mean["mse"]),
        "fidelity_recovered_adherence": rec_prompt,
        "fidelity_recovered_adherence_by_factor": rec_adh,
        "error_term_check": {
            "mse": float(image_mse(chk_imgs, clean_imgs).mean()),
            "max_pixel_diff_levels": pix,
            "max_latent_diff": lat_diff,
            "passed": bool(pix <= 1 and (lat_diff is None or lat_diff <= LATENT_TOLERANCE)),
        },
    }


def _recovered_adherence(clean, mean, splice) -> dict | None:
    """Per factor (and "prompt"): (adh(splice) - adh(mean)) / (adh(clean) - adh(mean)), where mean
    ablation is worse than clean; other factors are left out (nothing to recover)."""
    if clean is None or mean is None or splice is None:
        return None
    out = {}
    for k, c in clean.items():
        m, s_ = mean.get(k), splice.get(k)
        if None not in (c, m, s_) and c - m > 1e-9:
            out[k] = round(float((s_ - m) / (c - m)), 4)
    return out


def _store_stats(store, site: str):
    if store is None or site not in store.sites:
        return None
    st = store.stats(site)
    return st if len(st.timesteps_T) else None


def _mean_accumulator(sums: dict):
    """A hook adding up activations per step (all rows and tokens) for the mean-ablation baseline."""

    def hook(acts, ctx):
        x = acts.detach().double().reshape(-1, acts.shape[-1])
        tot, n = sums.get(ctx.step, (torch.zeros(x.shape[1], dtype=torch.float64, device=x.device), 0))
        sums[ctx.step] = (tot + x.sum(0), n + x.shape[0])
        return None

    return hook


def _write_grids(out: Path, prompts, clean, grids) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    n = len(prompts)
    for i, (name, (sp, mean, chk)) in enumerate(grids.items()):
        images = list(clean) + list(sp) + list(mean) + list(chk)
        labels = [f"clean: {p}" for p in prompts] + ["splice"] * n + ["mean ablation"] * n + ["splice + error"] * n
        path = out / f"splice_{i}.png"
        save_image(path, labelled_grid(images, labels, cols=n, label_lines=3, title=name))
        paths[name] = str(path)
    return paths
