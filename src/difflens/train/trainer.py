"""One training loop for every dictionary: a grid and/or a layer sweep trained in lockstep.

Each step reads one batch per site (`data.SiteStream`) and hands it to every dictionary of
that site. Gradient dictionaries: forward → backward → (DDP all-reduce) →
before_optimizer_step → clip → Adam step → after_optimizer_step. ITDA: `partial_fit` on the
(global) batch, no optimizer. Rank 0 evaluates on the held-out slice, logs and checkpoints.

One file (over 500 lines) on purpose: the order of a step (all-reduce, the dictionaries' hooks around
the optimizer, evaluation, checkpoints, signals) is one protocol, read best in one place.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difflens import __version__
from difflens.errors import DifflensError
from difflens.evaluate.metrics import ReconAccumulator, fvu_from_sums
from difflens.outdir import claim_out_dir
from difflens.train import checkpoint as ckpt
from difflens.train import distributed as ddp
from difflens.train import members as mem
from difflens.train.config import RESUMABLE_FIELDS, DictSpec, TrainConfig
from difflens.train.data import Filters, SiteStream, choose_heldout, init_sample, load_eval_slice, nonfinite_loss_error
from difflens.train.logbook import MetricsLog, heldout_summary
from difflens.train.optim_io import load_optimizer, save_optimizer
from difflens.train.schedule import torch_lr_factors
from difflens.utils import progress, read_json, write_json

RUN_JSON = "run.json"
EVAL_CHUNK = 4096


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step was written."""


@dataclass
class Member:
    """One dictionary under training and everything that belongs to it."""

    spec: DictSpec
    module: torch.nn.Module
    opt: torch.optim.Optimizer | None = None
    base_lr: float = 0.0
    log: MetricsLog | None = None
    last: dict = field(default_factory=dict)  # latest train/eval numbers for the progress bar

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def trainable(self) -> bool:
        return self.opt is not None


def open_store(path):
    """Open a store folder with a clear error when it is not one."""
    from difflens.store import Store

    if not isinstance(path, (str, Path)):
        return path  # already a Store
    p = Path(path)
    if not p.is_dir() or not (p / "manifest.json").exists():
        raise DifflensError(f"no activation store at {p}; run `difflens harvest` first or fix --data")
    return Store(p)


def check_sites(store, specs: list[DictSpec]) -> None:
    available = list(store.sites)
    for s in specs:
        if s.site not in available:
            raise DifflensError(
                f"site {s.site!r} (dictionary {s.name}) is not in the store {getattr(store, 'root', '')}; "
                f"available sites: {', '.join(available)}"
            )


class Trainer:
    def __init__(
        self,
        store,
        specs: list[DictSpec],
        cfg: TrainConfig,
        out: str | Path,
        *,
        resume: bool = False,
        env: ddp.DistEnv | None = None,
        on_step=None,
    ) -> None:
        if not specs:
            raise DifflensError("nothing to train: give --arch/--width/--k/--site or a --config with dictionaries")
        self.store = open_store(store)
        self.specs, self.cfg, self.out = specs, cfg, Path(out)
        self.env = env or ddp.current()
        self.on_step = on_step  # test hook: called with the step number after each step
        self.total_steps = cfg.total_steps()
        if cfg.batch_size % self.env.world_size:
            raise DifflensError(
                f"batch size {cfg.batch_size} does not split evenly over {self.env.world_size} processes; "
                "choose a multiple of the process count"
            )
        check_sites(self.store, specs)
        self.sites = list(dict.fromkeys(s.site for s in specs))
        self.filters = Filters(cfg.timestep_range, tuple(cfg.denoise_steps) if cfg.denoise_steps is not None else None)
        self.fingerprint = self.store.fingerprint()
        self._stop = False
        self.resume_from = self._prepare_out(resume)

    # ---- run identity -------------------------------------------------------------------------
    def _run_record(self, heldout: list[int]) -> dict:
        return {
            "difflens_version": __version__,
            "train": self.cfg.to_dict(),
            "dictionaries": [s.to_dict() for s in self.specs],
            "store": {"path": str(getattr(self.store, "root", "")), "fingerprint": self.fingerprint},
            "world_size": self.env.world_size,
            "heldout_sample_ids": heldout,
        }

    def _claim_out(self) -> None:
        """Rank 0 alone claims --out (others would race its marker's temp file), then tells every rank the outcome."""
        error = None
        if self.env.is_main:
            try:
                claim_out_dir(self.out, "train",
                              accept_if=lambda p: (p / RUN_JSON).is_file() or (p / ckpt.STATE_DIR).is_dir())
            except DifflensError as e:
                error = str(e)
        error = ddp.broadcast_object(self.env, error)
        if error is not None:
            raise DifflensError(error)

    def _prepare_out(self, resume: bool) -> Path | None:
        self._claim_out()
        found = ckpt.latest(self.out)
        if found is None:
            return None
        if not resume:
            raise DifflensError(
                f"{self.out} already holds a training run; pass --resume to continue it or choose another --out"
            )
        self._check_same_run(read_json(self.out / RUN_JSON))
        return found

    def _check_same_run(self, old: dict) -> None:
        new = self._run_record(old.get("heldout_sample_ids", []))
        diffs = []
        for key, value in new["train"].items():
            if key not in RESUMABLE_FIELDS and old["train"].get(key) != value:
                diffs.append(f"{key}: {old['train'].get(key)!r} -> {value!r}")
        if old["dictionaries"] != new["dictionaries"]:
            diffs.append("the list of dictionaries (arch/width/k/site/options) differs")
        if old["store"]["fingerprint"] != new["store"]["fingerprint"]:
            diffs.append("the store's contents (fingerprint) differ")
        if old["world_size"] != new["world_size"]:
            diffs.append(f"process count: {old['world_size']} -> {new['world_size']}")
        if diffs:
            raise DifflensError(
                f"--resume with a different configuration than the run in {self.out} ({'; '.join(diffs)}); "
                "rerun with the original settings or choose another --out"
            )

    # ---- setup ----------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg, env = self.cfg, self.env
        if self.resume_from is not None:
            run = read_json(self.out / RUN_JSON)
            self.heldout = run["heldout_sample_ids"]
        else:
            self.heldout = choose_heldout(self.store, self.sites[0], cfg.eval_tokens, self.filters)
            if env.is_main:
                write_json(self.out / RUN_JSON, self._run_record(self.heldout))
        self.run_record = self._run_record(self.heldout)
        local_bs = cfg.batch_size // env.world_size
        self.streams = {
            site: SiteStream(
                self.store,
                site,
                local_batch_size=local_bs,
                seed=cfg.seed,
                filters=self.filters,
                heldout=self.heldout,
                rank=env.rank,
                world_size=env.world_size,
            )
            for site in self.sites
        }
        self.eval_slices = {}
        if env.is_main and self.heldout:
            self.eval_slices = {s: load_eval_slice(self.store, s, self.heldout, self.filters) for s in self.sites}
        model = self.store.manifest.get("model")
        self.members = []
        for i, spec in enumerate(self.specs):
            if self.resume_from is not None:
                module = mem.load(self.resume_from / spec.name, spec)
            else:
                torch.manual_seed(cfg.seed * 1000 + i)  # same initial weights on every rank
                module = mem.build(spec, d_in=self.store.d(spec.site), model=model, cfg=cfg, store=self.store)
            self.members.append(self._member(spec, module))
        if self.resume_from is not None:
            state = ckpt.read_state(self.resume_from)
            self.step, self.tokens = state["step"], state["tokens"]
            self.finished_before = bool(state.get("done"))
            for m in self.members:
                if m.opt is not None:
                    load_optimizer(m.opt, self.resume_from / f"{m.name}.optim")
            for site, pos in state["positions"].items():
                self.streams[site].seek(pos)
            ckpt.load_rng(self.resume_from)
            if env.is_main:
                for m in self.members:
                    m.log.truncate_after(self.step)
                self._export()  # the exported folders match the checkpoint we continue from
        else:
            self.step, self.tokens = 0, 0
            self.finished_before = False
            if env.is_main:  # logs of an earlier attempt that never reached a checkpoint
                for m in self.members:
                    m.log.truncate_after(0)
            self._init_from_data()

    def _member(self, spec: DictSpec, module: torch.nn.Module) -> Member:
        cfg = self.cfg
        m = Member(spec=spec, module=module)
        if getattr(module, "trainable", True):
            groups = [dict(g) for g in module.param_groups()]
            for g in groups:
                g["lr_scale"] = float(g.get("lr_scale", 1.0)) if cfg.scale_lr else 1.0
                g["lr"] = cfg.lr * g["lr_scale"]
            m.base_lr = groups[0]["lr"]  # the dictionary matrices' lr (logged)
            m.opt = make_adam(groups, lr=cfg.lr, betas=(float(cfg.beta1), float(cfg.beta2)), eps=cfg.eps)
        if self.env.active and hasattr(module, "set_batch_comm"):
            module.set_batch_comm(ddp.BatchComm(self.env))  # global-batch selection and AuxK statistics
        if self.env.is_main:
            m.log = MetricsLog(self.out / spec.name, backend=cfg.log, run_name=spec.name,
                               run_config={"dictionary": spec.to_dict(), "training": cfg.to_dict()})
        return m

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> list[Member]:
        self._setup()
        cfg, env = self.cfg, self.env
        old_handlers = self._install_signal_handlers()
        quiet = {"disable": True} if not (env.is_main and cfg.progress) else {}
        bar = progress(total=self.total_steps, initial=self.step, desc="train", **quiet)
        try:
            while self.step < self.total_steps:
                batches, counts = self._next_batches()
                s = self.step
                self.tokens_after = self.tokens + counts[self.sites[0]]
                log_now = (s + 1) % cfg.log_every == 0 or s + 1 == self.total_steps
                for m in self.members:
                    self._train_member(m, batches[m.spec.site], counts[m.spec.site], s, log_now)
                self.step += 1
                self.tokens = self.tokens_after
                last = self.step == self.total_steps
                if env.is_main and cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                    self._evaluate()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not last:
                    self._checkpoint()
                if env.is_main:
                    bar.update(1)
                    bar.set_postfix_str(self._postfix(), refresh=False)
                if self.on_step is not None:
                    self.on_step(self.step)
                if self._agree_to_stop():
                    self._checkpoint()
                    raise Interrupted(f"stopped at step {self.step}; continue with --resume")
            if not self.finished_before:  # a finished run resumed again has nothing to add
                if env.is_main:
                    self._evaluate(final=True)
                self._checkpoint(done=True)
        finally:
            bar.close()
            self._restore_signal_handlers(old_handlers)
            if env.is_main:
                for m in self.members:
                    m.log.close()
        return self.members

    def _next_batches(self) -> tuple[dict, dict]:
        """One batch per site; ranks agree to start a new epoch together (drop_last per rank)."""
        batches, counts = {}, {}
        agree = self._agree if self.env.active else None
        for site, stream in self.streams.items():
            batch = stream.next(agree)
            n = torch.tensor([batch["acts"].shape[0]], dtype=torch.float64)
            ddp.all_reduce_sum_(n, self.env)
            batches[site], counts[site] = batch, int(n.item())
        return batches, counts

    def _agree(self, have: bool) -> bool:
        """True when every rank has a batch left in this epoch."""
        missing = torch.tensor([0.0 if have else 1.0])
        ddp.all_reduce_sum_(missing, self.env)
        return bool(missing.item() == 0)

    def _init_from_data(self) -> None:
        """Data-dependent init (normalisation statistics, b_dec) on the first init_tokens rows."""
        cfg, env = self.cfg, self.env
        for site in self.sites:
            local = init_sample(
                self.store, site, cfg.init_tokens, seed=cfg.seed, filters=self.filters, heldout=self.heldout,
                rank=env.rank, world_size=env.world_size,
            )
            x = ddp.all_gather_rows(local["acts"], env)
            t = ddp.all_gather_rows(local["timestep"], env)
            for m in self.members:
                if m.spec.site != site:
                    continue
                mem.init_from_data(m.module, x, t)
                ddp.broadcast_module_(m.module, env)
                if m.opt is not None:  # fresh Adam moments for the re-initialised parameters
                    m.opt.state.clear()

    def _train_member(self, m: Member, batch: dict, n_global: int, step: int, log_now: bool) -> None:
        cfg, env = self.cfg, self.env
        x, t = batch["acts"], batch["timestep"]
        n_local = int(x.shape[0])
        if n_global == 0:
            return
        if not m.trainable:
            gx = ddp.all_gather_rows(x, env)
            gt = ddp.all_gather_rows(t, env)
            prov = {k: ddp.all_gather_rows(batch[k], env) for k in mem.PROVENANCE if k in batch}
            gx, gt, prov = mem.provenance_order(gx, gt, prov)
            fit = mem.partial_fit(m.module, gx, gt, prov) or {}
            if log_now and env.is_main:
                with torch.no_grad():
                    acc = ReconAccumulator()
                    x_hat, codes = mem.reconstruct(m.module, gx, gt)
                    acc.update(gx, x_hat, codes)
                    r = acc.result()
                extra = {"atoms": mem.current_width(m.module)}
                extra.update({f"itda_{k}": v for k, v in fit.items() if k != "atoms" and isinstance(v, (int, float))})
                self._log_train(m, step, r, extra)
            return
        if getattr(self, "_lr_factors", None) is None or len(self._lr_factors) != self.total_steps:
            self._lr_factors = torch_lr_factors(self.total_steps, cfg.warmup_steps, cfg.decay, cfg.decay_fraction)
        factor = self._lr_factors[step]
        lr = m.base_lr * factor
        for g in m.opt.param_groups:
            g["lr"] = cfg.lr * g.get("lr_scale", 1.0) * factor
        m.opt.zero_grad(set_to_none=True)
        out = None
        m.module.train()
        dead_sync = mem.DeadCounterSync(m.module) if env.active else None
        if n_local:
            out = m.module(x, t)
            if not bool(torch.isfinite(out.loss)):
                raise nonfinite_loss_error(self.store, m.spec.site, batch, step, m.name)
            (out.loss * (n_local / n_global)).backward()
        elif env.active and hasattr(m.module, "join_without_rows"):
            m.module.join_without_rows()  # the batch-level collectives need every rank
        params = [p for p in m.module.parameters() if p.requires_grad]
        if env.active:
            _sync_grads(params, env)
            dead_sync.finish(n_local, n_global, env)
            mem.average_scalar_buffers(m.module, env)
        m.module.before_optimizer_step()
        grad_norm = None
        if cfg.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.grad_clip))
        m.opt.step()
        m.module.after_optimizer_step()
        if log_now:
            stats = _batch_sums(x, out, n_local, env)
            if env.is_main:
                extra = {"lr": lr, "grad_norm": grad_norm}
                extra.update(stats.pop("losses"))
                self._log_train(m, step, stats, extra)

    def _log_train(self, m: Member, step: int, r: dict, extra: dict) -> None:
        rec = {"kind": "train", "step": step + 1, "tokens": self.tokens_after, **extra}
        rec.update({k: v for k, v in r.items() if k in ("loss", "fvu", "explained_variance", "mse", "l0", "cosine")})
        m.last.update({k: rec[k] for k in ("loss", "fvu") if k in rec})
        m.log.append(rec)

    # ---- evaluation, checkpoints -------------------------------------------------------------------
    def _evaluate(self, final: bool = False) -> None:
        for m in self.members:
            sl = self.eval_slices.get(m.spec.site)
            if sl is None or len(sl) == 0:
                continue
            acc = ReconAccumulator(per_bucket=final)
            for x, t, st in sl.chunks(EVAL_CHUNK):
                x_hat, codes = mem.reconstruct(m.module, x, t)
                acc.update(x, x_hat, codes, timestep=t, step=st)
            r = acc.result()
            rec = {"kind": "final" if final else "eval", "step": self.step, "tokens": self.tokens}
            rec.update({k: r[k] for k in ("fvu", "explained_variance", "mse", "cosine", "l0") if k in r})
            rec["eval_tokens"] = r["n"]
            rec["eval_dead_fraction"] = r.get("dead_fraction")
            dead = mem.dead_fraction(m.module)
            if dead is not None:
                rec["dead_fraction"] = dead
                rec["dead_window_tokens"] = self.cfg.dead_after_tokens
            if final and "by_timestep" in r:
                rec["by_timestep"] = r["by_timestep"]
            m.last["fvu"] = rec.get("fvu")
            m.log.append(rec)

    def _extra(self) -> dict:
        return {
            "training": self.cfg.to_dict(),
            "store_fingerprint": self.fingerprint,
            "store": self.run_record["store"]["path"],
            "step": self.step,
            "tokens": self.tokens,
            "heldout_sample_ids": self.heldout,
            "timestep_range": list(self.cfg.timestep_range) if self.cfg.timestep_range else None,
            "denoise_steps": self.cfg.denoise_steps,
        }

    def _checkpoint(self, done: bool = False) -> None:
        ddp.barrier(self.env)
        if self.env.is_main:
            extra = self._extra()
            positions = {site: s.position() for site, s in self.streams.items()}

            def fill(folder: Path) -> None:
                for m in self.members:
                    mem.save(m.module, folder / m.name, extra)
                    if m.opt is not None:
                        save_optimizer(m.opt, folder / f"{m.name}.optim")
                ckpt.save_rng(folder)
                write_json(
                    folder / "state.json",
                    {"step": self.step, "tokens": self.tokens, "positions": positions, "done": done},
                )

            ckpt.write(self.out, self.step, fill, self.cfg.keep_checkpoints)
            self._export()
        ddp.barrier(self.env)

    def _export(self) -> None:
        extra = self._extra()
        for m in self.members:
            mem.save(m.module, self.out / m.name, extra)
            m.log.render_csv()

    def _postfix(self) -> str:
        if len(self.members) == 1:
            last = self.members[0].last
            return " ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
        fvus = [m.last["fvu"] for m in self.members if isinstance(m.last.get("fvu"), float)]
        return f"fvu {min(fvus):.3g}..{max(fvus):.3g}" if fvus else ""

    # ---- interruption ---------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def handler(signum, frame):  # noqa: ARG001
            if self._stop and signum == signal.SIGINT:  # a second Ctrl-C: stop now, lose this step
                raise KeyboardInterrupt
            self._stop = True
            if self.env.is_main:
                print("\nstopping after this step (checkpoint, then exit); Ctrl-C again to abort", file=sys.stderr)

        old = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no graceful stop, checkpoints still protect us
            return {}
        return old

    def _restore_signal_handlers(self, old) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0])
        ddp.all_reduce_sum_(flag, self.env)
        return bool(flag.item() > 0)


_FUSED_CPU_ADAM: bool | None = None


def _fused_cpu_adam_works() -> bool:
    """Whether this torch build runs Adam(fused=True) on CPU (probed once on a 2-element tensor)."""
    global _FUSED_CPU_ADAM
    if _FUSED_CPU_ADAM is None:
        try:
            p = torch.nn.Parameter(torch.ones(2))
            p.grad = torch.ones(2)
            torch.optim.Adam([p], lr=0.5, fused=True).step()
            _FUSED_CPU_ADAM = bool(torch.isfinite(p).all() and (p < 1).all())
        except Exception:  # noqa: BLE001 - any failure means "not supported here"
            _FUSED_CPU_ADAM = False
    return _FUSED_CPU_ADAM


def make_adam(params, **kwargs) -> torch.optim.Adam:
    """Adam, fused on CPU when the build supports it (3-7x faster step than foreach on large
    matrices, docs/dictionaries.md); otherwise torch's default implementation."""
    params = list(params)
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    on_cpu = bool(flat) and all(p.device.type == "cpu" and p.is_floating_point() for p in flat)
    if on_cpu and _fused_cpu_adam_works():
        try:
            return torch.optim.Adam(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.Adam(params, **kwargs)


def _sync_grads(params: list[torch.nn.Parameter], env: ddp.DistEnv) -> None:
    """All-reduce grads; a parameter no rank touched keeps grad None (as in one process)."""
    has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params])
    ddp.all_reduce_sum_(has, env)
    touched = [p for p, h in zip(params, has.tolist()) if h > 0]
    ddp.all_reduce_grads_(touched, env)


def _batch_sums(x: torch.Tensor, out, n_local: int, env: ddp.DistEnv) -> dict:
    """Exact global-batch FVU/L0/loss via all-reduced sums (training records)."""
    d = x.shape[1]
    buf = torch.zeros(5 + d, dtype=torch.float64)
    losses = {}
    if n_local and out is not None:
        x64 = x.detach().double()
        buf[0] = n_local
        buf[1] = float(x64.pow(2).sum())
        buf[2] = float((x64 - out.x_hat.detach().double()).pow(2).sum())
        buf[3] = float(out.l0) * n_local if out.l0 is not None else float((out.codes.detach() != 0).sum())
        buf[4] = float(out.loss.detach()) * n_local
        buf[5:] = x64.sum(0)
        losses = {f"loss_{k}": float(v.detach()) * n_local for k, v in (out.losses or {}).items()}
    names = _union_of_names(losses, env)  # ranks without rows (or without a term) still join in
    lbuf = torch.tensor([losses.get(k, 0.0) for k in names], dtype=torch.float64)
    ddp.all_reduce_sum_(buf, env)
    if names:
        ddp.all_reduce_sum_(lbuf, env)
    n = float(buf[0])
    if n == 0:
        return {"losses": {}}
    fvu = fvu_from_sums(n, float(buf[1]), buf[5:], float(buf[2]))
    return {
        "loss": float(buf[4]) / n,
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "mse": float(buf[2]) / (n * d),
        "l0": float(buf[3]) / n,
        "losses": {k: float(v) / n for k, v in zip(names, lbuf.tolist())},
    }


def _union_of_names(local: dict, env: ddp.DistEnv) -> list[str]:
    """Sorted union of the loss names over ranks, without pickling (names travel as bytes)."""
    if not env.active:
        return sorted(local)
    blob = torch.tensor(list((";".join(sorted(local)) + "\n").encode()), dtype=torch.uint8)
    text = bytes(ddp.all_gather_rows(blob, env).tolist()).decode()
    return sorted({n for part in text.split("\n") for n in part.split(";") if n})


def train(store, specs: list[DictSpec], cfg: TrainConfig, out, *, resume: bool = False, on_step=None) -> dict:
    """Train `specs` in lockstep on `store`; returns {name: trained dictionary}. See docs/training.md."""
    env = ddp.current()
    t0 = time.time()
    trainer = Trainer(store, specs, cfg, out, resume=resume, env=env, on_step=on_step)
    members = trainer.run()
    if env.is_main and cfg.progress:
        final = [next((r for r in reversed(m.log.records()) if r.get("kind") == "final"), None) for m in members]
        print(heldout_summary([(m.name, m.spec.arch, m.module.num_latents, r) for m, r in zip(members, final)],
                              heldout_samples=len(trainer.heldout), eval_tokens=cfg.eval_tokens), file=sys.stderr)
        print(f"trained {len(members)} dictionar{'y' if len(members) == 1 else 'ies'} in {time.time() - t0:.0f}s -> {out}", file=sys.stderr)
    return {m.name: m.module for m in members}
