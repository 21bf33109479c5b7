"""Figures of the intervention study (example grids, success against scale and window)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difflens.utils import save_image
from difflens.viz import save_figure

def steering_files(out: Path, result, items, cases, clean, scale_imgs, before, targets) -> dict:
    from difflens.viz import labelled_grid

    files = {}
    # Example sweep: the case whose success spans the most scales (else the first), per factor.
    scales = sorted(scale_imgs)
    rows_img, rows_lab = [], []
    for fac in ("color", "object"):
        idx = [i for i, c in enumerate(cases) if c[1].startswith(fac + "=") and before[i] != targets[i]][:3]
        for i in idx:
            rows_img.append(clean[i])
            rows_lab.append(f"clean: {items[i].color} {items[i].object} -> {cases[i][1]} (f{cases[i][0]})")
            for s in scales:
                imgs, after = scale_imgs[s]
                rows_img.append(imgs[i])
                rows_lab.append(f"x{s:g}: reads {after[i]}")
    if rows_img:
        path = out / "steering_examples.png"
        save_image(path, labelled_grid(rows_img, rows_lab, cols=1 + len(scales), label_lines=3,
                                       title=f"steering sweep ({result['mode']}, {result['by_scale'][0]['window']})"))
        files["examples"] = str(path)
    path = out / "steering_success.png"
    if plot_steering(result, path):
        files["plot"] = str(path)
    return files


def plot_steering(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    xs = [r["scale"] for r in result["by_scale"]]
    for key, label in (("success_rate", "all"),):
        axes[0].plot(xs, [r[key] if r[key] is not None else np.nan for r in result["by_scale"]], "o-", label=label)
    for fac in ("color", "object"):
        ys = [r["by_factor"].get(fac, {}).get("success_rate") for r in result["by_scale"]]
        if any(y is not None for y in ys):
            axes[0].plot(xs, [np.nan if y is None else y for y in ys], "s--", label=fac)
    for b, rs in result.get("by_scale_other_branches", {}).items():
        axes[0].plot([r["scale"] for r in rs], [np.nan if r["success_rate"] is None else r["success_rate"] for r in rs],
                     "^:", label=f"all, {b} branch only")
    axes[0].set_xscale("log" if all(x > 0 for x in xs) else "linear")
    axes[0].set_xlabel(f"scale ({result['mode']})")
    axes[0].set_ylabel("steering success rate")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    names = [r["window"] for r in result["by_window"]]
    axes[1].bar(range(len(names)), [r["success_rate"] or 0 for r in result["by_window"]])
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, rotation=20, fontsize=7)
    axes[1].set_ylim(0, 1)
    axes[1].set_title(f"by step window (scale {result['window_scale']:g})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    return True
