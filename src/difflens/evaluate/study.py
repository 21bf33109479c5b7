"""`difflens study dictionaries`: TopK SAE vs TIDE vs ITDA at one site, in one command.

What it does (on one site of one store):

1. trains a plain TopK SAE and a TIDE SAE at the same width and k, and builds ITDA at the same L0
   (its pursuit uses k atoms), all three in lockstep on the same batches (`difflens.train`);
2. every ``eval_every`` steps (and at steps 1, 2, 4, … before the first of those, where ITDA does
   most of its work; ``itda_tokens`` > 0 builds ITDA from that many tokens only, then freezes it,
   as Leask et al. build from a small sample) records each dictionary's held-out FVU together with the time
   spent in that dictionary's own updates so far (SAE: forward, backward, Adam; ITDA:
   `partial_fit`), both wall clock and process CPU time, and its size (latents / atoms);
3. evaluates the three on the held-out samples with `difflens.evaluate` (FVU, EV, cosine, L0,
   dead fraction overall and per timestep bucket);
4. writes ``study.json`` (everything), ``study.md`` (tables ready for the README) and
   ``study.png`` (FVU per timestep bucket; held-out FVU against wall time).

Times exclude data loading (shared by the three) and the periodic evaluations; they include the
trainer's light per-``log_every`` bookkeeping. CPU time (all threads of the process, so it also
holds the store's small prefetch work) is what the time-to-FVU table uses by default: on a shared
machine wall time mostly measures the other jobs (``--clock wall`` switches). Absolute values are
not benchmarks.

One file (over 500 lines) on purpose: the lockstep loop, the curve bookkeeping it feeds and the
report drawn from those curves change together.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from difflens.errors import DifflensError

NAMES = ("topk", "tide", "itda")
LABELS = {"topk": "TopK SAE", "tide": "TIDE SAE", "itda": "ITDA"}
RUN_DIR = "run"


@dataclass
class StudyConfig:
    """Settings of one study; every field that changes the numbers is recorded in study.json."""

    site: str
    width: int = 1024
    k: int = 16
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 2e-4
    warmup_steps: int = 100
    eval_every: int | None = None  # None: about 20 points on the FVU-vs-time curve
    eval_tokens: int = 8192
    init_tokens: int = 16384
    dead_after_tokens: int = 100_000
    normalization: str = "scalar"
    itda_cap: int = 0  # 0 = the library's default cap (50,000 atoms)
    itda_tau: float = 0.3
    itda_tokens: int = 0  # build ITDA from the first N training tokens only, then freeze it (0 = all of them)
    fvu_targets: list[float] = field(default_factory=lambda: [0.5, 0.3, 0.2, 0.1])
    seed: int = 0
    clock: str = "cpu"  # "cpu" (process CPU seconds) or "wall": the time in the time-to-FVU table
    progress: bool = True

    def eval_interval(self) -> int:
        return int(self.eval_every) if self.eval_every else max(1, self.steps // 20)

    def validate(self) -> None:
        for name in ("width", "k", "steps", "batch_size", "eval_tokens", "init_tokens", "dead_after_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise DifflensError(f"study: --{name.replace('_', '-')} must be a positive integer (got {v!r})")
        if self.k > self.width:
            raise DifflensError(f"study: k={self.k} is larger than width={self.width}; choose k <= width")
        if self.warmup_steps < 0:
            raise DifflensError(f"study: --warmup-steps must be >= 0 (got {self.warmup_steps})")
        if self.eval_every is not None and self.eval_every <= 0:
            raise DifflensError(f"study: --eval-every must be positive (got {self.eval_every})")
        if not isinstance(self.itda_tokens, int) or self.itda_tokens < 0:
            raise DifflensError(f"study: --itda-tokens must be >= 0 (got {self.itda_tokens!r}; 0 = every training token)")
        if self.itda_cap < 0:
            raise DifflensError(f"study: --itda-cap must be >= 0 (got {self.itda_cap}; 0 = the default cap)")
        if self.clock not in ("cpu", "wall"):
            raise DifflensError(f"study: --clock must be cpu or wall (got {self.clock!r})")
        if not self.itda_tau > 0:
            raise DifflensError(f"study: --itda-tau must be positive (got {self.itda_tau})")

    def command(self, data: str, out: str) -> str:
        """The `difflens study dictionaries` command line that reproduces this study."""
        parts = ["difflens study dictionaries", f"--data {data}", f"--site {self.site}", f"--out {out}",
                 f"--width {self.width}", f"--k {self.k}", f"--train-steps {self.steps}", f"--batch-size {self.batch_size}"]
        d = StudyConfig(site=self.site)
        for name in ("lr", "warmup_steps", "eval_every", "eval_tokens", "init_tokens", "dead_after_tokens", "normalization",
                     "itda_cap", "itda_tau", "itda_tokens", "seed", "clock"):
            if getattr(self, name) != getattr(d, name):
                parts.append(f"--{name.replace('_', '-')} {getattr(self, name)}")
        if self.fvu_targets != d.fvu_targets:
            parts.append("--fvu-targets " + ",".join(f"{v:g}" for v in self.fvu_targets))
        return " ".join(parts)


# ---- the run -------------------------------------------------------------------------------------


def early_eval_steps(every: int) -> set[int]:
    """Extra evaluation points before the first regular one (1, 2, 4, … steps): ITDA gets most of
    its reconstruction from its first few batches, which a steps/20 grid would not resolve."""
    out, s = set(), 1
    while s < every:
        out.add(s)
        s *= 2
    return out


def _timed_trainer_class():
    """A Trainer that also keeps, per dictionary, its own update time and a held-out FVU curve;
    ITDA stops growing after `itda_tokens` training tokens (built from a small sample)."""
    from difflens.train import members as mem
    from difflens.train.trainer import Trainer

    class TimedTrainer(Trainer):
        def __init__(self, *args, itda_tokens: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.itda_tokens = itda_tokens
            self.seconds = {s.name: 0.0 for s in self.specs}
            self.cpu_seconds = {s.name: 0.0 for s in self.specs}
            self.curves = {s.name: [] for s in self.specs}

        def _train_member(self, m, batch, n_global, step, log_now):
            if m.spec.arch == "itda" and self.itda_tokens and self.tokens >= self.itda_tokens:
                return  # built from its sample; frozen from here on
            t0, c0 = time.perf_counter(), time.process_time()
            super()._train_member(m, batch, n_global, step, log_now)
            self.cpu_seconds[m.name] += time.process_time() - c0
            self.seconds[m.name] += time.perf_counter() - t0

        def _evaluate(self, final: bool = False):
            super()._evaluate(final)
            for m in self.members:
                fvu = m.last.get("fvu")
                if fvu is None:
                    continue
                self.curves[m.name].append(
                    {
                        "step": self.step,
                        "tokens": self.tokens,
                        "wall_seconds": round(self.seconds[m.name], 4),
                        "cpu_seconds": round(self.cpu_seconds[m.name], 4),
                        "fvu": float(fvu),
                        "size": mem.current_width(m.module),
                    }
                )

    return TimedTrainer


def _check_store(store, cfg: StudyConfig) -> list[int]:
    """Clear errors for a wrong site or a store too small to train and hold out; the held-out ids."""
    from difflens.train.data import Filters, choose_heldout

    sites = list(store.sites)
    if cfg.site not in sites:
        raise DifflensError(f"site {cfg.site!r} is not in the store {store.root}; its sites are {', '.join(sites)}")
    heldout = choose_heldout(store, cfg.site, cfg.eval_tokens, Filters())
    sids = np.asarray(store.meta(cfg.site, ["sample_id"])["sample_id"])
    n_held = int(np.isin(sids, heldout).sum())
    n_train = len(sids) - n_held
    if n_train < cfg.batch_size:
        raise DifflensError(
            f"the store {store.root} is too small for this study at {cfg.site}: {len(sids)} rows, {n_held} of them "
            f"held out for evaluation, leaves {n_train} training rows, fewer than one batch of {cfg.batch_size}; "
            "harvest more prompts or lower --batch-size / --eval-tokens"
        )
    return heldout


def run_study(data, cfg: StudyConfig, out, *, overwrite: bool = False) -> dict:
    """Train, evaluate and report (see the module docstring); returns the study.json content."""
    from difflens.evaluate.reconstruction import evaluate, load_items
    from difflens.train.config import DictSpec, TrainConfig
    from difflens.train.trainer import open_store

    cfg.validate()
    store = open_store(data)
    _check_store(store, cfg)
    out = Path(out)
    run_dir = out / RUN_DIR
    if run_dir.exists():
        if not overwrite:
            raise DifflensError(f"{out} already holds a study (folder {run_dir}); pass --overwrite or choose another --out")
        if not (run_dir / "run.json").exists() and any(run_dir.iterdir()):
            raise DifflensError(f"{run_dir} exists and is not a training run; refusing to delete it, choose another --out")
        shutil.rmtree(run_dir)
    out.mkdir(parents=True, exist_ok=True)

    common = {"normalization": cfg.normalization}
    specs = [
        DictSpec(name="topk", arch="topk", site=cfg.site, width=cfg.width, k=cfg.k, options=dict(common)),
        DictSpec(name="tide", arch="tide", site=cfg.site, width=cfg.width, k=cfg.k, options=dict(common)),
        DictSpec(name="itda", arch="itda", site=cfg.site, width=cfg.itda_cap, k=cfg.k,
                 options={**common, "itda_tau": cfg.itda_tau}),
    ]
    every = cfg.eval_interval()
    tcfg = TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, eval_every=every, eval_tokens=cfg.eval_tokens,
        init_tokens=cfg.init_tokens, dead_after_tokens=cfg.dead_after_tokens, seed=cfg.seed,
        log_every=every, checkpoint_every=0, progress=cfg.progress,
    )
    if cfg.progress:
        print(f"study: training topk, tide (width {cfg.width}, k {cfg.k}) and building itda (L0 {cfg.k}) "
              f"at {cfg.site} for {cfg.steps} steps of {cfg.batch_size} tokens; held-out FVU every {every} steps")
    early = early_eval_steps(every)
    trainer = _timed_trainer_class()(store, specs, tcfg, run_dir, itda_tokens=cfg.itda_tokens,
                                     on_step=lambda s: trainer._evaluate() if s in early else None)
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0

    items = load_items([str(run_dir / n) for n in NAMES], store)
    result = evaluate(items, store, split="heldout", show_progress=cfg.progress)
    by_name = {d["name"]: d for d in result["dictionaries"]}

    dictionaries = {}
    for it in items:
        d = by_name[it.name]
        dictionaries[it.name] = {
            "label": LABELS[it.name],
            "arch": d["arch"],
            "k": d["k"],
            "latents": d["width"],  # ITDA: the atoms it holds
            "cap": int(it.module.cap) if it.name == "itda" else None,
            "stored_floats": _stored_floats(it.module),
            "file_bytes": _folder_bytes(run_dir / it.name),
            "wall_seconds": round(trainer.seconds[it.name], 3),
            "cpu_seconds": round(trainer.cpu_seconds[it.name], 3),
            "cpu_seconds_per_step": round(trainer.cpu_seconds[it.name] / cfg.steps, 5),
            "metrics": d["metrics"],
            "curve": trainer.curves[it.name],
        }
    study = {
        "study": "dictionaries",
        "command": cfg.command(str(data), str(out)),
        "config": asdict(cfg) | {"eval_every": every},
        "store": result["store"],
        "store_fingerprint": result["store_fingerprint"],
        "model": result["model"],
        "site": cfg.site,
        "heldout_samples": len(trainer.heldout),
        "trained_tokens": trainer.tokens,
        "wall_seconds_total": round(wall, 2),
        "dictionaries": dictionaries,
        "by_timestep": _bucket_table(dictionaries),
        "time_to_fvu": _time_to_fvu(dictionaries, cfg.fvu_targets, cfg.clock),
    }
    from difflens.evaluate.cli import json_safe
    from difflens.utils import atomic_write_text, write_json

    study = json_safe(study)
    write_json(out / "study.json", study)
    atomic_write_text(out / "study.md", markdown(study))
    plot(study, out / "study.png")
    return study


def _stored_floats(module) -> int:
    """Floating-point numbers the dictionary stores (weights, normalisation stats; not counters)."""
    return int(sum(t.numel() for t in module.state_dict().values() if t.is_floating_point()))


def _folder_bytes(folder: Path) -> int:
    return int(sum(f.stat().st_size for f in folder.iterdir() if f.name in ("weights.safetensors", "cfg.json")))


def _bucket_table(dicts: dict) -> list[dict]:
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


def _time_to_fvu(dicts: dict, fixed: list[float], clock: str) -> list[dict]:
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

    from difflens.evaluate.report import _png
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
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)


# ---- CLI -----------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="reproducible comparisons (e.g. TopK vs TIDE vs ITDA at one block)",
        description="Studies that train, evaluate and write a report in one command.",
    )
    p.set_defaults(func=_no_study)
    sub = p.add_subparsers(dest="study", metavar="<study>")
    d = sub.add_parser(
        "dictionaries",
        help="TopK SAE vs TIDE (equal width and k) vs ITDA (same L0) at one site",
        description="Train a TopK SAE and a TIDE SAE at equal width and k and build ITDA at the same L0, in lockstep "
        "on one site; evaluate on held-out samples (overall and per timestep bucket), record held-out FVU against "
        "wall time, and write study.json, study.md and study.png to --out. See docs/training.md.",
    )
    d.add_argument("--data", required=True, help="activation store folder")
    d.add_argument("--site", required=True, help="the site (e.g. transformer_blocks.1:img)")
    d.add_argument("--out", required=True, help="output folder (the trained dictionaries go to OUT/run/)")
    d.add_argument("--width", type=int, default=1024, help="SAE latents (default 1024)")
    d.add_argument("--k", type=int, default=16, help="active latents per token, and ITDA's L0 (default 16)")
    d.add_argument("--train-steps", type=int, default=1000, help="optimizer steps (default 1000)")
    d.add_argument("--batch-size", type=int, default=1024, help="tokens per step (default 1024)")
    d.add_argument("--lr", type=float, default=2e-4, help="base lr, times the width's lr scale (default 2e-4)")
    d.add_argument("--warmup-steps", type=int, default=100, help="linear lr warm-up steps (default 100)")
    d.add_argument("--eval-every", type=int, help="steps between held-out FVU points (default steps/20)")
    d.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens, whole samples (default 8192)")
    d.add_argument("--init-tokens", type=int, default=16384, help="rows for data-dependent init (default 16384)")
    d.add_argument("--dead-after-tokens", type=int, default=100_000,
                   help="training-time dead-latent window for AuxK (default 100000)")
    d.add_argument("--normalization", choices=["none", "scalar", "per-timestep", "pca-whiten"], default="scalar",
                   help="input normalisation of all three (default scalar)")
    d.add_argument("--itda-cap", type=int, default=0, help="ITDA atom cap (default 0 = 50,000)")
    d.add_argument("--itda-tau", type=float, default=0.3, help="ITDA's add-atom loss threshold τ (default 0.3)")
    d.add_argument("--itda-tokens", type=int, default=0,
                   help="build ITDA from the first N training tokens, then freeze it (default 0 = all)")
    d.add_argument("--fvu-targets", default="0.5,0.3,0.2,0.1",
                   help="extra held-out FVU targets for the time-to-FVU table (comma list)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="time axis of the time-to-FVU table and plot: process CPU seconds (default; robust on a "
                   "shared machine) or wall seconds; both are recorded")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier study in --out")
    d.set_defaults(func=run)


def _no_study(args: argparse.Namespace) -> int:
    raise DifflensError("choose a study: `difflens study dictionaries --help`")


def _targets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"--fvu-targets {text!r}: write numbers separated by commas, e.g. 0.5,0.2") from None
    if any(not v > 0 for v in values):
        raise DifflensError(f"--fvu-targets {text!r}: targets must be positive")
    return values


def run(args: argparse.Namespace) -> int:
    cfg = StudyConfig(
        site=args.site, width=args.width, k=args.k, steps=args.train_steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, eval_every=args.eval_every, eval_tokens=args.eval_tokens, init_tokens=args.init_tokens,
        dead_after_tokens=args.dead_after_tokens, normalization=args.normalization, itda_cap=args.itda_cap,
        itda_tau=args.itda_tau, itda_tokens=args.itda_tokens, fvu_targets=_targets(args.fvu_targets), seed=args.seed, clock=args.clock,
        progress=not getattr(args, "quiet", False),
    )
    if not args.lr > 0:
        raise DifflensError(f"--lr must be positive (got {args.lr})")
    from difflens.train.trainer import Interrupted

    try:
        study = run_study(args.data, cfg, args.out, overwrite=args.overwrite)
    except Interrupted:
        print("difflens study: interrupted; the partial run is in OUT/run, start again with --overwrite", file=sys.stderr)
        return 130
    out = Path(args.out)
    print(markdown(study))
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'study.png'}", file=sys.stderr)
    return 0
