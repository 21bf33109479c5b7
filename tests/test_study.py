"""`difflens study dictionaries`: files, per-bucket table, matched L0, differences, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train_fixtures import SITE_A, make_store

from difflens.cli import main
from difflens.errors import DifflensError
from difflens.evaluate.study import StudyConfig, run_study

K = 2
ARGS = ["--width", "16", "--k", str(K), "--train-steps", "8", "--batch-size", "64", "--eval-every", "4",
        "--eval-tokens", "128", "--init-tokens", "256", "--lr", "1e-3", "--dead-after-tokens", "512", "--quiet"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    store = make_store(root / "store", sites=(SITE_A,))
    out = root / "out"
    rc = main(["study", "dictionaries", "--data", str(store.root), "--site", SITE_A, "--out", str(out), *ARGS])
    assert rc == 0
    return store, out, json.loads((out / "study.json").read_text())


def test_writes_report_files_and_dictionaries(study):
    _, out, s = study
    for name in ("study.json", "study.md", "study.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("topk", "tide", "itda"):
        assert (out / "run" / name / "weights.safetensors").exists()
        d = s["dictionaries"][name]
        assert d["latents"] > 0 and d["stored_floats"] > 0 and d["file_bytes"] > 0 and d["wall_seconds"] > 0 and d["cpu_seconds"] > 0
        assert d["curve"] and [p["step"] for p in d["curve"]] == [1, 2, 4, 8]  # 1, 2: early points before eval_every
    assert s["dictionaries"]["topk"]["latents"] == s["dictionaries"]["tide"]["latents"] == 16
    assert s["command"].startswith("difflens study dictionaries --data ")
    # the recorded command is one the CLI accepts, and it asks for the same run
    import shlex

    from difflens.cli import build_parser

    parsed = build_parser().parse_args(shlex.split(s["command"])[1:])
    assert parsed.train_steps == 8 and parsed.width == 16 and parsed.k == K and parsed.eval_every == 4
    md = (out / "study.md").read_text()
    assert "TIDE − TopK" in md and "Time to a held-out FVU" in md and s["command"] in md


def test_bucket_table_covers_every_recorded_timestep(study):
    store, out, s = study
    steps = sorted(np.unique(store.meta(SITE_A, ["step"])["step"]).tolist())
    rows = s["by_timestep"]
    assert [r["step"] for r in rows] == steps
    for r in rows:
        assert r["tokens"] > 0
        for name in ("topk", "tide", "itda"):
            assert r[f"fvu_{name}"] is not None
    md_rows = [line for line in (out / "study.md").read_text().splitlines() if line.startswith("| ") and "1000.0" in line]
    assert len(md_rows) == 1  # one markdown row per bucket (timestep 1000 is bucket 0)


def test_differences_are_the_difference_of_the_reported_values(study):
    _, _, s = study
    per = {n: {b["step"]: b["fvu"] for b in d["metrics"]["by_timestep"]} for n, d in s["dictionaries"].items()}
    for r in s["by_timestep"]:
        for n in ("topk", "tide", "itda"):
            assert r[f"fvu_{n}"] == per[n][r["step"]]
        assert r["tide_minus_topk"] == pytest.approx(r["fvu_tide"] - r["fvu_topk"], rel=1e-12, abs=1e-15)
        assert r["itda_minus_topk"] == pytest.approx(r["fvu_itda"] - r["fvu_topk"], rel=1e-12, abs=1e-15)


def test_itda_matches_the_sae_l0(study):
    _, _, s = study
    d = s["dictionaries"]
    assert d["topk"]["metrics"]["l0"] == pytest.approx(K)
    assert d["tide"]["metrics"]["l0"] == pytest.approx(K)
    assert 0.75 * K <= d["itda"]["metrics"]["l0"] <= K + 1e-9
    assert d["itda"]["k"] == K


def test_time_to_fvu_is_read_off_the_curves(study):
    _, _, s = study
    d = s["dictionaries"]
    for name in ("topk", "tide", "itda"):  # the trainer's last held-out point is the final evaluation
        assert d[name]["curve"][-1]["fvu"] == pytest.approx(d[name]["metrics"]["fvu"], rel=1e-6)
    first = s["time_to_fvu"][0]
    assert first["target"] == pytest.approx(d["itda"]["metrics"]["fvu"])
    assert first["itda"] is not None  # ITDA reaches its own final FVU at the latest at the end
    for row in s["time_to_fvu"]:
        for name in ("topk", "tide", "itda"):
            hit = row[name]
            reached = [p for p in d[name]["curve"] if p["fvu"] <= row["target"]]
            assert (hit is None) == (not reached)
            if hit is not None:
                assert hit["seconds"] == reached[0]["cpu_seconds"] and hit["tokens"] == reached[0]["tokens"]


def test_clear_errors(study, tmp_path, capsys):
    store, out, _ = study
    base = ["study", "dictionaries", "--data", str(store.root), "--out", str(tmp_path / "o"), *ARGS]
    assert main([*base, "--site", "nope:img"]) == 2
    err = capsys.readouterr().err
    assert "'nope:img' is not in the store" in err and SITE_A in err
    assert main([*base, "--site", SITE_A, "--batch-size", "4096"]) == 2
    assert "too small" in capsys.readouterr().err
    assert main(["study", "dictionaries", "--data", str(tmp_path / "missing"), "--site", SITE_A, "--out", str(out)]) == 2
    assert "no activation store" in capsys.readouterr().err
    with pytest.raises(DifflensError, match="already holds a study"):
        run_study(store.root, StudyConfig(site=SITE_A, width=16, k=K, steps=2, batch_size=64, eval_tokens=128,
                                          init_tokens=256, progress=False), out)
    with pytest.raises(DifflensError, match="larger than width"):
        run_study(store.root, StudyConfig(site=SITE_A, width=4, k=8, progress=False), tmp_path / "o2")
