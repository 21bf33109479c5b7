"""Scenes: sampling factors (optionally constrained by a prompt) and rendering them with pixel masks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

from difflens.world import vocab as V
from difflens.world.glyphs import INSTANCES_PER_DIGIT, glyph_mask


@dataclass(frozen=True)
class ObjectSpec:
    """One object's factors; None means 'not specified' (a prompt may leave any factor out)."""

    object: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class SceneSpec:
    """What a prompt pins down; `sample_scene` fills in the rest."""

    objects: tuple[ObjectSpec, ...] = ()
    bgcolor: str | None = None
    bg: str | None = None


@dataclass(frozen=True)
class SceneObject:
    object: str
    color: str
    size: str
    position: str
    offset: tuple[int, int] = (0, 0)  # pixel jitter (dy, dx) around the position's centre
    glyph: int = 0  # which digit instance (digits only)

    def factors(self) -> dict[str, str]:
        return {"color": self.color, "object": self.object, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """A fully specified scene. objects[0] is the main object (drawn on top)."""

    objects: tuple[SceneObject, ...]
    bgcolor: str
    bg: str

    def factors(self) -> dict:
        return {"objects": [o.factors() for o in self.objects], "bgcolor": self.bgcolor, "bg": self.bg}

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "bgcolor": self.bgcolor, "bg": self.bg}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = tuple(
            SceneObject(**{**o, "offset": tuple(o.get("offset", (0, 0)))}) for o in d["objects"]
        )
        return cls(objects=objs, bgcolor=d["bgcolor"], bg=d["bg"])


@dataclass
class Rendered:
    """An image with its ground truth: per-object visible masks and the background mask."""

    image: np.ndarray  # uint8 [32, 32, 3]
    object_masks: np.ndarray  # bool [n_objects, 32, 32], visible pixels of each object
    background_mask: np.ndarray  # bool [32, 32]
    scene: Scene = field(repr=False)


def sample_scene(rng: np.random.Generator, spec: SceneSpec | None = None, *, two_object_prob: float = 0.35) -> Scene:
    """Sample a scene; factors given in `spec` are kept, the others drawn uniformly."""
    spec = spec or SceneSpec()
    n = len(spec.objects) if spec.objects else (2 if rng.random() < two_object_prob else 1)
    specs = list(spec.objects) if spec.objects else [ObjectSpec()] * n
    taken = {s.position for s in specs if s.position}
    objects = []
    for s in specs:
        pos = s.position
        if pos is None:
            free = [p for p in V.POSITIONS if p not in taken]
            pos = str(rng.choice(free))
            taken.add(pos)
        obj = s.object or str(rng.choice(V.OBJECTS))
        objects.append(
            SceneObject(
                object=obj,
                color=s.color or str(rng.choice(V.COLORS)),
                size=s.size or str(rng.choice(V.SIZES)),
                position=pos,
                offset=(int(rng.integers(-1, 2)), int(rng.integers(-1, 2))),
                glyph=int(rng.integers(INSTANCES_PER_DIGIT)) if obj in V.DIGIT_WORDS else 0,
            )
        )
    return Scene(
        objects=tuple(objects),
        bgcolor=spec.bgcolor or str(rng.choice(V.BG_COLORS)),
        bg=spec.bg or str(rng.choice(V.PATTERNS)),
    )


@lru_cache(maxsize=512)
def _shape_template(obj: str, size: int, glyph: int) -> np.ndarray:
    """Boolean [size, size] mask of an object drawn in its own box."""
    c = (np.arange(size) + 0.5) - size / 2  # pixel-centre coordinates relative to the box centre
    yy, xx = np.meshgrid(c, c, indexing="ij")
    half = size / 2
    if obj == "circle":
        return xx**2 + yy**2 <= half**2
    if obj == "square":
        return (np.abs(xx) <= half * 0.85) & (np.abs(yy) <= half * 0.85)
    if obj == "triangle":
        # Apex at the top, base at the bottom; half-width grows linearly with depth.
        depth = (yy + half) / size
        return np.abs(xx) <= depth * half + 1e-6
    return glyph_mask(V.DIGIT_WORDS.index(obj), glyph, size)


def object_mask(o: SceneObject) -> np.ndarray:
    """Full (unoccluded) boolean [32, 32] mask of an object on the canvas."""
    size = V.SIZE_PIXELS[o.size]
    cy, cx = V.POSITION_CENTER[o.position]
    cy, cx = cy + o.offset[0], cx + o.offset[1]
    top, left = cy - size // 2, cx - size // 2
    canvas = np.zeros((V.IMAGE_SIZE, V.IMAGE_SIZE), bool)
    t = _shape_template(o.object, size, o.glyph)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + size, V.IMAGE_SIZE), min(left + size, V.IMAGE_SIZE)
    canvas[r0:r1, c0:c1] = t[r0 - top : r1 - top, c0 - left : c1 - left]
    return canvas


@lru_cache(maxsize=16)
def _pattern_mask(pattern: str) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(V.IMAGE_SIZE), np.arange(V.IMAGE_SIZE), indexing="ij")
    if pattern == "stripes":
        return (yy % 4) < 2
    if pattern == "dots":
        return ((yy % 4) == 1) & ((xx % 4) == 1)
    return np.zeros((V.IMAGE_SIZE, V.IMAGE_SIZE), bool)


def render(scene: Scene) -> Rendered:
    """Draw the background, then objects from last to first so the main object is on top."""
    img = np.empty((V.IMAGE_SIZE, V.IMAGE_SIZE, 3), np.uint8)
    img[:] = V.BG_RGB[scene.bgcolor]
    img[_pattern_mask(scene.bg)] = V.BG_PATTERN_RGB[scene.bgcolor]
    covered = np.zeros((V.IMAGE_SIZE, V.IMAGE_SIZE), bool)
    visible = np.zeros((len(scene.objects), V.IMAGE_SIZE, V.IMAGE_SIZE), bool)
    for i in range(len(scene.objects) - 1, -1, -1):
        m = object_mask(scene.objects[i])
        img[m] = V.RGB[scene.objects[i].color]
        visible[i] = m
        visible[i + 1 :] &= ~m  # objects drawn earlier are hidden where this one lies
        covered |= m
    return Rendered(image=img, object_masks=visible, background_mask=~covered, scene=scene)
