"""The recording hook: keeps chosen tokens of the conditional rows at chosen steps, with coordinates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from difflens.hooks import HookContext, Site

STREAM_CODE = {"img": 0, "txt": 1}


def token_choice(n_tokens: int, k: int, sample_id: int, step: int, stream: str, seed: int,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Deterministic per (sample, step, stream): every site of a stream keeps the same tokens, so
    rows line up across sites, and a resumed harvest picks exactly what the first one did.
    With `valid` (bool [n_tokens], False = text padding) a subsample is drawn from valid tokens only."""
    if k >= n_tokens:
        return np.arange(n_tokens)
    rng = np.random.default_rng([seed, sample_id, step, STREAM_CODE[stream]])
    if valid is not None and not valid.all():
        cand = np.flatnonzero(valid)
        return np.sort(rng.choice(cand, size=min(k, len(cand)), replace=False))
    return np.sort(rng.choice(n_tokens, size=k, replace=False))


@dataclass
class UnitRecorder:
    """Collects one unit's rows per site; `rows()` returns them in the store's format."""

    sample_ids: np.ndarray  # global sample id of each sample in this generate() call
    prompt_ids: np.ndarray
    seeds: np.ndarray
    keep: Callable[[int], int]  # tokens kept per (sample, step) out of a stream's n
    record_steps: set[int] | None
    cond_only: bool
    token_seed: int
    token_labels: dict[int, np.ndarray] | None = None  # sample_id -> [n_img] int64 concept masks
    text_labels: dict[int, np.ndarray] | None = None  # sample_id -> [n_txt] int64
    parts: dict[str, list] = field(default_factory=dict)

    def hook_for(self, site: Site):
        def hook(acts_BND: torch.Tensor, ctx: HookContext):
            self.record(str(site), site.stream, acts_BND, ctx)
            return None

        return hook

    def record(self, site: str, stream: str, acts_BND: torch.Tensor, ctx: HookContext) -> None:
        if self.record_steps is not None and ctx.step not in self.record_steps:
            return
        rows = torch.nonzero(ctx.is_cond if self.cond_only else torch.ones_like(ctx.is_cond)).flatten()
        B, N, D = acts_BND.shape
        h_grid, w_grid = ctx.grid_hw
        k = min(self.keep(N), N)
        for r in rows.tolist():
            local = int(ctx.sample_index[r])
            sid = int(self.sample_ids[local])
            mask = getattr(ctx, "text_mask", None)  # [B, N] bool when the adapter reports text padding
            valid = mask[r].detach().cpu().numpy().astype(bool) if stream == "txt" and mask is not None else None
            if valid is not None and len(valid) != N:
                raise RuntimeError(f"site {site}: the adapter's text mask covers {len(valid)} tokens but the site "
                                   f"carries {N}; the adapter's text_masks() disagrees with its text stream")
            tok = token_choice(N, k, sid, ctx.step, stream, self.token_seed, valid)
            acts = acts_BND[r, torch.from_numpy(tok)].detach().to("cpu", torch.float32)
            n = len(tok)
            meta = {
                "sample_id": np.full(n, sid, np.int64),
                "prompt_id": np.full(n, self.prompt_ids[local], np.int64),
                "seed": np.full(n, self.seeds[local], np.int64),
                "step": np.full(n, ctx.step, np.int32),
                "timestep": np.full(n, ctx.timestep, np.float32),
                "token": tok.astype(np.int32),
                "h": (tok // w_grid).astype(np.int16) if stream == "img" else np.full(n, -1, np.int16),
                "w": (tok % w_grid).astype(np.int16) if stream == "img" else np.full(n, -1, np.int16),
                "stream": np.full(n, STREAM_CODE[stream], np.int8),
            }
            if not self.cond_only:  # both CFG branches: say which row is which
                meta["branch"] = np.full(n, 0 if bool(ctx.is_cond[r]) else 1, np.int8)
            if valid is not None:
                meta["attn_mask"] = valid[tok].astype(np.int8)
            labels = self.token_labels if stream == "img" else self.text_labels
            if labels is not None:
                lab = labels.get(sid)
                meta["labels"] = lab[tok] if lab is not None and len(lab) == N else np.zeros(n, np.int64)
            self.parts.setdefault(site, []).append((acts, meta))

    def rows(self) -> dict[str, tuple[torch.Tensor, dict[str, np.ndarray]]]:
        out = {}
        for site, parts in self.parts.items():
            acts = torch.cat([a for a, _ in parts])
            meta = {c: np.concatenate([m[c] for _, m in parts]) for c in parts[0][1]}
            out[site] = (acts, meta)
        return out
