"""Compatibility: the intervention study now lives in study_labels / study_items / study_steer /
study_edits / study_plots / study. Kept so existing imports keep working."""

from difflens.intervene.study import run_intervention_study, save_labels, summary_markdown  # noqa: F401
from difflens.intervene.study_edits import ABLATION_VARIANTS, run_ablation_study, run_transfer_study  # noqa: F401
from difflens.intervene.study_items import (  # noqa: F401
    ABSENT,
    Item,
    default_windows,
    generate_items,
    make_item,
    object_region,
    read_at,
    study_items,
    success_rate,
)
from difflens.intervene.study_labels import (  # noqa: F401
    STUDY_FACTORS,
    STUDY_OBJECTS,
    features_by_concept,
    label_features,
    read_labels,
)
from difflens.intervene.study_steer import run_steering_study  # noqa: F401
