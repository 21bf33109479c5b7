"""Feature cache (vs brute force), overlays, the toy-world oracle, score arithmetic, pipeline and CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflens.interpret.cache import CacheConfig, FeatureCache, SparseMaps
from difflens.interpret.cache_build import build_cache
from difflens.world.concepts import CONCEPT_INDEX, concept_matrix, concepts_in_text
from difflens.interpret.features import DictionaryFeatures, NeuronFeatures, RandomDirections
from difflens.interpret.heatmap import OVERLAY_RGB, overlay, upsample_map
from difflens.interpret.oracle import OracleExplainer, OracleJudge
from difflens.interpret.scoring import Truth, build_tasks, feature_score, score_features
from difflens.interpret.sources import StoreSource
from difflens.store import Store, StoreWriter
from difflens.world.labels import image_concepts, token_label_masks
from difflens.world.scene import ObjectSpec, SceneSpec, render, sample_scene

SITE = "blk.1:img"
NEURON = "blk.1.ff.net.0:img"
TIMESTEPS = (1000.0, 500.0)
D, DN, T = 16, 6, 256
NOISE = tuple(range(3, D))  # planted dims 0-2, then pure noise


def _png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def planted_acts(cm_TC: np.ndarray, step: int, rng) -> np.ndarray:
    """dim 0 = red-object tokens (stronger late), 1 = background tokens, 2 = top-left object, 3.. = noise."""
    x = np.zeros((T, D), np.float32)
    x[:, 0] = cm_TC[:, CONCEPT_INDEX["color=red"]] * (1.0 + 0.5 * step)
    x[:, 1] = cm_TC[:, CONCEPT_INDEX["region=background"]]
    x[:, 2] = cm_TC[:, CONCEPT_INDEX["position=top left"]]
    x[:, 3:] = rng.random((T, D - 3))
    return x


def sparse_acts(cm_TC: np.ndarray, step: int, rng) -> np.ndarray:
    """Sparse non-negative noise whose density varies per image, so some images do not qualify."""
    dens = rng.choice([0.004, 0.06], size=D)
    return (rng.random((T, D)) < dens) * rng.random((T, D)).astype(np.float32) * (1 + step)


def world_store(path, n: int = 40, acts_fn=planted_acts, seed: int = 0, unit: int = 10):
    """A store of toy-world scenes (every token, 2 steps) with planted activations and real labels."""
    rng = np.random.default_rng(seed)
    w = StoreWriter.open(path, model="toy", sites={SITE: D, NEURON: DN}, dtype="fp32", harvest_config={"synthetic": 1})
    for u in range(0, n, unit):
        cols = {s: {k: [] for k in ("sample_id", "prompt_id", "seed", "step", "timestep", "token", "h", "w", "stream", "labels")}
                for s in (SITE, NEURON)}
        acts = {SITE: [], NEURON: []}
        samples, images, labels = [], {}, {}
        for i in range(u, min(n, u + unit)):
            color = ("red", "blue", "green")[i % 3]
            scene = sample_scene(rng, SceneSpec(objects=(ObjectSpec(color=color),)))
            r = render(scene)
            lab = token_label_masks(r)
            labels[i] = (lab, concept_matrix(lab))
            samples.append({"sample_id": i, "prompt_id": i, "prompt": f"a {color} object", "seed": 0,
                            "scene": scene.to_dict(), "concepts": image_concepts(r), "token_labels": [int(x) for x in lab]})
            images[i] = _png(r.image)
        for step, t in enumerate(TIMESTEPS):  # step-major, as the harvester writes
            for i in range(u, min(n, u + unit)):
                lab, cm = labels[i]
                site_x = {SITE: acts_fn(cm, step, rng), NEURON: np.maximum(rng.normal(size=(T, DN)), 0).astype(np.float32)}
                for s in (SITE, NEURON):
                    c = cols[s]
                    c["sample_id"].append(np.full(T, i))
                    c["prompt_id"].append(np.full(T, i))
                    c["seed"].append(np.zeros(T, int))
                    c["step"].append(np.full(T, step))
                    c["timestep"].append(np.full(T, t))
                    c["token"].append(np.arange(T))
                    c["h"].append(np.arange(T) // 16)
                    c["w"].append(np.arange(T) % 16)
                    c["stream"].append(np.zeros(T, int))
                    c["labels"].append(lab)
                    acts[s].append(site_x[s])
        rows = {s: (np.concatenate(acts[s]), {k: np.concatenate(v) for k, v in cols[s].items()}) for s in (SITE, NEURON)}
        w.write_unit(f"u{u:04d}", rows, samples=samples, images=images)
    w.finalize()
    return path


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    return world_store(tmp_path_factory.mktemp("interp") / "planted", n=48)


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory):
    return world_store(tmp_path_factory.mktemp("interp") / "sparse", n=16, acts_fn=sparse_acts, seed=3, unit=8)


def dense_acts(store_path, site=SITE):
    """Brute force: X [n, S, T, d] by (sample, step, token) straight from the store."""
    st = Store(store_path)
    m = st.meta(site)
    x = st.read_rows(site, np.arange(st.num_rows(site))).numpy()
    sids = np.unique(m["sample_id"])
    X = np.zeros((len(sids), len(TIMESTEPS), T, x.shape[1]), np.float32)
    X[np.searchsorted(sids, m["sample_id"]), m["step"], m["token"]] = x
    return sids, X


# ---- cache vs brute force ---------------------------------------------------------------------------


def test_cache_matches_brute_force(sparse_store, tmp_path):
    cfg = CacheConfig(top_n=3, n_quantiles=4, min_tokens=6, rel_threshold=0.1, rows_per_batch=700)
    src = StoreSource(sparse_store, sites=[SITE])
    cache = build_cache(NeuronFeatures(SITE, D), src, config=cfg, out=tmp_path / "c")
    sids, X = dense_acts(sparse_store)
    assert np.array_equal(cache.sample_ids, sids)
    thr = np.maximum(0.0, 0.1 * X.max((0, 1, 2)))
    np.testing.assert_allclose(cache["threshold"], thr, rtol=1e-6)
    np.testing.assert_allclose(cache["frequency"], (X > 0).mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(cache["profile_mean"], X.mean((0, 2)).T, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cache["profile_max"], X.max(2).mean(0).T, rtol=1e-5, atol=1e-7)
    assert (cache["hist_counts"].sum(1) == (X > 0).sum((0, 1, 2))).all()
    split = cache.split
    stepmax = X.max(2)  # [n, S, d]
    qual = (X > thr).sum(2) >= 6  # [n, S, d]
    assert qual.any() and not qual.all(), "fixture must have qualifying and non-qualifying images"
    score = np.where(qual, stepmax, -np.inf).max(1)  # [n, d]
    for f in range(D):
        for k in (0, 1):
            cand = [i for i in range(len(sids)) if split[i] == k and np.isfinite(score[i, f])]
            cand.sort(key=lambda i: -score[i, f])
            want = [int(sids[i]) for i in cand[:3]]
            got = [e.sample_id for e in cache.top_examples(f, k)]
            assert got == want, (f, k)
            for e in cache.top_examples(f, k):
                i = int(np.searchsorted(sids, e.sample_id))
                assert e.value == pytest.approx(score[i, f])
                assert qual[i, e.step, f] and stepmax[i, e.step, f] == pytest.approx(e.value)
                np.testing.assert_array_equal(e.maps_ST, X[i, :, :, f])  # full token map at every step
        for e in cache.quantile_examples(f):
            i = int(np.searchsorted(sids, e.sample_id))
            assert X[i, :, :, f].max() == pytest.approx(e.value) and e.value > thr[f]
            np.testing.assert_array_equal(e.maps_ST, X[i, :, :, f])
    # concept statistics (oracle input) for feature 0 on the explain split, step 1
    lab = np.stack([np.asarray(src.record(int(s))["token_labels"]) for s in sids])
    cm = concept_matrix(lab)  # [n, T, C]
    a = X[:, 1, :, 0] > thr[0]
    rows = split == 0
    np.testing.assert_allclose(cache["concept_tp"][0, 1, 0], (a[rows][..., None] & cm[rows]).sum((0, 1)))
    np.testing.assert_allclose(cache["concept_active"][1, 0, 3], (X[~rows, 0, :, 3] > thr[3]).sum())
    # dense features (random directions) take the other, matrix-product path
    rd = RandomDirections(SITE, D, 3, seed=1)
    dense = build_cache(rd, src, config=CacheConfig(top_n=1, n_quantiles=0), map_features=[])
    P = X @ rd.W_FD.numpy().T  # [n, S, T, 3]
    ad = P[:, 1, :, 2] > dense["threshold"][2]
    assert 0.05 < ad.mean() < 0.95
    np.testing.assert_allclose(dense["concept_tp"][0, 1, 2], (ad[rows][..., None] & cm[rows]).sum((0, 1)))
    np.testing.assert_allclose(dense["concept_count"][1, 0], cm[~rows].sum((0, 1)))
    # maps are stored sparsely and survive a save/load round trip
    assert cache.top_maps.nnz < np.prod(cache.top_maps.shape)
    back = FeatureCache.load(tmp_path / "c")
    for k, v in cache.arrays.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert back.top_maps.shape == cache.top_maps.shape
    np.testing.assert_array_equal(back.top_maps.get(2, 1), cache.top_maps.get(2, 1))
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["source"]["kind"] == "neurons"


def test_sparse_maps_put_get():
    sm = SparseMaps((2, 3, 4))
    a = np.array([0, 1.5, 0, -2], np.float32)
    sm.put((1, 2), a)
    sm.put((0, 0), np.array([3, 0, 0, 0], np.float32))
    sm.finish()
    assert sm.nnz == 3
    np.testing.assert_array_equal(sm.get(1, 2), a)
    np.testing.assert_array_equal(sm.get(1)[2], a)
    assert sm.get(0, 0)[0] == 3 and not sm.get(0, 1).any()


def test_full_token_maps_required(tmp_path):
    w = StoreWriter.open(tmp_path / "s", model="toy", sites={SITE: 2}, dtype="fp32", harvest_config={})
    n = 5
    meta = {"sample_id": np.zeros(n, int), "prompt_id": np.zeros(n, int), "seed": np.zeros(n, int),
            "step": np.zeros(n, int), "timestep": np.full(n, 1000.0), "token": np.arange(n) * 3,
            "h": (np.arange(n) * 3) // 16, "w": (np.arange(n) * 3) % 16, "stream": np.zeros(n, int)}
    w.write_unit("u0", {SITE: (np.ones((n, 2), np.float32), meta)})
    from difflens.errors import DifflensError

    with pytest.raises(DifflensError, match="tokens-per-image"):
        StoreSource(tmp_path / "s")


def test_feature_sources_encode():
    x = torch.randn(7, D)
    c = torch.randn(D)
    r1 = RandomDirections(SITE, D, 5, seed=4, center=c)
    r2 = RandomDirections(SITE, D, 5, seed=4, center=c)
    W = r1.decoder_directions().numpy()
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(r1(x).numpy(), (x - c).numpy() @ W.T, rtol=1e-5, atol=1e-6)
    assert torch.equal(r1(x), r2(x))
    assert not torch.equal(r1.W_FD, RandomDirections(SITE, D, 5, seed=5).W_FD)


@pytest.mark.parametrize("arch", ["jumprelu", "matryoshka", "relu", "batchtopk"])
def test_every_sae_flavour_is_reported_as_an_sae(arch):
    from difflens.dictionaries import build
    from difflens.dictionaries.config import DictConfig

    d = build(DictConfig(arch=arch, d_in=D, width=16, k=2, site=SITE, normalization="none"))
    fs = DictionaryFeatures(d)
    assert (fs.name, fs.kind, fs.details["arch"]) == (arch, "sae", arch)
    assert fs(torch.randn(5, D)).shape == (5, 16)


def test_cache_passes_replay_sparse_codes_bit_identically(sparse_store, monkeypatch):
    """A pass over the same images as the previous one replays its sparse codes instead of encoding
    again (calibrate -> statistics -> token maps of every image: one encode of each batch); the
    cache is identical to encoding in every pass, and dense codes are never kept."""
    from difflens.interpret import cache_passes

    calls = []

    class Counting(NeuronFeatures):
        def __call__(self, x_ND, t_N=None):
            calls.append(x_ND.shape[0])
            return super().__call__(x_ND, t_N)

    cfg = CacheConfig(top_n=8, n_quantiles=8, min_tokens=1, rel_threshold=0.01, rows_per_batch=700)
    src = StoreSource(sparse_store, sites=[SITE])
    replayed = build_cache(Counting(SITE, D), src, config=cfg)
    n_batches = len(calls)
    monkeypatch.setattr(cache_passes, "_pack", lambda codes, room: None)  # as before: nothing kept
    calls.clear()
    encoded = build_cache(Counting(SITE, D), src, config=cfg)
    assert n_batches >= 2 and len(calls) >= 2 * n_batches  # statistics (and token maps) encoded again
    for k in encoded.arrays:
        np.testing.assert_array_equal(replayed[k], encoded[k], err_msg=k)
    f = int(encoded.map_features[0])
    for a, b in zip(replayed.top_examples(f), encoded.top_examples(f)):
        assert a.sample_id == b.sample_id and np.array_equal(a.maps_ST, b.maps_ST)
    monkeypatch.undo()
    dense = torch.rand(2, 2, 3, 4) + 0.1
    assert cache_passes._pack(dense, 10**9) is None  # dense: re-encoding is cheaper than keeping
    sparse = torch.zeros(2, 2, 3, 16)
    sparse[1, 0, 2, 5], sparse[0, 1, 0, 15] = 3.0, -1.5
    assert torch.equal(cache_passes._unpack(cache_passes._pack(sparse, 10)), sparse)
    assert cache_passes._pack(sparse, 1) is None  # over the room left


@pytest.mark.parametrize("arch", ["topk", "tide", "itda"])
def test_cache_works_for_dictionaries(arch, sparse_store):
    import difflens.dictionaries.itda  # noqa: F401  (registers the architectures)
    import difflens.dictionaries.sae  # noqa: F401
    import difflens.dictionaries.temporal  # noqa: F401
    from difflens.dictionaries.base import ARCHITECTURES
    from difflens.dictionaries.config import DictConfig

    sids, X = dense_acts(sparse_store)
    flat = torch.from_numpy(X.reshape(-1, D))
    t = torch.tensor(TIMESTEPS).repeat_interleave(T).repeat(len(sids))
    cfg = DictConfig(arch=arch, d_in=D, width=12 if arch != "itda" else 3000, k=2, site=SITE, normalization="none")
    d = ARCHITECTURES[arch](cfg)
    if arch == "itda":
        d.partial_fit(flat[:3000], t[:3000])
    else:
        d.init_from_data(flat, t)
    fs = DictionaryFeatures(d, name=arch)
    assert fs.kind == {"topk": "sae", "tide": "tide", "itda": "itda"}[arch] == fs.describe()["kind"]
    cache = build_cache(fs, StoreSource(sparse_store, sites=[SITE]), config=CacheConfig(top_n=2, n_quantiles=2, min_tokens=2))
    codes = d.encode(flat, t).detach().numpy().reshape(len(sids), len(TIMESTEPS), T, -1)
    np.testing.assert_allclose(cache["frequency"], (codes > 0).mean((0, 1, 2)), rtol=1e-5)
    f = next(int(f) for f in cache.map_features if cache["top_sample"][f, :, 0].max() >= 0)
    e = cache.top_examples(f)[0]
    np.testing.assert_allclose(e.maps_ST, codes[int(np.searchsorted(sids, e.sample_id)), :, :, f], rtol=1e-4, atol=1e-5)


# ---- overlays ------------------------------------------------------------------------------------------


def test_overlay_pixels_of_a_known_map():
    img = np.full((4, 4, 3), 100, np.uint8)
    m = np.array([0.0, 1.0, 0.25, -1.0])  # 2x2 token grid, each token a 2x2 pixel patch
    out = overlay(img, m, (2, 2), vmax=1.0, alpha_max=0.8)
    c = np.array(OVERLAY_RGB, float)
    assert (out[:2, :2] == 100).all()  # zero activation: untouched
    assert (out[2:, 2:] == 100).all()  # negative activation: untouched
    np.testing.assert_array_equal(out[0, 2], np.rint(0.2 * 100 + 0.8 * c))  # alpha = 0.8 * sqrt(1)
    np.testing.assert_array_equal(out[3, 1], np.rint(0.6 * 100 + 0.4 * c))  # alpha = 0.8 * sqrt(0.25)
    # default vmax = the map's own max; a map that never fires leaves the image alone
    np.testing.assert_array_equal(overlay(img, m * 3, (2, 2), alpha_max=0.8), out)
    assert (overlay(img, np.zeros(4), (2, 2)) == img).all()
    assert upsample_map(np.arange(4), (2, 2), (4, 4))[3, 3] == 3


# ---- scoring and the oracle ----------------------------------------------------------------------------


def test_score_arithmetic():
    assert feature_score([1, 1, 1], [0, 0]) == 1.0
    assert feature_score([0, 0], [1, 1]) == 0.0
    assert feature_score([1, 0.5, None], [0.5, 0]) == pytest.approx(0.5 * (0.75 + 0.75))
    assert feature_score([0.7] * 5, [0.7] * 5) == pytest.approx(0.5)
    assert feature_score([None], [0.0]) is None and feature_score([1.0], []) is None


def test_calibrated_score_and_control_items(planted_cache):
    from difflens.interpret.scoring import calibrated_score, control_items

    assert calibrated_score(1.0, 0.8) == 1.0 and calibrated_score(0.8, 0.8) == 0.5
    assert calibrated_score(0.7, 0.5) == pytest.approx(0.7)  # chance 0.5: unchanged
    assert calibrated_score(0.6, 0.8) == pytest.approx(0.0) and calibrated_score(0.99, 0.97) is None
    assert calibrated_score(None, 0.5) is None and calibrated_score(0.5, None) is None
    src, cache, fs = planted_cache
    (t,), _ = build_tasks(cache, [0], seed=1, feature_fn=fs, source=src)
    every = control_items(t, "all")
    assert len(every) == 100 and sum(it.positive for it in every) == 50
    for k, it in enumerate(every):  # map of item k // 10 over the image of item k % 10
        m, img = t.test[k // 10].example, t.test[k % 10].example
        assert it.example.maps_ST is m.maps_ST and it.example.sample_id == img.sample_id
        assert it.positive == t.test[k // 10].positive
    two = control_items(t, 2, seed=3)
    assert len(two) == 20 and all(it.example.sample_id != t.test[i // 2].example.sample_id for i, it in enumerate(two))


def random_acts(cm_TC: np.ndarray, step: int, rng) -> np.ndarray:
    """Planted random features: dims 0-7 sparse (a 5x5 blob on half the images, silent elsewhere), 8-15 dense."""
    x = np.zeros((T, D), np.float32)
    for f in range(D // 2):
        if rng.random() < 0.5:
            r, c = rng.integers(0, 12, 2)
            g = np.zeros((16, 16), np.float32)
            g[r : r + 5, c : c + 5] = rng.uniform(0.5, 1.5)
            x[:, f] = g.reshape(-1)
    x[:, D // 2 :] = rng.random((T, D - D // 2))
    return x


class FixedExplainer:
    """Names the same concept for every feature: an explanation unrelated to the feature by construction."""

    def __init__(self, concept, level="token"):
        self.concept, self.level = concept, level

    def explain_many(self, cache, tasks):
        from difflens.world.concepts import explanation_text
        from difflens.interpret.scoring import Explanation

        return {t.feature: Explanation(explanation_text(self.concept, self.level), concept=self.concept, level=self.level)
                for t in tasks}


def test_chance_is_half_for_sparse_and_dense_random_features(tmp_path):
    """Issue 20: before the correction a sparse feature silent on its negatives scored above 0.5
    with any token-level explanation (0.9 with "background"); the calibrated score is 0.5 for both."""
    path = world_store(tmp_path / "random", n=48, acts_fn=random_acts, seed=5, unit=16)
    src = StoreSource(path, sites=[SITE])
    fs = NeuronFeatures(SITE, D, name="random-planted")
    cache = build_cache(fs, src, config=CacheConfig(top_n=5, n_quantiles=0))
    truth = Truth(src)
    judge = OracleJudge(truth)
    tasks, skipped = build_tasks(cache, range(D), seed=0, feature_fn=fs, source=src)
    assert len(tasks) == D, skipped
    raw, cal = {"sparse": [], "dense": []}, {"sparse": [], "dense": []}
    silent = []
    concepts = ("region=background", "region=object", "bgcolor=black", "bgcolor=gray", "color=red", "size=large",
                "position=center", "object=circle")
    for c in concepts:
        for r in score_features(cache, tasks, FixedExplainer(c), judge, truth=truth):
            kind = "sparse" if r["feature"] < D // 2 else "dense"
            if kind == "sparse":  # mostly silent on negatives: the raw score's free 1 - s = 1
                silent += [s == 0.0 for s in r["s_neg"]]
            raw[kind].append(r["raw_score"])
            if r["score"] is not None:
                cal[kind].append(r["score"])
            if c == "region=background" and kind == "sparse":
                assert r["raw_score"] > 0.8  # the bias being corrected
    assert np.mean(silent) > 0.8
    assert np.mean(raw["sparse"]) > 0.6 and abs(np.mean(raw["dense"]) - 0.5) < 0.03
    assert len(cal["sparse"]) >= 0.8 * len(raw["sparse"])
    assert abs(np.mean(cal["sparse"]) - 0.5) < 0.08, np.mean(cal["sparse"])
    assert abs(np.mean(cal["dense"]) - 0.5) < 0.03, np.mean(cal["dense"])
    # the same holds for the oracle's own choice of explanation and at image level
    res = score_features(cache, tasks, OracleExplainer(truth, token_preference=0.0), judge, truth=truth)
    assert abs(np.mean([r["score"] for r in res if r["score"] is not None]) - 0.5) < 0.08
    res = score_features(cache, tasks, FixedExplainer("color=red", "image"), judge, truth=truth)
    assert all(r["chance"] == pytest.approx(0.5) and r["score"] == pytest.approx(r["raw_score"]) for r in res)


def test_vlm_protocol_chance_with_one_control_per_item(planted_cache):
    """A judge that ignores the explanation and only reacts to whether anything is highlighted (what a
    VLM does with an empty overlay) earns a raw 0.8 on a sparse feature silent on its negatives; with
    one control per test item (the VLM default) its chance is 0.8 too, so the score is 0.5."""
    src, cache, fs = planted_cache
    seen = []

    class Blind:
        def judge_many(self, cache, tasks, explanations):
            out = {}
            for t in tasks:
                seen.extend(it.example for it in t.test)
                out[t.feature] = [0.6 if (it.example.map > it.example.threshold).any() else 0.0 for it in t.test]
            return out

    tasks, _ = build_tasks(cache, [0], seed=1, feature_fn=fs, source=src)  # the sparse red feature
    (r,) = score_features(cache, tasks, FixedExplainer("color=red"), Blind(), chance=1)
    assert r["raw_score"] == pytest.approx(0.8) and r["chance"] == pytest.approx(0.8) and r["score"] == pytest.approx(0.5)
    assert r["chance_controls"] == {"per_item": 1, "n": 10, "failures": 0} and len(seen) == 20


def test_statistics_are_scipys():
    from difflens.interpret.report import bootstrap_diff, mann_whitney, mean_ci

    a = np.array([0.9, 0.8, 0.85, 0.7, 0.95, 0.6, 0.8])
    b = np.array([0.5, 0.55, 0.4, 0.6, 0.5, 0.45])
    u, p = mann_whitney(a, b)
    # independent: U = number of (a, b) pairs with a > b (+ half the ties), normal approximation
    u_ref = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    assert u == u_ref and 0 < p < 0.01
    d, lo, hi = bootstrap_diff(a, b)
    assert d == pytest.approx(a.mean() - b.mean()) and lo < d < hi and lo > 0
    lo, hi = mean_ci(a)
    assert lo < a.mean() < hi and hi - lo < 0.2 and mean_ci([1.0]) is None and mean_ci([0.5, 0.5]) == (0.5, 0.5)


def test_concepts_in_text():
    assert set(concepts_in_text("A red circle in the top left")) == {"color=red", "object=circle", "position=top left"}
    assert concepts_in_text("the digit 7") == ["object=seven"]
    assert set(concepts_in_text("striped navy background")) == {"bg=stripes", "bgcolor=navy"}
    assert concepts_in_text("something vague") == []


@pytest.fixture(scope="module")
def planted_cache(planted_store):
    src = StoreSource(planted_store, sites=[SITE])
    fs = NeuronFeatures(SITE, D, name="planted")
    return src, build_cache(fs, src, config=CacheConfig(top_n=5, n_quantiles=3)), fs


def test_oracle_names_planted_concepts_and_random_scores_half(planted_cache):
    src, cache, fs = planted_cache
    truth = Truth(src)
    feats = [0, 1, *NOISE]
    tasks, skipped = build_tasks(cache, feats, seed=1, feature_fn=fs, source=src)
    assert sorted(t.feature for t in tasks) == feats, skipped
    sids, X = dense_acts(planted_store_path(src))
    for t in tasks:  # protocol: explain split / held-out positives / top images of other features
        assert all(e.split == 0 for e in t.explain) and all(it.example.split == 1 for it in t.test)
        neg = [it for it in t.test if not it.positive]
        assert len(neg) == 5 and all(it.from_feature != t.feature for it in neg)
        assert len({it.example.sample_id for it in t.test}) == 10
        for it in neg:  # shown with the evaluated feature's own activation on that image
            assert it.example.feature == t.feature
            np.testing.assert_array_equal(it.example.maps_ST, X[int(np.searchsorted(sids, it.example.sample_id)), :, :, t.feature])
            assert it.example.sample_id in [e.sample_id for e in cache.top_examples(it.from_feature, 1)]
    res = {r["feature"]: r for r in score_features(cache, tasks, OracleExplainer(truth), OracleJudge(truth), truth=truth)}
    red = res[0]
    assert (red["concept"], red["level"]) == ("color=red", "token")
    assert red["s_pos"] == [1.0] * 5 and red["localisation"] == pytest.approx(1.0)
    # negatives are other features' top images on which the red feature does not fire: no red
    has_red = [truth.image(it["sample_id"])[CONCEPT_INDEX["color=red"]] for it in red["test"] if not it["positive"]]
    assert not any(has_red) and red["s_neg"] == [0.0] * 5 and red["score"] == 1.0 and red["raw_score"] == 1.0
    assert 0.5 <= red["chance"] < 0.8  # its maps over other images hit red tokens only by accident
    assert red["explanation_meta"]["best_step"] in (0, 1)
    noise = [res[f]["score"] for f in NOISE]
    assert abs(np.mean(noise) - 0.5) < 0.1, noise
    # background is named and localised exactly, but it fires on the background of *every* image,
    # negatives included, so the protocol cannot tell its images apart: chance
    assert res[1]["concept"] == "region=background" and res[1]["localisation"] == pytest.approx(1.0)
    assert res[1]["raw_score"] == pytest.approx(0.5) and res[1]["score"] == pytest.approx(0.5, abs=0.05)
    # the "top images only" oracle (what a VLM sees) also finds the planted concept
    top = score_features(cache, tasks[:1], OracleExplainer(truth, evidence="top"), OracleJudge(truth), truth=truth)[0]
    assert top["concept"] == "color=red" and top["score"] == 1.0
    # showing the other features' own maps on the negatives instead: a feature that fires on every
    # image (background) then looks better than chance, which is why "feature" is the default
    other, _ = build_tasks(cache, feats, seed=1, negative_overlay="other")
    assert all(it.example.feature == it.from_feature for t in other for it in t.test)
    res_o = {r["feature"]: r for r in score_features(cache, other, OracleExplainer(truth), OracleJudge(truth), truth=truth)}
    assert res_o[0]["score"] == 1.0 and res_o[1]["raw_score"] > 0.55


def planted_store_path(src):
    return src.store.root


def test_oracle_judge_is_graded_by_location(planted_cache):
    src, cache, _ = planted_cache
    truth = Truth(src)
    from difflens.interpret.scoring import Explanation

    e = cache.top_examples(0, 1)[0]  # a red object's map
    judge = OracleJudge(truth)
    assert judge.judge(Explanation("x", concept="color=red", level="token"), e) == 1.0
    assert judge.judge(Explanation("x", concept="region=background", level="token"), e) == 0.0
    assert judge.judge(Explanation("x", concept="color=red", level="image"), e) == 1.0
    half = e.maps_ST.copy()
    bg = np.flatnonzero(truth.tokens(e.sample_id)[:, CONCEPT_INDEX["region=background"]])
    red = np.flatnonzero(e.map > 0)
    m = np.zeros(T, np.float32)
    m[red[:4]] = 1
    m[bg[:4]] = 1
    half[e.step] = m
    e2 = type(e)(e.feature, e.sample_id, e.value, e.step, e.split, half, e.threshold)
    assert judge.judge(Explanation("x", concept="color=red", level="token"), e2) == pytest.approx(0.5)


# ---- the pipeline and the CLI ----------------------------------------------------------------------------


def test_oracle_pipeline_writes_everything(planted_store, tmp_path):
    from difflens.interpret import run_oracle_pipeline

    planted = NeuronFeatures(SITE, D, name="planted")
    planted.kind = "sae"  # stands in for a dictionary in the comparison
    out = tmp_path / "run"
    rep = run_oracle_pipeline({"planted": planted}, planted_store, out, n_features=D,
                              cache_config=CacheConfig(top_n=5, n_quantiles=2))
    names = [r["name"] for r in rep["table"]]
    assert names == ["planted", "neurons", "random"]
    row = rep["table"][0]
    assert row["sampled"] == D and row["scored"] >= 5 and 0 < row["coverage"] <= 1
    c = rep["checks"]["sae_vs_neurons"]
    assert c["n_a"] == row["scored"] and c["ci95"][0] <= c["diff"] <= c["ci95"][1] and "verdict" in c
    for rel in ("comparison.md", "comparison.json", "report.md", "report.json", "score_hist.png", "hierarchy.png",
                "hierarchy.json", "planted/scores.json", "planted/score_hist.png", "planted/features/index.json",
                "planted/cache/cache.safetensors", "neurons/cache/cache.json"):
        assert (out / rel).exists(), rel
    assert (out / "planted" / "heatmaps" / "feature_0.png").exists()
    feat = json.loads((out / "planted" / "features" / "0.json").read_text())
    assert feat["concept"] == "color=red" and len(feat["top"]) >= 5 and len(feat["top"][0]["map"]) == T
    assert len(feat["profile_mean"]) == len(TIMESTEPS) and feat["histogram"]["counts"]
    h = rep["hierarchy"]["planted"]["types"]
    assert 0 in h["color"]["features"] and h["color"]["median_peak_timestep"] == 500.0  # planted to grow late
    md = (out / "comparison.md").read_text()
    assert md.count("\n") >= 4 and "planted" in md and "random" in md
    run = json.loads((out / "run.json").read_text())  # the oracle costs nothing: every chance control
    assert run["protocol"]["chance_controls"] == "all" and run["evidence"] == "split"


def test_cli_interpret_run_cache_and_report(planted_store, tmp_path):
    import difflens.dictionaries.sae  # noqa: F401
    from difflens.cli import main
    from difflens.dictionaries.config import DictConfig
    from difflens.dictionaries.io import save
    from difflens.dictionaries.sae import TopKSAE

    sae = TopKSAE(DictConfig(arch="topk", d_in=D, width=D, k=2, site=SITE, normalization="none"))
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.eye(D))
        sae.W_dec_FD.copy_(torch.eye(D))
    save(sae, tmp_path / "sae")
    out = tmp_path / "run"
    rc = main(["interpret", "--dict", str(tmp_path / "sae"), "--data", str(planted_store), "--out", str(out),
               "--baselines", "random", "--n-features", "4", "--top-n", "5", "--quantiles", "2", "--no-heatmaps"])
    assert rc == 0
    table = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["name"] for r in table] == ["sae", "random"]
    assert all(r["scored"] > 0 for r in table)  # baselines get enough mapped features for negatives
    assert main(["interpret", "report", "--run", str(out)]) == 0
    rc = main(["interpret", "cache", "--random", "3", "--data", str(planted_store), "--site", SITE,
               "--out", str(tmp_path / "rc"), "--heatmaps", "2", "--top-n", "5"])
    assert rc == 0
    assert FeatureCache.load(tmp_path / "rc").num_features == 3
    assert len(list((tmp_path / "rc" / "heatmaps").glob("*.png"))) == 2
    assert main(["interpret", "--data", str(planted_store)]) == 2  # no --out: a clean error


def test_generated_source_matches_store_layout(tmp_path):
    """Generating afresh records every token at every step, like a full-token store."""
    from difflens.world.prompts import world_prompts
    from difflens.interpret.sources import generate_samples
    from difflens.models.toy.adapter import ToyAdapter
    from toy_fixtures import make_tiny_toy

    adapter = ToyAdapter.load(folder=make_tiny_toy(tmp_path / "toy"))
    prompts, scenes = world_prompts(3, seed=2)
    src = generate_samples(adapter, prompts, ["transformer_blocks.1:img", "transformer_blocks.1.ff.net.0:img"],
                           steps=2, scenes=scenes, batch_size=2)
    assert list(src.sample_ids()) == [0, 1, 2] and src.grid_hw == (16, 16) and len(src.timesteps) == 2
    (_, acts), = list(src.iter_acts("transformer_blocks.1:img", [2]))
    assert acts.shape == (1, 2, 256, adapter.site_dim("transformer_blocks.1:img"))
    assert src.token_labels([0]) is not None and src.image(1).shape == (32, 32, 3)
    cache = build_cache(NeuronFeatures("transformer_blocks.1.ff.net.0:img", src.d("transformer_blocks.1.ff.net.0:img")),
                        src, config=CacheConfig(top_n=1, n_quantiles=0, min_tokens=1), map_features=[0, 1])
    assert cache.top_examples(0)[0].maps_ST.shape == (2, 256)


def test_labels_are_read_through_the_stores_world(sparse_store, monkeypatch):
    """The cache counts concepts with the vocabulary of the world of the store's model
    (`models.ground_truth_for`), never a hard-coded one; a store whose model has no world but
    whose samples carry labels is refused with the fix."""
    from difflens.errors import DifflensError
    from difflens.groundtruth import GroundTruth

    src = StoreSource(sparse_store, sites=[SITE])
    truth = src.ground_truth()
    assert isinstance(truth, GroundTruth) and src.vocabulary() is truth.vocabulary()
    cache = build_cache(NeuronFeatures(SITE, D), src, config=CacheConfig(top_n=2, n_quantiles=0))
    assert cache.info["concepts"] == list(truth.vocabulary().names)

    import difflens.models

    monkeypatch.setattr(difflens.models, "ground_truth_for", lambda model: None)
    with pytest.raises(DifflensError, match="no ground-truth world"):
        build_cache(NeuronFeatures(SITE, D), StoreSource(sparse_store, sites=[SITE]), config=CacheConfig(top_n=2, n_quantiles=0))
