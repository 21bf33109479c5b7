"""`difflens evaluate`: metrics match a direct computation, held-out selection, reports, errors."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from test_train_fixtures import SITE_A, SITE_B, make_store

from difflens.cli import main
from difflens.errors import DifflensError
from difflens.dictionaries.io import expand_dict_paths
from difflens.evaluate.metrics import ReconAccumulator
from difflens.evaluate.reconstruction import evaluate, load_items
from difflens.train.config import TrainConfig, expand_specs
from difflens.train.trainer import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny layer sweep (two sites) plus a TIDE, trained for a few steps."""
    root = tmp_path_factory.mktemp("eval")
    store = make_store(root / "store")
    specs = expand_specs(
        [{"arch": "topk", "site": [SITE_A, SITE_B]}, {"arch": "tide", "site": SITE_A}], defaults={"width": 16, "k": 2}
    )
    cfg = TrainConfig(steps=6, batch_size=64, lr=1e-2, warmup_steps=0, eval_tokens=128, init_tokens=256, progress=False)
    train(store, specs, cfg, root / "run")
    return store, root / "run", [s.name for s in specs]


def test_metrics_equal_a_direct_computation_on_heldout_rows(trained):
    store, run, names = trained
    items = load_items(expand_dict_paths([str(run)]), store)
    assert [it.name for it in items] == names
    result = evaluate(items, store, show_progress=False)
    meta = store.meta(SITE_A, ["sample_id", "timestep", "step", "index"])
    rows = np.flatnonzero(np.isin(meta["sample_id"], [0, 1]))  # the run's held-out samples
    x = store.read_rows(SITE_A, meta["index"][rows])
    t = torch.from_numpy(meta["timestep"][rows])
    for it, res in zip(items, result["dictionaries"]):
        if it.site != SITE_A:
            continue
        acc = ReconAccumulator()
        with torch.no_grad():
            codes = it.module.encode(x, t)
            acc.update(x, it.module.decode(codes, t), codes, timestep=t, step=torch.from_numpy(meta["step"][rows]))
        want, got = acc.result(), res["metrics"]
        assert got["split"] == "heldout" and got["n"] == len(rows) == 128
        for key in ("fvu", "explained_variance", "mse", "cosine", "l0", "dead_fraction"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
        assert [b["step"] for b in got["by_timestep"]] == [0, 1, 2, 3]
        assert got["dead_window_tokens"] == 128
        assert res["arch"] == it.module.cfg.arch and res["width"] == 16 and res["k"] == 2


def test_cli_writes_json_table_and_plots(trained, tmp_path, capsys):
    store, run, names = trained
    out = tmp_path / "ev" / "eval.json"
    rc = main(["evaluate", "--dict", str(run), "--data", str(store.root), "--out", str(tmp_path / "ev"), "--quiet"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [d["name"] for d in result["dictionaries"]] == names
    printed = capsys.readouterr().out
    for name in names:
        assert name in printed
    assert "FVU" in printed and "dead%" in printed
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert f"| {names[0]} | topk | {SITE_A} | 16 | 2 |" in md and "N = 128" in md
    for png in ("eval_timestep.png", "eval_layer.png"):  # two sites -> a layer plot too
        data = (tmp_path / "ev" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_other_store_uses_all_rows_and_caps_tokens(trained, tmp_path):
    store, run, names = trained
    other = make_store(tmp_path / "other", seed=5, units=2)
    items = load_items([str(run / names[0])], other)
    res = evaluate(items, other, max_tokens=100, show_progress=False)["dictionaries"][0]["metrics"]
    assert res["split"] == "all" and res["n"] == 100
    with pytest.raises(DifflensError, match="no held-out samples"):
        evaluate(items, other, split="heldout", show_progress=False)


def test_site_and_width_mismatch_are_explained(trained, tmp_path):
    store, run, names = trained
    narrow = make_store(tmp_path / "narrow", d=6, units=1)
    with pytest.raises(DifflensError, match="expects d_in=8.*d=6"):
        load_items([str(run / names[0])], narrow)
    elsewhere = make_store(tmp_path / "elsewhere", sites=("other.3:img",), units=1)
    with pytest.raises(DifflensError, match="lacks; its sites are other.3:img"):
        load_items([str(run / names[0])], elsewhere)
    with pytest.raises(DifflensError, match="does not exist"):
        expand_dict_paths([str(tmp_path / "nothing")])


def test_splice_flag(trained, tmp_path, monkeypatch, capsys):
    store, run, _ = trained
    args = ["evaluate", "--dict", str(run), "--data", str(store.root), "--out", str(tmp_path / "e"), "--quiet"]
    assert main([*args, "--splice"]) == 2
    assert "--splice needs --model" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "difflens.evaluate.splice", None)  # as if the module were absent
    assert main([*args, "--splice", "--model", "toy"]) == 2
    assert "splice evaluation isn't available" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def _as_hf_cache(cache, repo_id: str, repo_folder, sha="1" * 40):
    """Lay a folder out the way huggingface_hub's cache does (snapshots/<sha> + refs/main)."""
    import shutil

    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(repo_folder, root / "snapshots" / sha)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)


def test_hub_references_evaluate_like_their_folders(trained, tmp_path, monkeypatch):
    """`--dict hf:ORG/REPO[/SUB]` resolves through the local HF cache (offline) and evaluates exactly
    like the folder it came from, named after the subfolder / repository, not the snapshot hash."""
    import huggingface_hub.constants

    store, run, names = trained
    hub = tmp_path / "hub"
    for n in names[:2]:
        shutil.copytree(run / n, hub / n)
    cache = tmp_path / "hf_cache"
    _as_hf_cache(cache, "org/sweep", hub)
    _as_hf_cache(cache, "org/single", run / names[0])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refs = [f"hf:org/sweep/{names[1]}", "hf:org/single"]
    paths = expand_dict_paths(refs)
    assert all(str(cache) in p for p in paths)
    items = load_items(paths, store)
    assert [i.name for i in items] == [names[1], "single"]
    direct = load_items([str(run / names[1]), str(run / names[0])], store)
    got = evaluate(items, store, show_progress=False)["dictionaries"]
    want = evaluate(direct, store, show_progress=False)["dictionaries"]
    assert [g["metrics"]["fvu"] for g in got] == [w["metrics"]["fvu"] for w in want]
    with pytest.raises(DifflensError, match="not in the local Hugging Face cache"):
        expand_dict_paths(["hf:org/absent"])
    rc = main(["evaluate", "--dict", "hf:org/single", "--data", str(store.root), "--out", str(tmp_path / "ev"), "-q"])
    assert rc == 0 and json.loads((tmp_path / "ev" / "eval.json").read_text())["dictionaries"][0]["name"] == "single"


def test_python_entry_point_takes_folders_runs_and_loaded_dictionaries(trained):
    """`difflens.evaluate.evaluate` (what the examples use) gives the CLI's numbers for folders and run
    folders, and evaluates an in-memory dictionary (no training record) on every row."""
    import difflens
    from difflens.evaluate import evaluate as evaluate_any, text_table

    store, run, names = trained
    reference = evaluate(load_items(expand_dict_paths([str(run)]), store), store, show_progress=False)
    by_run = evaluate_any(run, store.root, show_progress=False)  # a run folder and a store path
    assert [d["name"] for d in by_run["dictionaries"]] == names
    for a, b in zip(reference["dictionaries"], by_run["dictionaries"]):
        assert a["metrics"]["fvu"] == b["metrics"]["fvu"] and b["metrics"]["split"] == "heldout"
    one = evaluate_any({"mine": run / names[0]}, store, show_progress=False)["dictionaries"]
    assert [d["name"] for d in one] == ["mine"] and one[0]["metrics"]["fvu"] == reference["dictionaries"][0]["metrics"]["fvu"]
    loaded = evaluate_any([difflens.load(run / names[0])], store, show_progress=False)["dictionaries"][0]
    assert loaded["metrics"]["split"] == "all" and loaded["metrics"]["n"] > one[0]["metrics"]["n"]
    assert names[0] in text_table(by_run).splitlines()[2]
    with pytest.raises(DifflensError, match="pass a dictionary folder"):
        evaluate_any([42], store)
    with pytest.raises(DifflensError, match="nothing to evaluate"):
        evaluate_any([], store)
