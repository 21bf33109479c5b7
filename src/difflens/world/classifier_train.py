"""Training the factor classifier from freshly rendered scenes, with augmentation for generated images.

A diffusion model's images are the renderer's images plus noise, blur, small colour and
position errors; the augmentation covers that so the judge stays reliable on them.
Run: `difflens zoo train classifier`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflens.errors import DifflensError
from difflens.utils import progress, write_json
from difflens.world import vocab as V
from difflens.world.classifier import (
    GLOBAL_FACTORS,
    MIN_VISIBLE_PIXELS,
    SLOT_FACTORS,
    FactorClassifier,
    default_folder,
)
from difflens.world.scene import ObjectSpec, Rendered, Scene, SceneSpec, render, sample_scene

IGNORE = -100


# ---------------------------------------------------------------------- data
def slot_targets(r: Rendered) -> dict[str, np.ndarray]:
    """Ground truth per slot from the scene (not from pixels).

    A slot holds the object whose visible mask near that position is largest; objects sit at
    distinct positions, so that is the object placed there, provided enough of it is visible
    after occlusion. Absent slots get IGNORE for colour/object/size.
    """
    n = len(V.POSITIONS)
    t = {"presence": np.zeros(n, np.float32)}
    for f in SLOT_FACTORS:
        t[f] = np.full(n, IGNORE, np.int64)
    visible = r.object_masks.reshape(len(r.scene.objects), -1).sum(1) if r.scene.objects else []
    best = np.full(n, -1)
    for i, o in enumerate(r.scene.objects):
        s = V.POSITIONS.index(o.position)
        if visible[i] >= MIN_VISIBLE_PIXELS and (best[s] < 0 or visible[i] > visible[best[s]]):
            best[s] = i
    for s in range(n):
        if best[s] >= 0:
            o = r.scene.objects[best[s]]
            t["presence"][s] = 1.0
            for f in SLOT_FACTORS:
                t[f][s] = V.FACTORS[f].index(getattr(o, f))
    t["bgcolor"] = np.int64(V.BG_COLORS.index(r.scene.bgcolor))
    t["bg"] = np.int64(V.PATTERNS.index(r.scene.bg))
    return t


def _training_scene(rng: np.random.Generator) -> Scene:
    """Mostly 1- and 2-object scenes (as prompts have), a few empty and 3-object ones for calibration."""
    u = rng.random()
    if u < 0.04:
        return Scene(objects=(), bgcolor=str(rng.choice(V.BG_COLORS)), bg=str(rng.choice(V.PATTERNS)))
    if u < 0.08:
        return sample_scene(rng, SceneSpec(objects=(ObjectSpec(),) * 3))
    return sample_scene(rng, two_object_prob=0.5)


def make_dataset(n: int, seed: int, *, two_object_prob: float | None = None, desc: str | None = None) -> dict:
    """Render n scenes: images uint8 [n, 32, 32, 3], slot targets, and the number of objects per image.

    two_object_prob=None uses the training mix; a number uses sample_scene's ordinary 1/2 mix.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, V.IMAGE_SIZE, V.IMAGE_SIZE, 3), np.uint8)
    targets: dict[str, list] = {}
    n_obj = np.empty(n, np.int64)
    it = range(n)
    if desc:
        it = progress(it, desc=desc, leave=False)
    for i in it:
        scene = _training_scene(rng) if two_object_prob is None else sample_scene(rng, two_object_prob=two_object_prob)
        r = render(scene)
        images[i] = r.image
        n_obj[i] = len(scene.objects)
        for k, v in slot_targets(r).items():
            targets.setdefault(k, []).append(v)
    return {"images": images, "n_objects": n_obj, **{k: np.stack(v) for k, v in targets.items()}}


# ---------------------------------------------------------------------- augmentation
def augment(x: torch.Tensor, gen: torch.Generator, *, max_noise: float = 0.1) -> torch.Tensor:
    """Degrade a batch [B, 3, H, W] in [0, 1] like a generator would: ±1 px shifts, slight blur,
    brightness/contrast/colour jitter, Gaussian noise (std up to max_noise), 8-bit quantisation."""
    B, C, H, W = x.shape

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    # Occasional ±1 px shift (edge pixels replicated).
    shift = rand(B) < 0.3
    if shift.any():
        xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
        dy = torch.randint(0, 3, (B,), generator=gen)
        dx = torch.randint(0, 3, (B,), generator=gen)
        out = x.clone()
        for oy in range(3):
            for ox in range(3):
                sel = shift & (dy == oy) & (dx == ox)
                if sel.any():
                    out[sel] = xp[sel, :, oy : oy + H, ox : ox + W]
        x = out
    # Slight Gaussian blur with a per-image sigma.
    blur = rand(B) < 0.3
    sigma = torch.where(blur, 0.3 + 0.6 * rand(B), torch.zeros(B))
    if blur.any():
        d = torch.tensor([-1.0, 0.0, 1.0])
        k1 = torch.exp(-(d[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
        k1 = k1 / k1.sum(1, keepdim=True)
        k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(C, 0)[:, None]  # [B*C, 1, 3, 3]
        xb = F.conv2d(F.pad(x.reshape(1, B * C, H, W), (1, 1, 1, 1), mode="replicate"), k2, groups=B * C)
        x = torch.where(blur[:, None, None, None], xb.reshape(B, C, H, W), x)
    # Brightness, contrast and per-channel gain jitter.
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = 1 + 0.3 * (rand(B, 1, 1, 1) - 0.5)
    bright = 0.1 * (rand(B, 1, 1, 1) - 0.5)
    gain = 1 + 0.08 * (rand(B, C, 1, 1) - 0.5)
    x = ((x - mean) * contrast + mean) * gain + bright
    # Gaussian pixel noise, std uniform in [0, max_noise] on 80% of images.
    std = max_noise * rand(B, 1, 1, 1) * (rand(B, 1, 1, 1) < 0.8)
    x = x + std * torch.randn(x.shape, generator=gen)
    return (x.clamp(0, 1) * 255).round() / 255


def add_noise(x: torch.Tensor, gen: torch.Generator, std: float) -> torch.Tensor:
    """Fixed-strength Gaussian pixel noise, clamped and quantised to 8 bits (the 'noisy' test set)."""
    return ((x + std * torch.randn(x.shape, generator=gen)).clamp(0, 1) * 255).round() / 255


def _to_float(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------------- loss and metrics
def _loss(out: dict, t: dict) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(out["presence"], t["presence"])
    present = t["presence"] > 0
    if present.any():
        for f in SLOT_FACTORS:
            loss = loss + F.cross_entropy(out[f][present], t[f][present])
    for f in GLOBAL_FACTORS:
        loss = loss + F.cross_entropy(out[f], t[f])
    return loss


@torch.no_grad()
def evaluate(model: FactorClassifier, data: dict, *, noise_std: float = 0.0, augmented: bool = False,
             seed: int = 0, batch_size: int = 500) -> dict:
    """Held-out accuracy per factor, overall and for 1- and 2-object images.

    color/object/size: per occupied slot; position: the image's set of occupied slots is exactly
    right; presence: per slot; bgcolor/bg: per image.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    preds: dict[str, list] = {}
    for i in range(0, len(data["images"]), batch_size):
        x = _to_float(data["images"][i : i + batch_size])
        if augmented:
            x = augment(x, gen)
        elif noise_std > 0:
            x = add_noise(x, gen, noise_std)
        out = model(x)
        preds.setdefault("presence", []).append((out["presence"] > 0).numpy())
        for f in SLOT_FACTORS + GLOBAL_FACTORS:
            preds.setdefault(f, []).append(out[f].argmax(-1).numpy())
    p = {k: np.concatenate(v) for k, v in preds.items()}
    groups = {"all": np.ones(len(data["images"]), bool), "single_object": data["n_objects"] == 1,
              "two_object": data["n_objects"] == 2}
    res = {}
    for g, sel in groups.items():
        if not sel.any():
            continue
        truth_p = data["presence"][sel] > 0
        r = {
            "position": float((p["presence"][sel] == truth_p).all(1).mean()),
            "presence": float((p["presence"][sel] == truth_p).mean()),
        }
        for f in SLOT_FACTORS:
            r[f] = float((p[f][sel][truth_p] == data[f][sel][truth_p]).mean())
        for f in GLOBAL_FACTORS:
            r[f] = float((p[f][sel] == data[f][sel]).mean())
        r["n_images"] = int(sel.sum())
        res[g] = r
    return res


# ---------------------------------------------------------------------- training
def train_classifier(
    out_folder: str | Path | None = None,
    *,
    n_train: int = 20000,
    epochs: int = 12,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    n_eval: int = 2000,
    seed: int = 0,
    num_threads: int | None = None,
    progress_bar: bool = True,
) -> dict:
    """Train on n_train freshly rendered scenes for `epochs` epochs (augmented each time), evaluate on
    fresh seeds (clean, noisy σ=0.1, and augmented renders), write weights, config and metrics.json.
    Returns the metrics."""
    if n_train < batch_size or epochs < 1:
        raise DifflensError(f"n_train ({n_train}) must be at least batch_size ({batch_size}) and epochs >= 1")
    out_folder = Path(out_folder) if out_folder is not None else default_folder()
    old_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        t0, c0 = time.time(), time.process_time()
        torch.manual_seed(seed)
        data = make_dataset(n_train, seed, desc="rendering scenes" if progress_bar else None)
        render_s, render_cpu = time.time() - t0, time.process_time() - c0
        model = FactorClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = n_train // batch_size
        total = steps_per_epoch * epochs
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
        gen = torch.Generator().manual_seed(seed + 1)
        keys = ["presence", *SLOT_FACTORS, *GLOBAL_FACTORS]
        tensors = {k: torch.from_numpy(data[k]) for k in keys}
        images = data["images"]
        bar = progress(total=total, desc="training classifier", **({} if progress_bar else {"disable": True}))
        model.train()
        ema = None
        for epoch in range(epochs):
            perm = torch.randperm(n_train, generator=gen)
            for s in range(steps_per_epoch):
                idx = perm[s * batch_size : (s + 1) * batch_size]
                x = augment(_to_float(images[idx.numpy()]), gen)
                t = {k: v[idx] for k, v in tensors.items()}
                loss = _loss(model(x), t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{ema:.3f}")
        bar.close()
        train_s, train_cpu = time.time() - t0 - render_s, time.process_time() - c0 - render_cpu
        model.eval()
        # Held-out scenes from fresh seeds, in sample_scene's ordinary 1/2-object mix.
        held = make_dataset(n_eval, seed + 1_000_003, two_object_prob=0.5)
        metrics = {
            "clean": evaluate(model, held),
            "noisy_sigma_0.1": evaluate(model, held, noise_std=0.1, seed=seed + 7),
            "augmented": evaluate(model, held, augmented=True, seed=seed + 11),
            "train": {
                "n_train": n_train, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                "weight_decay": weight_decay, "seed": seed, "n_eval": n_eval,
                "threads": torch.get_num_threads(), "render_seconds": round(render_s, 1),
                "train_seconds": round(train_s, 1), "render_cpu_seconds": round(render_cpu, 1),
                "train_cpu_seconds": round(train_cpu, 1), "final_loss": ema,
            },
        }
        model.save(out_folder, extra_config={"train": metrics["train"]})
        write_json(out_folder / "metrics.json", metrics)
        os.chmod(out_folder / "metrics.json", 0o644)
        return metrics
    finally:
        torch.set_num_threads(old_threads)
