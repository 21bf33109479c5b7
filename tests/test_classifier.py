"""The factor classifier (the judge of generated images), with the weights shipped in the package."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from difflens.errors import DifflensError
from difflens.world import vocab as V
from difflens.world.classifier import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FactorClassifier,
    adherence,
    classify,
    default_folder,
    read_factor,
)
from difflens.world.classifier_train import augment, slot_targets
from difflens.world.prompts import scene_to_prompt
from difflens.world.scene import Scene, SceneObject, render, sample_scene



@pytest.fixture(scope="module")
def clf() -> FactorClassifier:
    return FactorClassifier.load()


@pytest.fixture(scope="module")
def fresh():
    """200 fresh scenes (seed unlike training/held-out), half with two objects."""
    rng = np.random.default_rng(424242)
    rs = [render(sample_scene(rng, two_object_prob=0.5)) for _ in range(200)]
    return rs, np.stack([r.image for r in rs])


def _scene(*objs, bgcolor="black", bg="plain") -> Scene:
    return Scene(objects=tuple(SceneObject(*o) for o in objs), bgcolor=bgcolor, bg=bg)


def test_accuracy_on_fresh_renders(clf, fresh):
    rs, images = fresh
    readings = clf.classify(images)
    assert len(readings) == len(rs)
    hits = {f: [] for f in ("color", "object", "size", "position", "bgcolor", "bg")}
    for r, out in zip(rs, readings):
        t = slot_targets(r)
        truth_slots = {V.POSITIONS[s] for s in np.flatnonzero(t["presence"])}
        hits["position"].append({o["position"] for o in out["objects"]} == truth_slots)
        for s in np.flatnonzero(t["presence"]):
            slot = out["slots"][V.POSITIONS[s]]
            for f in ("color", "object", "size"):
                hits[f].append(slot[f] == V.FACTORS[f][t[f][s]])
        hits["bgcolor"].append(out["bgcolor"] == r.scene.bgcolor)
        hits["bg"].append(out["bg"] == r.scene.bg)
    acc = {f: float(np.mean(h)) for f, h in hits.items()}
    assert len(hits["color"]) > 250  # both one- and two-object scenes were scored
    for f in ("color", "size", "position", "bgcolor", "bg"):
        assert acc[f] >= 0.95, acc
    assert acc["object"] >= 0.9, acc


def test_classify_output_structure(clf):
    img = render(_scene(("seven", "red", "large", "top left"), bgcolor="navy", bg="stripes")).image
    (out,) = clf.classify(img)  # a single [32, 32, 3] image is accepted
    assert [o["position"] for o in out["objects"]] == ["top left"]
    assert out["main"] == {k: out["objects"][0][k] for k in ("position", "color", "object", "size", "p")}
    assert (out["main"]["color"], out["main"]["object"], out["main"]["size"]) == ("red", "seven", "large")
    assert (out["bgcolor"], out["bg"]) == ("navy", "stripes")
    pres = out["probs"]["presence"]
    assert set(pres) == set(V.POSITIONS) and pres["top left"] > 0.5
    assert all(p < 0.5 for pos, p in pres.items() if pos != "top left")
    for f in ("color", "object", "size"):
        assert sum(out["probs"]["slots"]["top left"][f].values()) == pytest.approx(1.0, abs=1e-4)
    assert sum(out["probs"]["bgcolor"].values()) == pytest.approx(1.0, abs=1e-4)


def test_objects_sorted_by_presence(clf):
    img = render(_scene(("circle", "green", "large", "center"), ("three", "yellow", "small", "bottom right"))).image
    (out,) = classify(img, classifier=clf)
    ps = [o["p"] for o in out["objects"]]
    assert ps == sorted(ps, reverse=True)
    assert {o["position"] for o in out["objects"]} == {"center", "bottom right"}


def test_empty_input_gives_empty_list(clf):
    assert clf.classify(np.zeros((0, 32, 32, 3), np.uint8)) == []


def test_read_factor_by_position(clf):
    imgs = np.stack([
        render(_scene(("square", "blue", "large", "top right"), ("two", "white", "small", "bottom left"))).image,
        render(_scene(("triangle", "red", "large", "center"), ("circle", "cyan", "large", "top left"), bg="dots")).image,
    ])
    assert read_factor(imgs, "color", "top right", classifier=clf)[0] == "blue"
    assert read_factor(imgs, "color", "bottom left", classifier=clf)[0] == "white"
    assert read_factor(imgs, "object", "bottom left", classifier=clf)[0] == "two"
    assert read_factor(imgs, "color", "top left", classifier=clf)[1] == "cyan"
    assert read_factor(imgs, "object", "center", classifier=clf)[1] == "triangle"
    assert read_factor(imgs, "bg", classifier=clf) == ["plain", "dots"]
    # Without a position: the most confident object, which is one of the two.
    assert read_factor(imgs[:1], "color", classifier=clf)[0] in ("blue", "white")
    assert clf.read_factor(imgs[:1], "position")[0] in ("top right", "bottom left")


def test_read_factor_rejects_bad_arguments(clf):
    img = render(_scene(("circle", "red", "small", "center"))).image
    with pytest.raises(DifflensError, match="unknown factor"):
        read_factor(img, "hue", classifier=clf)
    with pytest.raises(DifflensError, match="unknown position"):
        read_factor(img, "color", "middle", classifier=clf)
    with pytest.raises(DifflensError, match="not read at a position"):
        read_factor(img, "bgcolor", "center", classifier=clf)


def test_input_validation_names_the_fix(clf):
    with pytest.raises(DifflensError, match="uint8"):
        clf.classify(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(DifflensError, match=r"32, 32, 3"):
        clf.classify(np.zeros((1, 64, 64, 3), np.uint8))


def _prompt_batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, two_object_prob=0.5) for _ in range(n)]
    return scenes, np.stack([render(s).image for s in scenes])


def test_adherence_on_matching_prompts_is_high(clf):
    scenes, images = _prompt_batch(60, 777)
    res = adherence([scene_to_prompt(s) for s in scenes], images, classifier=clf)
    assert res["n_prompts"] == 60
    for f in ("color", "object", "size", "position", "bgcolor", "bg"):
        assert res["accuracy"][f] >= 0.9, (f, res["accuracy"])
        assert res["counts"]["all"][f] == 60
    for g in ("single_object", "two_object"):
        assert res["counts"][g]["color"] > 10
        assert res["counts"]["single_object"]["color"] + res["counts"]["two_object"]["color"] == 60
    assert res["accuracy"]["prompt"] >= 0.8


def test_adherence_on_mismatched_prompts_is_low(clf):
    scenes, images = _prompt_batch(40, 778)

    def other(values, v):
        return values[(values.index(v) + 1) % len(values)]

    wrong_color, wrong_pos, wrong_bg = [], [], []
    for s in scenes:
        objs = [replace(o, color=other(V.COLORS, o.color)) for o in s.objects]
        wrong_color.append(scene_to_prompt(Scene(tuple(objs), s.bgcolor, s.bg)))
        taken = {o.position for o in s.objects}
        free = [p for p in V.POSITIONS if p not in taken]
        objs = [replace(o, position=free[i]) for i, o in enumerate(s.objects)]
        wrong_pos.append(scene_to_prompt(Scene(tuple(objs), s.bgcolor, s.bg)))
        wrong_bg.append(scene_to_prompt(Scene(s.objects, other(V.BG_COLORS, s.bgcolor), other(V.PATTERNS, s.bg))))
    r = adherence(wrong_color, images, classifier=clf)["accuracy"]
    assert r["color"] <= 0.1 and r["bgcolor"] >= 0.9 and r["prompt"] <= 0.1
    r = adherence(wrong_pos, images, classifier=clf)["accuracy"]
    assert r["position"] <= 0.1 and r["prompt"] <= 0.1
    r = adherence(wrong_bg, images, classifier=clf)["accuracy"]
    assert r["bgcolor"] <= 0.1 and r["bg"] <= 0.1 and r["color"] >= 0.9


def test_adherence_swapped_colours_in_two_object_prompt(clf):
    img = render(_scene(("circle", "red", "large", "top left"), ("square", "blue", "large", "bottom right"))).image
    good = "a large red circle in the top left and a large blue square in the bottom right"
    swapped = "a large blue circle in the top left and a large red square in the bottom right"
    res = adherence([good, swapped], np.stack([img, img]), classifier=clf)
    assert res["per_prompt"][0]["color"] == 1.0 and res["per_prompt"][1]["color"] == 0.0
    assert res["per_prompt"][1]["object"] == 1.0 and res["per_prompt"][1]["position"] == 1.0
    assert res["two_object"]["color"] == 0.5 and res["single_object"]["color"] is None


def test_adherence_without_positions_matches_best_object(clf):
    img = render(_scene(("circle", "red", "large", "top left"), ("eight", "green", "large", "bottom right"))).image
    prompts = ["a green eight and a red circle", "a red eight", "a small red circle on a black background"]
    res = adherence(prompts, np.stack([img] * 3), classifier=clf)
    pp = res["per_prompt"]
    assert pp[0] == {"color": 1.0, "object": 1.0, "prompt": 1.0}
    assert pp[1]["color"] + pp[1]["object"] == 1.0  # one of the two matches, not both
    assert pp[2]["size"] == 0.0 and pp[2]["color"] == 1.0 and pp[2]["bgcolor"] == 1.0
    assert "position" not in pp[0] and res["counts"]["all"]["position"] == 0
    assert res["accuracy"]["position"] is None


def test_adherence_single_object_position_uses_most_confident_slot(clf):
    img = render(_scene(("nine", "yellow", "large", "bottom left"))).image
    res = adherence(["a nine in the bottom left", "a nine in the center"], np.stack([img, img]), classifier=clf)
    assert [p["position"] for p in res["per_prompt"]] == [1.0, 0.0]
    assert res["per_prompt"][0]["object"] == 1.0 and res["per_prompt"][1]["object"] == 0.0


def test_adherence_checks_lengths(clf):
    img = render(_scene(("circle", "red", "small", "center"))).image
    with pytest.raises(DifflensError, match="one image per prompt"):
        adherence(["a red circle", "a blue circle"], img[None], classifier=clf)


def test_shipped_assets_are_small_safetensors_and_never_unpickled(monkeypatch):
    folder = default_folder()
    assert (folder / WEIGHTS_FILE).stat().st_size < 2_000_000
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["factors"] == {f: list(v) for f, v in V.FACTORS.items()}

    def no_unpickling(*a, **k):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    model = FactorClassifier.load()
    assert not model.training


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(DifflensError, match="difflens zoo train classifier"):
        FactorClassifier.load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    shutil.copy(default_folder() / CONFIG_FILE, tmp_path / "half" / CONFIG_FILE)
    with pytest.raises(DifflensError, match="model.safetensors"):
        FactorClassifier.load(tmp_path / "half")


def test_corrupt_or_foreign_weights_give_a_clear_error(tmp_path):
    shutil.copytree(default_folder(), tmp_path / "c")
    (tmp_path / "c" / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(DifflensError, match="cannot load classifier weights"):
        FactorClassifier.load(tmp_path / "c")
    shutil.copytree(default_folder(), tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / CONFIG_FILE).read_text())
    cfg["factors"]["color"] = cfg["factors"]["color"][:-1]
    (tmp_path / "v" / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(DifflensError, match="different toy-world vocabulary"):
        FactorClassifier.load(tmp_path / "v")


def test_save_load_round_trip(tmp_path, clf):
    clf.save(tmp_path / "copy")
    again = FactorClassifier.load(tmp_path / "copy")
    img = render(sample_scene(np.random.default_rng(5))).image
    a, b = clf.predict_probs(img), again.predict_probs(img)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_slot_targets_follow_the_scene():
    r = render(_scene(("circle", "red", "large", "center"), ("five", "blue", "small", "top left"), bg="dots"))
    t = slot_targets(r)
    s_c, s_tl = V.POSITIONS.index("center"), V.POSITIONS.index("top left")
    assert t["presence"].tolist() == [1.0 if s in (s_c, s_tl) else 0.0 for s in range(5)]
    assert V.COLORS[t["color"][s_tl]] == "blue" and V.OBJECTS[t["object"][s_tl]] == "five"
    assert V.SIZES[t["size"][s_c]] == "large"
    assert t["color"][V.POSITIONS.index("top right")] < 0  # ignored when absent
    assert V.PATTERNS[t["bg"]] == "dots"


def test_augment_keeps_images_valid_and_changes_them():
    x = torch.from_numpy(render(_scene(("circle", "red", "large", "center"))).image).permute(2, 0, 1)[None].float() / 255
    x = x.repeat(64, 1, 1, 1)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.allclose(y * 255, (y * 255).round(), atol=1e-3)  # 8-bit values
    assert (y - x).abs().mean() > 0.005
    assert (y - x).abs().mean() < 0.1  # still the same picture
