"""The toy world behind the `GroundTruth` interface: scenes, token labels, the factor classifier.

The toy adapter returns a `ToyWorld` from `ground_truth()`; the generic stages (harvest,
interpretation, splice evaluation, interventions, the demo) reach the world only through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from difflens.errors import DifflensError
from difflens.world import vocab as V
from difflens.world.concepts import TOY_CONCEPTS, ToyConcepts
from difflens.world.classifier import PRESENCE_THRESHOLD, FactorClassifier, adherence, classify, default_classifier, read_factor
from difflens.world.labels import concept_token_matrix, concepts_to_mask, image_concepts, token_label_masks
from difflens.world.prompts import parse_prompt, scene_to_prompt, world_prompts
from difflens.world.scene import Scene, render, sample_scene

# Words naming a position's first or second half ("top left" is two prompt words).
_POSITION_WORDS = ("top", "bottom", "left", "right", "center")
# What a harvest keeps of the classifier's reading in each sample record.
READING_KEYS = ("main", "bgcolor", "bg")


class ToyWorld:
    """Ground truth of the procedural toy world; `classifier` defaults to the shipped one (lazily)."""

    name = "toy-world"
    concepts: tuple[str, ...] = V.CONCEPTS
    factors: dict[str, tuple[str, ...]] = V.FACTORS
    image_size: int = V.IMAGE_SIZE
    grid: int = V.GRID
    # Objects the intervention studies draw: three shapes and three digits, a fixed subset so the
    # studies' cases (and their numbers) stay comparable from run to run.
    study_objects: tuple[str, ...] = ("circle", "square", "triangle", "two", "five", "seven")

    def __init__(self, classifier: FactorClassifier | None = None):
        self._classifier = classifier

    @property
    def classifier(self) -> FactorClassifier:
        """The factor classifier (loaded on first use; a DifflensError says how to get one)."""
        if self._classifier is None:
            self._classifier = default_classifier()
        return self._classifier

    # ---- prompts and scenes --------------------------------------------------------------------
    def sample_prompts(self, n: int, seed: int) -> tuple[list[str], list[Scene]]:
        return world_prompts(n, seed)

    def scene_for(self, prompt: str, seed: int) -> Scene | None:
        try:
            spec = parse_prompt(prompt)
        except DifflensError:
            return None
        return sample_scene(np.random.default_rng(seed), spec)

    def knows(self, prompts: Sequence[str]) -> bool:
        try:
            for p in prompts:
                parse_prompt(p)
        except DifflensError:
            return False
        return True

    def prompt_pair(self, factor: str, a: str, b: str, *, seed: int = 0) -> tuple[str, str]:
        if factor not in V.FACTORS:
            raise DifflensError(f"unknown factor {factor!r}; the toy world's factors are {', '.join(V.FACTORS)}")
        for v in (a, b):
            if v not in V.FACTORS[factor]:
                raise DifflensError(f"{factor}={v!r} is not a toy-world value; use one of {', '.join(V.FACTORS[factor])}")
        scene = sample_scene(np.random.default_rng(seed), two_object_prob=0.0)

        def with_value(v: str) -> Scene:
            if factor in V.BACKGROUND_FACTORS:
                return dataclasses.replace(scene, **{factor: v})
            main = dataclasses.replace(scene.objects[0], **{factor: v})
            return dataclasses.replace(scene, objects=(main,) + scene.objects[1:])

        return scene_to_prompt(with_value(a)), scene_to_prompt(with_value(b))

    # ---- labels --------------------------------------------------------------------------------
    def label_scene(self, scene: Scene) -> tuple[dict, np.ndarray]:
        r = render(scene)
        labels = token_label_masks(r)
        return {"scene": scene.to_dict(), "concepts": image_concepts(r), "token_labels": [int(x) for x in labels]}, labels

    def text_labels(self, prompt: str, tokenizer) -> np.ndarray:
        """Per text token, the concept its word names (a colour word -> color=red, ...); 0 otherwise."""
        ids, _ = tokenizer([prompt])
        words = tokenizer.words(ids[0])
        out = np.zeros(len(words), np.int64)
        for i, w in enumerate(words):
            concept = None
            for f in ("color", "object", "size", "bgcolor", "bg"):
                if w in V.FACTORS[f]:
                    concept = f"{f}={w}"
                    break
            if concept is None and w in _POSITION_WORDS:
                nxt = words[i + 1] if i + 1 < len(words) else ""
                prv = words[i - 1] if i > 0 else ""
                for pos in V.POSITIONS:
                    if pos in (f"{w} {nxt}", f"{prv} {w}", w):
                        concept = f"position={pos}"
                        break
            if concept:
                out[i] = concepts_to_mask([concept])
        return out

    def decode(self, masks: np.ndarray) -> np.ndarray:
        return concept_token_matrix(masks)

    # ---- reading images ------------------------------------------------------------------------
    def ready(self) -> None:
        self.classifier  # noqa: B018 - loading it is the check

    def read_images(self, images: np.ndarray) -> list[dict]:
        return [{k: r[k] for k in READING_KEYS if k in r} for r in classify(images, classifier=self.classifier)]

    def read_factor(self, images: np.ndarray, factor: str, position: str | None = None) -> list[str]:
        return read_factor(images, factor, position, classifier=self.classifier)

    def image_reader(self) -> FactorClassifier:
        return self.classifier

    def read_at(self, images: np.ndarray, positions: Sequence[str], factors: Sequence[str], *,
                reader=None) -> dict[str, list[str | None]]:
        """The classifier's slot at each image's position (None when its presence is <= 0.5, so
        an edit that erases the object does not count as changing its colour); bgcolor/bg per image."""
        readings = (self.classifier if reader is None else reader).classify(np.asarray(images))
        out: dict[str, list[str | None]] = {f: [] for f in factors}
        for r, p in zip(readings, positions):
            slot = r["slots"][p]
            there = slot["p"] > PRESENCE_THRESHOLD
            for f in factors:
                out[f].append(r[f] if f in V.BACKGROUND_FACTORS else (slot[f] if there else None))
        return out

    def describe(self, values: dict[str, str]) -> str:
        missing = [f for f in ("color", "object", "position", "bgcolor") if f not in values]
        if missing:
            raise DifflensError(f"describe() needs a value for {', '.join(missing)}")
        return (f"a large {values['color']} {values['object']} in the {values['position']} "
                f"on a {values['bgcolor']} plain background")

    def object_box(self, position: str, size: str, margin: int = 0) -> tuple[int, int, int, int]:
        if position not in V.POSITION_CENTER or size not in V.SIZE_PIXELS:
            raise DifflensError(f"no object box for position {position!r}, size {size!r}: positions are "
                                f"{', '.join(V.POSITIONS)}, sizes {', '.join(V.SIZES)}")
        cy, cx = V.POSITION_CENTER[position]
        half = V.SIZE_PIXELS[size] // 2 + margin
        return max(0, cx - half), max(0, cy - half), min(V.IMAGE_SIZE, cx + half), min(V.IMAGE_SIZE, cy + half)

    def adherence(self, prompts: Sequence[str], images: np.ndarray) -> dict:
        return adherence(prompts, images, classifier=self.classifier)

    def vocabulary(self) -> ToyConcepts:
        return TOY_CONCEPTS
