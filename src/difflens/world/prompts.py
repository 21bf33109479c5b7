"""The prompt grammar: scenes to prompts (with factors optionally left out) and prompts back to factors.

Grammar (words are lower case; digits are named by their English word, `seven`, and the
numerals `7` are accepted as aliases when parsing):

    prompt   := clause ("and" clause)* [ "on a" [bgcolor] [pattern] "background" ]
    clause   := ("a" | "an") [size] [color] (object | "object") [ "in the" position ]

e.g. `a small red circle in the top left on a black plain background`,
`a large blue seven in the center and a small white square in the top right on a navy dots background`.
"""

from __future__ import annotations

import numpy as np

from difflens.errors import DifflensError
from difflens.world import vocab as V
from difflens.world.scene import ObjectSpec, Scene, SceneSpec, sample_scene


def scene_to_prompt(scene: Scene, drop: dict[str, bool] | None = None) -> str:
    """Render a prompt for a scene; `drop[factor]` = True leaves that factor out of the prompt."""
    drop = drop or {}
    clauses = []
    for i, o in enumerate(scene.objects):
        words = ["a"]
        if not drop.get("size"):
            words.append(o.size)
        if not drop.get("color"):
            words.append(o.color)
        words.append("object" if drop.get("object") else o.object)
        if not drop.get("position"):
            words += ["in", "the", o.position]
        clauses.append(" ".join(words))
    text = " and ".join(clauses)
    bg = [w for f, w in (("bgcolor", scene.bgcolor), ("bg", scene.bg)) if not drop.get(f)]
    if bg:
        text += " on a " + " ".join(bg) + " background"
    return text.replace(" a a", " an a")


def random_drop(rng: np.random.Generator, p: float) -> dict[str, bool]:
    """Each factor left out of the prompt independently with probability p (object kept more often)."""
    return {f: bool(rng.random() < (p / 2 if f == "object" else p)) for f in V.FACTORS}


def tokenize(prompt: str) -> list[str]:
    """Whitespace words, lower-cased; multi-word positions stay as separate words."""
    if not isinstance(prompt, str):
        raise DifflensError(f"a prompt must be text, got {type(prompt).__name__}")
    return [V.NUMERAL_ALIASES.get(w, w) for w in prompt.lower().replace(",", " ").split()]


def _unknown(word: str, where: str, prompt: str) -> DifflensError:
    known = sorted(set(V.COLORS + V.OBJECTS + V.SIZES + V.BG_COLORS + V.PATTERNS))
    return DifflensError(
        f"unknown word {word!r} {where} in prompt {prompt!r}; the toy world knows: "
        f"{', '.join(known)}, positions ({', '.join(V.POSITIONS)}) and the words a/an/in/the/on/and/object/background"
    )


def _parse_position(words: list[str], i: int, prompt: str) -> tuple[str, int]:
    for pos in V.POSITIONS:
        parts = pos.split()
        if words[i : i + len(parts)] == parts:
            return pos, i + len(parts)
    raise DifflensError(
        f"expected a position after 'in the' in prompt {prompt!r}; use one of: {', '.join(V.POSITIONS)}"
    )


def parse_prompt(prompt: str) -> SceneSpec:
    """Parse a prompt of the grammar above into the factors it pins down (others are None)."""
    words = tokenize(prompt)
    if not words:
        raise DifflensError("empty prompt; write e.g. 'a small red circle in the top left on a black plain background'")
    bgcolor = bg = None
    if "background" in words:
        j = words.index("background")
        if j != len(words) - 1:
            raise _unknown(words[j + 1], "after 'background'", prompt)
        try:
            on = max(k for k in range(j) if words[k] == "on")
        except ValueError:
            raise DifflensError(f"'background' needs 'on a ...' before it in prompt {prompt!r}") from None
        bgwords = words[on + 1 : j]
        if bgwords and bgwords[0] in ("a", "an"):
            bgwords = bgwords[1:]
        for w in bgwords:
            if w in V.BG_COLORS and bgcolor is None:
                bgcolor = w
            elif w in V.PATTERNS and bg is None:
                bg = w
            else:
                raise _unknown(w, "in the background phrase", prompt)
        words = words[:on]
    objects = []
    clause: list[str] = []
    for w in words + ["and"]:
        if w == "and":
            if not clause:
                raise DifflensError(f"empty object description in prompt {prompt!r}")
            objects.append(_parse_clause(clause, prompt))
            clause = []
        else:
            clause.append(w)
    positions = [o.position for o in objects if o.position]
    if len(set(positions)) != len(positions):
        raise DifflensError(f"two objects share a position in prompt {prompt!r}; give each its own position")
    if len(objects) > len(V.POSITIONS):
        raise DifflensError(f"too many objects in prompt {prompt!r} (at most {len(V.POSITIONS)})")
    return SceneSpec(objects=tuple(objects), bgcolor=bgcolor, bg=bg)


def _parse_clause(words: list[str], prompt: str) -> ObjectSpec:
    i = 0
    if words[0] in ("a", "an"):
        i = 1
    size = color = obj = position = None
    while i < len(words) and obj is None:
        w = words[i]
        if w in V.SIZES and size is None:
            size = w
        elif w in V.COLORS and color is None:
            color = w
        elif w in V.OBJECTS:
            obj = w
        elif w == "object":
            obj = ""
        else:
            raise _unknown(w, "where a size, colour or object was expected", prompt)
        i += 1
    if obj is None:
        raise DifflensError(f"no object named in {' '.join(words)!r} of prompt {prompt!r}; name one (e.g. circle, seven) or say 'object'")
    if i < len(words):
        if words[i : i + 2] != ["in", "the"]:
            raise _unknown(words[i], "after the object (expected 'in the <position>')", prompt)
        position, i = _parse_position(words, i + 2, prompt)
        if i < len(words):
            raise _unknown(words[i], "after the position", prompt)
    return ObjectSpec(object=obj or None, color=color, size=size, position=position)


def prompt_vocabulary() -> list[str]:
    """Every word a prompt can contain, in a fixed order (the toy text encoder's vocabulary)."""
    words = list(V.FUNCTION_WORDS) + list(V.SIZES) + list(V.COLORS) + list(V.OBJECTS)
    for p in V.POSITIONS:
        words += p.split()
    words += list(V.BG_COLORS) + list(V.PATTERNS)
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def world_prompts(n: int, seed: int) -> tuple[list[str], list[Scene]]:
    """n fully specified prompts sampled from the toy world, with the scenes they describe."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return [scene_to_prompt(s) for s in scenes], scenes
