"""The study's prompts, regions, readings and success rates (a ground-truth world's values, geometry
and image reader, through `GroundTruth`; see `intervene.truth`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from difflens.errors import DifflensError
from difflens.utils import progress
from difflens.intervene.region import Region, Window
from difflens.generation import generate_batched
from difflens.intervene.batched import batch_interventions
from difflens.intervene.run import intervention_hooks, warn_if_idle
from difflens.intervene.truth import truth_of

if TYPE_CHECKING:
    from difflens.models.base import Adapter

MARGIN_PX = 2  # object jitter around its position's centre


# ---- prompts and regions ------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One study prompt: a single large object with known factors."""

    prompt: str
    seed: int
    color: str
    object: str
    position: str
    bgcolor: str

    @property
    def factors(self) -> dict[str, str]:
        return {"color": self.color, "object": self.object, "position": self.position}


def make_item(color: str, obj: str, position: str, bgcolor: str, seed: int, *, truth=None) -> Item:
    prompt = truth_of(None, truth).describe({"color": color, "object": obj, "position": position, "bgcolor": bgcolor})
    return Item(prompt, int(seed), color, obj, position, bgcolor)


def study_items(factor: str, value: str, n: int, rng: np.random.Generator, *, has: bool, seed0: int = 0,
                truth=None) -> list[Item]:
    """n single-object prompts that do (has=True) or do not name `factor=value` (values from
    `truth.factors`; default: `intervene.truth.truth_of()`)."""
    truth = truth_of(None, truth)
    values, study_objects = truth.factors, truth.study_objects
    positions, bg_colors = values["position"], values["bgcolor"]
    colors = [c for c in values["color"] if (c == value) == has] if factor == "color" else list(values["color"])
    objects = [o for o in study_objects if (o == value) == has] if factor == "object" else list(study_objects)
    if factor == "object" and has and value not in study_objects:
        objects = [value]
    if not colors or not objects:
        raise DifflensError(f"no study prompts for {factor}={value} (has={has})")
    out = []
    for i in range(n):
        out.append(
            make_item(
                str(rng.choice(colors)),
                str(rng.choice(objects)),
                positions[i % len(positions)],
                bg_colors[(i // len(positions)) % len(bg_colors)],
                seed0 + i,
                truth=truth,
            )
        )
    return out


def object_region(position: str, size: str = "large", margin: int = MARGIN_PX, *, truth=None) -> Region:
    """The pixel box an object of this size at this position can cover (with jitter margin;
    `truth.object_box`)."""
    box = truth_of(None, truth).object_box(position, size, margin)
    return Region(box=tuple(int(v) for v in box), units="px", label=f"{position} object box")


def object_mask(position: str, truth=None, size: str = "large") -> np.ndarray:
    """bool [image_size, image_size]: the pixels of `object_region(position)` as the token grid resolves them."""
    truth = truth_of(None, truth)
    return object_region(position, size, truth=truth).pixel_mask((truth.image_size,) * 2, (truth.grid,) * 2)


def study_classifier(classifier, truth=None):
    """`classifier` if given, else the world's image reader (`truth.image_reader()`)."""
    if classifier is not None:
        return classifier
    try:
        return truth_of(None, truth).image_reader()
    except DifflensError as e:
        raise DifflensError(f"the intervention study judges images with the factor classifier: {e}") from None


ABSENT = "(none)"  # the reading when the classifier sees no object at the slot


def read_at(classifier, images, factor: str, positions: Sequence[str], *, truth=None) -> list[str]:
    """The factor read (by `classifier`, through `truth.read_at`) at each image's own object
    position, or ABSENT when no object is there: an edit that erases the object must not count as
    changing its colour."""
    got = truth_of(None, truth).read_at(np.asarray(images), positions, (factor,), reader=classifier)[factor]
    return [ABSENT if v is None else v for v in got]


def success_rate(before: Sequence[str], after: Sequence[str], target: Sequence[str], *, mode: str = "reach") -> dict:
    """Over cases with an object before the intervention:
    mode "reach": success = after == target, among cases where before != target;
    mode "leave": success = after is another value (object still there), among cases where
    before == target. `vanished` counts eligible cases whose object disappeared."""
    before, after, target = list(before), list(after), list(target)
    present = [i for i in range(len(before)) if before[i] != ABSENT]
    if mode == "reach":
        eligible = [i for i in present if before[i] != target[i]]
        hits = [i for i in eligible if after[i] == target[i]]
    elif mode == "leave":
        eligible = [i for i in present if before[i] == target[i]]
        hits = [i for i in eligible if after[i] not in (target[i], ABSENT)]
    else:
        raise ValueError(mode)
    n = len(eligible)
    vanished = sum(1 for i in eligible if after[i] == ABSENT)
    return {
        "success_rate": (len(hits) / n) if n else None,
        "successes": len(hits),
        "eligible": n,
        "total": len(before),
        "vanished": vanished,
    }


def pixel_change(clean: np.ndarray, new: np.ndarray, masks: Sequence[np.ndarray]) -> dict:
    """Mean squared pixel change ([0,1] scale) inside and outside each image's region."""
    d = ((new.astype(np.float64) - clean.astype(np.float64)) / 255.0) ** 2
    d = d.mean(-1)  # [B, H, W]
    ins = [float(d[i][m].mean()) if m.any() else 0.0 for i, m in enumerate(masks)]
    outs = [float(d[i][~m].mean()) if (~m).any() else 0.0 for i, m in enumerate(masks)]
    mi, mo = float(np.mean(ins)), float(np.mean(outs))
    return {"mse_inside": mi, "mse_outside": mo, "outside_over_inside": (mo / mi) if mi > 0 else None}


# ---- batched generation ---------------------------------------------------------------------------
def generate_items(
    adapter: Adapter,
    items: Sequence[Item],
    make: Callable[[int, int], list] | None = None,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 32,
    bar=None,
    batched: bool = True,
) -> np.ndarray:
    """Images for `items` (through `generation.generate_batched`); `make(k, j)` gives the
    interventions of item k as sample j of its batch. With `batched`, the batch's per-sample
    interventions at one site run as one (`Batched`: one dictionary encode for all rows)."""
    if not items:
        return np.zeros((0, *adapter.image_hw(), 3), np.uint8)
    made: list[list] = []

    def hooks(plan):
        ivs = [] if make is None else [iv for j in range(len(plan.prompts)) for iv in make(plan.batch_start + j, j)]
        made.append(ivs)
        return intervention_hooks(batch_interventions(ivs) if batched else ivs)(plan)

    out = []
    for batch in generate_batched(adapter, items, hooks, steps=steps, guidance=guidance, batch_size=batch_size):
        warn_if_idle(made.pop(), stacklevel=3)
        out.append(np.asarray(batch.generation.images))
        if bar is not None:
            bar.update(len(batch.requests))
    return np.concatenate(out)


def default_windows(steps: int) -> dict[str, Window]:
    """The Flux recipe (first ~5/7 of the steps) and its neighbours: all, early, late."""
    first = max(1, round(steps * 5 / 7))
    half = max(1, steps // 2)
    return {
        f"0:{first} (first 5/7)": Window.range(0, first),
        "all": Window.all(),
        f"0:{half} (early half)": Window.range(0, half),
        f"{half}: (late half)": Window.range(half, None),
    }


def progress_bar(total: int, desc: str, show: bool, unit: str = "img"):
    return progress(total=total, desc=desc, unit=unit, **({} if show else {"disable": True}))
