"""The tables and reports of `difflens study dictionaries` (study.json's derived tables, study.md,
study.png), drawn from the curves and metrics the run in `study.py` records."""

from __future__ import annotations

import math
from pathlib import Path

NAMES = ("topk", "tide", "itda")
LABELS = {"topk": "TopK SAE", "tide": "TIDE SAE", "itda": "ITDA"}


# ---- tables --------------------------------------------------------------------------------------


def bucket_table(dicts: dict) -> list[dict]:
    """One row per timestep bucket: each dictionary's held-out FVU and the differences to TopK."""
    keyed = {n: {(r.get("step"), r.get("timestep")): r for r in d["metrics"].get("by_timestep", [])} for n, d in dicts.items()}
    keys = sorted(set().union(*(set(v) for v in keyed.values())), key=lambda k: (k[0] is None, k[0], k[1]))
    rows = []
    for key in keys:
        row = {"step": key[0], "timestep": key[1], "tokens": None}
        for n in NAMES:
            r = keyed.get(n, {}).get(key)
            row[f"fvu_{n}"] = None if r is None else r.get("fvu")
            row[f"l0_{n}"] = None if r is None else r.get("l0")
            if r is not None:
                row["tokens"] = r.get("n")
        for n in ("tide", "itda"):
            a, b = row[f"fvu_{n}"], row["fvu_topk"]
            row[f"{n}_minus_topk"] = None if a is None or b is None else a - b
        rows.append(row)
    return rows


def speedup(study: dict) -> dict | None:
    """TopK's time to ITDA's final FVU over ITDA's time to it, and ITDA's EV as a fraction of TopK's."""
    d = study["dictionaries"]
    row = next((t for t in study["time_to_fvu"] if t["label"] == f"{LABELS['itda']}'s final FVU"), None)
    if row is None or row["itda"] is None or row["topk"] is None or not row["itda"]["seconds"]:
        return None
    ev_topk = 1 - d["topk"]["metrics"]["fvu"]
    return {
        "target": row["target"],
        "topk_seconds": row["topk"]["seconds"],
        "itda_seconds": row["itda"]["seconds"],
        "ratio": row["topk"]["seconds"] / row["itda"]["seconds"],
        "ev_fraction": (1 - row["target"]) / ev_topk if ev_topk > 0 else float("nan"),
    }


def _reach(curve: list[dict], target: float, clock: str) -> dict | None:
    for p in curve:
        # relative slack: the final evaluation and the curve's last point are the same FVU summed
        # in a different order, so they can differ in the last bits
        if p["fvu"] is not None and p["fvu"] <= target * (1 + 1e-6):
            return {"seconds": p[f"{clock}_seconds"], "tokens": p["tokens"], "step": p["step"], "size": p["size"]}
    return None


def time_to_fvu(dicts: dict, fixed: list[float], clock: str) -> list[dict]:
    """First evaluation point at which each dictionary's held-out FVU is <= the target."""
    targets = []
    for n in ("itda", "topk"):
        fvu = dicts[n]["metrics"].get("fvu")
        if fvu is not None:
            targets.append({"target": float(fvu), "label": f"{LABELS[n]}'s final FVU"})
    fvu = dicts["topk"]["metrics"].get("fvu")
    if fvu is not None:  # the issue-19 bar: ≥ 90 % of the SAE's final explained variance
        targets.append({"target": 1 - 0.9 * (1 - float(fvu)), "label": f"90 % of {LABELS['topk']}'s final EV"})
    targets += [{"target": float(v), "label": f"{v:g}"} for v in fixed]
    return [{**t, **{n: _reach(dicts[n]["curve"], t["target"], clock) for n in NAMES}} for t in targets]


# ---- reports -------------------------------------------------------------------------------------


def _f(v, digits: int = 4, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _reach_cell(r: dict | None) -> str:
    if r is None:
        return "not reached"
    return f"{r['seconds']:.1f} s ({r['tokens']:,} tok)"


def markdown(study: dict) -> str:
    cfg, dicts = study["config"], study["dictionaries"]
    n_held = dicts["topk"]["metrics"].get("n")
    lines = [
        f"# TopK vs TIDE vs ITDA at `{study['site']}`",
        "",
        f"Store `{study['store']}` (model `{study['model']}`, fingerprint `{str(study['store_fingerprint'])[:12]}`). "
        f"Command: `{study['command']}`.",
        "",
        f"TopK and TIDE: width {cfg['width']}, k {cfg['k']}, {cfg['steps']} steps of {cfg['batch_size']} tokens "
        f"({study['trained_tokens']:,} training tokens), Adam lr {cfg['lr']:g} (times the width's lr scale). "
        f"ITDA: L0 {cfg['k']} (gradient pursuit), τ {cfg['itda_tau']:g}, cap "
        f"{cfg['itda_cap'] or 'default (50,000)'}, built on the same batches"
        f"{' (the first ' + format(cfg['itda_tokens'], ',') + ' training tokens only, then frozen)' if cfg.get('itda_tokens') else ''}. Evaluated on {n_held:,} held-out "
        f"tokens ({study['heldout_samples']} whole samples never trained on).",
        "",
        "| dictionary | latents / atoms | stored floats | file MB | FVU | EV | cosine | L0 | dead% | train / build CPU s | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in NAMES:
        d, m = dicts[n], dicts[n]["metrics"]
        dead = m.get("dead_fraction")
        lines.append(
            f"| {d['label']} | {d['latents']:,} | {d['stored_floats']:,} | {d['file_bytes'] / 1e6:.2f} | {_f(m.get('fvu'))} | "
            f"{_f(m.get('explained_variance'))} | {_f(m.get('cosine'))} | {_f(m.get('l0'), 2)} | "
            f"{'-' if dead is None else f'{100 * dead:.1f}'} | {d['cpu_seconds']:.1f} | {d['wall_seconds']:.1f} |"
        )
    lines += [
        "",
        f"dead% = latents/atoms with no activation on the {n_held:,} held-out tokens. Train / build s = time in the "
        "dictionary's own updates (no data loading, no evaluation; CPU s = process CPU time over all threads), "
        "the three interleaved step by step on the same batches.",
        "",
        "FVU per timestep bucket (held-out; each bucket is its own evaluation set):",
        "",
        "| step | timestep | tokens | TopK | TIDE | ITDA | TIDE − TopK | ITDA − TopK |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in study["by_timestep"]:
        lines.append(
            f"| {_f(r['step'])} | {_f(r['timestep'], 1)} | {_f(r['tokens'])} | {_f(r['fvu_topk'])} | {_f(r['fvu_tide'])} | "
            f"{_f(r['fvu_itda'])} | {_f(r['tide_minus_topk'], signed=True)} | {_f(r['itda_minus_topk'], signed=True)} |"
        )
    diffs = [r["tide_minus_topk"] for r in study["by_timestep"] if r["tide_minus_topk"] is not None]
    if diffs:
        better = sum(v < 0 for v in diffs)
        lines += ["", f"TIDE has the lower FVU in {better} of {len(diffs)} buckets (negative TIDE − TopK = TIDE better)."]
    lines += [
        "",
        f"Time to a held-out FVU ({cfg.get('clock', 'cpu')} seconds in the dictionary's own updates, and tokens seen, "
        f"at the first evaluation point at or below the target; points every {cfg['eval_every']} steps and at steps "
        f"1, 2, 4, … before that):",
        "",
        "| target FVU | TopK SAE | TIDE SAE | ITDA |",
        "|---|---:|---:|---:|",
    ]
    for t in study["time_to_fvu"]:
        label = t["label"] if t["label"] == f"{t['target']:g}" else f"{t['target']:.4f} ({t['label']})"
        lines.append(f"| {label} | {_reach_cell(t['topk'])} | {_reach_cell(t['tide'])} | {_reach_cell(t['itda'])} |")
    speed = speedup(study)
    if speed is not None:
        lines += ["", f"TopK needs {speed['ratio']:.1f}x ITDA's {cfg.get('clock', 'cpu')} time to reach FVU {speed['target']:.4f} "
                  f"(ITDA's final FVU, EV {speed['ev_fraction']:.1%} of TopK's final EV): "
                  f"{speed['topk_seconds']:.2f} s vs {speed['itda_seconds']:.2f} s."]
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflens.evaluate.report import figure_png
    from difflens.utils import atomic_write_bytes

    clock = study["config"].get("clock", "cpu")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = [r for r in study["by_timestep"] if r["timestep"] is not None]
    rows.sort(key=lambda r: r["timestep"])
    for n in NAMES:
        axes[0].plot([r["timestep"] for r in rows], [r[f"fvu_{n}"] for r in rows], marker="o", label=LABELS[n])
        curve = study["dictionaries"][n]["curve"]
        axes[1].plot([p[f"{clock}_seconds"] for p in curve], [p["fvu"] for p in curve], marker=".", label=LABELS[n])
    axes[0].set_xlabel("timestep (scheduler value; higher = noisier)")
    axes[0].set_ylabel("held-out FVU")
    axes[0].set_title("FVU per timestep bucket")
    axes[1].set_xlabel(f"{clock} seconds in the dictionary's own updates")
    axes[1].set_ylabel("held-out FVU")
    axes[1].set_yscale("log")
    axes[1].set_title("SAE training vs ITDA build")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{study['site']}: width {study['config']['width']}, k {study['config']['k']}", fontsize="medium")
    atomic_write_bytes(path, figure_png(fig))
    plt.close(fig)

