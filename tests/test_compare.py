"""`difflens compare`: similarity measures on cases with known answers, and the verb end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from difflens.cli import main
from difflens.compare import CompareConfig, compare, jaccard, linear_cka, svcca
from difflens.errors import DifflensError
from difflens.store import Store, StoreWriter

D, SAMPLES, STEPS, TOKENS = 16, 48, 3, 16


def test_measures_on_known_cases():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(40, 2))
    assert jaccard(ids, ids[::-1]) == 1.0  # a set: order does not matter
    assert jaccard(ids, ids + 1000) == 0.0  # disjoint
    assert jaccard([[1, 2], [3, 4]], [[1, 2], [5, 6]]) == pytest.approx(1 / 3)
    x = rng.normal(size=(500, 12)) @ np.diag(np.linspace(0.2, 3, 12))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-9)  # rotation and scale: identical
    assert svcca(x, x @ q + 5.0) == pytest.approx(1.0, abs=1e-9)
    y = rng.normal(size=(500, 12))
    assert linear_cka(x, y) < 0.1 and svcca(x, y) < 0.2  # independent: near 0
    assert linear_cka(x, x[:, :6]) < 1.0  # half the space: in between
    with pytest.raises(DifflensError, match="paired rows"):
        linear_cka(x, y[:10])


def _store(path, seed=0):
    """Sites: a; a_rot (a rotated and scaled); indep (independent data). Step 1 repeats step 0 exactly."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(24, D))
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    sites = {"a:img": D, "a_rot:img": D, "indep:img": D}
    w = StoreWriter.open(path, model="toy", sites=sites, dtype="fp32", harvest_config={"synthetic": seed})
    for u in range(2):
        sid, step, tok = np.meshgrid(np.arange(SAMPLES // 2) + u * SAMPLES // 2, np.arange(STEPS), np.arange(TOKENS),
                                     indexing="ij")
        sid, step, tok = sid.ravel(), step.ravel(), tok.ravel()
        n = len(sid)
        meta = {"sample_id": sid.astype(np.int64), "prompt_id": sid.astype(np.int64), "seed": sid.astype(np.int64),
                "step": step.astype(np.int32), "timestep": (1000.0 - 300 * step).astype(np.float32),
                "token": tok.astype(np.int32), "h": (tok // 4).astype(np.int16), "w": (tok % 4).astype(np.int16),
                "stream": np.zeros(n, np.int8)}

        def sparse():
            return (rng.exponential(size=(n, 24)) * (rng.random((n, 24)) < 0.12)) @ dirs

        a = sparse()
        a[step == 1] = a[step == 0]  # the same image token, unchanged from step 0 to step 1
        rows = {"a:img": a, "a_rot:img": 2.5 * a @ q, "indep:img": sparse()}
        w.write_unit(f"u{u:03d}", {s: (v.astype(np.float32), meta) for s, v in rows.items()})
    w.finalize()
    return Store(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("cmp") / "store")


def _cfg(**kw):
    return CompareConfig(**({"axis": "sites", "sites": ["a:img", "a_rot:img", "indep:img"], "k": 3, "tau": 0.3,
                             "tokens": 1200, "metric_rows": 400, "batch_size": 256} | kw))


def test_across_sites_identical_rotated_and_independent(store):
    r = compare([store], _cfg(), progress=False)
    J, C, S = (np.asarray(r[m]) for m in ("jaccard", "cka", "svcca"))
    assert r["labels"] == ["a:img", "a_rot:img", "indep:img"]
    assert all(g["atoms"] > 10 for g in r["groups"])
    # a rotated, rescaled copy: ITDA's pursuit only sees inner products, so the same atoms
    assert J[0, 1] == pytest.approx(1.0) and C[0, 1] == pytest.approx(1.0, abs=1e-6) and S[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert J[0, 2] < 0.25 and C[0, 2] < 0.2  # independent data: chance-level overlap only
    assert np.allclose(J, J.T) and np.allclose(np.diag(J), 1)


def test_across_steps_pairs_the_same_token(store):
    r = compare([store], _cfg(axis="steps", sites=["a:img"]), progress=False)
    assert r["labels"] == ["step 0", "step 1", "step 2"] and r["atom_id_fields"] == ["sample_id", "token"]
    J = np.asarray(r["jaccard"])
    assert J[0, 1] == pytest.approx(1.0)  # step 1 repeats step 0
    assert J[0, 2] < 0.25


def test_across_stores_and_the_verb(store, tmp_path):
    other = _store(tmp_path / "other", seed=0)  # the same harvest again: identical dictionaries
    out = tmp_path / "out"
    args = ["compare", "--data", str(store.root), "--data", str(other.root), "--across", "stores", "--sites", "a:img",
            "--k", "3", "--tokens", "1200", "--metric-rows", "400", "--out", str(out), "-q"]
    assert main(args) == 0
    r = json.loads((out / "compare.json").read_text())
    assert np.asarray(r["jaccard"])[0, 1] == pytest.approx(1.0)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Jaccard" in (out / "compare.md").read_text()
    assert main(args) == 2  # refuses to overwrite


def test_clear_errors(store, tmp_path, capsys):
    with pytest.raises(DifflensError, match="not in the store"):
        compare([store], _cfg(sites=["a:img", "nope:img"]), progress=False)
    with pytest.raises(DifflensError, match="exactly one site"):
        compare([store], _cfg(axis="steps"), progress=False)
    with pytest.raises(DifflensError, match="not recorded"):
        compare([store], _cfg(axis="steps", sites=["a:img"], steps=[0, 7]), progress=False)
    assert main(["compare", "--data", str(tmp_path / "none"), "--across", "sites", "--sites", "a:img,b:img",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no activation store" in capsys.readouterr().err
