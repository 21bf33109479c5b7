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


def enlarge(img_HW3: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling: toy images are 32x32 and must stay crisp."""
    return np.asarray(img_HW3).repeat(scale, 0).repeat(scale, 1)


def labelled_grid(
    images: list[np.ndarray],
    labels: list[str] | None = None,
    *,
    cols: int | None = None,
    scale: int = 4,
    label_lines: int = 3,
    title: str | None = None,
) -> np.ndarray:
    """Tile images (enlarged) with a wrapped caption under each; returns uint8 [H, W, 3]."""
    n = len(images)
    if n == 0:
        raise ValueError("no images to tile")
    cols = cols or min(n, 6)
    rows = (n + cols - 1) // cols
    cells = [enlarge(im, scale) for im in images]
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
            lines = textwrap.wrap(str(labels[i]), chars)[:label_lines]
            for j, line in enumerate(lines):
                draw.text((x, y + ch + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
