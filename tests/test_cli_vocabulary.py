"""One CLI vocabulary (difflens/cli_options.py): the same word means the same thing on every verb,
-q/-v everywhere, and exit codes tell usage errors (2) from runtime failures (1)."""

from __future__ import annotations

import argparse

import pytest

from difflens.cli import build_parser, main

# Spellings the vocabulary retired, with what replaced them.
RETIRED = {
    "--dtype": "--model-dtype / --store-dtype",
    "--store": "--data",
    "--num-steps": "--steps",
    "--normalize": "--normalization",
    "--denoise-steps": "--step-window",
    "--splice-steps": "--splice-window",
    "--timesteps": "--step-window (indices) or --timestep-range (values)",
}
# verbs whose --steps is not denoising steps, or whose flags another module still owns
NOT_YET: set[str] = set()  # every verb speaks the vocabulary


def leaves(parser: argparse.ArgumentParser, prefix: str = ""):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if parser.get_default("func") is not None or not subs:
        yield prefix.strip(), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaves(sub, f"{prefix} {name}")


VERBS = [(name, p) for name, p in leaves(build_parser()) if name and name.split()[0] not in NOT_YET]


@pytest.mark.parametrize("name, parser", VERBS, ids=[n for n, _ in VERBS])
def test_one_word_one_meaning(name, parser):
    opts = parser._option_string_actions
    assert "-q" in opts and "-v" in opts and "--quiet" in opts, f"{name}: -q/-v missing"
    for old, new in RETIRED.items():
        assert old not in opts, f"{name}: {old} is retired, use {new}"
    if "--steps" in opts:
        assert "denoising" in (opts["--steps"].help or ""), f"{name}: --steps must mean denoising steps"
    if "--model" in opts and name not in ("zoo eval",):
        for flag in ("--device", "--model-dtype"):
            assert flag in opts, f"{name} loads a model but lacks {flag}"


MODEL_VERBS = ["generate", "harvest", "evaluate", "interpret", "browse serve"]


@pytest.mark.parametrize("name", MODEL_VERBS)
def test_verbs_that_load_a_model_share_the_model_options(name):
    parser = dict(VERBS)[name]
    opts = parser._option_string_actions
    for flag in ("--model", "--device", "--model-dtype", "--quantize", "--offload", "--max-text-length"):
        assert flag in opts, f"{name} lacks {flag}"
    assert opts["--offload"].choices == ["none", "model", "sequential"] or tuple(opts["--offload"].choices) == (
        "none", "model", "sequential")
    if name in ("generate", "harvest", "interpret"):
        for flag in ("--steps", "--guidance", "--height", "--width"):
            assert flag in opts, f"{name} lacks {flag}"
        assert opts["--steps"].default is None  # the model's own default


def test_exit_codes(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:  # argparse: a usage error
        main(["harvest", "--no-such-flag"])
    assert e.value.code == 2
    assert main(["generate", "--prompt", "a red circle", "--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err

    import difflens.cli as cli

    def boom(args):
        raise RuntimeError("the GPU caught fire\nsecond line")

    real = cli.build_parser

    def patched():
        parser = real()
        dict(leaves(parser))["generate"].set_defaults(func=boom)
        return parser

    monkeypatch.setattr(cli, "build_parser", patched)
    capsys.readouterr()
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "y.png")]) == 1  # a failure, not the input
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "failed: RuntimeError: the GPU caught fire" in err and "-v" in err


def test_out_is_a_file_for_one_image_and_a_folder_for_several(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red circle", "--prompt", "a blue square", "--steps", "1",
                 "--out", str(tmp_path / "one.png")]) == 2
    assert "add --grid, or pass a folder" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a red circle", "--prompt", "a blue square", "--seed", "3,4", "--steps", "1",
                 "--out", str(tmp_path / "many")]) == 0
    import json

    made = sorted(p.name for p in (tmp_path / "many").iterdir() if not p.name.startswith("."))
    assert made == ["000.json", "000.png", "001.json", "001.png"]
    assert json.loads((tmp_path / "many" / "001.json").read_text())["seed"] == 4
    captured = capsys.readouterr()
    assert captured.out == ""  # messages on stderr; stdout is for --json


def test_quiet_and_verbose_before_a_sub_verb_are_kept():
    """argparse copies a sub-verb's defaults over its verb's values; -q/-v must survive that."""
    from difflens.cli import parse_args

    subs = dict(leaves(build_parser()))
    nested = [name for name in subs if len(name.split()) == 2]
    assert "interpret cache" in nested and "browse serve" in nested
    for name in nested:  # no default on a sub-verb, so it cannot overwrite the verb's value
        opts = subs[name]._option_string_actions
        assert opts["-q"].default is argparse.SUPPRESS and opts["-v"].default is argparse.SUPPRESS, name
    cache = ["--dict", "d", "--data", "s", "--out", "o"]
    for argv, want in (
        (["interpret", "-q", "cache", *cache], (True, 0)),
        (["interpret", "cache", "-q", *cache], (True, 0)),
        (["interpret", "-v", "-v", "cache", *cache], (False, 2)),
        (["interpret", "cache", *cache], (False, 0)),
        (["browse", "-q", "serve", "--dict", "d"], (True, 0)),
        (["interpret", *cache, "-q"], (True, 0)),
    ):
        args = parse_args(build_parser(), argv)
        assert (args.quiet, args.verbose) == want, f"difflens {' '.join(argv)}: {(args.quiet, args.verbose)} != {want}"
    assert parse_args(build_parser(), ["interpret", "-q", "cache", *cache]).func.__name__ == "run_cache"


# Declarations of a shared flag outside cli_options.py, each with why it is not the shared one.
OWN_DECLARATIONS = {
    ("models/toy/cli.py", "--seed"): "generate: one noise seed per prompt (repeatable), not one RNG seed",
    ("models/toy/cli.py", "--model"): "zoo eval: a toy model folder, not any model",
    ("compare/cli.py", "--data"): "several stores (repeatable)",
    ("models/cli.py", "--model"): "sites: read from configs, so none of the loading options",
    ("demo.py", "--out"): "the demo's folder with a default (runs/demo)",
}


def test_shared_flags_are_declared_once():
    """Issue 14: --model, --seed, --out, --steps and --data are declared in cli_options.py (one
    help, one metavar, one meaning) and only declared elsewhere for a stated reason."""
    import re
    from pathlib import Path

    import difflens

    root = Path(difflens.__file__).parent
    found = set()
    for p in root.rglob("*.py"):
        if p.name == "cli_options.py":
            continue
        for flag in re.findall(r"""add_argument\(\s*["'](--model|--seed|--out|--steps|--data)["']""", p.read_text()):
            found.add((str(p.relative_to(root)), flag))
    assert found == set(OWN_DECLARATIONS)
