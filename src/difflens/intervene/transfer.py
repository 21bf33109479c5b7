"""Transfer: put a reference generation's codes into the target (attribute or style transfer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from difflens.errors import DifflensError
from difflens.intervene.base import Intervention, RunInfo, check_features, codes_for, encode_codes
from difflens.intervene.edits import CodeEdit
from difflens.intervene.region import Region
from difflens.intervene.registry import InterventionSpec, Param, parse_ids, register_intervention
from difflens.hooks import Site
from difflens.intervene.run import Recording, record_activations

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary


# ---- transfer from a reference generation -----------------------------------------------------------
class Transfer(CodeEdit):
    """Put codes from a reference generation into the target at every (selected) step.

    `reference` is (prompt, seed); it is generated first with the same steps and guidance and its
    activations recorded at the site. Or it is (recording, sample): a `Recording` of this site made
    beforehand (`record_activations` over many references in one batch, which a study shares
    between dictionaries) and the index of the reference's sample in it. For each target row, the reference row of the same CFG
    branch and step supplies the codes of `features` (None = all features). mode "tokens" copies
    token by token (same positions); mode "mean" puts the reference's mean code over
    `reference_region` (default: the target region, or all tokens) on every target token — the
    choice for style when layouts differ. The target's error term is kept.
    """

    kind = "transfer"

    def __init__(
        self,
        dictionary: Dictionary,
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
            raise DifflensError("reference must be (prompt, seed) or (recording, sample index)")
        if isinstance(reference[0], Recording):
            if Site.parse(reference[0].site) != self.site:
                raise DifflensError(f"the reference recording is of site {reference[0].site}, the transfer acts at {self.site}")
            self.recording: Recording | None = reference[0]
            self.reference = (f"recorded sample {int(reference[1])}", int(reference[1]))
        else:
            self.recording = None
            self.reference = (str(reference[0]), int(reference[1]))
        self.features = None if features is None else check_features(dictionary, features)
        self.mode = mode
        self.reference_region = reference_region
        self._ref: dict[tuple[int, bool], torch.Tensor] = {}

    def prepare(self, run: RunInfo) -> None:
        super().prepare(run)
        if self.reference_region is not None:
            self.reference_region.resolve(run.grid_hw, run.image_hw)
        if self.recording is None:
            rec, sample = record_activations(
                run.adapter, [self.reference[0]], [self.reference[1]], self.site, steps=run.steps,
                guidance=run.guidance, **run.gen_kwargs,
            ), 0
        else:
            rec, sample = self.recording, self.reference[1]
        self._ref = {}
        for (step, _call), (acts, is_cond, sidx) in rec.acts.items():
            for r in range(acts.shape[0]):
                if int(sidx[r]) == sample:
                    self._ref.setdefault((step, bool(is_cond[r])), acts[r])
        if not self._ref:
            raise DifflensError(f"the reference recording has no sample {sample}")
        active = {s for s, t in enumerate(run.timesteps) if self.window.active(s, t)}
        missing = sorted(active - {s for s, _ in self._ref})
        if missing:
            raise DifflensError(f"the reference recording lacks steps {missing}: record it with the same number of steps")
        self.reference_image = rec.images[sample] if rec.images is not None else None

    def reference_acts(self, ctx, rows, toks, device) -> torch.Tensor:
        """The reference's activations for each target row (same step and CFG branch): [R, T', D]."""
        out = []
        for r in rows.tolist():
            key = (ctx.step, bool(ctx.is_cond[r]))
            if key not in self._ref:
                raise DifflensError(
                    f"the reference run has no {'conditional' if key[1] else 'unconditional'} row at step {ctx.step}: "
                    "generate target and reference with the same guidance"
                )
            ref = self._ref[key].to(device)
            sel = toks if self.mode == "tokens" else self._ref_tokens(ctx, ref.shape[0], device, toks)
            out.append(ref if sel is None else ref.index_select(0, sel))
        return torch.stack(out)

    def reference_codes(self, ctx, rows, toks, device) -> tuple:
        """encode_codes of `reference_acts` (flattened), or what `Batched` encoded for this call."""
        anchor = (ctx.step, ctx.call_index, tuple(rows.tolist()))
        hit = self._codes.get(("ref", id(self.dictionary)))
        if hit is not None and hit[0] == anchor:
            return hit[1]
        src = self.reference_acts(ctx, rows, toks, device)
        return encode_codes(self.dictionary, src.reshape(-1, src.shape[-1]), ctx.timestep)

    def apply(self, x, ctx, rows, toks, acts):
        R, T, D = x.shape
        xf, tt, codes = codes_for(self, self.dictionary, x, ctx.timestep)
        ref_codes = self.reference_codes(ctx, rows, toks, x.device)[2]
        if self.mode == "mean":
            ref_codes = ref_codes.reshape(R, -1, ref_codes.shape[-1]).mean(1, keepdim=True).expand(R, T, -1).reshape(R * T, -1)
        if self.features is None:
            new = ref_codes.clone()
        else:
            new = codes.clone()
            f = torch.tensor(self.features, device=new.device)
            new[:, f] = ref_codes[:, f]
        delta = self.dictionary.decode(new, tt) - self.dictionary.decode(codes, tt)
        return (xf + delta).reshape(R, T, D)

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


# ---- the `transfer` verb and playground section (intervene/registry.py) --------------------------------
def _transfer_arguments(p) -> None:
    p.add_argument("--reference-prompt", required=True, help="prompt of the reference generation")
    p.add_argument("--reference-seed", type=int, default=0, help="seed of the reference generation")
    p.add_argument("--features", default="all", help="feature ids F,F,... to transfer, or 'all' (default)")
    p.add_argument("--mode", choices=["tokens", "mean"], default="tokens",
                   help="tokens: same positions (default); mean: the reference's mean code on every target token")


def _transfer_from_args(args, dictionary: Dictionary, where) -> Transfer:
    features = None if str(args.features).strip().lower() == "all" else parse_ids(args.features, "--features")
    return Transfer(dictionary, (args.reference_prompt, args.reference_seed), features, mode=args.mode, site=args.site,
                    **where)


register_intervention(InterventionSpec(
    "transfer",
    "take features' codes from a reference generation into the target (style / attribute transfer)",
    build=_transfer_from_args,
    add_arguments=_transfer_arguments,
    description="Generate the reference, then generate the target with the chosen features' codes replaced "
    "by the reference's at every (selected) step, token by token or as the reference's mean code.",
    labels=("target", "transferred"),
    title="transfer: {reference_prompt} -> {prompt}",
    meta=lambda args: {"reference_prompt": args.reference_prompt, "reference_seed": args.reference_seed},
    extra_images=lambda iv: [("reference", iv.reference_image)],
    params=(Param("reference_prompt", "text", None, "prompt of the reference generation"),
            Param("reference_seed", "int", 0, "seed of the reference generation", min=0, max=2**31 - 1),
            Param("features", "features", "all", "feature ids to take from the reference, or 'all'", all_ok=True),
            Param("mode", "choice", "tokens", "tokens: same positions; mean: the reference's mean code everywhere",
                  choices=("tokens", "mean"))),
    from_request=lambda p, dictionary, where: Transfer(dictionary, (p["reference_prompt"], p["reference_seed"]),
                                                       p["features"], mode=p["mode"], **where),
))
