"""The steer / edit / transfer verbs end to end on the tiny toy model, their error messages, and the
intervention registry: a verb and a playground action declared in this file alone."""

from __future__ import annotations

import json

import pytest

from difflens.cli import main
from difflens.errors import DifflensError

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


# ---- a new intervention touches only its own module: here, this test file ---------------------------------------
def zero_tokens_spec():
    """A "zero tokens" intervention declared the way an intervention module does: the class, its
    flags, its playground parameter and one `InterventionSpec`; nothing else in difflens names it."""
    import torch

    from difflens.intervene.base import Intervention, dictionary_site
    from difflens.intervene.registry import InterventionSpec, Param, parse_ids

    class Zero(Intervention):
        kind = "zero-tokens"

        def __init__(self, dictionary, tokens, **common):
            super().__init__(site=dictionary_site(dictionary, None), tokens=tokens, **common)

        def apply(self, x, ctx, rows, toks, acts):
            return torch.zeros_like(x)

    def arguments(p):
        p.add_argument("--tokens", required=True, help="token indices to zero: 0,1,2")

    return InterventionSpec(
        "zero-tokens", "set chosen tokens' activations to zero",
        build=lambda args, d, where: Zero(d, parse_ids(args.tokens, "--tokens"), **where),
        add_arguments=arguments, labels=("clean", "zeroed"),
        params=(Param("token", "int", 0, "token index to zero", min=0, max=255),),
        from_request=lambda p, d, where: Zero(d, [p["token"]], **where),
    )


@pytest.fixture
def zero_tokens(monkeypatch):
    from difflens.intervene.registry import INTERVENTIONS, intervention_specs

    intervention_specs()  # the built-in verbs first
    spec = zero_tokens_spec()
    monkeypatch.setitem(INTERVENTIONS, spec.name, spec)
    return spec


def test_registry_lists_the_builtin_verbs():
    from difflens.intervene.registry import get_intervention, intervention_specs, playground_specs

    assert {"steer", "edit", "transfer"} <= {s.name for s in intervention_specs()}
    assert {"steer", "edit", "transfer"} <= {s.name for s in playground_specs()}
    assert get_intervention("transfer").extra_images is not None
    with pytest.raises(DifflensError, match="unknown intervention 'nope': use one of"):
        get_intervention("nope")


def test_a_registered_intervention_is_a_cli_verb(cli, zero_tokens, tmp_path, capsys):
    from difflens.cli import build_parser

    args = build_parser().parse_args(["zero-tokens", "--dict", "d", "--tokens", "0,1", "--prompt", PROMPT, "--out", "x.png"])
    assert args.tokens == "0,1" and args.intervention_verb == "zero-tokens"
    out = tmp_path / "z.png"
    assert cli("zero-tokens", "--tokens", "0,1,2,3", "--step-window", ":2", "--prompt", PROMPT, "--out", str(out)) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["verb"] == "zero-tokens" and meta["steps_applied"] == [0, 1]
    assert "tokens 0,1,2,3" in meta["intervention"] and meta["labels"][1].startswith("zeroed")
    assert meta["mean_abs_pixel_change"] > 0  # zeroing tokens changed the picture
    # its flags are checked (before the model loads) with the shared messages
    rc = cli("zero-tokens", "--tokens", "a", "--prompt", PROMPT, "--out", str(tmp_path / "y.png"))
    assert rc == 2 and "--tokens 'a'" in capsys.readouterr().err


def test_unregistered_verb_is_unknown(cli, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli("zero-tokens", "--tokens", "0", "--prompt", PROMPT, "--out", str(tmp_path / "z.png"))
    assert "invalid choice" in capsys.readouterr().err


def test_registry_refuses_bad_specs_and_params(zero_tokens, setup):
    from difflens.intervene.registry import InterventionSpec, Param, get_intervention, register_intervention

    with pytest.raises(DifflensError, match="registered twice"):
        register_intervention(zero_tokens_spec())
    with pytest.raises(DifflensError, match="lower-case"):
        register_intervention(InterventionSpec("Zero Tokens", "x", build=lambda *a: None))
    with pytest.raises(DifflensError, match="no from_request"):
        register_intervention(InterventionSpec("zt", "x", build=lambda *a: None, params=(Param("a", "int", 0),)))
    with pytest.raises(DifflensError, match="kind 'vector' unknown"):
        Param("a", "vector")

    class D:
        num_latents = 64

    steer = get_intervention("steer")
    assert steer.parse_params({"feature": 63, "scale": -2}, D()) == {"feature": 63, "scale": -2.0}
    assert steer.parse_params({}, D()) == {"feature": 0, "scale": 1.0}  # defaults
    for raw, msg in (({"feature": 64}, "feature must be an integer in 0..63, got 64"),
                     ({"feature": True}, "feature must be an integer"),
                     ({"scale": 101}, "scale must be a number in -100..100"),
                     ({"scale": "1"}, "scale must be a number"),
                     ({"sclae": 1}, "steer has no parameter 'sclae': it takes feature, scale"),
                     ([1], "params must be a JSON object")):
        with pytest.raises(DifflensError, match=msg):
            steer.parse_params(raw, D())
    transfer = get_intervention("transfer")
    got = transfer.parse_params({"reference_prompt": " a blue seven ", "features": "1,2"}, D())
    assert got == {"reference_prompt": "a blue seven", "reference_seed": 0, "features": [1, 2], "mode": "tokens"}
    assert transfer.parse_params({"reference_prompt": "x", "features": "all"}, D())["features"] is None
    for raw, msg in (({}, "reference_prompt is missing"), ({"reference_prompt": "x", "features": [64]}, "0..63"),
                     ({"reference_prompt": "x", "mode": "style"}, "mode must be one of tokens, mean"),
                     ({"reference_prompt": "x" * 501}, "under 500")):
        with pytest.raises(DifflensError, match=msg):
            transfer.parse_params(raw, D())


def test_playground_runs_a_registered_intervention(zero_tokens, setup):
    """The playground's generic action builds any registered intervention from its declared params."""
    import difflens
    from difflens.browse.server import Playground

    adapter, root = setup
    pg = Playground(adapter, {"sae": difflens.load(root / "sae")}, default_steps=2)
    names = [s["name"] for s in pg.interventions()]
    assert "zero-tokens" in names and {"steer", "edit", "transfer"} <= set(names)
    spec = next(s for s in pg.interventions() if s["name"] == "zero-tokens")
    assert spec["params"] == [{"name": "token", "kind": "int", "default": 0, "help": "token index to zero", "min": 0, "max": 255}]
    body = {"prompt": PROMPT, "seed": 1, "steps": 2, "dict": "sae"}
    clean = pg.intervene({**body, "kind": "zero-tokens", "params": {"token": 0}})
    assert clean["kind"] == "zero-tokens" and clean["params"] == {"token": 0} and "tokens 0" in clean["intervention"]
    other = pg.intervene({**body, "kind": "zero-tokens", "params": {"token": 5}})
    assert other["image"] != clean["image"]
    moved = pg.intervene({**body, "kind": "transfer", "params": {"reference_prompt": "a small blue square"}})
    assert [e["label"] for e in moved["extra"]] == ["reference"] and moved["extra"][0]["image"].startswith("data:image/png")
    for req, msg in (({"kind": "zero-tokens", "params": {"token": 256}}, "token must be an integer in 0..255"),
                     ({"kind": "zero-tokens", "params": {"tokn": 1}}, "no parameter 'tokn'"),
                     ({"kind": "nope"}, "unknown intervention 'nope'")):
        with pytest.raises(DifflensError, match=msg):
            pg.intervene({**body, **req})
