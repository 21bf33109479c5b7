"""Human-facing views of an evaluation result: comparison table (text/markdown) and PNG plots."""

from __future__ import annotations

import math
import re
from pathlib import Path

from difflens.utils import atomic_write_bytes, atomic_write_text

COLUMNS = ("dictionary", "arch", "site", "width", "k", "FVU", "EV", "cosine", "L0", "dead%", "tokens")


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}"
    return str(v)


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for d in result["dictionaries"]:
        m = d["metrics"]
        dead = m.get("dead_fraction")
        rows.append(
            [
                d["name"],
                d["arch"],
                d["site"],
                _fmt(d.get("width")),
                _fmt(d.get("k")),
                _fmt(m.get("fvu")),
                _fmt(m.get("explained_variance")),
                _fmt(m.get("cosine")),
                _fmt(m.get("l0"), 3),
                "-" if dead is None else f"{100 * dead:.1f}",
                f"{m.get('n', 0)} ({m.get('split', '?')})",
            ]
        )
    return rows


def text_table(result: dict) -> str:
    rows = [list(COLUMNS)] + table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(result: dict) -> str:
    rows = table_rows(result)
    out = [
        "# Reconstruction evaluation",
        "",
        f"Store: `{result['store']}` (model `{result.get('model')}`).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    windows = sorted({d["metrics"].get("dead_window_tokens") for d in result["dictionaries"]} - {None})
    out += [
        "",
        "FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ = mean over the evaluated tokens); EV = 1 − FVU; cosine = mean "
        "cos(x, x̂); L0 = mean number of non-zero latents per token; dead% = latents with no activation "
        f"over the last N evaluated tokens (N = {', '.join(str(w) for w in windows) or 'n/a'}). "
        "tokens: how many were evaluated, from held-out samples or from all rows.",
    ]
    if "splice" in result:
        out += ["", "## Splice evaluation", "", "```json", _json(result["splice"]), "```"]
    return "\n".join(out) + "\n"


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


_LAYER = re.compile(r"^(?P<prefix>.*?)(?P<idx>\d+)(?P<rest>.*)$")
_BLOCK_ORDER = {"transformer_blocks.": 0, "single_transformer_blocks.": 1}


def layer_key(site: str):
    """Sort sites by depth: Flux double blocks, then single blocks, by index; others by name."""
    m = _LAYER.match(site)
    if not m:
        return (9, site, 0, "")
    return (_BLOCK_ORDER.get(m["prefix"], 5), m["prefix"], int(m["idx"]), m["rest"])


def _family(d: dict) -> str:
    k = f" k={d['k']}" if d.get("k") is not None else ""
    return f"{d['arch']} w={d['width']}{k}"


def figure_png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_timestep(result: dict, path: str | Path) -> bool:
    """FVU and L0 against timestep, one line per dictionary. False when there is nothing to plot."""
    series = [d for d in result["dictionaries"] if d["metrics"].get("by_timestep")]
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for d in series:
        rows = [r for r in d["metrics"]["by_timestep"] if r.get("timestep") is not None and r.get("n")]
        rows.sort(key=lambda r: r["timestep"])
        ts = [r["timestep"] for r in rows]
        axes[0].plot(ts, [r.get("fvu") for r in rows], marker="o", label=d["name"])
        axes[1].plot(ts, [r.get("l0") for r in rows], marker="o", label=d["name"])
    for ax, what in zip(axes, ("FVU", "L0")):
        ax.set_xlabel("timestep (scheduler value; higher = noisier)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].set_title("reconstruction error by timestep")
    axes[1].set_title("active latents by timestep")
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    atomic_write_bytes(path, figure_png(fig))
    plt.close(fig)
    return True


def plot_layer(result: dict, path: str | Path) -> bool:
    """FVU and L0 against layer (site), one line per (arch, width, k). Only for several sites."""
    dicts = result["dictionaries"]
    sites = sorted({d["site"] for d in dicts}, key=layer_key)
    if len(sites) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    families: dict[str, dict[str, dict]] = {}
    for d in dicts:
        families.setdefault(_family(d), {})[d["site"]] = d["metrics"]
    xs = list(range(len(sites)))
    for fam, by_site in families.items():
        pts = [(i, by_site[s]) for i, s in enumerate(sites) if s in by_site]
        axes[0].plot([i for i, _ in pts], [m.get("fvu") for _, m in pts], marker="o", label=fam)
        axes[1].plot([i for i, _ in pts], [m.get("l0") for _, m in pts], marker="o", label=fam)
    for ax, what in zip(axes, ("FVU", "L0")):
        ax.set_xticks(xs)
        ax.set_xticklabels(sites, rotation=30, ha="right", fontsize="small")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].set_title("reconstruction error by layer")
    axes[1].set_title("active latents by layer")
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    atomic_write_bytes(path, figure_png(fig))
    plt.close(fig)
    return True


def write_reports(result: dict, json_path: str | Path) -> dict[str, str]:
    """Markdown table and plots next to the JSON (same stem); returns what was written."""
    json_path = Path(json_path)
    stem = json_path.with_suffix("")
    written = {}
    md = Path(f"{stem}.md")  # not with_suffix: names may contain dots
    atomic_write_text(md, markdown(result))
    written["markdown"] = str(md)
    ts_png = Path(f"{stem}_timestep.png")
    if plot_timestep(result, ts_png):
        written["timestep_plot"] = str(ts_png)
    layer_png = Path(f"{stem}_layer.png")
    if plot_layer(result, layer_png):
        written["layer_plot"] = str(layer_png)
    return written
