"""Edits through a dictionary's sparse code (ablate / clamp / scale, error term kept), splicing
the reconstruction, and replacing activations (mean ablation)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from difflens.errors import DifflensError
from difflens.hooks import HookContext, Site
from difflens.intervene.base import (
    Intervention,
    RunInfo,
    check_dictionary,
    check_features,
    codes_for,
    dictionary_site,
    encode_codes,
    prep_dictionary,
)
from difflens.intervene.registry import InterventionSpec, Param, parse_ids, parse_pairs, register_intervention

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary

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
        dictionary: Dictionary,
        ops: Sequence[tuple[str, Sequence[int] | int, float | None]] = (),
        *,
        only_active: bool = False,
        site: str | Site | None = None,
        **common,
    ) -> None:
        super().__init__(site=dictionary_site(dictionary, site), **common)
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
        prep_dictionary(self.dictionary, run.adapter)

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
        xf, tt, codes = codes_for(self, self.dictionary, x, ctx.timestep)
        new_codes = self.edit_codes(codes, ctx, rows, toks, (R, T))
        delta = self.dictionary.decode(new_codes, tt) - self.dictionary.decode(codes, tt)
        return (xf + delta).reshape(R, T, D)

    def describe(self) -> str:
        ops = "; ".join(f"{n} {','.join(map(str, f))}" + ("" if v is None else f"={v:g}") for n, f, v in self.ops)
        return f"edit [{ops or 'no change'}]; " + super().describe()


class CodeShift(CodeEdit):
    """Add `delta` to the codes, error term kept: [F] at every selected token, or [T, F] per token
    of the site's sequence (a row of zeros leaves its token as it is). Codes that were >= 0 stay
    >= 0. Why: a concept that a text encoder spreads over the prompt (the object, after a
    bidirectional encoder) is carried by shifts of the features already active at each token,
    not by a few features of its own that could be clamped."""

    kind = "shift"

    def __init__(self, dictionary: Dictionary, delta, **common) -> None:
        super().__init__(dictionary, [], **common)
        delta = torch.as_tensor(delta, dtype=torch.float32)
        width = int(dictionary.num_latents)
        if delta.ndim not in (1, 2) or delta.shape[-1] != width:
            raise DifflensError(f"shift delta of shape {tuple(delta.shape)}: give [{width}] or [tokens, {width}] (the dictionary's width)")
        self.delta = delta

    def edit_codes(self, codes, ctx, rows, toks, shape):
        R, T = shape
        d = self.delta.to(codes.device, codes.dtype)
        if d.ndim == 2:
            n = int(toks.max()) + 1 if toks is not None else T
            if d.shape[0] < n:
                raise DifflensError(f"shift delta covers {d.shape[0]} tokens; site {self.site} has {n}: give one row per token")
            d = d.index_select(0, toks) if toks is not None else d[:T]
            d = d[None].expand(R, T, -1).reshape(R * T, -1)
        new = codes + d
        return torch.where(codes >= 0, new.clamp_min(0), new)

    def describe(self) -> str:
        return f"code shift (|delta| {float(self.delta.abs().sum()):.3g}); " + Intervention.describe(self)


def Ablate(dictionary: Dictionary, features, **kw) -> CodeEdit:
    """Set the features' codes to zero (error term kept)."""
    return CodeEdit(dictionary, [("ablate", features, None)], **kw)


def Clamp(dictionary: Dictionary, features, value: float, **kw) -> CodeEdit:
    """Set the features' codes to `value` at every selected token (or only where active)."""
    return CodeEdit(dictionary, [("clamp", features, value)], **kw)


def Scale(dictionary: Dictionary, features, factor: float, **kw) -> CodeEdit:
    """Multiply the features' codes by `factor` (1 = no change, −1 inverts)."""
    return CodeEdit(dictionary, [("scale", features, factor)], **kw)


class Splice(Intervention):
    """Replace activations by the dictionary's reconstruction x̂ (splice evaluation).

    With `keep_error` the written value is x̂ + (x − x̂): mathematically x, so generation must
    reproduce the clean run to float tolerance; it checks that the hooks read and write the
    right tensors.
    """

    kind = "splice"

    def __init__(self, dictionary: Dictionary, *, keep_error: bool = False, site=None, **common) -> None:
        super().__init__(site=dictionary_site(dictionary, site), **common)
        self.dictionary = dictionary
        self.keep_error = bool(keep_error)

    def prepare(self, run: RunInfo) -> None:
        super().prepare(run)
        check_dictionary(self.dictionary, run.adapter, self.site)
        prep_dictionary(self.dictionary, run.adapter)

    def apply(self, x, ctx, rows, toks, acts):
        R, T, D = x.shape
        xf, tt, codes = encode_codes(self.dictionary, x.reshape(R * T, D), ctx.timestep)
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


# ---- the `edit` verb and playground section (intervene/registry.py) ------------------------------------
def _edit_arguments(p) -> None:
    p.add_argument("--ablate", default=None, help="features to set to 0: F,F,...")
    p.add_argument("--clamp", default=None, help="features to set to a value: F=V,F=V,...")
    p.add_argument("--scale", default=None, help="features to multiply: F=S,F=S,... (-1 inverts)")
    p.add_argument("--only-active", action="store_true", help="--clamp only where the feature is already active")


def _edit_from_args(args, dictionary: Dictionary, where) -> CodeEdit:
    ops = []
    if args.ablate:
        ops.append(("ablate", parse_ids(args.ablate, "--ablate"), None))
    for name, text in (("clamp", args.clamp), ("scale", args.scale)):
        if text:
            for f, v in parse_pairs(text, f"--{name}"):
                ops.append((name, [f], v))
    if not ops:
        raise DifflensError("edit needs at least one of --ablate F,.. / --clamp F=V,.. / --scale F=S,..")
    return CodeEdit(dictionary, ops, only_active=args.only_active, site=args.site, **where)


register_intervention(InterventionSpec(
    "edit",
    "ablate / clamp / scale features through the dictionary's codes (error term kept)",
    build=_edit_from_args,
    add_arguments=_edit_arguments,
    description="Encode the site's activations, change chosen codes, decode and add back the error term "
    "x - x_hat, so everything the edit does not touch stays as it was.",
    labels=("clean", "edited"),
    params=(Param("features", "features", None, "feature ids to edit, e.g. 12,40"),
            Param("op", "choice", "ablate", "ablate: code to 0; clamp: code to value; scale: code x value",
                  choices=EDIT_OPS),
            Param("value", "float", 0.0, "the clamp value or scale factor (ablate ignores it)", min=-1000, max=1000,
                  step=0.1)),
    from_request=lambda p, dictionary, where: CodeEdit(
        dictionary, [(p["op"], p["features"], None if p["op"] == "ablate" else p["value"])], **where),
))
