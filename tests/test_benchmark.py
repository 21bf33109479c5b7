"""`difflens benchmark`: each metric on a synthetic case with a known answer, then end to end on a planted store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflens.benchmark.absorption import absorption, hierarchy
from difflens.benchmark.probing import sparse_probe
from difflens.benchmark.spatial import SpatialAccumulator, iou, morans_i
from difflens.world.concepts import CONCEPT_INDEX, CONCEPT_NAMES, TOY_CONCEPTS

HIERARCHY = hierarchy(TOY_CONCEPTS)


def morans_i_reference(x: np.ndarray) -> float:
    """Moran's I straight from its definition, with an explicit rook weight matrix."""
    H, W = x.shape
    v = x.reshape(-1).astype(np.float64)
    N = v.size
    w = np.zeros((N, N))
    for i in range(H):
        for j in range(W):
            for di, dj in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                a, b = i + di, j + dj
                if 0 <= a < H and 0 <= b < W:
                    w[i * W + j, a * W + b] = 1
    z = v - v.mean()
    return float(N / w.sum() * (z @ w @ z) / (z @ z))


def test_morans_i_known_maps():
    checker = np.indices((16, 16)).sum(0) % 2
    assert morans_i(checker) == pytest.approx(-1.0)
    halves = np.zeros((16, 16))
    halves[:, :8] = 1
    # 16 of the 480 adjacent pairs straddle the edge: I = (256/480) * (464 - 16) * 0.25 / 64 = 14/15
    assert morans_i(halves) == pytest.approx(14 / 15)
    rng = np.random.default_rng(0)
    maps = rng.random((3, 6, 7))
    np.testing.assert_allclose(morans_i(maps), [morans_i_reference(m) for m in maps], rtol=1e-10)
    noise = morans_i(rng.random((200, 16, 16)))
    assert abs(noise.mean() + 1 / 255) < 0.01  # E[I] = -1/(N-1) for noise
    assert np.isnan(morans_i(np.ones((4, 4))))


def test_spatial_accumulator_moran_and_localisation():
    T, F = 256, 2
    blob = np.zeros((16, 16), np.float32)
    blob[2:6, 3:8] = 1
    checker = (np.indices((16, 16)).sum(0) % 2).astype(np.float32)
    maps = np.stack([blob.reshape(-1), checker.reshape(-1)], -1)[None]  # [1, T, F]
    concepts = np.zeros((1, T, 2), bool)
    concepts[0, :, 0] = blob.reshape(-1) > 0  # concept 0 = exactly the blob
    concepts[0, :128, 1] = True
    acc = SpatialAccumulator(F, (16, 16), 2)
    acc.add(maps, maps > 0, concepts)
    assert acc.moran()[0] == pytest.approx(morans_i(blob)) and acc.moran()[1] == pytest.approx(-1.0)
    loc = acc.localisation(np.array([0, 1]))
    assert loc[0] == pytest.approx(1.0)
    assert loc[1] == pytest.approx(iou(checker.reshape(1, -1) > 0, concepts[0, :, 1][None])[0])


def _digit_tokens(n_per: int = 60, seed: int = 0):
    """Token rows labelled with one digit each (or background), as concept rows [N, C]."""
    rng = np.random.default_rng(seed)
    digits = HIERARCHY["digit"]
    y = np.zeros((n_per * (len(digits) + 1), len(CONCEPT_NAMES)), bool)
    which = np.repeat(np.arange(len(digits) + 1), n_per)  # last block: background
    for i, c in enumerate(digits):
        y[which == i, CONCEPT_INDEX[c]] = True
    y[which < len(digits), CONCEPT_INDEX["region=object"]] = True
    return y, which, rng


def test_absorption_planted():
    y, which, rng = _digit_tokens()
    seven = HIERARCHY["digit"].index("object=seven")
    digit = which < len(HIERARCHY["digit"])
    noise = rng.random((len(y), 3)) < 0.05
    # absorbing dictionary: latent 0 = "a digit" except on sevens, latent 1 = "seven"
    a = np.concatenate([(digit & (which != seven))[:, None], (which == seven)[:, None], noise], 1)
    r = absorption(a, y, TOY_CONCEPTS)["digit"]
    assert r["parent_latent"] == 0 and r["children"]["object=seven"]["absorption"] == 1.0
    assert r["children"]["object=seven"]["child_latent"] == 1 and r["children"]["object=seven"]["parent_recall"] == 0.0
    assert all(v["absorption"] == 0.0 for c, v in r["children"].items() if c != "object=seven")
    assert r["mean_absorption"] == pytest.approx(1 / len(HIERARCHY["digit"]))
    # the same with a parent latent that fires on every digit: no absorption
    b = a.copy()
    b[:, 0] = digit
    assert absorption(b, y, TOY_CONCEPTS)["digit"]["mean_absorption"] == 0.0
    assert "skipped" in absorption(a, y, TOY_CONCEPTS)["shape"]  # no shape tokens: reported, not guessed


def test_sparse_probe_planted():
    rng = np.random.default_rng(1)
    n = 2000
    y = rng.random(n) < 0.2
    codes = rng.random((n, 20)) * (rng.random((n, 20)) < 0.1)
    codes[:, 7] = y * rng.uniform(1, 2, n)  # latent 7 is the concept
    tr = np.arange(n) < n // 2
    r = sparse_probe(codes[tr], codes[~tr], y[tr], y[~tr], ks=(1, 4))
    assert r[1]["latents"] == [7] and r[1]["f1"] == 1.0 and r[1]["auc"] == 1.0
    codes[:, 7] = rng.random(n)  # no latent knows the concept
    r = sparse_probe(codes[tr], codes[~tr], y[tr], y[~tr], ks=(1,))
    assert abs(r[1]["auc"] - 0.5) < 0.1


def _identity_sae(tmp_path, d, site):
    import difflens.dictionaries.sae  # noqa: F401
    from difflens.dictionaries.config import DictConfig
    from difflens.dictionaries.io import save
    from difflens.dictionaries.sae import TopKSAE

    sae = TopKSAE(DictConfig(arch="topk", d_in=d, width=d, k=2, site=site, normalization="none"))
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.eye(d))
        sae.W_dec_FD.copy_(torch.eye(d))
    save(sae, tmp_path / "sae")
    return tmp_path / "sae"


def test_benchmark_end_to_end_and_without_labels(tmp_path, monkeypatch):
    from test_interpret import D, NEURON, SITE, world_store

    from difflens.cli import main
    from difflens.evaluate.reconstruction import evaluate, load_items
    from difflens.store import Store

    store = world_store(tmp_path / "store", n=24, unit=12)
    sae = _identity_sae(tmp_path, D, SITE)
    out = tmp_path / "bench"
    rc = main(["benchmark", "--dict", str(sae), "--data", str(store), "--out", str(out), "--autointerp", "none",
               "--probe-rows", "3000", "--ks", "1,4", "--concepts", "color=red,region=background,position=top left",
               "--causal-cases", "0"])
    assert rc == 0
    assert main(["benchmark", "--dict", str(sae), "--data", str(store), "--out", str(tmp_path / "x"),
                 "--concepts", "colour=red"]) == 2  # a clean error naming the problem
    res = json.loads((out / "benchmark.json").read_text())
    row = res["dictionaries"][0]
    ref = evaluate(load_items([str(sae)], Store(store)), Store(store), max_tokens=50_000, show_progress=False)
    assert row["fvu"] == ref["dictionaries"][0]["metrics"]["fvu"]  # evaluate's numbers, not a re-definition
    assert [b["name"] for b in res["baselines"]] == ["neurons", "raw"] and res["neuron_site"] == NEURON
    # the planted red latent (dim 0) is read by a 1-latent probe; the neurons (pure noise) are not
    red = row["probe_concepts"]["color=red"]["1"]
    assert red["latents"] == [0] and red["auc"] > 0.95
    assert res["baselines"][0]["probe_concepts"]["color=red"]["1"]["auc"] < 0.75
    assert row["moran_i"] is not None and row["matched_features"] >= 1 and 0 < row["localisation"] <= 1
    for f in ("benchmark.md", "reconstruction.json", "fvu_by_timestep.png", "probing.png"):
        assert (out / f).exists(), f
    assert "probe F1@1" in (out / "benchmark.md").read_text()
    # a real model's store (no labels): reconstruction and Moran's I only, with the reason
    from difflens.interpret.sources import StoreSource

    monkeypatch.setattr(StoreSource, "token_labels", lambda self, sids: None)
    res2 = json.loads(json.dumps(__import__("difflens.benchmark", fromlist=["run_benchmark"]).run_benchmark(
        [sae], store, tmp_path / "bench2", autointerp="oracle", show_progress=False)))
    r2 = res2["dictionaries"][0]
    assert r2["fvu"] == row["fvu"] and r2["moran_i"] == row["moran_i"] and "probe" not in r2 and "autointerp" not in r2
    assert any("no ground-truth labels" in n for n in res2["notes"])
