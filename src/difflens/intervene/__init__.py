"""Interventions on a diffusion transformer's activations: steering, ablation / clamping / scaling
through a dictionary's codes, transfer from a reference generation, and splicing.

    from difflens.intervene import Steer, Ablate, Region, Window, generate_with
    gen = generate_with(adapter, prompts, seeds, [
        Steer(sae, [123], 0.8, mode="token-norm", region=Region.parse("0,0,16,16"), window=Window.range(0, 5)),
        Ablate(sae, [7, 9], branch="cond"),
    ])

See docs/intervene.md for the semantics (error term, CFG branches, regions, windows). Each
intervention module registers its CLI verb and playground section with `register_intervention`
(docs/architecture.md, "Where to add things").
"""

from difflens.intervene.batched import Batched, batch_interventions
from difflens.intervene.base import BRANCHES, SCALE_MODES, Intervention, RunInfo, FiresOn
from difflens.intervene.directions import concept_direction
from difflens.intervene.edits import Ablate, Clamp, CodeEdit, CodeShift, MeanAblate, Replace, Scale, Splice
from difflens.intervene.run import Recording, build_hookset, generate_with, record_activations, recorder
from difflens.intervene.steer import Steer, feature_maxima
from difflens.intervene.transfer import Transfer
from difflens.intervene.region import Region, Window
from difflens.intervene.registry import InterventionSpec, Param, intervention_specs, register_intervention
from difflens.intervene.sweep import steer_sweep

__all__ = [
    "BRANCHES",
    "SCALE_MODES",
    "Ablate",
    "Batched",
    "Clamp",
    "FiresOn",
    "CodeEdit",
    "CodeShift",
    "Intervention",
    "InterventionSpec",
    "MeanAblate",
    "Param",
    "Recording",
    "Region",
    "Replace",
    "RunInfo",
    "Scale",
    "Splice",
    "Steer",
    "Transfer",
    "Window",
    "batch_interventions",
    "build_hookset",
    "concept_direction",
    "feature_maxima",
    "generate_with",
    "intervention_specs",
    "record_activations",
    "recorder",
    "register_intervention",
    "steer_sweep",
]
