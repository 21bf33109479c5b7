"""The toy world's concept vocabulary as the oracle sees it: names, types, token masks, words.

Generic stages reach it only through `ToyWorld.vocabulary()` (a `groundtruth.ConceptVocabulary`);
the toy-world benchmark (difflens.benchmark) uses the module directly.

The world's concepts (`factor=value`, difflens.world.vocab.CONCEPTS) plus two regions
("region=object" / "region=background"), since a feature that fires on every object token
is interpretable even though no single factor value describes it.
"""

from __future__ import annotations

import re

import numpy as np

from difflens.world import vocab as V
from difflens.world.labels import concept_token_matrix

REGIONS = ("region=object", "region=background")
CONCEPT_NAMES: tuple[str, ...] = tuple(V.CONCEPTS) + REGIONS
CONCEPT_INDEX = {c: i for i, c in enumerate(CONCEPT_NAMES)}
_COLOR_BITS = np.int64(sum(1 << V.CONCEPT_ID[f"color={c}"] for c in V.COLORS))

# Concept types for the coarse-to-fine analysis; digits and shapes are separate types.
TYPES = ("position", "bgcolor", "bg", "region", "size", "color", "shape", "digit")


def concept_type(concept: str) -> str:
    factor, _, value = concept.partition("=")
    if factor == "object":
        return "digit" if value in V.DIGIT_WORDS else "shape"
    return factor


def concept_matrix(masks) -> np.ndarray:
    """bool [..., C] from int64 token bitmasks [...]: world concepts, then object/background region."""
    m = np.asarray(masks, np.int64)
    world = concept_token_matrix(m)
    obj = (m & _COLOR_BITS) != 0
    return np.concatenate([world, obj[..., None], (~obj)[..., None]], axis=-1)


_PHRASE = {
    "color": "a {v} object",
    "size": "a {v} object",
    "position": "an object in the {v}",
    "bgcolor": "a {v} background",
    "bg": "a background with {v}",
}


def concept_phrase(concept: str) -> str:
    factor, _, value = concept.partition("=")
    t = concept_type(concept)
    if t == "digit":
        return f"the digit {value}"
    if t == "shape":
        return f"a {value}"
    if factor == "bg" and value == "plain":
        return "a plain background"
    if factor == "region":
        return "object pixels" if value == "object" else "background pixels"
    return _PHRASE[factor].format(v=value)


def explanation_text(concept: str, level: str) -> str:
    """The oracle's explanation, worded like a VLM's (token level says where, image level says whether)."""
    p = concept_phrase(concept)
    if level == "token":
        return f"fires on the tokens of {p}" if not concept.startswith("region=") else f"fires on {p}"
    return f"fires on images that contain {p}" if not concept.startswith("region=") else f"fires on images with {p}"


_WORDS = {}
for _f, _vals in V.FACTORS.items():
    for _v in _vals:
        _WORDS.setdefault(_v, []).append(f"{_f}={_v}")
for _num, _w in V.NUMERAL_ALIASES.items():
    _WORDS.setdefault(_num, []).append(f"object={_w}")
_WORDS.update({"stripes": ["bg=stripes"], "striped": ["bg=stripes"], "dotted": ["bg=dots"], "dots": ["bg=dots"]})


def concepts_in_text(text: str) -> list[str]:
    """Toy-world concepts a free-text explanation names ("a red circle in the top left" -> 3 concepts).

    Colour words after "background" or before "background" are read as background colours.
    """
    t = " " + re.sub(r"[^a-z0-9 ]+", " ", text.lower()) + " "
    found: list[str] = []
    for pos in V.POSITIONS:
        if f" {pos} " in t:
            found.append(f"position={pos}")
            t = t.replace(f" {pos} ", " ")
    words = t.split()
    for i, w in enumerate(words):
        for c in _WORDS.get(w, []):
            f, _, v = c.partition("=")
            if f == "color" and v not in V.BG_COLORS:
                near_bg = "background" in words[i + 1 : i + 3]
                if near_bg:
                    continue
            if c not in found:
                found.append(c)
    if "background" in words and not any(c.startswith(("bgcolor=", "bg=")) for c in found):
        found.append("region=background")
    return found


def mask_for_concepts(cm_TC: np.ndarray, concepts: list[str]) -> np.ndarray:
    """bool [T]: tokens having all named factors (any of the values named within one factor)."""
    by_factor: dict[str, list[int]] = {}
    for c in concepts:
        by_factor.setdefault(c.partition("=")[0], []).append(CONCEPT_INDEX[c])
    out = np.ones(cm_TC.shape[0], bool)
    for idx in by_factor.values():
        out &= cm_TC[:, idx].any(1)
    return out


class ToyConcepts:
    """The `groundtruth.ConceptVocabulary` of the toy world (what `ToyWorld.vocabulary()` returns)."""

    names: tuple[str, ...] = CONCEPT_NAMES
    index: dict[str, int] = CONCEPT_INDEX
    types: tuple[str, ...] = TYPES
    coarse_types: tuple[str, ...] = ("position", "bgcolor", "bg")  # decided early in a run, or so one expects
    fine_types: tuple[str, ...] = ("digit", "shape", "color")
    # the concepts an image can have or lack (every image has object and background pixels)
    image_level: np.ndarray = np.array([not c.startswith("region=") for c in CONCEPT_NAMES])

    def type_of(self, concept: str) -> str:
        return concept_type(concept)

    def matrix(self, masks) -> np.ndarray:
        return concept_matrix(masks)

    def explanation(self, concept: str, level: str) -> str:
        return explanation_text(concept, level)

    def in_text(self, text: str) -> list[str]:
        return concepts_in_text(text)

    def mask_for(self, cm_TC: np.ndarray, concepts: list[str]) -> np.ndarray:
        return mask_for_concepts(cm_TC, concepts)


TOY_CONCEPTS = ToyConcepts()
