"""Where the intervention studies find their world: always through the `GroundTruth` interface.

The studies (`study_*.py`) and the difference-of-means directions never import a world package:
they take its value lists (`truth.factors`), concept names (`truth.concepts`), image geometry
(`image_size`, `grid`, `object_box`) and per-position readings (`read_at`) from a `GroundTruth`:
the one passed in (`truth=`), else the adapter's (`adapter.ground_truth()`), else the world of the
store's model (`models.ground_truth_for`). Helpers called with none of these (a test building
cases, say, or a store naming no model) use the world of the CLI's default model
(`models.default_ground_truth`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from difflens.errors import DifflensError
from difflens.groundtruth import GroundTruth, ground_truth_of

if TYPE_CHECKING:
    from difflens.models.base import Adapter


def default_truth() -> GroundTruth:
    """The ground truth of the CLI's default model (resolved without loading weights)."""
    from difflens.models import DEFAULT_MODEL, default_ground_truth

    truth = default_ground_truth()
    if truth is None:
        raise DifflensError(f"the default model {DEFAULT_MODEL!r} has no ground-truth world: pass truth= (a GroundTruth)")
    return truth


def truth_of(adapter: Adapter | None = None, truth: GroundTruth | None = None) -> GroundTruth:
    """`truth` if given, else the adapter's ground truth (a usage error when it has none), else the default world."""
    if truth is not None:
        return truth
    if adapter is None:
        return default_truth()
    found = ground_truth_of(adapter)
    if found is None:
        raise DifflensError(f"the intervention studies read images with a ground-truth world, and the model "
                            f"{getattr(adapter, 'name', adapter)!r} has none: use a model trained on one (such as the default --model)")
    return found


def store_truth(store, truth: GroundTruth | None = None) -> GroundTruth:
    """`truth` if given, else the world of the model the store was harvested from (how its token
    labels are read; a usage error when that model has none), else (a store naming no model, e.g.
    a duck-typed one) the default world."""
    if truth is not None:
        return truth
    from difflens.models import ground_truth_for

    model = (getattr(store, "manifest", None) or {}).get("model")
    if not model:
        return default_truth()
    found = ground_truth_for(model)
    if found is None:
        raise DifflensError(f"store {store.root} was harvested from {model!r}, which has no ground-truth world: "
                            "concept labels need a model trained on a known world")
    return found


def concept_ids(truth: GroundTruth) -> dict[str, int]:
    """concept name -> its bit in a token label bitmask."""
    return {c: i for i, c in enumerate(truth.concepts)}
