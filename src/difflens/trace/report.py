"""Trace outputs: a sites x steps heatmap per factor (one panel per stream and CFG branch), the
JSON of every cell, and a markdown table of the most decisive cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difflens.trace.run import ALL_SITES, TraceResult
from difflens.viz import save_figure


def _grid(result: TraceResult, stream: str, branch: str, key: str):
    sites = [s for s in result.sites if s.endswith(":" + stream)]
    wins = [w for w, _ in result.windows]
    M = np.full((len(sites), len(wins)), np.nan)
    for c in result.cells:
        if c["branch"] == branch and c["site"] in sites and c["window"] in wins:
            M[sites.index(c["site"]), wins.index(c["window"])] = c.get(key, np.nan)
    return sites, wins, M


def heatmap(results: list[TraceResult], path: str | Path, *, key: str = "source") -> Path | None:
    """One row of panels per factor: (img, txt) x branches; colour = mean readout `key`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not results:
        return None
    panels = [(st, br) for br in results[0].branches for st in ("img", "txt")]
    fig, axes = plt.subplots(len(results), len(panels), figsize=(2.6 * len(panels) + 0.6, 2.0 * len(results) + 0.6),
                             squeeze=False)
    im = None
    for r, res in enumerate(results):
        for p, (st, br) in enumerate(panels):
            ax = axes[r][p]
            sites, wins, M = _grid(res, st, br, key)
            im = ax.imshow(M if M.size else np.zeros((1, 1)), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(wins)))
            ax.set_xticklabels(wins, fontsize=6, rotation=90)
            ax.set_yticks(range(len(sites)))
            ax.set_yticklabels([_short(s) for s in sites] if p % 2 == 0 or True else [], fontsize=6)
            if r == 0:
                ax.set_title(f"{st} stream, {br} branch", fontsize=8)
            if p == 0:
                ax.set_ylabel(res.factor, fontsize=9)
    fig.suptitle(f"activation patching: P(patched image reads the source's value) (n = {results[0].cells[0]['n']} pairs)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 0.95))
    if im is not None:
        cax = fig.add_axes((0.945, 0.15, 0.012, 0.7))
        fig.colorbar(im, cax=cax)
    return save_figure(fig, path, dpi=90)


def _short(site: str) -> str:
    m, _, _ = site.partition(":")
    return (m.replace("single_transformer_blocks", "single").replace("transformer_blocks", "double")
            .replace("time_text_embed", "pooled/t emb").replace("norm1.emb", "emb"))


def decisive(result: TraceResult, top: int = 6, key: str = "source") -> list[dict]:
    """Single-site cells ranked by the readout (ties broken by fewer steps, then `kept`)."""
    cells = [c for c in result.cells if c["site"] not in ("none", ALL_SITES)]
    cells.sort(key=lambda c: (-c.get(key, 0.0), len(c["steps"]), -c.get("kept", 0.0)))
    return cells[:top]


def reference_cells(result: TraceResult) -> dict:
    out = {}
    for c in result.cells:
        if c["site"] == "none":
            out["no patch"] = c
        elif c["site"] == ALL_SITES:
            out[f"all sites, {c['branch']}"] = c
    return out


def markdown(results: list[TraceResult], top: int = 6) -> str:
    lines = ["# Trace: where each factor is decided", ""]
    for res in results:
        refs = reference_cells(res)
        n = res.cells[0]["n"] if res.cells else 0
        ref_txt = "; ".join(f"{k}: {100 * v.get('source', 0):.0f}%" for k, v in refs.items())
        lines += [f"## {res.factor or 'pairs'} ({n} pairs; {ref_txt})", "",
                  "| site | steps | branch | reads source | others kept |", "|---|---|---|---|---|"]
        for c in decisive(res, top):
            kept = "-" if "kept" not in c else f"{100 * c['kept']:.0f}%"
            lines.append(f"| `{c['site']}` | {c['window']} | {c['branch']} | {100 * c.get('source', 0):.0f}% | {kept} |")
        lines.append("")
    return "\n".join(lines)


def summary_lines(results: list[TraceResult]) -> list[str]:
    """One line per factor for terminal summaries: the best single-site cell and the best single step."""
    out = []
    for res in results:
        best = decisive(res, 1)
        single = [c for c in res.cells if c["site"] not in ("none", ALL_SITES) and len(c["steps"]) < len(res.windows[-1][1])]
        single.sort(key=lambda c: -c.get("source", 0.0))
        b = best[0] if best else None
        s = single[0] if single else None
        txt = f"{res.factor}: "
        if b:
            # several sites often tie (e.g. 100%): name them all rather than whichever sorted first
            ties = [c for c in decisive(res, len(res.cells)) if c.get("source", 0.0) == b.get("source", 0.0)
                    and c["window"] == b["window"] and c["branch"] == b["branch"]]
            names = ", ".join(c["site"] for c in ties[:4]) + (f" (+{len(ties) - 4} more)" if len(ties) > 4 else "")
            txt += (f"best {names} steps {b['window']} {b['branch']} {100 * b.get('source', 0):.0f}%"
                    + (" (tied)" if len(ties) > 1 else ""))
        if s and s is not b:
            txt += f"; best window {s['site']} steps {s['window']} {s['branch']} {100 * s.get('source', 0):.0f}%"
        out.append(txt)
    return out
