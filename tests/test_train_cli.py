"""`difflens train` flags and config files, and its one-line errors."""

from __future__ import annotations

import json

import pytest
from test_train_fixtures import SITE_A, SITE_B, make_store

from difflens.cli import build_parser, main
from difflens.errors import DifflensError
from difflens.train.cli import build_from_args


def parse(*argv):
    return build_parser().parse_args(["train", "--data", "d", "--out", "o", *argv])


def test_flags_make_a_grid_and_a_config():
    specs, cfg = build_from_args(
        parse("--site", f"{SITE_A},{SITE_B}", "--arch", "topk", "--width", "32", "--k", "4,8", "--train-steps", "5",
              "--timestep-range", "100:600", "--step-window", "0:3", "--normalization", "pca-whiten",
              "--option", "k_aux=3", "--no-auxk", "--decay", "cosine")
    )
    assert [s.name for s in specs] == [
        "blocks.1-img-topk-w32-k4", "blocks.1-img-topk-w32-k8", "blocks.2-img-topk-w32-k4", "blocks.2-img-topk-w32-k8",
    ]
    assert specs[0].options == {"normalization": "pca-whiten", "k_aux": 3}
    assert cfg.steps == 5 and cfg.timestep_range == (100.0, 600.0) and cfg.denoise_steps == [0, 1, 2]
    assert cfg.auxk is False and cfg.decay == "cosine" and cfg.batch_size == 1024


def test_toml_config_with_cli_overrides(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(
        '[train]\nsteps = 100\nlr = 1e-3\n\n[defaults]\nsite = "blocks.1:img"\nwidth = 64\n\n'
        '[[dictionaries]]\narch = "topk"\nk = [4, 8]\n\n[[dictionaries]]\narch = "itda"\nk = 4\nname = "atoms"\n'
    )
    specs, cfg = build_from_args(parse("--config", str(path), "--tokens", "4096", "--batch-size", "512"))
    assert [s.name for s in specs] == ["topk-w64-k4", "topk-w64-k8", "atoms"]
    assert cfg.steps is None and cfg.total_steps() == 8 and cfg.lr == 1e-3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--arch", "topk", "--width", "8", "--k", "16", "--site", "s", "--train-steps", "1"), "k=16 is larger than width=8"),
        (("--arch", "topk", "--width", "8", "--k", "2", "--train-steps", "1"), "missing site"),
        (("--arch", "topk", "--width", "8", "--k", "x", "--site", "s", "--train-steps", "1"), "comma-separated list of integers"),
        (("--arch", "topk", "--width", "8", "--k", "2", "--site", "s", "--train-steps", "1", "--timestep-range", "5"), "lo:hi"),
        (("--arch", "topk", "--width", "8", "--k", "2", "--site", "s", "--train-steps", "1", "--option", "x"), "KEY=VALUE"),
    ],
)
def test_bad_flags_explain_the_fix(argv, message):
    with pytest.raises(DifflensError, match=message):
        build_from_args(parse(*argv))


def test_cli_errors_are_one_line(tmp_path, capsys):
    store = make_store(tmp_path / "s", units=2)
    base = ["train", "--data", str(store.root), "--arch", "topk", "--width", "8", "--k", "2", "--train-steps", "2",
            "--batch-size", "32", "--eval-tokens", "32", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*base, "--site", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "available sites: blocks.1:img, blocks.2:img" in err
    assert main(["train", "--data", str(tmp_path / "none"), *base[3:], "--site", SITE_A]) == 2
    assert "no activation store at" in capsys.readouterr().err
    assert main([*base, "--site", SITE_A]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["dictionaries"][0]["name"] == "topk-w8-k2"
    assert main([*base, "--site", SITE_A, "--resume", "--lr", "0.5"]) == 2
    assert "--resume with a different configuration" in capsys.readouterr().err
    assert main([*base, "--site", SITE_A, "--resume"]) == 0  # finished: nothing to do, still fine


def test_every_config_field_is_a_documented_flag():
    """Flags come from TrainConfig: a new field gets a flag, and its documentation is the help."""
    import dataclasses

    from difflens.train.cli import field_docs
    from difflens.train.config import TrainConfig

    docs = field_docs(TrainConfig)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(fields) <= set(docs), f"undocumented TrainConfig fields: {set(fields) - set(docs)}"
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    dests = {a.dest for a in train._actions}
    assert {f"cfg_{f}" for f in fields if f != "progress"} <= dests
    helps = {a.dest: a.help for a in train._actions}
    assert docs["grad_clip"] in helps["cfg_grad_clip"]
    # --steps is denoising steps everywhere: optimizer steps are --train-steps
    assert "--steps" not in train._option_string_actions and "--train-steps" in train._option_string_actions
    _, cfg = build_from_args(parse("--site", "s", "--arch", "topk", "--width", "8", "--k", "2", "--train-steps", "3",
                                   "--no-scale-lr", "--beta2", "0.9"))
    assert cfg.steps == 3 and cfg.scale_lr is False and cfg.beta2 == 0.9


def test_train_ends_with_the_held_out_table(tmp_path, capsys):
    store = make_store(tmp_path / "s", units=2)
    rc = main(["train", "--data", str(store.root), "--site", SITE_A, "--arch", "topk,relu", "--width", "8", "--k", "2",
               "--train-steps", "3", "--batch-size", "32", "--eval-tokens", "100", "--out", str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr()
    assert "held-out FVU" not in out.out  # messages on stderr, stdout stays empty for data
    err = out.err.splitlines()
    # 100 tokens need 2 samples of 64 rows (4 steps x 16 tokens): 128 rows held out
    assert any(line.startswith("held out: 128 tokens from 2 image(s)") and "--eval-tokens 100" in line for line in err)
    for name in ("topk-w8-k2", "relu-w8-k2"):
        final = [json.loads(x) for x in (tmp_path / "run" / name / "metrics.jsonl").read_text().splitlines()]
        final = next(r for r in reversed(final) if r["kind"] == "final")
        row = next(line.split() for line in err if line.startswith(name + " "))
        assert row[3] == f"{final['fvu']:.4f}" and row[6] == f"{final['l0']:.1f}"


def test_log_backends_write_or_explain_what_is_missing(tmp_path, capsys, monkeypatch):
    import sys
    import types

    store = make_store(tmp_path / "s", units=2)
    base = ["train", "--data", str(store.root), "--site", SITE_A, "--arch", "topk", "--width", "8", "--k", "2",
            "--train-steps", "3", "--batch-size", "32", "--eval-tokens", "32", "--log-every", "1", "-q"]
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main([*base, "--log", "tensorboard", "--out", str(tmp_path / "tb")]) == 2
    assert "pip install 'difflens[tensorboard]'" in capsys.readouterr().err
    from difflens.train.config import TrainConfig

    with pytest.raises(DifflensError, match="jsonl, tensorboard, wandb"):  # a config file's [train] log = "nope"
        TrainConfig(log="nope")

    calls = []  # a stand-in wandb records what the trainer sends it

    class Run:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    assert main([*base, "--log", "wandb", "--out", str(tmp_path / "wb")]) == 0
    assert calls[0][0] == "init" and calls[0][1]["name"] == "topk-w8-k2"
    assert calls[0][1]["config"]["training"]["log"] == "wandb" and calls[-1] == ("finish",)
    records = [json.loads(x) for x in (tmp_path / "wb" / "topk-w8-k2" / "metrics.jsonl").read_text().splitlines()]
    logged = [c for c in calls if c[0] == "log"]
    assert len(logged) == len(records)  # every JSONL record also went to wandb, same step and values
    for (_, step, data), rec in zip(logged, records):
        assert step == rec["step"] and data[f"{rec['kind']}/fvu"] == rec["fvu"]
