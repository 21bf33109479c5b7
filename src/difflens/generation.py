"""The one batched generation loop: requests in, one `Generation` per batch out, hooks per batch.

Harvest, interpretation (`--generate`), splice evaluation, interventions, trace, `difflens
generate` and the toy model's adherence check all generate through `generate_batched`, so
batching, default steps and the run's plan (timesteps, token grid, image size, known before
the first step) are decided in one place. Each sample's noise comes from its own seed, so
batching does not change images.

Hooks are either one `HookSet` for every batch or a function of the batch's `GenerationPlan`
returning one: recorders that need to know the batch's samples, and interventions that need
the run's timesteps and grid before it starts (`intervene.run.intervention_hooks` prepares them from the plan).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from difflens.errors import DifflensError
from difflens.hooks import HookSet
from difflens.models.base import Adapter, Generation


class Request(Protocol):
    """Anything with a prompt and a seed (harvest's `Sample`, a study's item, `GenRequest`)."""

    prompt: str
    seed: int


@dataclass(frozen=True)
class GenRequest:
    prompt: str
    seed: int


@dataclass
class GenerationPlan:
    """What one generate() call will do, known before it runs (interventions prepare from it)."""

    adapter: Adapter
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float | None
    timesteps: list[float]
    grid_hw: tuple[int, int]
    image_hw: tuple[int, int] | None
    gen_kwargs: dict = field(default_factory=dict)  # height/width as passed to adapter.generate
    batch_index: int = 0  # which batch of a `generate_batched` run this is
    batch_start: int = 0  # position of its first request in that run's requests


def plan_generation(
    adapter: Adapter,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> GenerationPlan:
    """The plan of one generate() call; the adapter's default steps when `steps` is None."""
    adapter.check_request(list(prompts), list(seeds), 1 if steps is None else steps)
    steps = adapter.resolve_steps(steps)
    gen_kwargs = {k: int(v) for k, v in (("height", height), ("width", width)) if v is not None}
    return GenerationPlan(
        adapter=adapter,
        prompts=[str(p) for p in prompts],
        seeds=[int(s) for s in seeds],
        steps=steps,
        guidance=guidance,
        timesteps=[float(t) for t in adapter.timesteps(steps, **gen_kwargs)],
        grid_hw=tuple(int(v) for v in adapter.grid_hw(height, width)),
        image_hw=tuple(int(v) for v in adapter.image_hw(height, width)),
        gen_kwargs=gen_kwargs,
    )


def run_plan(plan: GenerationPlan, hooks: HookSet | None = None) -> Generation:
    """Generate what `plan` describes, with `hooks` active."""
    return plan.adapter.generate(
        list(plan.prompts), list(plan.seeds), steps=plan.steps, guidance=plan.guidance, hooks=hooks, **plan.gen_kwargs
    )


@dataclass
class Batch:
    """One generate() call of a batched run: requests[start:start + len(requests)]."""

    index: int
    start: int
    requests: list[Any]
    plan: GenerationPlan
    generation: Generation


Hooks = HookSet | Callable[[GenerationPlan], HookSet | None] | None


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive batches of at most `batch_size` over n requests."""
    if batch_size < 1:
        raise DifflensError(f"batch size must be >= 1, got {batch_size}")
    return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]


def generate_batched(
    adapter: Adapter,
    requests: Sequence[Request],
    hooks: Hooks = None,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 16,
    height: int | None = None,
    width: int | None = None,
    only: Callable[[int], bool] | None = None,
    on_batch: Callable[[Batch], None] | None = None,
) -> Iterator[Batch]:
    """Generate `requests` in batches of `batch_size`, yielding each batch as it is done.

    hooks: one HookSet for all batches, or `hooks(plan)` building the batch's HookSet.
    only: batch index -> whether to run it (resume, one rank's share); skipped batches are not
    yielded but keep their numbers, so batch i always holds the same requests.
    on_batch: called with each finished batch (e.g. to advance a progress bar).
    """
    requests = list(requests)
    if not requests:
        raise DifflensError("nothing to generate: pass at least one prompt")
    for i, (a, b) in enumerate(batch_bounds(len(requests), batch_size)):
        if only is not None and not only(i):
            continue
        chunk = requests[a:b]
        plan = plan_generation(
            adapter, [r.prompt for r in chunk], [r.seed for r in chunk], steps=steps, guidance=guidance, height=height, width=width
        )
        plan.batch_index, plan.batch_start = i, a
        hs = hooks(plan) if callable(hooks) else hooks
        batch = Batch(i, a, chunk, plan, run_plan(plan, hs))
        if on_batch is not None:
            on_batch(batch)
        yield batch


def requests_of(prompts: Sequence[str], seeds: Sequence[int]) -> list[GenRequest]:
    """One request per (prompt, seed) pair, in order."""
    if len(prompts) != len(seeds):
        raise DifflensError(f"{len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
    return [GenRequest(str(p), int(s)) for p, s in zip(prompts, seeds)]
