"""Intervention verbs: the one place the CLI and the browser's playground learn which
interventions exist and how to build them.

An intervention module declares its face once, at import time:

    register_intervention(InterventionSpec(
        "steer", "add a feature's decoder direction during generation", build=_from_args,
        add_arguments=_arguments, params=(Param("feature", "feature", 0), ...), from_request=_from_request))

`difflens <name>` then exists (`intervene/cli.py` adds the shared model, prompt, where and --out
flags and writes the PNG + JSON), and, when it declares `params` and `from_request`, so does its
section of the playground (`browse/server.py` validates each parameter against its `Param`, and
the shared where — step window, region, CFG branch — with `parse_where`).
Every module in `difflens/intervene/` is imported before the registry is read, so a new
intervention touches only its own module (and its test).
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING

from difflens.errors import DifflensError

if TYPE_CHECKING:
    from difflens.dictionaries.base import Dictionary

PARAM_KINDS = ("int", "float", "choice", "text", "feature", "features")
MAX_TEXT = 500  # characters of a text parameter (the playground's prompt limit)
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


# ---- parsing helpers shared by the verbs' flags ----------------------------------------------------
def parse_ids(text: str, what: str = "--feature") -> list[int]:
    try:
        ids = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"{what} {text!r}: give integer feature ids separated by commas, e.g. 12,40") from None
    if not ids:
        raise DifflensError(f"{what} names no feature; e.g. {what} 12")
    return ids


def parse_pairs(text: str, what: str) -> list[tuple[int, float]]:
    out = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        f, sep, v = part.partition("=")
        if not sep:
            raise DifflensError(f"{what} {text!r}: each entry needs =value, e.g. {what} 12=3.5,40=0")
        try:
            out.append((int(f), float(v)))
        except ValueError:
            raise DifflensError(f"{what} {text!r}: write F=V pairs separated by commas, e.g. {what} 12=3.5,40=0") from None
    if not out:
        raise DifflensError(f"{what} names no feature")
    return out


def parse_scales(text: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DifflensError(f"--scales {text!r}: give numbers separated by commas, e.g. -8,-4,0,4,8") from None
    if not vals:
        raise DifflensError("--scales names no scale")
    return vals


# ---- playground parameters ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One playground control, validated server-side by `parse`.

    kind: int / float (within min..max), choice (one of `choices`), text (a non-empty string),
    feature (one id of the dictionary), features (ids as a list or "12,40"; "all" -> None when
    `all_ok`). `default` None means the request must give it. `slider` is the playground's slider
    span (inside min..max) for a float; `step` its increment.
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    slider: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    all_ok: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise DifflensError(f"parameter {self.name!r}: kind {self.kind!r} unknown; use one of {', '.join(PARAM_KINDS)}")
        if self.kind == "choice" and not self.choices:
            raise DifflensError(f"parameter {self.name!r} is a choice: give its choices")

    def parse(self, value, num_latents: int):
        """The checked value; DifflensError naming the parameter and what it accepts otherwise."""
        if value is None:
            value = self.default
            if value is None:
                raise DifflensError(f"{self.name} is missing: {self.help or 'give a value'}")
        if self.kind in ("int", "feature"):
            lo, hi = (0, num_latents - 1) if self.kind == "feature" else (self.min, self.max)
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == int(value)
            if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
                raise DifflensError(f"{self.name} must be an integer{_span(lo, hi)}, got {value!r}")
            return int(value)
        if self.kind == "float":
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not ok or (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                raise DifflensError(f"{self.name} must be a number{_span(self.min, self.max)}, got {value!r}")
            return float(value)
        if self.kind == "choice":
            if value not in self.choices:
                raise DifflensError(f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.kind == "text":
            if not isinstance(value, str) or not value.strip():
                raise DifflensError(f"{self.name} is empty: {self.help or 'give some text'}")
            if len(value) > MAX_TEXT:
                raise DifflensError(f"{self.name} is {len(value)} characters; keep it under {MAX_TEXT}")
            return value.strip()
        return self._features(value, num_latents)

    def _features(self, value, n: int):
        if self.all_ok and isinstance(value, str) and value.strip().lower() in ("all", ""):
            return None
        if isinstance(value, str):
            try:
                value = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                value = None
        ok = isinstance(value, list) and 0 < len(value) <= n and all(
            not isinstance(f, bool) and isinstance(f, (int, float)) and f == int(f) and 0 <= f < n for f in value)
        if not ok:
            extra = " or 'all'" if self.all_ok else ""
            raise DifflensError(f"{self.name} must be feature ids in 0..{n - 1} (a list or '12,40'){extra}, got {value!r}")
        return [int(f) for f in value]

    def to_json(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "default": self.default, "help": self.help}
        for k in ("min", "max", "step", "slider"):
            if getattr(self, k) is not None:
                out[k] = list(getattr(self, k)) if k == "slider" else getattr(self, k)
        if self.choices:
            out["choices"] = list(self.choices)
        if self.all_ok:
            out["all_ok"] = True
        return out


def _span(lo, hi) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" >= {lo:g}"
    if lo is None:
        return f" <= {hi:g}"
    return f" in {lo:g}..{hi:g}"


WHERE_KEYS = ("window", "region", "region_units", "branch")


def parse_where(raw) -> dict:
    """A playground request's "where" -> the keywords every `Intervention` takes (window, region,
    branch), checked like the CLI's --step-window / --region / --region-units / --branch.

    {"window": "0:5" or "0,2,4" (step indices; empty = every step), "region": [x0, y0, x1, y1] or
    "x0,y0,x1,y1" (empty = every token), "region_units": "tokens" (default) or "px",
    "branch": "both" / "cond" / "uncond"}; every key optional.
    """
    from difflens.intervene.base import BRANCHES
    from difflens.intervene.region import UNITS, Region, Window

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DifflensError("where must be a JSON object {window, region, region_units, branch}")
    unknown = sorted(set(raw) - set(WHERE_KEYS))
    if unknown:
        raise DifflensError(f"where has no key {', '.join(map(repr, unknown))}: it takes {', '.join(WHERE_KEYS)}")
    out: dict = {}
    window = raw.get("window")
    if window not in (None, ""):
        if not isinstance(window, str):
            raise DifflensError(f"window must be text like '0:5' or '0,2,4' (step indices), got {window!r}")
        out["window"] = Window.parse(window, steps_flag="window")
    branch = raw.get("branch", "both")
    if branch not in BRANCHES:
        raise DifflensError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
    out["branch"] = branch
    units = raw.get("region_units", "tokens")
    if units not in UNITS:
        raise DifflensError(f"region_units must be one of {', '.join(UNITS)}, got {units!r}")
    region = raw.get("region")
    if region not in (None, "", []):
        if isinstance(region, str):
            region = region.replace(" ", "").split(",")
        ok = isinstance(region, list) and len(region) == 4
        try:
            box = tuple(float(v) for v in region) if ok else ()
        except (TypeError, ValueError):
            box = ()
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or any(isinstance(v, bool) for v in region):
            raise DifflensError(f"region must be four numbers x0,y0,x1,y1 (x = column, y = row, ends excluded), got {raw['region']!r}")
        text = ",".join(f"{v:g}" for v in box)
        out["region"] = Region(box=box, units=units, label=f"box {text} ({units})")
    return out


# ---- the spec -----------------------------------------------------------------------------------------
def _no_arguments(parser) -> None:
    return None


@dataclass(frozen=True)
class InterventionSpec:
    """An intervention's CLI verb and playground section.

    build(args, dictionary, where) -> an `Intervention`, or a sweep: [(label, Intervention), ...]
        generated in one batch beside the clean image (the runner restricts variant i to sample
        i + 1). `where` holds the shared window / region / branch keywords of `Intervention`.
    add_arguments(parser): the verb's own flags (the shared ones are added by `intervene/cli.py`).
    labels: captions of the clean and the changed image; title: the grid's title. Both are
        format strings over the parsed flags, e.g. "scale {scale:+g}".
    meta(args) -> extra keys of the JSON written beside the PNG.
    extra_images(iv) -> [(label, image), ...] shown between clean and changed (after generating).
    params + from_request(params, dictionary, where) -> Intervention: the playground's controls and
        build; `where` holds the same keywords as `build`'s (from the request's "where", `parse_where`).
    """

    name: str
    help: str
    build: Callable
    add_arguments: Callable = _no_arguments
    description: str = ""
    labels: tuple[str, str] = ("clean", "changed")
    title: str = "{verb}: {prompt}"
    meta: Callable | None = None
    extra_images: Callable | None = None
    params: tuple[Param, ...] = field(default=())
    from_request: Callable | None = None

    def parse_params(self, raw, dictionary: Dictionary) -> dict:
        """A playground request's parameters, each checked by its `Param`; unknown names refused."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise DifflensError("params must be a JSON object {name: value}")
        known = {p.name for p in self.params}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DifflensError(f"{self.name} has no parameter {', '.join(map(repr, unknown))}: "
                                f"it takes {', '.join(p.name for p in self.params) or 'none'}")
        n = int(dictionary.num_latents)
        return {p.name: p.parse(raw.get(p.name), n) for p in self.params}

    @property
    def in_playground(self) -> bool:
        return self.from_request is not None

    def to_json(self) -> dict:
        return {"name": self.name, "help": self.help, "params": [p.to_json() for p in self.params]}


INTERVENTIONS: dict[str, InterventionSpec] = {}


def register_intervention(spec: InterventionSpec) -> InterventionSpec:
    """Add a verb (at import time of the intervention's module); returns the spec."""
    if not _NAME.match(spec.name):
        raise DifflensError(f"intervention name {spec.name!r}: use lower-case letters, digits and '-' (it is a CLI verb)")
    if spec.name in INTERVENTIONS and INTERVENTIONS[spec.name] is not spec:
        raise DifflensError(f"intervention {spec.name!r} is registered twice")
    if spec.params and spec.from_request is None:
        raise DifflensError(f"intervention {spec.name!r} declares playground params but no from_request")
    INTERVENTIONS[spec.name] = spec
    return spec


_DISCOVERED = False


def _discover() -> None:
    """Import every module of difflens.intervene once, so each registers its verbs."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import difflens.intervene as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")
    _DISCOVERED = True


def intervention_specs() -> list[InterventionSpec]:
    """Every registered intervention, by name."""
    _discover()
    return [INTERVENTIONS[k] for k in sorted(INTERVENTIONS)]


def playground_specs() -> list[InterventionSpec]:
    return [s for s in intervention_specs() if s.in_playground]


def get_intervention(name, *, playground: bool = False) -> InterventionSpec:
    specs = playground_specs() if playground else intervention_specs()
    for s in specs:
        if s.name == name:
            return s
    raise DifflensError(f"unknown intervention {name!r}: use one of {', '.join(s.name for s in specs)}")


def sweep_or_single(built) -> list[tuple[str | None, Any]]:
    """[(label, intervention)]: a sweep's variants, or one intervention with no label."""
    from difflens.intervene.base import Intervention

    if isinstance(built, Intervention):
        return [(None, built)]
    variants = list(built) if isinstance(built, Sequence) else None
    if not variants or not all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], Intervention) for v in variants):
        raise DifflensError(f"an intervention's build returned {type(built).__name__}: return an Intervention or "
                            "[(label, Intervention), ...]")
    return variants
