"""Heatmaps: a feature's token map upsampled onto its image, alpha ∝ sqrt(normalised activation).

The square root (Shabalin et al. 2025) keeps weak but real activation visible next to the peak.
Token maps are upsampled by repetition (each token is a patch of pixels), so the overlay shows
exactly which tokens fired; toy images (32x32) are enlarged with nearest-neighbour afterwards.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from difflens.utils import progress, save_image
from difflens.viz import enlarge, labelled_grid

# Orange is not one of the toy world's object colours, so the overlay stays distinguishable.
OVERLAY_RGB = (255, 128, 0)


def upsample_map(map_T: np.ndarray, grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """[T] token values -> [H, W] per pixel (each token covers an (H/h) x (W/w) patch)."""
    h, w = grid_hw
    H, W = image_hw
    if H % h or W % w:
        raise ValueError(f"image {H}x{W} is not a multiple of the token grid {h}x{w}")
    m = np.asarray(map_T, np.float32).reshape(h, w)
    return m.repeat(H // h, 0).repeat(W // w, 1)


def overlay(image_HW3: np.ndarray, map_T: np.ndarray, grid_hw: tuple[int, int], *, vmax: float | None = None,
            alpha_max: float = 0.8, color=OVERLAY_RGB) -> np.ndarray:
    """uint8 [H, W, 3]: image blended towards `color` with alpha = alpha_max * sqrt(clip(a / vmax, 0, 1)).

    vmax defaults to the map's own max (the map shows *where*, not *how much*); pass the feature's
    max to compare strengths across images. Negative activations get no overlay.
    """
    img = np.asarray(image_HW3, np.float32)
    a = upsample_map(map_T, grid_hw, img.shape[:2])
    top = float(np.max(a)) if vmax is None else float(vmax)
    if top <= 0:
        return np.asarray(image_HW3, np.uint8).copy()
    alpha = alpha_max * np.sqrt(np.clip(a / top, 0.0, 1.0))[..., None]
    out = (1.0 - alpha) * img + alpha * np.asarray(color, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def png_bytes(img_HW3: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img_HW3, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(img_HW3: np.ndarray) -> str:
    """A base64 PNG data URL, the image form chat-completions APIs accept."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(img_HW3)).decode("ascii")


def vlm_image(image_HW3: np.ndarray, map_T: np.ndarray, grid_hw, *, scale: int | None = None, vmax=None) -> np.ndarray:
    """The overlay a VLM sees: small images enlarged to >= 256 px so the model can read them."""
    ov = overlay(image_HW3, map_T, grid_hw, vmax=vmax)
    if scale is None:
        scale = max(1, 256 // max(ov.shape[:2]))
    return enlarge(ov, scale) if scale > 1 else ov


def feature_grid(cache, f: int, image_of, *, n_top: int = 10, scale: int = 4, title: str | None = None) -> np.ndarray:
    """One picture per feature: its top images with overlays (one colour scale), then the best
    image's map at every recorded step (high noise on the left)."""
    ex = cache.top_examples(f)[:n_top]
    grid_hw = cache.grid_hw
    if not ex:
        raise ValueError(f"feature {f} has no qualifying images")
    vmax = max(e.value for e in ex)
    imgs = [overlay(image_of(e.sample_id), e.map, grid_hw, vmax=vmax) for e in ex]
    # caption: image id and split (the explainer's images vs held-out ones for scoring), the largest
    # activation in the image and the timestep where it occurs
    labels = [f"img {e.sample_id} {'explain' if e.split == 0 else 'held-out'}\nmax {e.value:.3g} at t={cache.timesteps[e.step]:.0f}"
              for e in ex]
    top = labelled_grid(imgs, labels, cols=min(len(imgs), 5), scale=scale, label_lines=2, title=title)
    best = ex[0]
    base = image_of(best.sample_id)
    per_step = [overlay(base, best.maps_ST[s], grid_hw, vmax=vmax) for s in range(len(cache.steps))]
    row = labelled_grid(per_step, [f"t={t:.0f}" for t in cache.timesteps], cols=min(len(per_step), 12),
                        scale=max(2, scale // 2), label_lines=1, title=f"img {best.sample_id} at every step (same colour scale)")
    W = max(top.shape[1], row.shape[1])
    pad = lambda a: np.pad(a, ((0, 0), (0, W - a.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
    return np.concatenate([pad(top), pad(row)], axis=0)


def write_feature_grids(cache, features, image_of, folder: str | Path, *, n_top: int = 10, titles: dict | None = None) -> list[Path]:
    """PNG grids for `features` into folder/feature_<id>.png; features without images are skipped."""
    folder = Path(folder)
    out = []
    for f in progress(list(features), desc=f"{cache.name}: heatmaps", unit="feature"):
        f = int(f)
        if not cache.has_maps(f) or int(cache["top_sample"][f, :, 0].max()) < 0:
            continue
        title = (titles or {}).get(f) or f"{cache.name} feature {f}"
        p = folder / f"feature_{f}.png"
        save_image(p, feature_grid(cache, f, image_of, n_top=n_top, title=title[:80]))
        out.append(p)
    return out
