"""`interpret` takes each dictionary feature's calibration max from a harvest's streamed top-k cache
of it (no calibration pass over the store) and gets the same feature cache and scores; a cache of
other weights, or one that cannot stand for this run, is ignored with a message saying why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflens.cli import main
from difflens.interpret.cache import CacheConfig, FeatureCache
from difflens.interpret.cache_build import build_cache
from difflens.interpret.features import as_feature_source
from difflens.interpret.sources import StoreSource
from difflens.interpret.topk_use import streamed_max
from difflens.store import Store

SITE = "transformer_blocks.1:img"
CACHE = ["--top-n", "3", "--quantiles", "2", "--min-tokens", "2", "--heatmaps", "0"]


def _sae(d, folder, seed):
    from difflens.dictionaries.config import DictConfig
    from difflens.dictionaries.io import save
    from difflens.dictionaries.sae import TopKSAE

    sae = TopKSAE(DictConfig(arch="topk", d_in=d, width=16, k=3, site=SITE, normalization="none"))
    with torch.no_grad():
        sae.W_enc_FD.add_(0.05 * torch.randn(sae.W_enc_FD.shape, generator=torch.Generator().manual_seed(seed)))
    save(sae, folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from difflens.models.toy.adapter import ToyAdapter
    from toy_fixtures import make_tiny_toy

    root = tmp_path_factory.mktemp("topk_use")
    toy = make_tiny_toy(root / "toy")
    d = ToyAdapter.load(folder=toy).site_dim(SITE)
    sae = _sae(d, root / "sae", 0)
    other = _sae(d, root / "other" / "sae", 1)  # same folder name, other weights
    store = root / "store"
    assert main(["harvest", "--model", str(toy), "--num-prompts", "8", "--steps", "2", "--sites", SITE, "--batch-size", "3",
                 "--dict", str(sae), "--topk", "2", "--out", str(store), "-q"]) == 0
    return {"root": root, "sae": sae, "other": other, "store": store, "toy": toy}


def _same(a: FeatureCache, b: FeatureCache):
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        if k in ("threshold", "calib_max"):  # the stream encoded other batches: equal up to float rounding
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for x, y in ((a.top_maps, b.top_maps), (a.quant_maps, b.quant_maps)):
        np.testing.assert_array_equal(x.idx, y.idx)
        np.testing.assert_array_equal(x.val, y.val)
    assert a.info == b.info


def test_streamed_max_replaces_the_calibration_pass(setup):
    fs = as_feature_source(str(setup["sae"]))
    src = StoreSource(Store(setup["store"]), sites=[SITE])
    cfg = CacheConfig(top_n=3, n_quantiles=2, min_tokens=2)
    gmax, note = streamed_max(fs, src, src.sample_ids(), cfg)
    assert gmax is not None and "one store pass saved" in note
    assert int((gmax > 0).sum()) >= 4  # live features: the thresholds are not all the floor
    encoded = []
    real = fs.dictionary.encode

    def counting(x, t=None):
        encoded.append(x.shape[0])
        return real(x, t)

    fs.dictionary.encode = counting  # count the rows this source encodes
    plain = build_cache(fs, src, config=cfg)
    rows_plain = sum(encoded)
    encoded.clear()
    fast = build_cache(fs, src, config=cfg, calibration=gmax)
    assert sum(encoded) < rows_plain  # the calibration pass (every row) was skipped
    _same(plain, fast)
    with pytest.raises(Exception, match="cannot stand"):
        build_cache(fs, src, config=CacheConfig(calib_samples=3), calibration=gmax)


def test_interpret_cache_uses_it_and_says_so(setup, capsys):
    out = setup["root"] / "c"
    assert main(["interpret", "cache", "--dict", str(setup["sae"]), "--data", str(setup["store"]), "--out",
                 str(out / "with"), *CACHE]) == 0
    assert "calibrated from the streamed top-k cache" in capsys.readouterr().err
    assert main(["interpret", "cache", "--dict", str(setup["sae"]), "--data", str(setup["store"]), "--out",
                 str(out / "without"), "--no-topk", *CACHE]) == 0
    assert "top-k" not in capsys.readouterr().err
    _same(FeatureCache.load(out / "with"), FeatureCache.load(out / "without"))
    # a subset calibration cannot come from the stream: said, and the store is encoded
    assert main(["interpret", "cache", "--dict", str(setup["sae"]), "--data", str(setup["store"]), "--out",
                 str(out / "subset"), "--calib-samples", "3", *CACHE]) == 0
    assert "did not use the streamed top-k cache" in capsys.readouterr().err
    # a dictionary of the same name with other weights: the stale cache is ignored, with the reason
    assert main(["interpret", "cache", "--dict", str(setup["other"]), "--data", str(setup["store"]), "--out",
                 str(out / "other"), *CACHE]) == 0
    err = capsys.readouterr().err
    assert "ignored the streamed top-k cache" in err and "other weights" in err
    plain = build_cache(as_feature_source(str(setup["other"])), StoreSource(Store(setup["store"]), sites=[SITE]),
                        config=CacheConfig(top_n=3, n_quantiles=2, min_tokens=2))
    _same(FeatureCache.load(out / "other"), plain)


def test_scored_interpretation_is_the_same_with_the_streamed_cache(setup):
    runs = {}
    for name, extra in (("with", []), ("without", ["--no-topk"])):
        out = setup["root"] / f"run_{name}"
        assert main(["interpret", "--dict", str(setup["sae"]), "--data", str(setup["store"]), "--baselines", "none",
                     "--n-features", "4", "--n-explain", "2", "--n-pos", "2", "--n-neg", "2", "--no-heatmaps",
                     "--out", str(out), *extra, *CACHE[:-2]]) == 0
        runs[name] = out
    notes = json.loads((runs["with"] / "run.json").read_text())["notes"]
    assert any("calibrated from the streamed top-k cache" in n for n in notes)
    a, b = (json.loads((runs[n] / "sae" / "scores.json").read_text()) for n in ("with", "without"))
    assert a["selected"] == b["selected"] and a["results"] == b["results"] and a["summary"] == b["summary"]
    assert any(r["score"] is not None for r in a["results"])  # something was scored


def test_a_store_without_every_token_points_at_its_streamed_cache(setup, capsys):
    store = setup["root"] / "sparse"
    assert main(["harvest", "--model", str(setup["toy"]), "--num-prompts", "3", "--steps", "2", "--sites", SITE,
                 "--tokens-per-image", "4", "--dict", str(setup["sae"]), "--topk", "2", "--out", str(store), "-q"]) == 0
    rc = main(["interpret", "cache", "--dict", str(setup["sae"]), "--data", str(store), "--out", str(setup["root"] / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "full token maps" in err and "streamed top-k cache (sae in" in err
    assert f"--interp {store / 'topk'} --data {store}" in err
