"""Steering: add decoder directions (one feature, several features, or any vector) at a site."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from difflens.errors import DifflensError
from difflens.hooks import HookContext, Site
from difflens.intervene.base import (
    SCALE_MODES,
    Intervention,
    RunInfo,
    check_dictionary,
    check_features,
    dictionary_site,
    prep_dictionary,
)
from difflens.intervene.registry import InterventionSpec, Param, parse_ids, parse_scales, register_intervention

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary

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
    `random_direction=seed` is the control of a steer: each token gets a vector of the same length
    (same features, scale, tokens, steps and rows) along one fixed random unit direction drawn from
    the seed, so only the direction differs.
    """

    kind = "steer"

    def __init__(
        self,
        dictionary: Dictionary | None = None,
        features: int | Sequence[int] = (),
        scale: float = 1.0,
        *,
        mode: str = "token-norm",
        direction: torch.Tensor | None = None,
        stats=None,
        store=None,
        feature_max: Mapping[int, float] | None = None,
        site: str | Site | None = None,
        random_direction: int | None = None,
        **common,
    ) -> None:
        if mode not in SCALE_MODES:
            raise DifflensError(f"scale mode {mode!r} unknown: use one of {', '.join(SCALE_MODES)}")
        if (dictionary is None) == (direction is None):
            raise DifflensError("Steer needs a dictionary with features, or a raw direction vector (not both)")
        super().__init__(site=dictionary_site(dictionary, site) if dictionary is not None else site, **common)
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
        self.random_direction = None if random_direction is None else int(random_direction)
        self._random: torch.Tensor | None = None
        self._dirs: torch.Tensor | None = None
        self._gain: dict[float, torch.Tensor] = {}

    def prepare(self, run: RunInfo) -> None:
        super().prepare(run)
        adapter = run.adapter
        dev = adapter.device
        if self.dictionary is not None:
            check_dictionary(self.dictionary, adapter, self.site)
            prep_dictionary(self.dictionary, adapter)
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
        if self.random_direction is not None:
            r = torch.randn(self._dirs.shape[1], generator=torch.Generator().manual_seed(self.random_direction))
            self._random = (r / r.norm()).to(dev)
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
        if self._random is not None:
            vec = vec.norm(dim=-1, keepdim=True) * self._random.to(acts.device)[None, :]
        return x.float() + vec[:, None, :]

    def describe(self) -> str:
        what = f"features {','.join(map(str, self.features))}" if self.features else "direction"
        what += ", random direction of the same norm" if self.random_direction is not None else ""
        return f"steer {what} x {self.scale:g} ({self.mode}); " + super().describe()


def feature_maxima(dictionary: Dictionary, store, features: Sequence[int], *, max_rows: int = 20000,
                   batch: int = 2048, seed: int = 0) -> dict[int, float]:
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


# ---- the `steer` verb and playground section (intervene/registry.py) -----------------------------------
def _steer_arguments(p) -> None:
    from difflens.cli_options import add_data_option

    p.add_argument("--feature", required=True, help="feature id(s), comma-separated: 12 or 12,40")
    sc = p.add_mutually_exclusive_group(required=True)
    sc.add_argument("--scale", type=float, help="steering scale (see --scale-mode)")
    sc.add_argument("--scales", help="comma-separated scales for a sweep grid beside the unsteered image; write it with '=' when "
                    "the first is negative: --scales=-8,-4,0,4,8")
    p.add_argument("--scale-mode", choices=list(SCALE_MODES), default="token-norm",
                   help="token-norm (default): scale x mean image-token norm; absolute: raw units; "
                   "feature-max: scale x the feature's max activation in --data")
    add_data_option(p, required=False,
                    help="activation store: token norms per timestep (token-norm) and feature maxima (feature-max)")


def _steer_from_args(args, dictionary: Dictionary, where):
    """One Steer, or with --scales a sweep of one Steer per scale."""
    features = parse_ids(args.feature)
    store = None
    if args.data is not None:
        from difflens.store import Store

        store = Store(args.data)
    site = args.site or dictionary.cfg.site
    stats = store.stats(site) if (store is not None and args.scale_mode == "token-norm" and site in store.sites) else None
    kw = dict(mode=args.scale_mode, stats=stats, store=store, site=args.site, **where)
    if args.scales is not None:
        return [(f"scale {s:+g}", Steer(dictionary, features, s, **kw)) for s in parse_scales(args.scales)]
    return Steer(dictionary, features, args.scale, **kw)


def _steer_meta(args) -> dict:
    return {"features": parse_ids(args.feature), "scale_mode": args.scale_mode,
            "scales": parse_scales(args.scales) if args.scales else [args.scale]}


register_intervention(InterventionSpec(
    "steer",
    "add a feature's decoder direction during generation (one scale or a sweep)",
    build=_steer_from_args,
    add_arguments=_steer_arguments,
    description="Steer generation by adding dictionary features' unit decoder directions at the site. "
    "Scales may be negative. Flux recipe: --scale 0.8 --scale-mode token-norm --step-window :5 --steps 7 with a region.",
    labels=("unsteered", "scale {scale:+g}"),
    title="steer f{feature}: {prompt}",
    meta=_steer_meta,
    params=(Param("feature", "feature", 0, "the feature whose unit decoder direction is added"),
            Param("scale", "float", 1.0, "x the mean image-token norm (negative subtracts)", min=-100, max=100, step=0.1,
                  slider=(-4, 4))),
    from_request=lambda p, dictionary, where: Steer(dictionary, [p["feature"]], p["scale"], mode="token-norm", **where),
))
