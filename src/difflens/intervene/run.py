"""Running interventions: one HookSet, one generation; recording a site's activations."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from difflens.errors import DifflensError
from difflens.hooks import HookSet, Site
from difflens.generation import GenerationPlan, plan_generation, run_plan
from difflens.intervene.base import Intervention, RunInfo

if TYPE_CHECKING:
    from difflens.models.base import Adapter

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


def plan_run(adapter: Adapter, prompts, seeds, *, steps=None, guidance=None, height=None, width=None) -> RunInfo:
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
    adapter: Adapter,
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
    warn_if_idle(interventions, stacklevel=3)
    return gen


def warn_if_idle(interventions: Sequence[Intervention], stacklevel: int = 2) -> None:
    """Warn about each intervention that never acted in the run it was prepared for."""
    for iv in interventions:
        if not iv.log:
            hint = " (this model has no unconditional branch)" if iv.branch == "uncond" else ""
            warnings.warn(f"intervention never acted: {iv.describe()}{hint}", stacklevel=stacklevel)


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


def record_activations(adapter: Adapter, prompts, seeds, site, *, steps=None, guidance=None, interventions=(),
                       **gen_kwargs) -> Recording:
    """Generate (optionally with interventions) and record the site's activations after them."""
    site = Site.parse(site)
    acts: dict = {}
    gen = generate_with(
        adapter, prompts, seeds, interventions, steps=steps, guidance=guidance,
        extra_hooks=HookSet([(site, recorder(acts))]), **gen_kwargs,
    )
    return Recording(str(site), acts, gen.images, list(gen.timesteps))
