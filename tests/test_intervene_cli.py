"""The steer / edit / transfer verbs end to end on the tiny toy model, and their error messages."""

from __future__ import annotations

import json

import pytest

from difflens.cli import main

PROMPT = "a large red circle in the top left on a black plain background"
SITE = "transformer_blocks.1:img"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_intervene import tiny_sae
    from toy_fixtures import make_tiny_toy

    from difflens.dictionaries.io import save
    from difflens.models.toy.adapter import ToyAdapter

    root = tmp_path_factory.mktemp("cli")
    adapter = ToyAdapter.load(folder=make_tiny_toy(root / "toy"))
    save(tiny_sae(adapter.site_dim(SITE)), root / "sae")
    return adapter, root


@pytest.fixture
def cli(setup, monkeypatch):
    """`difflens ...` with --model resolving to the tiny model (load_adapter knows only the shipped one)."""
    import difflens.models

    adapter, root = setup
    monkeypatch.setattr(difflens.models, "load_adapter", lambda *a, **k: adapter)

    def run(*argv):
        return main([argv[0], "--dict", str(root / "sae"), "--steps", "3", *argv[1:]])

    return run


def test_steer_sweep_writes_grid_and_json(cli, tmp_path, capsys):
    out = tmp_path / "sweep.png"
    rc = cli("steer", "--feature", "3", "--scales=-4,0,4", "--scale-mode", "absolute", "--step-window", ":2",
             "--region", "0,0,16,16", "--prompt", PROMPT, "--seed", "1", "--out", str(out))
    assert rc == 0
    assert out.is_file()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["scales"] == [-4.0, 0.0, 4.0] and len(meta["labels"]) == 4
    assert "steps :2" in meta["intervention"] and "box 0,0,16,16" in meta["intervention"]


def test_single_steer_edit_and_transfer(cli, tmp_path):
    assert cli("steer", "--feature", "3,4", "--scale", "0.8", "--prompt", PROMPT, "--out", str(tmp_path / "s.png")) == 0
    assert cli("edit", "--ablate", "1,2", "--clamp", "5=3", "--scale", "6=-1", "--branch", "cond",
               "--prompt", PROMPT, "--out", str(tmp_path / "e.png")) == 0
    meta = json.loads((tmp_path / "e.json").read_text())
    assert meta["steps_applied"] == [0, 1, 2] and "cond branch" in meta["intervention"]
    assert cli("transfer", "--reference-prompt", "a small blue square in the center on a gray plain background",
               "--features", "all", "--mode", "mean", "--timestep-range", "0:2000",
               "--prompt", PROMPT, "--out", str(tmp_path / "t.png")) == 0
    meta = json.loads((tmp_path / "t.json").read_text())
    assert len(meta["labels"]) == 3 and meta["steps_applied"] == [0, 1, 2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["steer", "--feature", "64", "--scale", "1"], "out of range"),
        (["steer", "--feature", "x", "--scale", "1"], "integer feature ids"),
        (["steer", "--feature", "1", "--scale", "1", "--region", "8,8,2,2"], "empty"),
        (["steer", "--feature", "1", "--scale", "1", "--region", "0,0,64,8"], "beyond"),
        (["steer", "--feature", "1", "--scale", "1", "--step-window", "7:9"], "selects none"),
        (["steer", "--feature", "1", "--scale", "1", "--scale-mode", "feature-max"], "feature-max"),
        (["edit"], "at least one"),
        (["edit", "--clamp", "5"], "=value"),
    ],
)
def test_cli_errors_are_one_line_and_actionable(cli, tmp_path, capsys, argv, message):
    rc = cli(*argv, "--prompt", PROMPT, "--out", str(tmp_path / "x.png"))
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert "Traceback" not in err


def test_readings_come_from_the_models_ground_truth(cli, setup, tmp_path, monkeypatch):
    """The verbs read images through `adapter.ground_truth()`, never by the model's name: a model
    whose ground truth is None gets no readings, whatever it is called."""
    adapter, _ = setup
    assert cli("edit", "--ablate", "1", "--prompt", PROMPT, "--out", str(tmp_path / "a.png")) == 0
    meta = json.loads((tmp_path / "a.json").read_text())
    if meta["readings"] is not None:  # the shipped classifier is present
        factors = set(adapter.ground_truth().factors)
        assert set(meta["readings"][0]["main"]) <= factors and meta["labels"][0].startswith("clean: ")
    monkeypatch.setattr(adapter, "ground_truth", lambda: None)
    assert cli("edit", "--ablate", "1", "--prompt", PROMPT, "--out", str(tmp_path / "b.png")) == 0
    meta = json.loads((tmp_path / "b.json").read_text())
    assert meta["readings"] is None and meta["labels"] == ["clean", "edited"]


def test_intervene_study_needs_ground_truth(cli, setup, tmp_path, monkeypatch, capsys):
    adapter, root = setup
    monkeypatch.setattr(adapter, "ground_truth", lambda: None)
    rc = main(["intervene-study", "--dict", str(root / "sae"), "--labels", str(tmp_path / "l.json"),
               "--out", str(tmp_path / "study")])
    assert rc == 2 and "has none" in capsys.readouterr().err
