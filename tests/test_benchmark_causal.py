"""Causal editing in `difflens benchmark`, with known answers on the tiny toy model: an edit that
cannot act leaves every image bit-identical (success 0, side effects 0); an edit that acts on every
case flips a planted reader's colour (success 1) and, through it, is a side effect of every other
factor's edit; the metric is skipped, with the reason, when the model has no ground truth or is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflens.benchmark.causal import benchmark_causal, causal_editing, score_row
from difflens.intervene.study_concepts import make_cases
from difflens.world import vocab as V

from test_intervene import tiny_sae

TXT = "transformer_blocks.0:txt"
N = 4


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from toy_fixtures import make_tiny_toy

    from difflens.models.toy.adapter import ToyAdapter

    return ToyAdapter.load(folder=make_tiny_toy(tmp_path_factory.mktemp("tiny_toy_causal")))


@pytest.fixture(scope="module")
def store(adapter, tmp_path_factory):
    from test_splice import tiny_store

    prompts = [c.prompt for c in make_cases(N, 0)]
    return tiny_store(adapter, tmp_path_factory.mktemp("causal") / "store", prompts, TXT)


@pytest.fixture(scope="module")
def sae(adapter):
    d = tiny_sae(adapter.site_dim(TXT), width=32, k=3, site=TXT, seed=3)
    with torch.no_grad():
        d.b_enc_F[0] = -1e4  # feature 0 never fires
    return d


class PlantedReader:
    """A stand-in for the world's classifier: the first batch it sees (the unedited images) reads
    as prompted; afterwards an image identical to its unedited one reads the same, and any changed
    image reads the case's *target colour* (object and background as prompted)."""

    def __init__(self, cases):
        self.cases, self.clean = cases, None

    def classify(self, images):
        images = np.asarray(images)
        if self.clean is None:
            self.clean = images.copy()
        out = []
        for i, (img, c) in enumerate(zip(images, self.cases)):
            changed = not np.array_equal(img, self.clean[i])
            slot = {"p": 1.0, "color": c.to_color if changed else c.color, "object": c.object}
            out.append({"slots": {p: slot if p == c.position else {"p": 0.0, "color": "red", "object": "circle"}
                                  for p in V.POSITIONS}, "bgcolor": c.bgcolor})
        return out


def every_concept(features):
    return {f"{f}={v}": list(features) for f in ("color", "object", "bgcolor") for v in V.FACTORS[f]}


def test_score_row_definitions():
    cases = make_cases(4, 0)
    clean = {f: [getattr(c, f) for c in cases] for f in ("color", "object", "bgcolor")}
    clean["color"][3] = "(none)"  # case 3's unedited image misses its colour: not eligible for colour rows
    after = {f: list(v) for f, v in clean.items()}
    after["color"][0] = cases[0].to_color  # reached the target
    after["color"][1] = next(x for x in V.COLORS if x not in (cases[1].color, cases[1].to_color))  # another colour
    after["bgcolor"][1] = "changed"  # and a side effect
    e = score_row(cases, clean, after, "color", "edit")
    assert (e["eligible"], e["successes"], e["side_effect_rate"]) == (3, 1, pytest.approx(1 / 3, abs=1e-4))
    assert e["specificity"] == pytest.approx(0.0, abs=1e-4) and e["side_effects_by_factor"]["object"] == 0
    a = score_row(cases, clean, after, "color", "ablation")  # ablation: any other colour counts
    assert a["successes"] == 2 and a["success_rate"] == pytest.approx(2 / 3, abs=1e-4)


def test_an_edit_that_cannot_act_changes_nothing(adapter, store, sae):
    cases = make_cases(N, 0)
    res = causal_editing(adapter, {"sae": sae}, store, n_cases=N, steps=2, classifier=PlantedReader(cases),
                         features={"sae": every_concept([0])}, show_progress=False)
    rows = res["dictionaries"]["sae"]["rows"]
    assert set(rows) == {"color", "object", "bgcolor"}
    for factor, by_mode in rows.items():
        for mode, e in by_mode.items():
            assert e["eligible"] == N, (factor, mode)
            assert e["success_rate"] == 0 and e["side_effect_rate"] == 0, (factor, mode)  # bit-identical images
            assert e["edits"] == N
        # the edit acts where feature 0 fires (nowhere); the ablation acts everywhere and zeroes a zero code
        assert by_mode["edit"]["edits_that_never_acted"] == N and by_mode["ablation"]["edits_that_never_acted"] == 0
        c = by_mode["edit"]["control_random_features"]  # random features at the same (no) tokens
        assert c["success_rate"] == 0 and c["edits_that_never_acted"] == N
        assert by_mode["edit"]["features_per_edit"] == c["features_per_edit"] == 2  # equal-sized control
        assert by_mode["ablation"]["features_per_edit"] == by_mode["ablation"]["control_random_features"]["features_per_edit"] == 1
    assert res["images"] == N * (1 + 3 * 2 * 2)


def test_an_edit_that_acts_everywhere_flips_the_planted_colour(adapter, store, sae):
    cases = make_cases(N, 0)
    feats = every_concept(range(1, 17))  # half the latents: some fire on every text token
    res = causal_editing(adapter, {"sae": sae}, store, n_cases=N, steps=2, modes=("edit",), classifier=PlantedReader(cases),
                         features={"sae": feats}, show_progress=False)
    rows = res["dictionaries"]["sae"]["rows"]
    color, obj = rows["color"]["edit"], rows["object"]["edit"]
    assert color["edits_that_never_acted"] == 0
    assert color["success_rate"] == 1 and color["side_effect_rate"] == 0 and color["specificity"] == 1
    # the object edit changes the image too: the planted reader sees the colour move, not the object
    assert obj["success_rate"] == 0 and obj["side_effect_rate"] == 1 and obj["specificity"] == -1
    assert obj["side_effects_by_factor"] == {"color": 1.0, "bgcolor": 0.0}
    s = res["dictionaries"]["sae"]["summary"]["edit"]
    assert s["success"] == pytest.approx(1 / 3, abs=1e-3) and s["specificity"] == pytest.approx((1 - 1 - 1) / 3, abs=1e-3)


def test_benchmark_table_json_and_plot(adapter, store, sae, tmp_path):
    from difflens.benchmark import run_benchmark
    from difflens.dictionaries.io import save

    save(sae, tmp_path / "sae")
    cases = make_cases(N, 0)
    res = run_benchmark([tmp_path / "sae"], store, tmp_path / "bench", autointerp="none", causal_cases=N, causal_scale=2.0,
                        causal_modes=("edit",), causal_factors=("color",), adapter=adapter, steps=2,
                        classifier=PlantedReader(cases), show_progress=False)
    row = res["dictionaries"][0]
    assert set(row["causal"]) == {"edit"} and row["causal"]["edit"]["factors"] == ["color"]
    on_disk = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert on_disk["causal"]["n_cases"] == N and on_disk["causal"]["factors"] == ["color"] and on_disk["causal"]["scale"] == 2.0
    md = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "edit success" in md and "## Causal editing" in md and "| sae | color | edit |" in md
    assert (tmp_path / "bench" / "causal.png").is_file()


def test_skipped_with_the_reason(store, sae, monkeypatch):
    r = benchmark_causal({"sae": sae}, store, model="/no/such/model/folder", n_cases=2, show_progress=False)
    assert "/no/such/model/folder" in r["skipped"]
    import difflens.models as models

    monkeypatch.setattr(models, "ground_truth_for", lambda name: None)
    r = benchmark_causal({"sae": sae}, store, model="some-org/real-model", n_cases=2, show_progress=False)
    assert "no ground truth" in r["skipped"] and "real-model" in r["skipped"]


def test_cli_options(tmp_path, capsys):
    from difflens.cli import main

    assert main(["benchmark", "--dict", "x", "--data", "y", "--out", str(tmp_path / "o"), "--causal-factors", "colour"]) == 2
    assert "--causal-factors" in capsys.readouterr().err
    assert main(["benchmark", "--dict", "x", "--data", "y", "--out", str(tmp_path / "o"), "--causal-cases", "-1"]) == 2
    assert main(["benchmark", "--dict", "x", "--data", "y", "--out", str(tmp_path / "o"), "--causal-scale", "0"]) == 2
