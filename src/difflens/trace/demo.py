"""The demo's trace: a small whole-run patching grid (one window, both CFG branches) for two
factors, sized to take seconds on 2 cores; the full map is `difflens trace` (docs/intervene.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from difflens.trace import report
from difflens.trace.run import trace
from difflens.trace.world import trace_world
from difflens.utils import write_json

if TYPE_CHECKING:
    from difflens.models.base import Adapter


def run_trace_demo(out_dir: str | Path, adapter: Adapter, *, factors=("color", "object"), n_pairs: int = 2, steps: int = 12,
                   show_progress: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, info = [], {}
    for f, pairs, pinfo, readout in trace_world(adapter, factors, n_pairs, steps=steps):
        info[f] = pinfo
        if pairs:
            results.append(trace(adapter, pairs, readout, steps=steps, bin_size=steps, branches=("both",), factor=f,
                                 show_progress=show_progress))
    images = sum(r.images for r in results)
    seconds = sum(r.seconds for r in results)
    write_json(out / "trace.json", {"pair_selection": info, "images": images, "seconds": round(seconds, 1),
                                    "factors": [r.to_dict() for r in results]})
    (out / "trace.md").write_text(report.markdown(results, top=4), encoding="utf-8")
    png = report.heatmap(results, out / "trace.png")
    return {"summary": report.summary_lines(results), "images": images,
            "images_per_second": round(images / max(seconds, 1e-9), 2), "png": str(png) if png else None,
            "markdown": str(out / "trace.md")}
