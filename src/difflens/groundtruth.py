"""The ground-truth interface: what a model trained on a known world can tell the generic stages.

A real model has no ground truth (`Adapter.ground_truth()` returns None). A model trained on a
procedural world (the embedded toy model) returns a `GroundTruth`: it plans the reference scene
of each prompt, labels image and text tokens with concept bitmasks, reads generated images back
with a classifier, scores prompt adherence, and proposes prompt pairs that differ in one factor.
Harvest, interpretation, splice evaluation, interventions and the demo branch on this object,
never on a model's name, so another world plugs in by implementing this protocol and returning
it from its adapter (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TYPE_CHECKING, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from difflens.models.base import Adapter


class ConceptVocabulary(Protocol):
    """A world's concepts as interpretation reads them: per-token concept matrices, the concepts'
    types, explanations in words and the concepts a free-text explanation names."""

    names: tuple[str, ...]  # column i of `matrix` is names[i]
    index: dict[str, int]
    types: tuple[str, ...]  # concept types, e.g. for the coarse-to-fine analysis
    coarse_types: tuple[str, ...]
    fine_types: tuple[str, ...]
    image_level: np.ndarray  # bool [len(names)]: concepts an image as a whole can have or lack

    def type_of(self, concept: str) -> str: ...

    def matrix(self, masks: np.ndarray) -> np.ndarray:
        """bool [..., len(names)] from the int64 token label bitmasks [...] a harvest stores."""

    def explanation(self, concept: str, level: str) -> str:
        """The concept in words, at "token" (where) or "image" (whether) level."""

    def in_text(self, text: str) -> list[str]:
        """The concepts a free-text explanation names."""

    def mask_for(self, cm_TC: np.ndarray, concepts: list[str]) -> np.ndarray:
        """bool [T]: tokens having every named factor (any named value within a factor)."""


@runtime_checkable
class GroundTruth(Protocol):
    """A world with per-token concept labels and a reader of generated images."""

    name: str
    # Concept names; bit i of a token label bitmask means `concepts[i]` ("factor=value").
    concepts: tuple[str, ...]
    # The factors a prompt pins down, each with its values (e.g. {"color": ("red", ...), ...}).
    factors: dict[str, tuple[str, ...]]

    # ---- prompts and scenes --------------------------------------------------------------------
    def sample_prompts(self, n: int, seed: int) -> tuple[list[str], list[Any]]:
        """n fully specified prompts and the scenes they describe."""

    def scene_for(self, prompt: str, seed: int) -> Any | None:
        """A reference scene consistent with `prompt` (unspecified factors drawn from `seed`),
        or None when the prompt is outside the world's grammar."""

    def knows(self, prompts: Sequence[str]) -> bool:
        """True when every prompt is in the world's grammar (so images can be scored against it)."""

    def prompt_pair(self, factor: str, a: str, b: str, *, seed: int = 0) -> tuple[str, str]:
        """Two prompts of one scene (drawn from `seed`) that differ only in `factor`: a vs b."""

    # ---- labels --------------------------------------------------------------------------------
    def label_scene(self, scene: Any) -> tuple[dict, np.ndarray]:
        """(JSON record fields of the scene, int64 [image tokens] concept bitmasks). Harvest keeps
        the fields in the sample's record and adds the bitmasks as its `token_labels`."""

    def text_labels(self, prompt: str, tokenizer: Any) -> np.ndarray:
        """int64 [text tokens]: the concept bitmask each text token's word names (0 otherwise)."""

    def decode(self, masks: np.ndarray) -> np.ndarray:
        """bool [..., len(concepts)] from int64 bitmasks [...]."""

    # ---- reading images ------------------------------------------------------------------------
    def ready(self) -> None:
        """Raise a DifflensError saying what is missing when images cannot be read (no classifier)."""

    def read_images(self, images: np.ndarray) -> list[dict]:
        """A JSON-ready reading of each uint8 [B, H, W, 3] image (what the classifier sees)."""

    def read_factor(self, images: np.ndarray, factor: str, position: str | None = None) -> list[str]:
        """The value of one factor per image (at `position`, when the world has positions)."""

    def adherence(self, prompts: Sequence[str], images: np.ndarray) -> dict:
        """How well images follow their prompts: {"accuracy": {factor | "prompt": float | None},
        "per_prompt": [{factor: score}], ...}."""

    # ---- geometry and per-position readings (the intervention studies) --------------------------
    image_size: int  # generated images are image_size x image_size pixels ...
    grid: int  # ... on a grid x grid grid of image tokens
    study_objects: tuple[str, ...]  # the object values the intervention studies draw

    def describe(self, values: dict[str, str]) -> str:
        """A prompt naming one object with these factor values (the interventions' factors: color,
        object, position, bgcolor), always in the same template so prompts that differ in one value
        have aligned text tokens."""

    def object_box(self, position: str, size: str, margin: int = 0) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixels: the box an object of `size` at `position` can cover, grown
        by `margin` pixels on every side and clipped to the image."""

    def image_reader(self) -> Any:
        """The world's image reader (e.g. its classifier): `.classify(uint8 [B, H, W, 3])` gives
        the full reading of each image, which `read_at` interprets. Raises a DifflensError saying
        what is missing (no classifier weights)."""

    def read_at(self, images: np.ndarray, positions: Sequence[str], factors: Sequence[str], *,
                reader: Any = None) -> dict[str, list[str | None]]:
        """Per factor, its value in each image i read at `positions[i]` (None when no object is
        seen there); a background factor is read for the whole image. `reader` replaces
        `image_reader()` (anything whose `.classify` gives the same reading, e.g. a test's stand-in)."""

    # ---- interpretation ------------------------------------------------------------------------
    def vocabulary(self) -> ConceptVocabulary:
        """The concepts the token labels stand for, as the oracle explainer and judge read them."""


def ground_truth_of(adapter) -> GroundTruth | None:
    """The adapter's ground truth, or None (also for objects that predate the interface)."""
    get = getattr(adapter, "ground_truth", None)
    return get() if callable(get) else None


def world_prompts_of(adapter: Adapter, n: int, seed: int, *, model: str, option: str,
                     instead: str) -> tuple[list[str], list[Any]]:
    """n prompts and their scenes from the adapter's ground-truth world (`sample_prompts`); a
    usage error for a model without one (a real model) that names `option` and what to pass instead."""
    from difflens.errors import DifflensError

    truth = ground_truth_of(adapter)
    if truth is None:
        raise DifflensError(f"{option} samples prompts from the model's ground-truth world, and {model} has none "
                            f"(only a model trained on a known world, like the toy model, has one): pass {instead}")
    return truth.sample_prompts(int(n), int(seed))
