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

This module holds the settings and the lockstep run; the tables and reports drawn from its curves
are in `study_report.py`, the `difflens study` command in `study_cli.py`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from difflens.errors import DifflensError
from difflens.evaluate.study_report import LABELS, NAMES, bucket_table, markdown, plot, speedup, time_to_fvu

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
        "by_timestep": bucket_table(dictionaries),
        "time_to_fvu": time_to_fvu(dictionaries, cfg.fvu_targets, cfg.clock),
    }
    from difflens.utils import atomic_write_text, json_safe, write_json

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


__all__ = ["StudyConfig", "run_study", "early_eval_steps", "markdown", "plot", "speedup", "NAMES", "LABELS", "RUN_DIR"]
