"""Trace pairs and readouts for a model with ground truth (the toy world).

The world proposes two prompts of one scene that differ in one factor; pairs whose clean target
or clean source the world's reader does not read as prompted are dropped (a patch cannot be
judged on a pair the model gets wrong without any patch), and the share dropped is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from difflens.errors import DifflensError
from difflens.generation import generate_batched, requests_of
from difflens.groundtruth import ground_truth_of
from difflens.trace.readouts import WorldReadout
from difflens.trace.run import Pair

if TYPE_CHECKING:
    from difflens.models.base import Adapter

TRACE_FACTORS = ("color", "object", "position", "bgcolor", "bg")
# Factors that must keep the target's reading while `factor` is patched.
KEEP_FACTORS = ("color", "object", "position", "bgcolor")


def world_readout(truth, factor: str) -> WorldReadout:
    """Reads `factor` (did the source's value come through?) and the world's other kept factors."""
    others = [f for f in KEEP_FACTORS if f in truth.factors and f != factor and not (factor == "bg" and f == "bgcolor")]
    return WorldReadout(lambda images, f: list(truth.read_factor(np.asarray(images), f)), factor, others)


def world_pairs(adapter: Adapter, truth, factor: str, n: int, *, seed: int = 0, steps: int, guidance: float | None = None,
                oversample: float = 2.0, batch_size: int = 64) -> tuple[list[Pair], dict]:
    """n pairs differing in `factor` whose clean images read as prompted, and how many were tried."""
    values = tuple(truth.factors.get(factor, ()))
    if len(values) < 2:
        raise DifflensError(f"factor {factor!r} unknown to the world; use one of {', '.join(truth.factors)}")
    rng = np.random.default_rng(seed)
    cand = []
    for i in range(max(n, int(np.ceil(n * oversample)))):
        a, b = rng.choice(len(values), size=2, replace=False)
        tgt, src = truth.prompt_pair(factor, values[a], values[b], seed=seed * 100003 + i)
        cand.append(Pair(tgt, src, seed * 1000 + i, factor, values[a], values[b]))
    prompts = [p.target for p in cand] + [p.source for p in cand]
    seeds = [p.seed for p in cand] * 2
    images = np.concatenate([np.asarray(b.generation.images) for b in generate_batched(
        adapter, requests_of(prompts, seeds), steps=steps, guidance=guidance, batch_size=batch_size)])
    reads = truth.read_factor(images, factor)
    ok = [i for i, p in enumerate(cand) if reads[i] == p.target_value and reads[len(cand) + i] == p.source_value]
    kept = [cand[i] for i in ok][:n]
    return kept, {"candidates": len(cand), "read_as_prompted": len(ok), "used": len(kept)}


def trace_world(adapter: Adapter, factors: Sequence[str], n_pairs: int, **kw):
    """Yields (factor, pairs, pair_info, readout) for each factor (helper for the CLI and the demo)."""
    truth = ground_truth_of(adapter)
    if truth is None:
        raise DifflensError("this model has no ground truth: give prompt pairs (--pair 'target|source') and use the pixel readout")
    for f in factors:
        pairs, info = world_pairs(adapter, truth, f, n_pairs, steps=kw["steps"], guidance=kw.get("guidance"),
                                  seed=kw.get("seed", 0))
        yield f, pairs, info, world_readout(truth, f)
