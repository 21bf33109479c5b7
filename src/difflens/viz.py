"""Image grids with captions: the pictures people look at (generation grids, sweeps, top examples)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def save_figure(fig, path, *, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically (no half-written plot beside the JSON) and close it."""
    import io

    import matplotlib.pyplot as plt

    from difflens.utils import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


MAX_SIDE = 2048  # longest side of any grid we write: a display size, not a poster (no 8k PNGs)


def enlarge(img_HW3: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling: toy images are 32x32 and must stay crisp."""
    return np.asarray(img_HW3).repeat(scale, 0).repeat(scale, 1)


def display_scale(side: int) -> int:
    """Small images (the toy's 32 px) are enlarged to ~128 px cells; real-model images are not."""
    return max(1, 128 // max(1, int(side)))


def fit_cell(img_HW3: np.ndarray, scale: int | None, cols: int, rows: int, max_side: int) -> np.ndarray:
    """Enlarge (nearest) or shrink (area average) one cell so a cols x rows grid fits in max_side px."""
    img = np.asarray(img_HW3, dtype=np.uint8)
    h, w = img.shape[:2]
    scale = display_scale(max(h, w)) if scale is None else int(scale)
    ch, cw = h * scale, w * scale
    limit = min((max_side - 8 * (cols + 1)) / cols / cw, (max_side - 60 * rows) / rows / ch, 1.0)
    if limit >= 1.0:
        return enlarge(img, scale) if scale > 1 else img
    th, tw = max(8, int(ch * limit)), max(8, int(cw * limit))
    if scale > 1 and th >= h:
        img = enlarge(img, scale)
    return np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.BOX if th < h else Image.Resampling.NEAREST))


def labelled_grid(
    images: list[np.ndarray],
    labels: list[str] | None = None,
    *,
    cols: int | None = None,
    scale: int | None = None,
    label_lines: int = 3,
    title: str | None = None,
    max_side: int = MAX_SIDE,
) -> np.ndarray:
    """Tile images with a wrapped caption under each; returns uint8 [H, W, 3].

    `scale` None enlarges small images to ~128 px cells; the whole grid is kept within `max_side`
    pixels by shrinking the cells, so a sweep of 1024-px images stays a viewable PNG."""
    n = len(images)
    if n == 0:
        raise ValueError("no images to tile")
    cols = cols or min(n, 6)
    rows = (n + cols - 1) // cols
    cells = [fit_cell(im, scale, cols, rows, max_side) for im in images]
    ch, cw = cells[0].shape[:2]
    font = ImageFont.load_default()
    line_h = 11
    cap_h = (label_lines * line_h + 4) if labels else 0
    title_h = 16 if title else 0
    pad = 4
    W = cols * (cw + pad) + pad
    H = title_h + rows * (ch + cap_h + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0), font=font)
    chars = max(8, cw // 6)
    for i, cell in enumerate(cells):
        r, c = divmod(i, cols)
        x = pad + c * (cw + pad)
        y = title_h + pad + r * (ch + cap_h + pad)
        canvas.paste(Image.fromarray(np.asarray(cell, np.uint8)), (x, y))
        if labels:
            lines = [w for part in str(labels[i]).split("\n") for w in textwrap.wrap(part, chars)][:label_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + ch + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
