"""The trainer's only contact with `difflens.dictionaries`: build, load, save, fit, encode.

Kept in one place so the loop stays architecture-agnostic and an API change touches one file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflens.errors import DifflensError
from difflens.train.config import DictSpec, TrainConfig

PROVENANCE = ("sample_id", "step", "token")


def dict_config(spec: DictSpec, *, d_in: int, model: str | None, cfg: TrainConfig):
    """A DictConfig from a spec; unknown option names are reported with the known ones."""
    from difflens.dictionaries import config_class

    cls = config_class(spec.arch)
    fields = cls.field_names() - {"schema_version"}
    kwargs = {"arch": spec.arch, "d_in": d_in, "width": spec.width, "k": spec.k, "site": spec.site, "model": model}
    unknown = sorted(set(spec.options) - fields)
    if unknown:
        raise DifflensError(
            f"dictionary {spec.name}: unknown option(s) {', '.join(unknown)} for arch {spec.arch}; "
            f"its options are {', '.join(sorted(fields - set(kwargs)))}"
        )
    reserved = sorted({"d_in", "model"} & set(spec.options))
    if reserved:
        raise DifflensError(
            f"dictionary {spec.name}: {', '.join(reserved)} come(s) from the store; remove it from the options"
        )
    kwargs.update(spec.options)
    # training-loop settings the dictionary owns (dead tracking, AuxK) unless set per dictionary
    if "dead_after_tokens" in fields and "dead_after_tokens" not in spec.options:
        kwargs["dead_after_tokens"] = cfg.dead_after_tokens
    if "init_seed" in fields and "init_seed" not in spec.options:
        kwargs["init_seed"] = cfg.seed
    if not cfg.auxk and "auxk" in fields and "auxk" not in spec.options:
        kwargs["auxk"] = False
    return cls(**kwargs)


def build(spec: DictSpec, *, d_in: int, model: str | None, cfg: TrainConfig, store=None):
    from difflens.dictionaries import build as build_dict

    return build_dict(dict_config(spec, d_in=d_in, model=model, cfg=cfg))


def load(folder: Path, spec: DictSpec):
    from difflens.dictionaries import io

    return io.load(folder, expect_site=spec.site)


def load_with_extra(folder: Path):
    """A saved dictionary plus its training record (store fingerprint, held-out ids, step)."""
    from difflens.dictionaries import io

    meta = io.read_meta(folder)
    extra = dict(meta.get("extra") or {})
    extra["store_fingerprint"] = meta.get("store_fingerprint")
    extra["training"] = meta.get("training")
    return io.load(folder), extra


def save(module, folder: Path, extra: dict) -> None:
    from difflens.dictionaries import io

    io.save(module, folder, extra=extra)


def init_from_data(module, x: torch.Tensor, t: torch.Tensor) -> None:
    fn = getattr(module, "init_from_data", None)
    if fn is not None:
        fn(x, t)


def provenance_order(x: torch.Tensor, t: torch.Tensor, prov: dict[str, torch.Tensor]):
    """Rows sorted by where they came from (sample, step, token), so ITDA, which admits atoms in
    batch order, builds the same dictionary whether a batch was read by one process or gathered
    from several ranks (whose concatenation order differs)."""
    if not prov or x.shape[0] < 2:
        return x, t, prov
    key = torch.zeros(x.shape[0], dtype=torch.int64)
    for name in PROVENANCE:
        if name in prov:
            col = prov[name].to(torch.int64)
            key = key * (int(col.max()) + 1) + col
    order = torch.argsort(key, stable=True)
    return x[order], t[order], {k: v[order] for k, v in prov.items()}


def partial_fit(module, x: torch.Tensor, t: torch.Tensor, provenance: dict[str, torch.Tensor]) -> dict | None:
    """ITDA's step: add badly reconstructed rows as atoms; returns its counts for the log."""
    return module.partial_fit(x, t, provenance)


@torch.no_grad()
def reconstruct(module, x: torch.Tensor, t: torch.Tensor):
    """(x_hat, codes) in eval mode, codes sparse when the dictionary is (never densified).

    `forward` in eval mode leaves training statistics (dead counters, BatchTopK's threshold)
    untouched and uses inference-time selection, like `encode`.
    """
    from difflens.evaluate.metrics import SparseCodes

    was_training = module.training
    module.eval()
    try:
        out = module(x, t)
    finally:
        module.train(was_training)
    if out.values is not None and out.indices is not None:
        return out.x_hat, SparseCodes(out.values, out.indices, int(out.num_latents))
    return out.x_hat, out.codes


def dead_fraction(module) -> float | None:
    fn = getattr(module, "dead_fraction", None)
    return None if fn is None else float(fn())


def current_width(module) -> int:
    return int(getattr(module, "num_atoms", None) or module.cfg.width)


class DeadCounterSync:
    """DDP: make the dead-latent counters what one process would hold after the global batch.

    A dictionary counts, per latent, tokens since it last fired (`tokens_since_fired_F`), adding
    its local row count. Across ranks the right update is: 0 where the latent fired on ANY rank,
    else previous + global row count. We snapshot before the forward and rebuild after it.
    Dictionaries without such a counter fall back to their own `sync_dead_stats`.
    """

    def __init__(self, module) -> None:
        self.module = module
        self.counter = getattr(module, "tokens_since_fired_F", None)
        self.prev = None if self.counter is None else self.counter.clone()

    def finish(self, n_local: int, n_global: int, env) -> None:
        from difflens.train import distributed as ddp

        if self.counter is None:
            fn = getattr(self.module, "sync_dead_stats", None)
            if fn is not None:
                fn(env)
            return
        fired = (self.counter < self.prev + n_local).to(torch.float32) if n_local else torch.zeros(self.counter.shape)
        ddp.all_reduce_sum_(fired, env)
        self.counter.copy_(torch.where(fired > 0, torch.zeros_like(self.prev), self.prev + n_global))


def average_scalar_buffers(module, env) -> None:
    """DDP: running scalar statistics are averaged over ranks (BatchTopK's threshold is already the
    same on every rank, since it selects over the global batch; averaging keeps it)."""
    from difflens.train import distributed as ddp

    for buf in module.buffers():
        if buf.ndim == 0 and buf.is_floating_point():
            ddp.all_reduce_sum_(buf.data, env)
            buf.data.div_(env.world_size)
