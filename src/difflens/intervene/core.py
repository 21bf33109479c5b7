"""Interventions: objects that change a site's activations during generation, through one HookSet.

Every intervention acts on one site and selects what it touches along four axes:

* `window`  — which denoising steps (`Window`: step indices and/or a timestep range);
* `region`  — which image tokens (`Region`: a pixel/token box or a mask; default all tokens);
* `branch`  — which classifier-free-guidance rows: "both" (default), "cond" or "uncond".
  The adapter tells each hook which rows are conditional (`ctx.is_cond`), so this works for
  [uncond; cond] (toy, SD3, PixArt), [cond; uncond] (DiT) and single-branch models alike; on a
  model without CFG every row is conditional and "uncond" never fires (a warning says so);
* `samples` — which samples of the generate() call (default all), so one batched call can run
  a whole sweep with a different intervention per sample.

Dictionary edits (Ablate / Clamp / Scale / CodeEdit / Transfer) encode the selected tokens,
change the codes and write back x + (decode(c') − decode(c)): the dictionary's error term
x − decode(c) is kept, so whatever the dictionary does not explain is untouched, and an edit
that changes no code leaves the activations bit-identical. `Splice` swaps in the
reconstruction itself (optionally plus the error term, the hook-correctness check).

`generate_with(adapter, prompts, seeds, interventions=[...])` runs them all in one generation;
several interventions on one site apply in list order, each seeing the previous one's output.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from difflens.errors import DifflensError
from difflens.generation import GenerationPlan, plan_generation, run_plan
from difflens.hooks import HookContext, HookSet, Site
from difflens.intervene.region import Region, Window

BRANCHES = ("both", "cond", "uncond")
SCALE_MODES = ("absolute", "token-norm", "feature-max")


# ---- run description -------------------------------------------------------------------------
# What an intervention may need to know about the generation it is about to join: the plan of
# one generate() call (prompts, seeds, steps, guidance, timesteps, token grid, image size).
RunInfo = GenerationPlan


def default_steps(adapter) -> int:
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
        self.branch = branch
        self.samples = None if samples is None else tuple(int(s) for s in samples)
        self.log: list[dict] = []
        self._token_cache: dict[tuple, torch.Tensor] = {}
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
        x = acts.index_select(0, rows)
        if toks is not None:
            x = x.index_select(1, toks)
        with torch.no_grad():
            new = self.apply(x, ctx, rows, toks, acts)
        if new is None:
            return None
        out = acts.clone()
        new = new.to(out.dtype)
        if toks is None:
            out[rows] = new
        else:
            out[rows[:, None], toks[None, :]] = new
        self.log.append(
            {
                "step": ctx.step,
                "timestep": ctx.timestep,
                "call_index": ctx.call_index,
                "rows": [(int(ctx.sample_index[r]), bool(ctx.is_cond[r])) for r in rows.tolist()],
                "tokens": int(acts.shape[1] if toks is None else toks.numel()),
            }
        )
        return out

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
        if self.branch != "both":
            parts.append(f"{self.branch} branch")
        return ", ".join(parts)


# ---- dictionary helpers ----------------------------------------------------------------------
def check_features(dictionary, features) -> tuple[int, ...]:
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


def check_dictionary(dictionary, adapter, site: Site) -> None:
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


def _dict_site(dictionary, site) -> Site:
    if site is not None:
        return Site.parse(site)
    s = getattr(getattr(dictionary, "cfg", None), "site", "")
    if not s:
        raise DifflensError("the dictionary's cfg names no site: pass site='transformer_blocks.N:img'")
    return Site.parse(s)


def _prep_dictionary(dictionary, adapter):
    dictionary.eval()
    dev = getattr(adapter, "device", torch.device("cpu"))
    if dictionary.device != torch.device(dev):
        dictionary.to(dev)
    if dictionary.param_dtype == torch.float16 and torch.device(dev).type == "cpu":
        dictionary.float()  # fp16 on CPU is slow and inexact: compute in fp32


def _encode(dictionary, x_MD: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x in the dictionary's dtype, per-row timesteps, dense codes)."""
    xf = x_MD.to(dictionary.param_dtype)
    tt = torch.full((xf.shape[0],), float(t), device=xf.device)
    return xf, tt, dictionary.encode(xf, tt)


# ---- steering --------------------------------------------------------------------------------
class Steer(Intervention):
    """Add decoder directions: x += Σ_f m_f · d_f, d_f the unit decoder direction of feature f.

    `scale` sets m_f by `mode`:
      absolute     m = scale (raw activation units);
      token-norm   m = scale × the mean image-token norm at this step (from `stats`, a store's
                   SiteStats, per timestep; without stats, the mean token norm of the row being
                   steered). The Flux recipe is scale ≈ 0.8 inside a region for the first 5 of 7 steps;
      feature-max  m = scale × the largest activation of f seen in a store (`feature_max` or `store`),
                   converted to raw units through the decoder, i.e. scale=1 adds f at its max.
    Negative scales subtract. Without a dictionary, `direction` (a [D] vector, normalised here) is used.
    """

    kind = "steer"

    def __init__(
        self,
        dictionary=None,
        features: int | Sequence[int] = (),
        scale: float = 1.0,
        *,
        mode: str = "token-norm",
        direction: torch.Tensor | None = None,
        stats=None,
        store=None,
        feature_max: Mapping[int, float] | None = None,
        site: str | Site | None = None,
        **common,
    ) -> None:
        if mode not in SCALE_MODES:
            raise DifflensError(f"scale mode {mode!r} unknown: use one of {', '.join(SCALE_MODES)}")
        if (dictionary is None) == (direction is None):
            raise DifflensError("Steer needs a dictionary with features, or a raw direction vector (not both)")
        super().__init__(site=_dict_site(dictionary, site) if dictionary is not None else site, **common)
        self.dictionary = dictionary
        self.scale = float(scale)
        self.mode = mode
        self.stats = stats
        self.store = store
        self.feature_max = dict(feature_max) if feature_max is not None else None
        if dictionary is not None:
            self.features = check_features(dictionary, features)
            if not self.features:
                raise DifflensError("Steer: name at least one feature to steer with")
        else:
            self.features = ()
            if mode == "feature-max":
                raise DifflensError("scale mode feature-max needs a dictionary feature, not a raw direction")
            direction = torch.as_tensor(direction, dtype=torch.float32).reshape(-1)
            n = float(direction.norm())
            if n == 0 or n != n:
                raise DifflensError("the steering direction is zero or not finite")
            self._raw_direction = direction / n
        self._dirs: torch.Tensor | None = None
        self._gain: dict[float, torch.Tensor] = {}

    def prepare(self, run: RunInfo) -> None:
        super().prepare(run)
        adapter = run.adapter
        dev = getattr(adapter, "device", torch.device("cpu"))
        if self.dictionary is not None:
            check_dictionary(self.dictionary, adapter, self.site)
            _prep_dictionary(self.dictionary, adapter)
            self._dirs = self.dictionary.decoder_directions().detach()[list(self.features)].float().to(dev)
            if self.mode == "feature-max" and self.feature_max is None:
                if self.store is None:
                    raise DifflensError(
                        "scale mode feature-max needs each feature's max activation: pass a store (--data DIR) "
                        "or feature_max={feature: value}"
                    )
                self.feature_max = feature_maxima(self.dictionary, self.store, self.features)
            if self.mode == "feature-max":
                missing = [f for f in self.features if f not in self.feature_max]
                if missing:
                    raise DifflensError(f"feature_max lacks features {missing}: give a max activation for each")
        else:
            d = adapter.site_dim(str(self.site))
            if self._raw_direction.numel() != d:
                raise DifflensError(f"direction has {self._raw_direction.numel()} dims but site {self.site} has {d}")
            self._dirs = self._raw_direction[None].to(dev)
        self._gain.clear()

    def _feature_gain(self, t: float) -> torch.Tensor:
        """Raw-space length of one unit of each feature's code at timestep t (decoder + normalisation)."""
        if t not in self._gain:
            F = self.dictionary.num_latents
            n = len(self.features)
            dev = self.dictionary.device
            codes = torch.zeros(n + 1, F, device=dev, dtype=self.dictionary.param_dtype)
            codes[torch.arange(n, device=dev), torch.tensor(self.features, device=dev)] = 1.0
            out = self.dictionary.decode(codes, torch.full((n + 1,), float(t), device=dev))
            self._gain[t] = (out[:n] - out[n:]).float().norm(dim=1)
        return self._gain[t]

    def magnitudes(self, ctx: HookContext, acts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[R, F] how far to move along each direction, per steered row."""
        R, F = rows.numel(), self._dirs.shape[0]
        base = torch.full((R, F), self.scale, device=acts.device)
        if self.mode == "absolute":
            return base
        if self.mode == "token-norm":
            if self.stats is not None:
                i = self.stats.timestep_index(ctx.timestep)
                return base * float(self.stats.mean_norm_T[i])
            norms = acts.index_select(0, rows).float().norm(dim=-1).mean(dim=-1)  # [R]
            return base * norms[:, None]
        fmax = torch.tensor([float(self.feature_max[f]) for f in self.features], device=acts.device)
        return base * (fmax * self._feature_gain(ctx.timestep).to(acts.device))[None, :]

    def apply(self, x, ctx, rows, toks, acts):
        vec = self.magnitudes(ctx, acts, rows) @ self._dirs.to(acts.device)  # [R, D]
        return x.float() + vec[:, None, :]

    def describe(self) -> str:
        what = f"features {','.join(map(str, self.features))}" if self.features else "direction"
        return f"steer {what} x {self.scale:g} ({self.mode}); " + super().describe()


def feature_maxima(dictionary, store, features: Sequence[int], *, max_rows: int = 20000, batch: int = 2048, seed: int = 0) -> dict[int, float]:
    """Largest code of each feature over (a random subset of) a store's rows at the dictionary's site."""
    import numpy as np

    site = dictionary.cfg.site
    n = store.num_rows(site)
    if n == 0:
        raise DifflensError(f"store {store.root} has no rows at {site}: harvest that site first")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, max_rows), replace=False))
    meta = store.meta(site, ["timestep"])
    feats = list(features)
    best = torch.zeros(len(feats))
    dictionary.eval()
    with torch.no_grad():
        for a in range(0, len(idx), batch):
            ii = idx[a : a + batch]
            x = store.read_rows(site, ii).to(dictionary.device)
            t = torch.from_numpy(meta["timestep"][ii]).float().to(dictionary.device)
            codes = dictionary.encode(x.to(dictionary.param_dtype), t)[:, feats]
            best = torch.maximum(best, codes.max(0).values.float().cpu())
    zero = [f for f, v in zip(feats, best.tolist()) if v <= 0]
    if zero:
        warnings.warn(f"features {zero} never fired on {len(idx)} store rows: their feature-max is 0", stacklevel=2)
    return {f: float(v) for f, v in zip(feats, best.tolist())}


# ---- edits through the sparse code -------------------------------------------------------------
EDIT_OPS = ("ablate", "clamp", "scale")


class CodeEdit(Intervention):
    """Encode, change chosen codes, decode, keep the error term: x' = x + dec(c') − dec(c).

    `ops` is a list of (op, features, value) applied in order: ("ablate", [f...], None) sets codes
    to 0, ("clamp", [f...], v) sets them to v (at every selected token, or only where the feature
    is active with `only_active`), ("scale", [f...], s) multiplies them by s.
    """

    kind = "edit"

    def __init__(
        self,
        dictionary,
        ops: Sequence[tuple[str, Sequence[int] | int, float | None]] = (),
        *,
        only_active: bool = False,
        site: str | Site | None = None,
        **common,
    ) -> None:
        super().__init__(site=_dict_site(dictionary, site), **common)
        self.dictionary = dictionary
        self.only_active = bool(only_active)
        self.ops: list[tuple[str, tuple[int, ...], float | None]] = []
        for op in ops:
            if len(op) != 3 or op[0] not in EDIT_OPS:
                raise DifflensError(f"edit op {op!r}: use (op, features, value) with op one of {', '.join(EDIT_OPS)}")
            name, feats, value = op
            feats = check_features(dictionary, feats)
            if name != "ablate":
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise DifflensError(f"edit op {name} needs a number, got {value!r}") from None
            self.ops.append((name, feats, value))

    def prepare(self, run: RunInfo) -> None:
        super().prepare(run)
        check_dictionary(self.dictionary, run.adapter, self.site)
        _prep_dictionary(self.dictionary, run.adapter)

    def edit_codes(self, codes: torch.Tensor, ctx: HookContext, rows, toks, shape) -> torch.Tensor:
        c = codes.clone()
        for name, feats, value in self.ops:
            idx = torch.tensor(feats, device=c.device)
            if name == "ablate":
                c[:, idx] = 0
            elif name == "clamp":
                if self.only_active:
                    cur = c[:, idx]
                    c[:, idx] = torch.where(cur > 0, torch.full_like(cur, value), cur)
                else:
                    c[:, idx] = value
            else:
                c[:, idx] = c[:, idx] * value
        return c

    def apply(self, x, ctx, rows, toks, acts):
        R, T, D = x.shape
        xf, tt, codes = _encode(self.dictionary, x.reshape(R * T, D), ctx.timestep)
        new_codes = self.edit_codes(codes, ctx, rows, toks, (R, T))
        delta = self.dictionary.decode(new_codes, tt) - self.dictionary.decode(codes, tt)
        return (xf + delta).reshape(R, T, D)

    def describe(self) -> str:
        ops = "; ".join(f"{n} {','.join(map(str, f))}" + ("" if v is None else f"={v:g}") for n, f, v in self.ops)
        return f"edit [{ops or 'no change'}]; " + super().describe()


def Ablate(dictionary, features, **kw) -> CodeEdit:
    """Set the features' codes to zero (error term kept)."""
    return CodeEdit(dictionary, [("ablate", features, None)], **kw)


def Clamp(dictionary, features, value: float, **kw) -> CodeEdit:
    """Set the features' codes to `value` at every selected token (or only where active)."""
    return CodeEdit(dictionary, [("clamp", features, value)], **kw)


def Scale(dictionary, features, factor: float, **kw) -> CodeEdit:
    """Multiply the features' codes by `factor` (1 = no change, −1 inverts)."""
    return CodeEdit(dictionary, [("scale", features, factor)], **kw)


class Splice(Intervention):
    """Replace activations by the dictionary's reconstruction x̂ (splice evaluation).

    With `keep_error` the written value is x̂ + (x − x̂): mathematically x, so generation must
    reproduce the clean run to float tolerance; it checks that the hooks read and write the
    right tensors.
    """

    kind = "splice"

    def __init__(self, dictionary, *, keep_error: bool = False, site=None, **common) -> None:
        super().__init__(site=_dict_site(dictionary, site), **common)
        self.dictionary = dictionary
        self.keep_error = bool(keep_error)

    def prepare(self, run: RunInfo) -> None:
        super().prepare(run)
        check_dictionary(self.dictionary, run.adapter, self.site)
        _prep_dictionary(self.dictionary, run.adapter)

    def apply(self, x, ctx, rows, toks, acts):
        R, T, D = x.shape
        xf, tt, codes = _encode(self.dictionary, x.reshape(R * T, D), ctx.timestep)
        x_hat = self.dictionary.decode(codes, tt)
        out = x_hat + (xf - x_hat) if self.keep_error else x_hat
        return out.reshape(R, T, D)


class Replace(Intervention):
    """Replace the selected activations by `value(ctx)`: a [D] vector (every token) or [N, D]."""

    kind = "replace"

    def __init__(self, site, value: Callable[[HookContext], torch.Tensor], **common) -> None:
        super().__init__(site=site, **common)
        self.value = value

    def apply(self, x, ctx, rows, toks, acts):
        v = torch.as_tensor(self.value(ctx)).to(device=x.device, dtype=torch.float32)
        if v.ndim == 1:
            return v.expand(x.shape).clone()
        if toks is not None:
            v = v.index_select(0, toks)
        return v[None].expand(x.shape).clone()


def MeanAblate(site, stats=None, means_by_step: Mapping[int, torch.Tensor] | None = None, **common) -> Replace:
    """Replace activations by the mean activation at this timestep (store stats) or step (given)."""
    if (stats is None) == (means_by_step is None):
        raise DifflensError("MeanAblate needs either a store's SiteStats or means_by_step")
    if stats is not None:
        if len(stats.timesteps_T) == 0:
            raise DifflensError(f"the store has no rows at {stats.site}: cannot mean-ablate")

        def value(ctx):
            return stats.mean_TD[stats.timestep_index(ctx.timestep)]
    else:
        means = dict(means_by_step)

        def value(ctx):
            if ctx.step not in means:
                raise DifflensError(f"no mean activation recorded for step {ctx.step}")
            return means[ctx.step]

    iv = Replace(site, value, **common)
    iv.kind = "mean-ablate"
    return iv


# ---- transfer from a reference generation -----------------------------------------------------------
class Transfer(CodeEdit):
    """Put codes from a reference generation into the target at every (selected) step.

    `reference` is (prompt, seed); it is generated first with the same steps and guidance and its
    activations recorded at the site. For each target row, the reference row of the same CFG
    branch and step supplies the codes of `features` (None = all features). mode "tokens" copies
    token by token (same positions); mode "mean" puts the reference's mean code over
    `reference_region` (default: the target region, or all tokens) on every target token — the
    choice for style when layouts differ. The target's error term is kept.
    """

    kind = "transfer"

    def __init__(
        self,
        dictionary,
        reference: tuple[str, int],
        features: Sequence[int] | None = None,
        *,
        mode: str = "tokens",
        reference_region: Region | None = None,
        site=None,
        **common,
    ) -> None:
        super().__init__(dictionary, [], site=site, **common)
        if mode not in ("tokens", "mean"):
            raise DifflensError(f"transfer mode {mode!r} unknown: use 'tokens' or 'mean'")
        if not (isinstance(reference, (tuple, list)) and len(reference) == 2):
            raise DifflensError("reference must be (prompt, seed)")
        self.reference = (str(reference[0]), int(reference[1]))
        self.features = None if features is None else check_features(dictionary, features)
        self.mode = mode
        self.reference_region = reference_region
        self._ref: dict[tuple[int, bool], torch.Tensor] = {}

    def prepare(self, run: RunInfo) -> None:
        super().prepare(run)
        if self.reference_region is not None:
            self.reference_region.resolve(run.grid_hw, run.image_hw)
        rec = record_activations(
            run.adapter, [self.reference[0]], [self.reference[1]], self.site, steps=run.steps,
            guidance=run.guidance, **run.gen_kwargs,
        )
        self._ref = {}
        for (step, _call), (acts, is_cond, _sidx) in rec.acts.items():
            for r in range(acts.shape[0]):
                self._ref.setdefault((step, bool(is_cond[r])), acts[r])
        self.reference_image = rec.images[0]

    def apply(self, x, ctx, rows, toks, acts):
        R, T, D = x.shape
        out = []
        for j, r in enumerate(rows.tolist()):
            key = (ctx.step, bool(ctx.is_cond[r]))
            if key not in self._ref:
                raise DifflensError(
                    f"the reference run has no {'conditional' if key[1] else 'unconditional'} row at step {ctx.step}: "
                    "generate target and reference with the same guidance"
                )
            ref = self._ref[key].to(x.device)
            if self.mode == "tokens":
                src = ref if toks is None else ref.index_select(0, toks)
            else:
                ref_toks = self._ref_tokens(ctx, ref.shape[0], x.device, toks)
                src = ref if ref_toks is None else ref.index_select(0, ref_toks)
            xf, tt, codes = _encode(self.dictionary, x[j], ctx.timestep)
            _, tr, ref_codes = _encode(self.dictionary, src, ctx.timestep)
            if self.mode == "mean":
                ref_codes = ref_codes.mean(0, keepdim=True).expand(T, -1)
            new = codes.clone()
            if self.features is None:
                new = ref_codes.clone()
            else:
                f = torch.tensor(self.features, device=new.device)
                new[:, f] = ref_codes[:, f]
            delta = self.dictionary.decode(new, tt) - self.dictionary.decode(codes, tt)
            out.append(xf + delta)
        return torch.stack(out)

    def _ref_tokens(self, ctx, n, device, toks):
        region = self.reference_region
        if region is None:
            return toks
        key = ("ref", tuple(ctx.grid_hw), n)
        if key not in self._token_cache:
            self._token_cache[key] = region.resolve(ctx.grid_hw, self._image_hw).nonzero().flatten()
        return self._token_cache[key].to(device)

    def describe(self) -> str:
        feats = "all features" if self.features is None else "features " + ",".join(map(str, self.features))
        return f"transfer {feats} from {self.reference[0]!r} seed {self.reference[1]} ({self.mode}); " + Intervention.describe(self)


# ---- running ---------------------------------------------------------------------------------------
def build_hookset(interventions: Sequence[Intervention], extra: HookSet | None = None, pre: HookSet | None = None) -> HookSet:
    """One HookSet: `pre` hooks, then the interventions in order, then `extra` (e.g. recorders)."""
    hs = HookSet()
    for site, fn in pre or ():
        hs.add(site, fn)
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise DifflensError(f"{iv!r} is not an Intervention (Steer, Ablate, Clamp, Scale, CodeEdit, Transfer, Splice, ...)")
        hs.add(iv.site, iv.hook)
    for site, fn in extra or ():
        hs.add(site, fn)
    return hs


def plan_run(adapter, prompts, seeds, *, steps=None, guidance=None, height=None, width=None) -> RunInfo:
    return plan_generation(adapter, prompts, seeds, steps=steps, guidance=guidance, height=height, width=width)


def intervention_hooks(interventions: Sequence[Intervention], extra: HookSet | None = None, pre: HookSet | None = None):
    """A hooks factory for `generation.generate_batched`: prepares `interventions` for each
    batch's plan, then builds that batch's HookSet (`pre`, the interventions, `extra`)."""
    interventions = list(interventions)

    def make(plan: GenerationPlan) -> HookSet:
        for iv in interventions:
            iv.prepare(plan)
        return build_hookset(interventions, extra, pre)

    return make


def generate_with(
    adapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    interventions: Sequence[Intervention] = (),
    *,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    extra_hooks: HookSet | None = None,
    pre_hooks: HookSet | None = None,
):
    """Generate with all `interventions` active (in list order per site); returns the adapter's
    Generation. Each intervention's `log` lists where it acted; one that never acted warns."""
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    interventions = list(interventions)
    run = plan_run(adapter, prompts, seeds, steps=steps, guidance=guidance, height=height, width=width)
    gen = run_plan(run, intervention_hooks(interventions, extra_hooks, pre_hooks)(run))
    for iv in interventions:
        if not iv.log:
            hint = " (this model has no unconditional branch)" if iv.branch == "uncond" else ""
            warnings.warn(f"intervention never acted: {iv.describe()}{hint}", stacklevel=2)
    return gen


# ---- recording -------------------------------------------------------------------------------------
@dataclass
class Recording:
    """Activations at one site per (step, call): acts [B, N, D] (float32, CPU), is_cond, sample_index."""

    site: str
    acts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    images: object = None
    timesteps: list[float] | None = None

    def step_acts(self, step: int) -> torch.Tensor:
        """All rows recorded at a step (calls concatenated)."""
        parts = [a for (s, _c), (a, _, _) in sorted(self.acts.items()) if s == step]
        if not parts:
            raise KeyError(step)
        return torch.cat(parts)


def recorder(store: dict, clone: bool = True):
    """A hook that keeps a copy of what it sees, keyed by (step, call_index)."""

    def hook(acts, ctx):
        a = acts.detach().to("cpu", torch.float32)
        store[(ctx.step, ctx.call_index)] = (a.clone() if clone else a, ctx.is_cond.clone(), ctx.sample_index.clone())
        return None

    return hook


def record_activations(adapter, prompts, seeds, site, *, steps=None, guidance=None, interventions=(), **gen_kwargs) -> Recording:
    """Generate (optionally with interventions) and record the site's activations after them."""
    site = Site.parse(site)
    acts: dict = {}
    gen = generate_with(
        adapter, prompts, seeds, interventions, steps=steps, guidance=guidance,
        extra_hooks=HookSet([(site, recorder(acts))]), **gen_kwargs,
    )
    return Recording(str(site), acts, gen.images, list(gen.timesteps))
