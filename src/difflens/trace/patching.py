"""Activation patching: run a target prompt with some of a source run's activations swapped in.

A *cell* says what to patch: which sites, at which denoising steps, in which CFG branch, and
(optionally) only which image tokens. One `patched_generate` call runs many cells as one batch:
sample j of the batch is the target of pair `pair_of[j]` and patches as `cells[j]` says, with
the activations of that pair's source run (recorded once by `record_source`), taken from the
same site, step, transformer call and CFG branch.

Why whole tensors are copied (`torch.where`, no arithmetic): patching nothing leaves the run
bit-identical, and patching every site plus the conditioning vector at every step makes the
target's transformer output the source's, so the image is the source image.

The conditioning vector (the pooled text + timestep embedding that modulates every block in
Flux / SD3, the class embedding in DiT) is not a token stream; `conditioning_sites` exposes it
as extra sites (`time_text_embed:txt`) so a trace can ask whether a concept travels that way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from difflens.errors import DifflensError
from difflens.generation import generate_batched, requests_of
from difflens.hooks import HookSet, Site, SiteBinding

if TYPE_CHECKING:
    from difflens.models.base import Adapter

BRANCH_CODES = {"both": 0, "cond": 1, "uncond": 2}
# diffusers' modules that turn (timestep, pooled text / class label) into the modulation vector.
_CONDITIONING_CLASS_HINT = "CombinedTimestep"


# ---- what to patch ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """Patch `sites` at `steps` (scheduler step indices) in CFG `branch`; `region` names a token
    mask given per pair (None = every token)."""

    sites: tuple[str, ...]
    steps: tuple[int, ...]
    branch: str = "both"
    region: str | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.branch not in BRANCH_CODES:
            raise DifflensError(f"branch {self.branch!r} unknown: use both, cond or uncond")


NO_PATCH = Cell((), (), "both", None, "no patch")


# ---- the conditioning vector as a site ------------------------------------------------------------
def conditioning_modules(transformer: torch.nn.Module) -> list[str]:
    """Module paths of the embedding(s) that carry pooled text / class labels into every block.

    Outermost modules only (a chosen module's children are skipped)."""
    out: list[str] = []
    for name, mod in transformer.named_modules():
        if not name or _CONDITIONING_CLASS_HINT not in type(mod).__name__:
            continue
        if any(name.startswith(p + ".") for p in out):
            continue
        out.append(name)
    return out


def conditioning_sites(adapter: Adapter) -> dict[str, SiteBinding]:
    """{'time_text_embed:txt': binding} for the adapter's conditioning modules (may be empty)."""
    out = {}
    for path in conditioning_modules(adapter.transformer):
        mod = adapter.transformer.get_submodule(path)
        dim = next((int(p.shape[0]) for n, p in mod.named_parameters() if n.endswith("bias")), 0)
        out[f"{path}:txt"] = SiteBinding(path, dim, "tensor")
    return out


@contextmanager
def with_sites(adapter: Adapter, extra: dict[str, SiteBinding]) -> Iterator[None]:
    """The adapter also hooks `extra` sites inside the block (adapters resolve sites through
    `site_bindings()` when they attach hooks); restored afterwards."""
    if not extra:
        yield
        return
    base = adapter.site_bindings
    merged = {**base(), **extra}
    adapter.site_bindings = lambda: merged
    try:
        yield
    finally:
        del adapter.site_bindings  # back to the class's method


def block_sites(adapter: Adapter) -> list[str]:
    """The residual outputs of every block (`transformer_blocks.3:img` ...), both streams: the
    default sites of a trace. MLP hidden units and other inner sites can be named explicitly."""
    out = []
    for s in adapter.sites():
        module = Site.parse(s).module
        parts = module.split(".")
        if len(parts) == 2 and parts[1].isdigit():
            out.append(s)
    return out


# ---- recording the source runs ------------------------------------------------------------------------
@dataclass
class SourceRun:
    """Activations of the source prompts at every (site, step, call): acts [R, ...] float32,
    with is_cond / sample_index per row; plus the source images."""

    acts: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    images: np.ndarray
    n: int

    def rows_for(self, key, pairs: torch.Tensor, is_cond: torch.Tensor) -> torch.Tensor:
        """Row of the recording for each (pair, branch)."""
        _, cond_r, sidx_r = self.acts[key]
        table = torch.full((self.n, 2), -1, dtype=torch.long)
        table[sidx_r, cond_r.long()] = torch.arange(len(sidx_r))
        rows = table[pairs, is_cond.long()]
        if (rows < 0).any():
            raise DifflensError(
                f"the source run has no matching CFG row at {key[0]} step {key[1]}: generate target and source "
                "with the same guidance"
            )
        return rows


def record_source(adapter: Adapter, prompts: Sequence[str], seeds: Sequence[int], sites: Sequence[str], *, steps: int,
                  guidance: float | None = None, extra: dict[str, SiteBinding] | None = None, **gen_kwargs) -> SourceRun:
    """Generate the source prompts once and keep every site's activations at every step."""
    acts: dict = {}

    def rec(site):
        def hook(a, ctx):
            acts[(site, ctx.step, ctx.call_index)] = (a.detach().to("cpu", torch.float32).clone(), ctx.is_cond.clone(),
                                                      ctx.sample_index.clone())

        return hook

    hooks = HookSet([(s, rec(s)) for s in sites])
    with with_sites(adapter, extra or {}):
        gen = adapter.generate(list(prompts), [int(s) for s in seeds], steps=steps, guidance=guidance, hooks=hooks,
                               **gen_kwargs)
    return SourceRun(acts, np.asarray(gen.images), len(prompts))


# ---- patched generation -------------------------------------------------------------------------------
def _patch_hook(site: str, source: SourceRun, bits_B: torch.Tensor, branch_B: torch.Tensor, pair_B: torch.Tensor,
                tokens_BN: torch.Tensor | None):
    """Hook for one site: rows whose cell patches this site at this step/branch take the source's values."""

    def hook(acts, ctx):
        si = ctx.sample_index.cpu()
        cond = ctx.is_cond.cpu()
        on_step = ((bits_B[si] >> ctx.step) & 1).bool()
        br = branch_B[si]
        active = on_step & ((br == 0) | ((br == 1) & cond) | ((br == 2) & ~cond))
        if not bool(active.any()):
            return None
        key = (site, ctx.step, ctx.call_index)
        if key not in source.acts:
            raise DifflensError(f"no source activations recorded at {site} step {ctx.step}: record the source with the same sites and steps")
        src = source.acts[key][0]
        rows = source.rows_for(key, pair_B[si], cond)
        src = src.index_select(0, rows).to(device=acts.device, dtype=acts.dtype)
        if src.shape != acts.shape:
            raise DifflensError(f"source activations at {site} have shape {tuple(src.shape)}, target {tuple(acts.shape)}: "
                                "target and source must have the same size and text length")
        mask = active.to(acts.device)
        if tokens_BN is not None and acts.ndim == 3 and Site.parse(site).stream == "img":
            mask = mask[:, None] & tokens_BN[si].to(acts.device)
        while mask.ndim < acts.ndim:
            mask = mask[..., None]
        return torch.where(mask, src, acts)

    return hook


def patch_hooks(cells: Sequence[Cell], pair_of: Sequence[int], source: SourceRun, *,
                regions: dict[str, np.ndarray] | None = None) -> HookSet:
    """One hook per patched site; sample j patches as `cells[j]` from source pair `pair_of[j]`.

    `regions[name]` is a bool [n_pairs, image tokens] mask for cells with `region=name`."""
    if len(cells) != len(pair_of):
        raise DifflensError("patch_hooks: cells and pair_of need one entry per sample")
    B = len(cells)
    pair_B = torch.tensor([int(p) for p in pair_of], dtype=torch.long)
    if B and (int(pair_B.max()) >= source.n or int(pair_B.min()) < 0):
        raise DifflensError(f"pair index out of range: the source run has {source.n} prompts")
    branch_B = torch.tensor([BRANCH_CODES[c.branch] for c in cells], dtype=torch.long)
    names = {c.region for c in cells if c.region is not None}
    tokens = None
    if names:
        if any(n not in (regions or {}) for n in names):
            raise DifflensError(f"cells name regions {sorted(names)} but no token masks were given for them")
        n_tok = next(iter(regions.values())).shape[1]
        tokens = torch.ones(B, n_tok, dtype=torch.bool)
        for j, c in enumerate(cells):
            if c.region is not None:
                tokens[j] = torch.from_numpy(np.asarray(regions[c.region][pair_of[j]], bool))
    hooks = HookSet()
    for site in sorted({s for c in cells for s in c.sites}):
        bits = torch.zeros(B, dtype=torch.long)
        for j, c in enumerate(cells):
            if site in c.sites:
                for s in c.steps:
                    if not 0 <= int(s) < 62:
                        raise DifflensError(f"step {s} out of range for a patch (0..61)")
                    bits[j] |= 1 << int(s)
        hooks.add(site, _patch_hook(site, source, bits, branch_B, pair_B, tokens))
    return hooks


def patched_batches(adapter: Adapter, prompts: Sequence[str], seeds: Sequence[int], cells: Sequence[Cell],
                    pair_of: Sequence[int],
                    source: SourceRun, *, steps: int, guidance: float | None = None,
                    regions: dict[str, np.ndarray] | None = None, extra: dict[str, SiteBinding] | None = None,
                    batch_size: int = 64, **gen_kwargs) -> Iterator[tuple[int, np.ndarray]]:
    """(first sample, images) per batch of at most `batch_size` targets, generated through
    `generation.generate_batched`; sample j patched as `cells[j]` from source pair `pair_of[j]` (see patch_hooks)."""
    if len(prompts) != len(seeds) or len(prompts) != len(cells) or len(cells) != len(pair_of):
        raise DifflensError("patched_generate: prompts, seeds, cells and pair_of must have one entry per sample")
    cells, pair_of = list(cells), list(pair_of)

    def hooks(plan):
        a, b = plan.batch_start, plan.batch_start + len(plan.prompts)
        return patch_hooks(cells[a:b], pair_of[a:b], source, regions=regions) or None

    with with_sites(adapter, extra or {}):
        for b in generate_batched(adapter, requests_of(prompts, seeds), hooks, steps=steps, guidance=guidance,
                                  batch_size=batch_size, **gen_kwargs):
            yield b.start, np.asarray(b.generation.images)


def patched_generate(adapter: Adapter, prompts: Sequence[str], seeds: Sequence[int], cells: Sequence[Cell],
                     pair_of: Sequence[int],
                     source: SourceRun, *, steps: int, guidance: float | None = None,
                     regions: dict[str, np.ndarray] | None = None, extra: dict[str, SiteBinding] | None = None,
                     **gen_kwargs) -> np.ndarray:
    """Images of the targets in one generate() call, sample j patched as `cells[j]` from source pair `pair_of[j]`."""
    return np.concatenate([imgs for _, imgs in patched_batches(
        adapter, prompts, seeds, cells, pair_of, source, steps=steps, guidance=guidance, regions=regions, extra=extra,
        batch_size=max(1, len(prompts)), **gen_kwargs)])
