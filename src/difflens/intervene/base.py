"""The intervention base: one change at one site, restricted to a step window, a token region,
a CFG branch and some samples; plus the dictionary helpers every dictionary edit shares.

Interventions compose: `difflens.intervene.run.generate_with` turns a list of them (several
sites, several dictionaries, image and text streams) into one HookSet and one generation.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from difflens.errors import DifflensError
from difflens.generation import GenerationPlan
from difflens.hooks import HookContext, Site
from difflens.intervene.region import Region, Window

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary
    from difflens.models.base import Adapter

BRANCHES = ("both", "cond", "uncond")
SCALE_MODES = ("absolute", "token-norm", "feature-max")


# ---- run description -------------------------------------------------------------------------
# What an intervention may need to know about the generation it is about to join: the plan of
# one generate() call (prompts, seeds, steps, guidance, timesteps, token grid, image size).
RunInfo = GenerationPlan


def default_steps(adapter: Adapter) -> int:
    """The adapter's declared default number of denoising steps."""
    return adapter.default_steps


# ---- base class ------------------------------------------------------------------------------
class Intervention:
    """One change at one site, restricted to a window, a region, a CFG branch and some samples."""

    kind = "intervention"

    def __init__(
        self,
        *,
        site: str | Site | None = None,
        window: Window | None = None,
        region: Region | None = None,
        branch: str = "both",
        samples: Sequence[int] | None = None,
        tokens: Sequence[int] | None = None,
        where: "FiresOn | None" = None,
    ) -> None:
        if branch not in BRANCHES:
            raise DifflensError(f"branch {branch!r} unknown: use 'both' (default), 'cond' or 'uncond'")
        if site is None:
            raise DifflensError(f"{type(self).__name__} needs a site (or a dictionary, whose site it takes)")
        self.site = Site.parse(site)
        self.window = window or Window.all()
        if not isinstance(self.window, Window):
            raise DifflensError(f"window must be a Window, got {type(self.window).__name__}")
        if region is not None and not isinstance(region, Region):
            raise DifflensError(f"region must be a Region, got {type(region).__name__}")
        if region is not None and self.site.stream != "img":
            raise DifflensError(f"regions select image tokens; site {self.site} is a text stream: drop the region")
        self.region = region
        if tokens is not None:
            if region is not None:
                raise DifflensError("give either a region (image tokens by position) or tokens (indices), not both")
            try:
                tokens = tuple(int(t) for t in tokens)
            except (TypeError, ValueError):
                raise DifflensError(f"tokens {tokens!r}: give token indices along the site's sequence, e.g. [3] or [3, 4]") from None
            if not tokens or min(tokens) < 0:
                raise DifflensError(f"tokens {list(tokens)}: give at least one index >= 0")
        self.tokens = tokens
        if where is not None and not isinstance(where, FiresOn):
            raise DifflensError(f"where must be a FiresOn(dictionary, features), got {type(where).__name__}")
        self.where = where
        self.branch = branch
        self.samples = None if samples is None else tuple(int(s) for s in samples)
        self.log: list[dict] = []
        self._token_cache: dict[tuple, torch.Tensor] = {}
        self._codes: dict = {}  # codes of the tensor being changed, per dictionary (see `codes_for`)
        self._image_hw: tuple[int, int] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def prepare(self, run: RunInfo) -> None:
        """Check against the model and the run; subclasses add their own set-up (super() first)."""
        adapter = run.adapter
        key = str(self.site)
        if key not in adapter.site_bindings():
            adapter.site_dim(key)  # raises the helpful unknown-site error
        self.window.check(run.timesteps)
        if self.samples is not None:
            bad = [s for s in self.samples if not 0 <= s < len(run.prompts)]
            if bad:
                raise DifflensError(f"samples {bad} out of range for {len(run.prompts)} prompts (indices start at 0)")
        self._image_hw = run.image_hw
        self._token_cache.clear()
        if self.region is not None:
            self.region.resolve(run.grid_hw, run.image_hw)  # fail before generating
        self.log = []

    def hook(self, acts: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        """The HookSet function: select rows/tokens, let `apply` change them, write them back."""
        if not self.window.active(ctx.step, ctx.timestep):
            return None
        rows = self._rows(ctx, acts.device)
        if rows.numel() == 0:
            return None
        toks = self._tokens(ctx, acts.shape[1], acts.device)
        self._codes.clear()
        new = self.change(select_tokens(acts, rows, toks), ctx, rows, toks, acts)
        self._codes.clear()
        if new is None:
            return None
        out = acts.clone()
        write_tokens(out, rows, toks, new)
        return out

    def change(self, x, ctx: HookContext, rows, toks, acts) -> torch.Tensor | None:
        """New values for the selected [R, T, D] (`where` applied, logged), or None for no change.
        `Batched` calls it for each member with its rows of a shared selection."""
        with torch.no_grad():
            keep = self.where.mask(x, ctx, self) if self.where is not None else None  # [R, T] bool
            if keep is not None and not bool(keep.any()):
                return None
            new = self.apply(x, ctx, rows, toks, acts)
        if new is None:
            return None
        new = new.to(acts.dtype)
        if keep is not None:
            new = torch.where(keep[..., None], new, x.to(acts.dtype))
        self.log.append(
            {
                "step": ctx.step,
                "timestep": ctx.timestep,
                "call_index": ctx.call_index,
                "rows": [(int(ctx.sample_index[r]), bool(ctx.is_cond[r])) for r in rows.tolist()],
                "tokens": int(keep.sum()) if keep is not None else int(acts.shape[1] if toks is None else toks.numel()),
            }
        )
        return new

    def apply(self, x_RTD, ctx, rows, toks, acts) -> torch.Tensor | None:
        """New values for the selected rows x tokens [R, T, D] (or None for no change)."""
        raise NotImplementedError

    # ---- selection -------------------------------------------------------------------------------
    def _rows(self, ctx: HookContext, device) -> torch.Tensor:
        keep = torch.ones_like(ctx.is_cond, dtype=torch.bool)
        if self.branch == "cond":
            keep &= ctx.is_cond
        elif self.branch == "uncond":
            keep &= ~ctx.is_cond
        if self.samples is not None:
            keep &= torch.isin(ctx.sample_index, torch.tensor(self.samples, dtype=torch.long))
        return keep.nonzero().flatten().to(device)

    def _tokens(self, ctx: HookContext, n: int, device) -> torch.Tensor | None:
        if self.tokens is not None:
            if max(self.tokens) >= n:
                raise DifflensError(f"token index {max(self.tokens)} out of range: site {self.site} has {n} tokens (0..{n - 1})")
            return torch.tensor(self.tokens, dtype=torch.long, device=device)
        if self.region is None:
            return None
        key = (tuple(ctx.grid_hw), n)
        if key not in self._token_cache:
            mask = self.region.resolve(ctx.grid_hw, self._image_hw)
            if mask.numel() != n:
                raise DifflensError(
                    f"site {self.site} has {n} tokens but the image-token grid is {ctx.grid_hw[0]}x{ctx.grid_hw[1]}: "
                    "regions only apply to sites carrying exactly the image tokens"
                )
            self._token_cache[key] = mask.nonzero().flatten()
        return self._token_cache[key].to(device)

    def steps_applied(self) -> list[int]:
        return sorted({e["step"] for e in self.log})

    def describe(self) -> str:
        parts = [self.kind, str(self.site), self.window.describe()]
        if self.region is not None:
            parts.append(self.region.label or "region")
        if self.tokens is not None:
            parts.append("tokens " + ",".join(map(str, self.tokens)))
        if self.where is not None:
            parts.append(self.where.describe())
        if self.branch != "both":
            parts.append(f"{self.branch} branch")
        return ", ".join(parts)


# ---- token selection by what a dictionary sees ---------------------------------------------------
class FiresOn:
    """Select, per row, the tokens where any of `features` has a code above `threshold`.

    The dictionary-native way to say "where the prompt's concept is": on a text stream the tokens
    of the word (and whatever absorbed it), on an image stream the concept's pixels. Used as
    `Steer(..., where=FiresOn(sae, red_features))`: tokens where none fires are left untouched.
    """

    def __init__(self, dictionary: Dictionary, features: Sequence[int], *, threshold: float = 0.0) -> None:
        self.dictionary = dictionary
        self.features = check_features(dictionary, features)
        if not self.features:
            raise DifflensError("FiresOn needs at least one feature")
        self.threshold = float(threshold)

    def mask(self, x_RTD: torch.Tensor, ctx: HookContext, owner: Intervention | None = None) -> torch.Tensor:
        """[R, T] bool: the tokens where a feature fires. With `owner`, the codes are kept for (or
        taken from) the owner's edit through the same dictionary (`codes_for`)."""
        R, T, D = x_RTD.shape
        if int(self.dictionary.cfg.d_in) != D:
            raise DifflensError(f"FiresOn's dictionary has d_in={self.dictionary.cfg.d_in} but the site has width {D}")
        dev = x_RTD.device
        if self.dictionary.device != dev:
            self.dictionary.to(dev)
        if owner is not None:
            enc = codes_for(owner, self.dictionary, x_RTD, ctx.timestep)
        else:
            enc = encode_codes(self.dictionary, x_RTD.reshape(R * T, D), ctx.timestep)
        hit = enc[2][:, list(self.features)] > self.threshold
        return hit.any(dim=1).reshape(R, T)

    def describe(self) -> str:
        return f"where features {','.join(map(str, self.features))} fire"


# ---- dictionary helpers ----------------------------------------------------------------------
def check_features(dictionary: Dictionary, features) -> tuple[int, ...]:
    """Feature ids as ints, each in [0, width); errors say the valid range."""
    if isinstance(features, (int,)) and not isinstance(features, bool):
        features = [features]
    try:
        feats = tuple(int(f) for f in features)
    except (TypeError, ValueError):
        raise DifflensError(f"features {features!r}: give integer feature ids, e.g. 12 or [12, 40]") from None
    width = int(dictionary.num_latents)
    bad = [f for f in feats if not 0 <= f < width]
    if bad:
        raise DifflensError(
            f"feature id(s) {bad} out of range: this dictionary ({dictionary.cfg.arch}, site {dictionary.cfg.site}) "
            f"has {width} features, ids 0..{width - 1}"
        )
    return feats


def check_dictionary(dictionary: Dictionary, adapter: Adapter, site: Site) -> None:
    """The dictionary must fit the site's width; it is moved to the model's device in fp32/bf16."""
    d = adapter.site_dim(str(site))
    if int(dictionary.cfg.d_in) != d:
        raise DifflensError(
            f"dictionary has d_in={dictionary.cfg.d_in} but site {site} of {adapter.model_id} has width {d}: "
            "use a dictionary trained on this model and site"
        )
    if dictionary.cfg.site and str(Site.parse(dictionary.cfg.site)) != str(site):
        warnings.warn(
            f"dictionary was trained on site {dictionary.cfg.site} but is applied at {site}", stacklevel=3
        )


def dictionary_site(dictionary: Dictionary, site) -> Site:
    if site is not None:
        return Site.parse(site)
    s = getattr(getattr(dictionary, "cfg", None), "site", "")
    if not s:
        raise DifflensError("the dictionary's cfg names no site: pass site='transformer_blocks.N:img'")
    return Site.parse(s)


def prep_dictionary(dictionary: Dictionary, adapter: Adapter):
    dictionary.eval()
    dev = adapter.device
    if dictionary.device != torch.device(dev):
        dictionary.to(dev)
    if dictionary.param_dtype == torch.float16 and torch.device(dev).type == "cpu":
        dictionary.float()  # fp16 on CPU is slow and inexact: compute in fp32


def codes_for(iv: Intervention, dictionary: Dictionary, x_RTD: torch.Tensor,
              t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """encode_codes of x flattened to [R*T, D], computed once per (intervention, dictionary, tensor):
    the intervention's `FiresOn` and its edit share them, and `Batched` fills them in for every
    member from one encode of all members' rows."""
    key = id(dictionary)
    hit = iv._codes.get(key)
    if hit is not None and hit[0] is x_RTD:
        return hit[1]
    R, T, D = x_RTD.shape
    enc = encode_codes(dictionary, x_RTD.reshape(R * T, D), t)
    iv._codes[key] = (x_RTD, enc)
    return enc


def select_tokens(acts: torch.Tensor, rows: torch.Tensor, toks: torch.Tensor | None) -> torch.Tensor:
    """acts[rows][:, toks] ([R, T, D]; every token when toks is None)."""
    x = acts.index_select(0, rows)
    return x if toks is None else x.index_select(1, toks)


def write_tokens(out: torch.Tensor, rows: torch.Tensor, toks: torch.Tensor | None, new: torch.Tensor) -> None:
    """out[rows][:, toks] = new, in place."""
    if toks is None:
        out[rows] = new
    else:
        out[rows[:, None], toks[None, :]] = new


def encode_codes(dictionary: Dictionary, x_MD: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x in the dictionary's dtype, per-row timesteps, dense codes)."""
    xf = x_MD.to(dictionary.param_dtype)
    tt = torch.full((xf.shape[0],), float(t), device=xf.device)
    return xf, tt, dictionary.encode(xf, tt)
