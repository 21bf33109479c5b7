import numpy as np
import pytest

from difflens.errors import DifflensError
from difflens.world import vocab as V
from difflens.world.labels import (
    concept_token_matrix,
    image_concepts,
    mask_to_concepts,
    token_label_masks,
    token_owner,
)
from difflens.world.prompts import parse_prompt, prompt_vocabulary, random_drop, scene_to_prompt
from difflens.world.scene import ObjectSpec, Scene, SceneObject, SceneSpec, object_mask, render, sample_scene


def scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_generator_is_deterministic_and_varied():
    a, b = scenes(50, 3), scenes(50, 3)
    assert a == b
    assert all((render(x).image == render(y).image).all() for x, y in zip(a, b))
    assert scenes(50, 4) != a
    objs = {o.object for s in scenes(400) for o in s.objects}
    assert objs == set(V.OBJECTS)
    counts = {len(s.objects) for s in scenes(100)}
    assert counts == {1, 2}


def test_masks_agree_with_factors():
    for s in scenes(200, 1):
        r = render(s)
        assert r.image.shape == (32, 32, 3) and r.image.dtype == np.uint8
        # Every pixel is background or exactly one visible object.
        total = r.object_masks.sum(0) + r.background_mask
        assert (total == 1).all()
        for i, o in enumerate(s.objects):
            m = r.object_masks[i]
            assert m.any(), "every object must be visible"
            assert (r.image[m] == V.RGB[o.color]).all()
            ys, xs = np.nonzero(object_mask(o))
            cy, cx = V.POSITION_CENTER[o.position]
            assert abs(ys.mean() - cy) <= 4 and abs(xs.mean() - cx) <= 2
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert extent <= V.SIZE_PIXELS[o.size]
            assert extent >= V.SIZE_PIXELS[o.size] // 2
        bg_pixels = r.image[r.background_mask]
        allowed = {V.BG_RGB[s.bgcolor], V.BG_PATTERN_RGB[s.bgcolor]}
        assert {tuple(p) for p in bg_pixels} <= allowed
        if s.bg == "plain":
            assert {tuple(p) for p in bg_pixels} == {V.BG_RGB[s.bgcolor]}


def test_main_object_drawn_on_top():
    s = Scene(
        objects=(
            SceneObject("square", "red", "large", "center"),
            SceneObject("square", "blue", "large", "top left"),
        ),
        bgcolor="black",
        bg="plain",
    )
    r = render(s)
    assert (r.image[16, 16] == V.RGB["red"]).all()
    overlap = object_mask(s.objects[0]) & object_mask(s.objects[1])
    assert overlap.any() and not (r.object_masks[1] & overlap).any()


def test_token_labels():
    s = Scene(objects=(SceneObject("square", "green", "large", "top left"),), bgcolor="navy", bg="stripes")
    r = render(s)
    owner = token_owner(r)
    assert owner.shape == (16, 16)
    assert owner[4, 4] == 0 and owner[12, 12] == -1
    masks = token_label_masks(r)
    assert masks.shape == (256,) and masks.dtype == np.int64
    assert set(mask_to_concepts(masks[4 * 16 + 4])) == {"color=green", "object=square", "size=large", "position=top left"}
    assert set(mask_to_concepts(masks[12 * 16 + 12])) == {"bgcolor=navy", "bg=stripes"}
    assert set(image_concepts(r)) == {"color=green", "object=square", "size=large", "position=top left", "bgcolor=navy", "bg=stripes"}
    mat = concept_token_matrix(masks)
    assert mat.shape == (256, len(V.CONCEPTS))
    assert mat[:, V.CONCEPT_ID["color=green"]].sum() == (owner == 0).sum()


def test_prompt_round_trip():
    rng = np.random.default_rng(0)
    for s in scenes(300, 2):
        spec = parse_prompt(scene_to_prompt(s))
        assert len(spec.objects) == len(s.objects)
        for o, so in zip(spec.objects, s.objects):
            assert (o.object, o.color, o.size, o.position) == (so.object, so.color, so.size, so.position)
        assert (spec.bgcolor, spec.bg) == (s.bgcolor, s.bg)
        drop = random_drop(rng, 0.5)
        partial = parse_prompt(scene_to_prompt(s, drop))
        for f in ("color", "size", "position", "object"):
            got = getattr(partial.objects[0], f)
            assert got == (None if drop[f] else getattr(s.objects[0], f))
        assert partial.bgcolor == (None if drop["bgcolor"] else s.bgcolor)


def test_parser_examples_and_aliases():
    spec = parse_prompt("a small red circle in the top left on a black plain background")
    assert spec == SceneSpec((ObjectSpec("circle", "red", "small", "top left"),), "black", "plain")
    spec = parse_prompt("A large 7 and a blue object in the center on a dots background")
    assert spec.objects[0].object == "seven" and spec.objects[1] == ObjectSpec(None, "blue", None, "center")
    assert spec.bg == "dots" and spec.bgcolor is None
    assert set(prompt_vocabulary()) >= {"circle", "seven", "navy", "top", "left", "background"}


@pytest.mark.parametrize(
    "prompt, needle",
    [
        ("a purple circle", "'purple'"),
        ("a red circle in the middle", "position"),
        ("a red circle on a black plain", "background"),
        ("", "empty"),
        ("a red circle in the top left and a blue square in the top left", "share a position"),
        ("a red", "no object"),
    ],
)
def test_parser_errors(prompt, needle):
    with pytest.raises(DifflensError, match=needle):
        parse_prompt(prompt)


def test_sampling_respects_a_partial_prompt():
    spec = parse_prompt("a red seven and a square in the center")
    rng = np.random.default_rng(0)
    for _ in range(30):
        s = sample_scene(rng, spec)
        assert s.objects[0].color == "red" and s.objects[0].object == "seven"
        assert s.objects[1].object == "square" and s.objects[1].position == "center"
        assert s.objects[0].position != "center"
