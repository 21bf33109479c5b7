"""Reconstruction evaluation of trained dictionaries on an activation store.

Several dictionaries are evaluated in one pass per site. When a dictionary was trained on this
very store (same fingerprint in its checkpoint), only its held-out samples are used, so the
numbers are out-of-sample; on any other store every row counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.evaluate.metrics import ReconAccumulator
from difflens.train.data import Filters
from difflens.train.members import load_with_extra, reconstruct
from difflens.utils import progress

READ_COLUMNS = ("acts", "timestep", "step", "sample_id")


@dataclass
class Evaluated:
    """One dictionary to evaluate, with what the report shows about it."""

    name: str
    module: torch.nn.Module
    path: str | None = None
    extra: dict = field(default_factory=dict)  # the checkpoint's training record (may be empty)

    @property
    def site(self) -> str:
        return self.module.cfg.site

    def describe(self) -> dict:
        cfg = self.module.cfg
        out = {"name": self.name, "path": self.path, "arch": cfg.arch, "site": cfg.site, "d_in": cfg.d_in}
        out["width"] = int(getattr(self.module, "num_atoms", None) or cfg.width)
        out["k"] = getattr(cfg, "k", None)
        if getattr(cfg, "normalization", None) is not None:
            out["normalization"] = cfg.normalization
        if self.extra.get("step") is not None:
            out["trained_steps"] = self.extra["step"]
            out["trained_tokens"] = self.extra.get("tokens")
        return out


def check_against_store(items: list[Evaluated], store) -> None:
    sites = list(store.sites)
    for it in items:
        if it.site not in sites:
            raise DifflensError(
                f"dictionary {it.name} was trained on site {it.site!r}, which store {store.root} lacks; "
                f"its sites are {', '.join(sites)}: evaluate on a store harvested at that site"
            )
        d = store.d(it.site)
        if d != it.module.cfg.d_in:
            raise DifflensError(
                f"dictionary {it.name} expects d_in={it.module.cfg.d_in} at {it.site} but the store has d={d}: "
                "it was trained on another model"
            )


def _heldout_ids(it: Evaluated, store, split: str) -> np.ndarray | None:
    """Sample ids to evaluate on, or None for every row."""
    if split == "all":
        return None
    same_store = it.extra.get("store_fingerprint") == store.fingerprint()
    ids = it.extra.get("heldout_sample_ids")
    if same_store and ids:
        return np.asarray(ids, dtype=np.int64)
    if split == "heldout":
        raise DifflensError(
            f"dictionary {it.name} has no held-out samples in this store (it was trained on another store, "
            "or with --eval-tokens 0); use --split all"
        )
    return None


def evaluate(
    items: list[Evaluated],
    store,
    *,
    max_tokens: int | None = None,
    batch_size: int = 4096,
    split: str = "auto",
    filters: Filters | None = None,
    dead_window: int | None = None,
    show_progress: bool = True,
) -> dict:
    """Metrics (overall and per timestep) of each dictionary; a JSON-ready dict.

    split: "auto" = held-out samples when the dictionary was trained on this store, else all rows;
    "heldout" requires them; "all" uses every row. max_tokens caps the rows per dictionary.
    """
    if split not in ("auto", "heldout", "all"):
        raise DifflensError(f"split {split!r} is unknown; use auto, heldout or all")
    if max_tokens is not None and max_tokens <= 0:
        raise DifflensError(f"--max-tokens must be positive (got {max_tokens})")
    check_against_store(items, store)
    filters = filters or Filters()
    results: dict[str, dict] = {}
    for site in dict.fromkeys(it.site for it in items):
        group = [it for it in items if it.site == site]
        results.update(_evaluate_site(group, store, site, max_tokens, batch_size, split, filters, dead_window, show_progress))
    return {
        "store": str(store.root),
        "store_fingerprint": store.fingerprint(),
        "model": store.manifest.get("model"),
        "filters": {"timestep_range": filters.timestep_range, "denoise_steps": filters.denoise_steps},
        "max_tokens": max_tokens,
        "dictionaries": [{**it.describe(), **results[it.name]} for it in items],
    }


def _evaluate_site(group, store, site, max_tokens, batch_size, split, filters, dead_window, show_progress) -> dict:
    meta = store.meta(site, ["sample_id", "timestep", "step"])
    keep = filters.mask(np.asarray(meta["timestep"]), np.asarray(meta["step"]))
    sids = np.asarray(meta["sample_id"])[keep]
    plans = []
    for it in group:
        ids = _heldout_ids(it, store, split)
        available = int(len(sids) if ids is None else np.isin(sids, ids).sum())
        if available == 0:
            raise DifflensError(f"dictionary {it.name}: no rows of {site} to evaluate (check the filters)")
        want = available if max_tokens is None else min(max_tokens, available)
        plans.append(
            {
                "it": it,
                "ids": None if ids is None else torch.as_tensor(ids),
                "want": want,
                "acc": ReconAccumulator(dead_window=dead_window),
                "split": "all" if ids is None else "heldout",
            }
        )
    # a capped evaluation of all rows reads a shuffled sample; otherwise store order (held-out first)
    shuffle = max_tokens is not None and any(p["ids"] is None for p in plans)
    stream = store.batches(
        site, batch_size, shuffle=shuffle, seed=0, columns=READ_COLUMNS, drop_last=False, epochs=1, **filters.store_kwargs()
    )
    quiet = {} if show_progress else {"disable": True}
    bar = progress(total=max(p["want"] for p in plans), desc=f"evaluate {site}", unit="tok", **quiet)
    for batch in stream:
        pending = [p for p in plans if p["acc"].overall.n < p["want"]]
        if not pending:
            break
        for p in pending:
            sel = torch.ones(len(batch["acts"]), dtype=torch.bool)
            if p["ids"] is not None:
                sel = torch.isin(batch["sample_id"], p["ids"])
            idx = torch.nonzero(sel).reshape(-1)[: p["want"] - p["acc"].overall.n]
            if len(idx) == 0:
                continue
            x, t, st = batch["acts"][idx], batch["timestep"][idx], batch["step"][idx]
            x_hat, codes = reconstruct(p["it"].module, x, t)
            p["acc"].update(x, x_hat, codes, timestep=t, step=st)
        bar.n = min(p["acc"].overall.n for p in plans)
        bar.refresh()
    bar.close()
    out = {}
    for p in plans:
        r = p["acc"].result()
        r["split"] = p["split"]
        out[p["it"].name] = {"metrics": r}
    return out


def load_items(paths: list[str], store=None) -> list[Evaluated]:
    """Load dictionary folders (checking site and d_in against the store when given)."""
    from difflens.dictionaries.hub import display_name

    folders = [Path(path).resolve() for path in paths]
    short = [display_name(f) or f.name for f in folders]
    items = []
    for f, name in zip(folders, short):
        if short.count(name) > 1:  # equally named dictionaries of two runs: qualify with the run folder
            name = f"{f.parent.name}/{f.name}"
        module, extra = load_with_extra(f)
        items.append(Evaluated(name=name, module=module, path=str(f), extra=extra))
    if store is not None:
        check_against_store(items, store)
    return items
