"""The toy world's factors and their values: the single source of every word and concept name."""

from __future__ import annotations

SIZES = ("small", "large")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
SHAPES = ("circle", "square", "triangle")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OBJECTS = SHAPES + DIGIT_WORDS
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BG_COLORS = ("black", "gray", "navy")
PATTERNS = ("plain", "stripes", "dots")

# Factor name -> allowed values; the order defines class indices for the classifier and concept ids.
FACTORS: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "object": OBJECTS,
    "size": SIZES,
    "position": POSITIONS,
    "bgcolor": BG_COLORS,
    "bg": PATTERNS,
}
OBJECT_FACTORS = ("color", "object", "size", "position")
BACKGROUND_FACTORS = ("bgcolor", "bg")

RGB = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 255),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
    "white": (245, 245, 245),
}
BG_RGB = {"black": (0, 0, 0), "gray": (105, 105, 105), "navy": (20, 20, 90)}
# The pattern is drawn in a lighter shade of the background colour.
BG_PATTERN_RGB = {"black": (70, 70, 70), "gray": (160, 160, 160), "navy": (65, 65, 160)}

# Centre of each position in pixel coordinates (row, col) on the 32x32 canvas.
IMAGE_SIZE = 32
PATCH = 2
GRID = IMAGE_SIZE // PATCH
POSITION_CENTER = {
    "top left": (8, 8),
    "top right": (8, 24),
    "bottom left": (24, 8),
    "bottom right": (24, 24),
    "center": (16, 16),
}
SIZE_PIXELS = {"small": 10, "large": 16}

# Concepts: "factor=value", in a fixed order so a per-token label set fits an int64 bitmask.
CONCEPTS: tuple[str, ...] = tuple(f"{f}={v}" for f, vals in FACTORS.items() for v in vals)
CONCEPT_ID = {c: i for i, c in enumerate(CONCEPTS)}
assert len(CONCEPTS) <= 63

# Prompt words: numerals are accepted as aliases of digit words ("7" -> "seven").
NUMERAL_ALIASES = {str(i): w for i, w in enumerate(DIGIT_WORDS)}
FUNCTION_WORDS = ("a", "an", "in", "the", "on", "background", "and", "object")


def concept_factor(concept: str) -> str:
    return concept.split("=", 1)[0]
