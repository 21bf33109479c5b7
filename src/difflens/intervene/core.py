"""Compatibility: the intervention classes now live in base / steer / edits / transfer / run.

Kept so `from difflens.intervene.core import Steer, generate_with` keeps working; new code
imports from `difflens.intervene` (or the module that owns the name)."""

from difflens.intervene.base import (  # noqa: F401
    BRANCHES,
    SCALE_MODES,
    Intervention,
    RunInfo,
    check_dictionary,
    check_features,
    default_steps,
    dictionary_site,
    encode_codes,
    prep_dictionary,
)
from difflens.intervene.edits import EDIT_OPS, Ablate, Clamp, CodeEdit, MeanAblate, Replace, Scale, Splice  # noqa: F401
from difflens.intervene.run import (  # noqa: F401
    Recording,
    build_hookset,
    generate_with,
    intervention_hooks,
    plan_run,
    record_activations,
    recorder,
)
from difflens.intervene.steer import Steer, feature_maxima  # noqa: F401
from difflens.intervene.transfer import Transfer  # noqa: F401
