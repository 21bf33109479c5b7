"""The measured studies: success-rate bookkeeping, best-F1 feature labelling, and an end-to-end
run of the steering / ablation / transfer studies on the tiny toy model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflens.errors import DifflensError
from difflens.intervene.study import run_intervention_study
from difflens.intervene.study_items import ABSENT, object_region, study_items, success_rate
from difflens.intervene.study_labels import features_by_concept, label_features, read_labels
from difflens.world import vocab as V
from difflens.world.labels import concepts_to_mask
from difflens.world.prompts import parse_prompt

SITE = "transformer_blocks.1:img"


def test_success_rate_counts_only_eligible_cases():
    before = ["red", "blue", "red", "green"]
    after = ["red", "red", "blue", "red"]
    target = ["red"] * 4
    r = success_rate(before, after, target)  # reach red: eligible = blue, green -> both reached
    assert (r["eligible"], r["successes"], r["success_rate"]) == (2, 2, 1.0)
    r = success_rate(before, after, target, mode="leave")  # leave red: eligible = 0, 2 -> only #2 left
    assert (r["eligible"], r["successes"], r["success_rate"]) == (2, 1, 0.5)
    assert success_rate(["red"], ["red"], ["red"])["success_rate"] is None
    # An erased object is not a colour change, and no object before means nothing to steer.
    r = success_rate(["red", "red", ABSENT], [ABSENT, "blue", "red"], ["red", "red", "red"], mode="leave")
    assert (r["eligible"], r["successes"], r["vanished"]) == (2, 1, 1)
    r = success_rate([ABSENT, "blue"], ["red", ABSENT], ["red", "red"])
    assert (r["eligible"], r["successes"], r["vanished"]) == (1, 0, 1)


class FakeStore:
    """Duck-typed store: synthetic activations whose coordinates 2 and 5 mark red and circle tokens."""

    root = "fake-store"

    def __init__(self, n=400, d=8, seed=0):
        rng = np.random.default_rng(seed)
        red = rng.random(n) < 0.3
        circle = rng.random(n) < 0.4
        x = -np.ones((n, d), np.float32)
        x[red, 2] = 1.0
        x[circle, 5] = 1.0
        x[:, 0] = rng.choice([-1.0, 1.0], size=n)
        self.x = x
        self.sites = [SITE]
        red_bits, circle_bits = concepts_to_mask(["color=red"]), concepts_to_mask(["object=circle"])
        self.labels = np.where(red, red_bits, 0) | np.where(circle, circle_bits, 0)

    def meta(self, site, columns=None):
        n = len(self.x)
        return {"timestep": np.full(n, 500.0, np.float32), "step": np.zeros(n, np.int32),
                "stream": np.zeros(n, np.int8), "labels": self.labels.astype(np.int64)}

    def read_rows(self, site, idx):
        return torch.from_numpy(self.x[np.asarray(idx)])


def test_label_features_finds_the_concept_features():
    from test_splice import exact_sae

    labels, scores = label_features(exact_sae(8), FakeStore(), return_scores=True, show_progress=False)
    assert labels[2] == "color=red" and labels[5] == "object=circle"
    assert list(labels)[:2] in ([2, 5], [5, 2])  # perfect matches come first
    assert scores["f1"][2] == pytest.approx(1.0) and scores["f1"][5] == pytest.approx(1.0)
    assert scores["by_concept"]["color=red"][0][0] == 2
    assert all(v >= 0.2 for v in scores["f1"].values())
    only_color = label_features(exact_sae(8), FakeStore(), factors=("color",), show_progress=False)
    assert 5 not in only_color or only_color[5].startswith("color=")
    with pytest.raises(DifflensError):
        label_features(exact_sae(8), FakeStore(), factors=("flavour",), show_progress=False)


def test_study_prompts_regions_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    items = study_items("color", "red", 12, rng, has=False)
    assert all(it.color != "red" for it in items)
    for it in items:
        spec = parse_prompt(it.prompt)  # the prompts follow the world's grammar
        assert spec.objects[0].color == it.color and spec.objects[0].position == it.position
    assert all(it.object == "circle" for it in study_items("object", "circle", 5, rng, has=True))
    box = object_region("top left").resolve((16, 16), (32, 32)).reshape(16, 16)
    assert box[0:9, 0:9].all() and not box[10:, :].any() and not box[:, 10:].any()
    p = tmp_path / "labels.json"
    p.write_text(json.dumps({"labels": {"3": "color=red", "7": "object=seven", "9": "size=large"}}))
    labels = read_labels(p)
    assert labels == {3: "color=red", 7: "object=seven", 9: "size=large"}
    assert features_by_concept(labels) == {"color=red": [3], "object=seven": [7]}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from toy_fixtures import make_tiny_toy

    from difflens.models.toy.adapter import ToyAdapter

    return ToyAdapter.load(folder=make_tiny_toy(tmp_path_factory.mktemp("tiny_toy_study")))


def test_study_end_to_end_on_the_tiny_model(adapter, tmp_path):
    from test_intervene import tiny_sae

    from difflens.world.classifier import FactorClassifier

    torch.manual_seed(0)
    clf = FactorClassifier().eval()  # random weights: the numbers mean nothing, the bookkeeping does
    sae = tiny_sae(adapter.site_dim(SITE))
    labels = {3: "color=red", 7: "color=blue", 5: "object=circle", 11: "size=large"}
    s = run_intervention_study(
        adapter, sae, tmp_path, feature_labels=labels, quick=True, classifier=clf, steps=3,
        scales=(1.0, 8.0), mode="absolute", show_progress=False,
    )
    st = s["steering"]
    assert st["n_cases"] == 9  # 3 colour/object concepts x 3 prompts; size is not studied
    assert [r["scale"] for r in st["by_scale"]] == [1.0, 8.0]
    assert len(st["by_window"]) == 4 and st["window_scale"] in (1.0, 8.0)
    for r in st["by_scale"] + st["by_window"]:
        assert r["eligible"] <= r["total"] == 9
        assert r["success_rate"] is None or 0 <= r["success_rate"] <= 1
        assert r["mse_outside"] >= 0 and r["mse_inside"] >= 0
    assert st["by_scale"][1]["mse_inside"] > 0  # a strong push changes the region
    ab = s["ablation"]
    assert ab["n_cases"] == 6 and "control_random_features" in ab
    assert ab["ablation"]["eligible"] <= 6
    tr = s["transfer"]
    assert tr["n_pairs"] == 6 and tr["features"] == [3, 7]
    for name in ("steering.json", "ablation.json", "transfer.json", "summary.json", "summary.md",
                 "steering_success.png", "ablation_examples.png", "transfer_examples.png"):
        assert (tmp_path / name).is_file(), name
    assert "Steering" in (tmp_path / "summary.md").read_text()


def test_study_needs_labels_or_a_store(adapter, tmp_path):
    from test_intervene import tiny_sae

    from difflens.world.classifier import FactorClassifier

    with pytest.raises(DifflensError, match="labels"):
        run_intervention_study(adapter, tiny_sae(adapter.site_dim(SITE)), tmp_path, classifier=FactorClassifier().eval())
    with pytest.raises(DifflensError, match="no feature is labelled"):
        run_intervention_study(adapter, tiny_sae(adapter.site_dim(SITE)), tmp_path, feature_labels={1: "size=small"},
                               classifier=FactorClassifier().eval(), steps=3, show_progress=False)


def test_labelling_from_a_real_store(adapter, tmp_path):
    from test_intervene import tiny_sae
    from test_splice import tiny_store

    prompts = [f"a large {c} circle in the center on a black plain background" for c in ("red", "blue")]
    store = tiny_store(adapter, tmp_path / "store", prompts, SITE)
    labels, scores = label_features(tiny_sae(adapter.site_dim(SITE)), store, min_f1=0.0, return_scores=True, show_progress=False)
    assert scores["rows"] == 2 * 3 * 256  # 2 images x 3 steps x 256 tokens
    assert all(c in V.CONCEPT_ID for c in labels.values())
    assert all(c.split("=")[0] in ("color", "object") for c in labels.values())


def test_ablation_uses_per_concept_rankings_and_variants(adapter, tmp_path):
    from test_intervene import tiny_sae

    from difflens.intervene.study_edits import run_ablation_study
    from difflens.world.classifier import FactorClassifier

    ranking = {"color=red": [3, 9, 12], "color=blue": [7, 3], "object=circle": [5]}
    res = run_ablation_study(
        adapter, tiny_sae(adapter.site_dim(SITE)), {3: "color=red"}, tmp_path, concept_features=ranking,
        features_per_value=2, prompts_per_value=2, variants=[("invert", "scale", -1.0, "cond")],
        classifier=FactorClassifier().eval(), steps=3, show_progress=False,
    )
    assert res["features"] == {"color=blue": [7, 3], "color=red": [3, 9]}
    assert res["feature_source"] == "ranked by F1 per concept" and res["n_cases"] == 4
    assert list(res["variants"]) == ["invert"] and res["ablation"]["total"] == 4
    assert (tmp_path / "ablation.json").is_file() and (tmp_path / "ablation_examples.png").is_file()
