"""Issue 14: "another ground-truth world could be added without touching the generic stages".

A second, minimal world (a coloured object on the left or right half of the image) is declared
here, in the test alone, with an adapter family that runs the tiny toy network and names it as its
`world_class`. The generic stages then run through it unchanged: prompts from `world_prompts_of`,
harvest's labels, records and readings, a store's world found from its model without weights
(`models.ground_truth_for`), and the oracle explainer and judge over the store's labels.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from difflens.errors import DifflensError

IMG, TXT = "transformer_blocks.1:img", "transformer_blocks.0:txt"
COLORS, OBJECTS = ("red", "blue"), ("circle", "square")
CONCEPTS = tuple(f"color={c}" for c in COLORS) + tuple(f"object={o}" for o in OBJECTS)
BIT = {c: i for i, c in enumerate(CONCEPTS)}
GRID = 16


def _mask(concepts) -> int:
    return sum(1 << BIT[c] for c in concepts)


def _decode(masks) -> np.ndarray:
    return ((np.asarray(masks, np.int64)[..., None] >> np.arange(len(CONCEPTS))) & 1).astype(bool)


class HalvesConcepts:
    """The `ConceptVocabulary` of the halves world."""

    names = CONCEPTS
    index = BIT
    types = ("color", "object")
    coarse_types = ("color",)
    fine_types = ("object",)
    image_level = np.ones(len(CONCEPTS), bool)

    def type_of(self, concept):
        return concept.partition("=")[0]

    def matrix(self, masks):
        return _decode(masks)

    def explanation(self, concept, level):
        value = concept.partition("=")[2]
        return f"fires on the tokens of a {value} object" if level == "token" else f"fires on images with a {value} object"

    def in_text(self, text):
        words = re.findall(r"[a-z]+", text.lower())
        return [c for c in CONCEPTS if c.partition("=")[2] in words]

    def mask_for(self, cm_TC, concepts):
        out = np.ones(cm_TC.shape[0], bool)
        for factor in {c.partition("=")[0] for c in concepts}:
            out &= cm_TC[:, [BIT[c] for c in concepts if c.startswith(factor + "=")]].any(1)
        return out


class HalvesWorld:
    """'a red circle': the object fills the left half of the token grid for even seeds, else the right."""

    name = "halves-world"
    concepts = CONCEPTS
    factors = {"color": COLORS, "object": OBJECTS}
    image_size, grid = 32, GRID
    study_objects = OBJECTS

    def sample_prompts(self, n, seed):
        rng = np.random.default_rng(seed)
        prompts = [f"a {COLORS[rng.integers(2)]} {OBJECTS[rng.integers(2)]}" for _ in range(n)]
        return prompts, [self.scene_for(p, seed + i) for i, p in enumerate(prompts)]

    def scene_for(self, prompt, seed):
        m = re.fullmatch(r"a (\w+) (\w+)", prompt.strip())
        if not m or m[1] not in COLORS or m[2] not in OBJECTS:
            return None
        return {"color": m[1], "object": m[2], "side": "left" if seed % 2 == 0 else "right"}

    def knows(self, prompts):
        return all(self.scene_for(p, 0) is not None for p in prompts)

    def prompt_pair(self, factor, a, b, *, seed=0):
        base = {"color": COLORS[seed % 2], "object": OBJECTS[seed % 2]}
        return tuple(self.describe({**base, factor: v}) for v in (a, b))

    def label_scene(self, scene):
        cols = np.arange(GRID * GRID) % GRID
        inside = cols < GRID // 2 if scene["side"] == "left" else cols >= GRID // 2
        labels = np.where(inside, _mask([f"color={scene['color']}", f"object={scene['object']}"]), 0).astype(np.int64)
        return {"scene": scene, "concepts": [f"color={scene['color']}", f"object={scene['object']}"]}, labels

    def text_labels(self, prompt, tokenizer):
        ids, _ = tokenizer([prompt])
        words = tokenizer.words(ids[0])
        return np.array([_mask([c for c in CONCEPTS if c.partition("=")[2] == w]) for w in words], np.int64)

    def decode(self, masks):
        return _decode(masks)

    def ready(self):
        return None

    def read_images(self, images):
        return [{"color": self._color(im)} for im in np.asarray(images)]

    @staticmethod
    def _color(image):
        return "red" if image[..., 0].mean() >= image[..., 2].mean() else "blue"

    def read_factor(self, images, factor, position=None):
        if factor not in self.factors:
            raise DifflensError(f"the halves world has no factor {factor}")
        # its reader tells colours apart, not shapes: every object reads as a circle
        return [self._color(im) if factor == "color" else "circle" for im in np.asarray(images)]

    def adherence(self, prompts, images):
        per = [{"color": float(self._color(im) in p), "prompt": float(self._color(im) in p)} for p, im in zip(prompts, images)]
        acc = float(np.mean([r["prompt"] for r in per])) if per else None
        return {"accuracy": {"color": acc, "prompt": acc}, "per_prompt": per}

    def describe(self, values):
        return f"a {values['color']} {values['object']}"

    def object_box(self, position, size, margin=0):
        return (0, 0, 16, 32) if position == "left" else (16, 0, 32, 32)

    def image_reader(self):
        return self

    def read_at(self, images, positions, factors, *, reader=None):
        return {f: self.read_factor(images, f) for f in factors}

    def vocabulary(self):
        return HalvesConcepts()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """An adapter family running the tiny toy network whose ground truth is the halves world,
    registered by its diffusers class name (removed again after the module)."""
    from toy_fixtures import make_tiny_toy

    from difflens.models.base import ADAPTERS
    from difflens.models.toy.adapter import ToyAdapter

    class HalvesAdapter(ToyAdapter):
        pipeline_classes = ("HalvesWorldPipeline",)
        world_class = HalvesWorld

    folder = make_tiny_toy(tmp_path_factory.mktemp("halves_model"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "HalvesWorldPipeline"}))
    yield HalvesAdapter.load(folder=folder), folder
    ADAPTERS.pop("HalvesWorldPipeline", None)


def test_the_world_meets_the_interface(family):
    from difflens.groundtruth import GroundTruth, ground_truth_of
    from difflens.models import ground_truth_for

    adapter, folder = family
    assert isinstance(ground_truth_of(adapter), HalvesWorld) and isinstance(adapter.ground_truth(), GroundTruth)
    # a store names its model; the model's family gives the world, without loading weights
    assert isinstance(ground_truth_for(str(folder)), HalvesWorld)


def test_generic_stages_run_through_a_second_world(family, tmp_path):
    from difflens.groundtruth import world_prompts_of
    from difflens.harvest.config import HarvestConfig
    from difflens.harvest.run import harvest
    from difflens.interpret import run_oracle_pipeline
    from difflens.interpret.sources import StoreSource
    from difflens.store import Store

    adapter, folder = family
    world = adapter.ground_truth()
    prompts, scenes = world_prompts_of(adapter, 12, 1, model="halves", option="--num-prompts", instead="--prompts")
    assert world.knows(prompts) and scenes[0]["color"] in COLORS
    cfg = HarvestConfig(model=str(folder), sites=[IMG, TXT], steps=2, batch_size=6, seeds=[0])
    harvest(tmp_path / "store", cfg, prompts, scenes=scenes, adapter=adapter)

    store = Store(tmp_path / "store")
    records = {r["sample_id"]: r for r in store.samples()}
    meta, meta_t = store.meta(IMG), store.meta(TXT)
    for sid, rec in records.items():
        _, want = world.label_scene(rec["scene"])
        rows = meta["sample_id"] == sid
        assert (meta["labels"][rows] == want[meta["token"][rows]]).all()  # the world's image-token labels
        assert rec["token_labels"] == want.tolist() and rec["reading"]["color"] in COLORS  # its record and reading
        assert "adherent" in rec
        words = world.text_labels(rec["prompt"], adapter.text_tokenizer())
        rows = meta_t["sample_id"] == sid
        assert (meta_t["labels"][rows] == words[meta_t["token"][rows]]).all()  # its words' labels
    assert meta["labels"].any() and meta_t["labels"].any()

    # interpretation reads the labels through the store's world, found from its model
    source = StoreSource(store, sites=[IMG])
    assert isinstance(source.ground_truth(), HalvesWorld) and source.vocabulary().names == CONCEPTS

    from difflens.dictionaries import DictConfig, build, save

    d = build(DictConfig(arch="topk", d_in=adapter.site_dim(IMG), width=8, k=2, site=IMG, normalization="none"))
    save(d, tmp_path / "dict")
    run_oracle_pipeline({"d": tmp_path / "dict"}, tmp_path / "store", tmp_path / "interp", baselines=(), n_features=4,
                        n_explain=2, n_pos=2, n_neg=2, grids=False)
    results = json.loads((tmp_path / "interp" / "d" / "scores.json").read_text())["results"]
    assert results and all(r["concept"] in CONCEPTS for r in results)  # the oracle names this world's concepts ...
    assert {r["explanation"] for r in results} <= {HalvesConcepts().explanation(c, "token") for c in CONCEPTS} | {
        HalvesConcepts().explanation(c, "image") for c in CONCEPTS}  # ... in its words
    assert all(r["score"] is not None for r in results)  # and the judge scores them against its labels
    hierarchy = json.loads((tmp_path / "interp" / "hierarchy.json").read_text())["d"]
    assert set(hierarchy["types"]) == {"color", "object"}


def test_trace_runs_through_a_second_world(family):
    """`difflens trace`'s world path: pairs from the world's `prompt_pair`, kept when its reader
    reads them as prompted, and a grid scored by its reader (only the factors the world has kept)."""
    from difflens.trace.run import Pair, trace
    from difflens.trace.world import trace_world

    adapter, _ = family
    world = adapter.ground_truth()
    (factor, pairs, info, readout), = list(trace_world(adapter, ["color"], 2, steps=2))
    assert factor == "color" and info["candidates"] == 4 and readout.others == ("object",)
    assert len(pairs) == info["used"] and all(world.knows([p.target, p.source]) for p in pairs)
    # the random network rarely draws the prompted colour, so the grid runs on a pair of the world's own
    pair = Pair(*world.prompt_pair("color", "red", "blue"), 0, "color", "red", "blue")
    res = trace(adapter, [pair], readout, sites=[IMG], steps=2, bin_size=2, branches=("both",), factor="color",
                show_progress=False).to_dict()
    assert res["factor"] == "color" and res["pairs"][0]["target"] == "a red circle"
