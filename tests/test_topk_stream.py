"""The streaming top-k cache of `harvest --dict --topk` resumes and runs under torchrun: an
interrupted harvest (including a crash between the store's commit and the cache's snapshot),
resumed, and a two-rank torchrun harvest each end with the cache of one uninterrupted process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from difflens.errors import DifflensError
from difflens.harvest import HarvestConfig, harvest
from difflens.interpret.topk import TopKAccumulator
from difflens.models.toy.adapter import ToyAdapter
from difflens.world.prompts import world_prompts
from toy_fixtures import make_tiny_toy

SITE = "transformer_blocks.1:img"
N = 3


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_tiny_toy(tmp_path_factory.mktemp("tiny_toy_topk"))


@pytest.fixture(scope="module")
def adapter(toy):
    return ToyAdapter.load(folder=toy)


def _sae(adapter, folder, seed=0):
    from difflens.dictionaries.config import DictConfig
    from difflens.dictionaries.io import save
    from difflens.dictionaries.sae import TopKSAE

    sae = TopKSAE(DictConfig(arch="topk", d_in=adapter.site_dim(SITE), width=12, k=3, site=SITE, normalization="none"))
    with torch.no_grad():
        sae.W_enc_FD.add_(0.01 * torch.randn(sae.W_enc_FD.shape, generator=torch.Generator().manual_seed(seed)))
    save(sae, folder)
    return folder


@pytest.fixture(scope="module")
def sae(adapter, tmp_path_factory):
    return _sae(adapter, tmp_path_factory.mktemp("sae") / "sae")


def _cfg(**kw):
    return HarvestConfig(**{**dict(sites=[SITE], steps=2, tokens_per_image=4, batch_size=2, seeds=[0]), **kw})


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "topk.safetensors"))


def assert_same_cache(a, b, *, exact=True):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ("sample", "step", "frequency", "hist_counts"):
        assert torch.equal(ta[k], tb[k]), k
    for k in ("values", "maps", "profile_mean", "profile_max"):
        if exact:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)
    live = (ta["sample"] >= 0).sum()
    assert live >= ta["sample"].shape[0]  # not vacuous: on average a feature keeps at least one example


def test_resumed_topk_cache_equals_an_uninterrupted_one(tmp_path, adapter, sae):
    prompts, scenes = world_prompts(7, seed=4)  # 4 units of 2 samples (the last one short)
    topk = [("sae", str(sae), N)]
    full = harvest(tmp_path / "full", _cfg(), prompts, scenes=scenes, adapter=adapter, topk=topk)
    assert full["units_written"] == 4
    part = tmp_path / "part"
    harvest(part, _cfg(), prompts, scenes=scenes, adapter=adapter, topk=topk, stop_after_units=1)
    info = TopKAccumulator.load(part / "topk" / "sae").info
    assert info["complete"] is False and info["units"] == 1 and info["units_total"] == 4
    snapshot = part / "topk" / "sae" / "partial" / "rank-0.safetensors"
    older = tmp_path / "older.safetensors"
    shutil.copy(snapshot, older)
    harvest(part, _cfg(), prompts, scenes=scenes, adapter=adapter, topk=topk, resume=True, stop_after_units=1)
    # a crash after the store committed unit 1 but before the cache's snapshot: the snapshot is older
    shutil.copy(older, snapshot)
    rest = harvest(part, _cfg(), prompts, scenes=scenes, adapter=adapter, topk=topk, resume=True)
    assert rest["units_written"] == 2 and rest["units_regenerated_for_topk"] == 1
    got = TopKAccumulator.load(part / "topk" / "sae")
    assert got.info["complete"] is True and got.info["samples"] == 7
    assert_same_cache(tmp_path / "full" / "topk" / "sae", part / "topk" / "sae")
    # a cache added to a finished store on --resume: every unit regenerated for the cache only
    again = harvest(tmp_path / "full", _cfg(), prompts, scenes=scenes, adapter=adapter, resume=True,
                    topk=[("late", str(sae), N)])
    assert again["units_written"] == 0 and again["units_regenerated_for_topk"] == 4
    assert_same_cache(tmp_path / "full" / "topk" / "sae", tmp_path / "full" / "topk" / "late")


def test_snapshots_every_n_units_give_the_same_cache(tmp_path, adapter, sae, monkeypatch):
    """--topk-snapshot-every 3: fewer snapshot writes, the same cache; a crash before the end-of-run
    snapshot loses only the units since the last one, which --resume regenerates for the cache."""
    from difflens.harvest.topk_stream import TopKStream

    prompts, scenes = world_prompts(7, seed=4)  # 4 units
    topk = [("sae", str(sae), N)]
    every1 = harvest(tmp_path / "a", _cfg(), prompts, scenes=scenes, adapter=adapter, topk=topk)
    every3 = harvest(tmp_path / "b", _cfg(), prompts, scenes=scenes, adapter=adapter, topk=topk, topk_snapshot_every=3)
    assert every1["topk_snapshots"] == {"sae": 4} and every3["topk_snapshots"] == {"sae": 2}  # after unit 3, at the end
    assert_same_cache(tmp_path / "a" / "topk" / "sae", tmp_path / "b" / "topk" / "sae")
    # the run loses its end-of-run snapshot (as in a crash after the store committed unit 4):
    # the store has all 4 units, the snapshot 3, and the cache says it is incomplete
    monkeypatch.setattr(TopKStream, "flush", lambda self: None)
    harvest(tmp_path / "c", _cfg(), prompts, scenes=scenes, adapter=adapter, topk=topk, topk_snapshot_every=3)
    monkeypatch.undo()
    info = TopKAccumulator.load(tmp_path / "c" / "topk" / "sae").info
    assert info["complete"] is False and info["units"] == 3
    rest = harvest(tmp_path / "c", _cfg(), prompts, scenes=scenes, adapter=adapter, topk=topk, resume=True,
                   topk_snapshot_every=3)
    assert rest["units_written"] == 0 and rest["units_regenerated_for_topk"] == 1
    assert_same_cache(tmp_path / "a" / "topk" / "sae", tmp_path / "c" / "topk" / "sae")
    with pytest.raises(DifflensError, match="--topk-snapshot-every must be an integer >= 1"):
        harvest(tmp_path / "d", _cfg(), prompts, scenes=scenes, adapter=adapter, topk=topk, topk_snapshot_every=0)


def test_resuming_with_another_dictionary_or_n_is_refused(tmp_path, adapter, sae):
    prompts, scenes = world_prompts(4, seed=4)
    harvest(tmp_path / "s", _cfg(), prompts, scenes=scenes, adapter=adapter, topk=[("sae", str(sae), N)], stop_after_units=1)
    other = _sae(adapter, tmp_path / "other", seed=1)
    for spec in (("sae", str(other), N), ("sae", str(sae), N + 1)):
        with pytest.raises(DifflensError, match="another dictionary or --topk"):
            harvest(tmp_path / "s", _cfg(), prompts, scenes=scenes, adapter=adapter, topk=[spec], resume=True)
    with pytest.raises(DifflensError, match="cannot --append"):
        harvest(tmp_path / "s", _cfg(steps=3), prompts, scenes=scenes, adapter=adapter, topk=[("sae", str(sae), N)], append=True)


def test_merging_accumulators_equals_feeding_one(tmp_path):
    """Units fed to two accumulators (as two ranks do) and merged equal one accumulator fed in order,
    ties included (equal maxima are kept in arrival order)."""
    g = torch.Generator().manual_seed(0)
    one, ranks = TopKAccumulator(5, 3, 4), [TopKAccumulator(5, 3, 4), TopKAccumulator(5, 3, 4)]
    for unit in range(6):
        for step in range(2):
            codes = torch.relu(torch.randn(2, 4, 5, generator=g)).round(decimals=1)  # rounding makes ties
            sids = [2 * unit, 2 * unit + 1]
            one.update(codes, sids, step, unit=unit)
            ranks[unit % 2].update(codes, sids, step, unit=unit)
    merged = TopKAccumulator.from_state(ranks[0].state()).merge(ranks[1])
    for k in ("values", "sample", "step", "unit", "maps", "frequency", "hist"):
        assert torch.equal(getattr(merged, k), getattr(one, k)), k
    assert merged.profiles()[0].allclose(one.profiles()[0]) and merged.tokens_seen == one.tokens_seen


def test_two_torchrun_ranks_fill_the_cache_of_one_process(tmp_path, toy, sae):
    common = ["harvest", "--model", str(toy), "--sites", SITE, "--num-prompts", "6", "--steps", "2",
              "--tokens-per-image", "4", "--batch-size", "2", "--dict", str(sae), "--topk", str(N), "-q"]
    env = {**os.environ, "DIFFLENS_QUIET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "difflens", *common, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                        "-m", "difflens", *common, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    parts = sorted(p.name for p in (tmp_path / "two" / "topk" / "sae" / "partial").iterdir())
    assert parts == ["rank-0.safetensors", "rank-1.safetensors"]
    assert TopKAccumulator.load(tmp_path / "two" / "topk" / "sae").info["complete"] is True
    assert_same_cache(tmp_path / "one" / "topk" / "sae", tmp_path / "two" / "topk" / "sae", exact=False)
    assert (tmp_path / "two" / "topk" / "sae" / "features" / "index.json").is_file()


PROMPTS = {"dit": ["207", "goldfish", "tench"]}


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "dit"])
def test_streamed_cache_equals_the_full_store_on_tiny_pipelines(family, tiny_folders, tmp_path):
    """On every pipeline family (CFG rows included: only the conditional rows feed the cache), the
    streamed top-k cache holds, per feature, the N (sample, step) with the largest max-over-tokens
    code and that step's map: the same as encoding every token of a full store."""
    from difflens.cli import main
    from difflens.dictionaries.config import DictConfig
    from difflens.dictionaries.io import save
    from difflens.dictionaries.sae import TopKSAE
    from difflens.interpret.sources import StoreSource
    from difflens.models import load_adapter
    from difflens.store import Store

    folder = tiny_folders[family]
    adapter = load_adapter(str(folder))
    site = adapter.default_site()
    sae = TopKSAE(DictConfig(arch="topk", d_in=adapter.site_dim(site), width=8, k=2, site=site, normalization="none"))
    save(sae, tmp_path / "sae")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS.get(family, ["a red cat", "blue sky", "a green door"])), encoding="utf-8")
    store = tmp_path / "store"
    assert main(["harvest", "--model", str(folder), "--prompts", str(prompts), "--steps", "2", "--sites", site,
                 "--batch-size", "2", *([] if family == "flux" else ["--guidance", "4.0"]), "--dict", str(tmp_path / "sae"), "--topk", "2",
                 "--out", str(store), "-q"]) == 0
    got = TopKAccumulator.load(store / "topk" / "sae")
    src = StoreSource(Store(store), sites=[site])
    batches = list(src.iter_acts(site, src.sample_ids()))
    sids, acts = np.concatenate([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    S = len(src.steps)
    with torch.no_grad():
        codes = sae.encode(acts.reshape(-1, acts.shape[-1])).reshape(len(sids), S, -1, sae.num_latents)
    kept = 0
    for f in range(sae.num_latents):
        cands = sorted((-float(codes[i, s, :, f].max()), (int(sid) // 2, s, int(sid)), int(sid), s)
                       for i, sid in enumerate(sids.tolist()) for s in range(S) if float(codes[i, s, :, f].max()) > 0)[:2]
        ex = got.examples(f)
        assert [(e["sample_id"], e["step"]) for e in ex] == [(c[2], c[3]) for c in cands], (family, f)
        for e in ex:
            i = list(sids).index(e["sample_id"])
            torch.testing.assert_close(e["map"], codes[i, e["step"], :, f], rtol=1e-4, atol=1e-5)
        kept += len(ex)
    assert kept >= sae.num_latents  # not vacuous
    assert int(got.frequency.sum()) == int((codes > 0).sum())
