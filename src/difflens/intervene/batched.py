"""Many per-sample interventions as one: a study's cases share a generation, each with its own edit.

A study gives every case (a batch row) its own intervention: `CodeEdit(sae, ops_k,
where=FiresOn(sae, feats_k), samples=[j])`. Run as separate hooks, each encodes its own two rows
(cond and uncond) through the dictionary: many small encodes, which for ITDA's pursuit (a fixed
number of iterations per call) cost nearly as much as one large one. `Batched` runs them in one
hook: one selection and one encode per dictionary of all members' rows, then each member's own
change on its rows (codes taken from the shared encode), all written back at once. Members must
act on disjoint rows, at one site, on the same tokens; the result is the same as running them
one after another.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difflens.errors import DifflensError
from difflens.hooks import HookContext
from difflens.intervene.base import Intervention, RunInfo, encode_codes, select_tokens, write_tokens
from difflens.intervene.edits import CodeEdit


class Batched(Intervention):
    """Per-sample interventions at one site run as one hook with a shared dictionary encode."""

    kind = "batched"

    def __init__(self, members: Sequence[Intervention]) -> None:
        members = list(members)
        if not members:
            raise DifflensError("Batched needs at least one intervention")
        for m in members:
            if not isinstance(m, Intervention) or isinstance(m, Batched):
                raise DifflensError(f"Batched takes single interventions (Steer, CodeEdit, Transfer, ...), got {type(m).__name__}")
        first = members[0]
        for m in members[1:]:
            if not _same_tokens(first, m):
                raise DifflensError(
                    f"Batched members must share the site and token selection: {first.describe()!r} vs {m.describe()!r}"
                )
        super().__init__(site=first.site, region=first.region, tokens=first.tokens)
        self.members = members

    def prepare(self, run: RunInfo) -> None:
        super().prepare(run)
        for m in self.members:
            m.prepare(run)

    def hook(self, acts: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        live, rows = [], []
        for m in self.members:
            if m.window.active(ctx.step, ctx.timestep):
                r = m._rows(ctx, acts.device)
                if r.numel():
                    live.append(m)
                    rows.append(r)
        if not live:
            return None
        union = torch.cat(rows).unique()  # sorted
        if union.numel() != sum(r.numel() for r in rows):
            raise DifflensError("Batched members act on the same rows: give each its own samples (or run them in sequence)")
        toks = self._tokens(ctx, acts.shape[1], acts.device)
        x = select_tokens(acts, union, toks)
        U, T, D = x.shape
        with torch.no_grad():
            shared = {id(d): encode_codes(d, x.reshape(U * T, D), ctx.timestep) for d in _dictionaries(live)}
            refs = _reference_codes(live, rows, ctx, toks, acts.device)
        out, acted = None, 0
        for m, r in zip(live, rows):
            pos = torch.searchsorted(union, r)
            xm = x.index_select(0, pos)
            flat = (pos[:, None] * T + torch.arange(T, device=pos.device)[None, :]).reshape(-1)
            m._codes = {k: (xm, tuple(e.index_select(0, flat) for e in enc)) for k, enc in shared.items()}
            if m in refs:
                m._codes[("ref", id(m.dictionary))] = refs[m]
            new = m.change(xm, ctx, r, toks, acts)
            m._codes = {}
            if new is None:
                continue
            if out is None:
                out = acts.clone()
            write_tokens(out, r, toks, new)
            acted += 1
        if out is not None:
            self.log.append({"step": ctx.step, "timestep": ctx.timestep, "call_index": ctx.call_index,
                             "members": acted})
        return out

    def apply(self, x, ctx, rows, toks, acts):  # the hook does the work
        raise NotImplementedError

    def describe(self) -> str:
        return f"{len(self.members)} interventions batched at {self.site}: " + "; ".join(
            m.describe() for m in self.members[:2]) + ("; ..." if len(self.members) > 2 else "")


def _dictionaries(members) -> list:
    """Every dictionary a member encodes the site through (its own, its FiresOn's), once each."""
    seen: dict[int, object] = {}
    for m in members:
        own = m.dictionary if isinstance(m, CodeEdit) else None  # steering adds directions, encodes nothing
        for d in (own, getattr(m.where, "dictionary", None)):
            if d is not None:
                seen.setdefault(id(d), d)
    return list(seen.values())


def _reference_codes(members, rows, ctx, toks, device) -> dict:
    """One encode of the references of every member that transfers from one (per dictionary and
    reference token count): {member: (anchor, codes)} as `Transfer.reference_codes` reads them."""
    groups: dict[tuple, list] = {}
    for m, r in zip(members, rows):
        if hasattr(m, "reference_acts"):
            src = m.reference_acts(ctx, r, toks, device)
            groups.setdefault((id(m.dictionary), src.shape[1]), []).append((m, r, src))
    out = {}
    for group in groups.values():
        d = group[0][0].dictionary
        src = torch.cat([s for _, _, s in group])
        enc = encode_codes(d, src.reshape(-1, src.shape[-1]), ctx.timestep)
        a = 0
        for m, r, s in group:
            n = s.shape[0] * s.shape[1]
            out[m] = ((ctx.step, ctx.call_index, tuple(r.tolist())), tuple(e[a : a + n] for e in enc))
            a += n
    return out


def _same_tokens(a: Intervention, b: Intervention) -> bool:
    if a.site != b.site or a.tokens != b.tokens:
        return False
    if a.region is b.region:
        return True
    return a.region is not None and b.region is not None and a.region.mask is None and a.region == b.region


def batch_interventions(interventions: Sequence[Intervention]) -> list[Intervention]:
    """Group per-sample interventions that share a site and token selection and act on disjoint
    samples into `Batched` ones. Order at each site is kept: an intervention that cannot join the
    open group at its site (no samples, other tokens, a sample the group already has) closes it."""
    slots: list = []  # interventions, or lists (groups being filled)
    open_: dict = {}  # site -> (group list, its samples)
    for iv in interventions:
        if not isinstance(iv, Intervention):
            slots.append(iv)  # build_hookset names the mistake
            continue
        key = str(iv.site)
        group = open_.get(key)
        can = not isinstance(iv, Batched) and iv.samples is not None
        if group is not None and can and _same_tokens(group[0][0], iv) and not set(iv.samples) & group[1]:
            group[0].append(iv)
            group[1].update(iv.samples)
            continue
        open_.pop(key, None)
        if can:
            open_[key] = ([iv], set(iv.samples))
            slots.append(open_[key][0])
        else:
            slots.append(iv)
    return [(Batched(s) if len(s) > 1 else s[0]) if isinstance(s, list) else s for s in slots]
