"""Interpretation of a real model without a VLM: `interpret --generate` with prompts from a file
(or an `hf:` dataset, refused clearly offline), at a chosen image size, on tiny random diffusers
pipelines; and the CFG-branch filter when the feature cache reads a both-branches store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from difflens.cli import main
from difflens.interpret.cache import FeatureCache

NEURONS = "transformer_blocks.0.ff.net.0:img"


pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def folders(tiny_folders):
    return tiny_folders  # saved once per session (conftest.TinyFolders)


def _cache(folder, prompts_arg, out, *extra):
    return main(["interpret", "cache", "--neurons", NEURONS, "--model", str(folder), "--generate", "3",
                 "--prompts", str(prompts_arg), "--steps", "2", "--seeds", "0", "--out", str(out),
                 "--heatmaps", "2", "--top-n", "2", "--quantiles", "0", "--min-tokens", "1", *extra])


def test_flux_cache_from_a_prompt_file_at_a_chosen_size(folders, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nblue sky over hills\na green door\nnever used\n", encoding="utf-8")
    out = tmp_path / "c"
    assert _cache(folders["flux"], prompts, out, "--height", "48", "--width", "32") == 0
    cache = FeatureCache.load(out)
    assert cache.info["num_samples"] == 3  # the first N prompts of the file
    assert cache.info["data"]["kind"] == "generated" and cache.info["data"]["prompts"] == 3
    top = cache.top_examples(int(np.flatnonzero(cache.live())[0]))[0]
    assert top.maps_ST.shape == (2, 12 * 8)  # 48x32 px = a 12x8 token grid (4 px per token), every step
    assert len(list((out / "heatmaps").glob("*.png"))) == 2


def test_dit_cache_from_jsonl_class_names(folders, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"label": c}) for c in ("goldfish", "207", "tench")), encoding="utf-8")
    out = tmp_path / "c"
    assert _cache(folders["dit"], prompts, out, "--prompt-column", "label") == 0
    assert FeatureCache.load(out).info["num_samples"] == 3


def test_real_model_without_prompts_or_offline_dataset_is_a_clear_error(folders, tmp_path, capsys):
    rc = main(["interpret", "cache", "--neurons", NEURONS, "--model", str(folders["dit"]), "--generate", "2",
               "--steps", "1", "--out", str(tmp_path / "a")])
    assert rc == 2 and "--prompts" in capsys.readouterr().err
    rc = _cache(folders["dit"], "hf:nobody/no-such-prompts", tmp_path / "b")
    err = capsys.readouterr().err
    assert rc == 2 and "HF_HUB_OFFLINE" in err and "local .txt/.jsonl" in err
    rc = main(["interpret", "cache", "--neurons", NEURONS, "--data", str(tmp_path), "--prompts", "x.txt",
               "--out", str(tmp_path / "c")])
    assert rc == 2 and "--generate" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # harvest --num-prompts asks the model's ground truth for prompts: a real model has none
    rc = main(["harvest", "--model", str(folders["dit"]), "--num-prompts", "2", "--steps", "1", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and "ground-truth world" in err and "--prompts FILE" in err and not (tmp_path / "d").exists()


def test_cache_reads_one_cfg_branch_of_a_both_branches_store(tmp_path):
    """A store harvested with --both-branches holds every (sample, step, token) twice; the cache
    reads the branch asked for, never both mixed."""
    import torch

    from difflens.harvest.config import HarvestConfig
    from difflens.harvest.run import harvest
    from difflens.interpret.sources import StoreSource
    from difflens.models.toy.adapter import ToyAdapter
    from difflens.store import Store
    from difflens.world.prompts import world_prompts
    from toy_fixtures import make_tiny_toy

    site = "transformer_blocks.1:img"
    toy = make_tiny_toy(tmp_path / "toy")
    prompts, scenes = world_prompts(2, seed=3)
    cfg = HarvestConfig(model=str(toy), sites=[site], steps=2, batch_size=2, cond_only=False, guidance=3.0)
    harvest(tmp_path / "s", cfg, prompts, scenes=scenes, adapter=ToyAdapter.load(folder=toy))
    store = Store(tmp_path / "s")
    meta = store.meta(site)
    got = {}
    for branch, code in (("cond", 0), ("uncond", 1)):
        src = StoreSource(store, sites=[site], branch=branch)
        (sids, acts), = list(src.iter_acts(site, src.sample_ids()))
        sel = np.flatnonzero((meta["branch"] == code) & (meta["sample_id"] == 1))
        order = sel[np.lexsort((meta["token"][sel], meta["step"][sel]))]
        want = store.read_rows(site, order).reshape(len(src.steps), src.num_tokens, -1)
        assert torch.equal(acts[list(sids).index(1)], want)
        got[branch] = acts
    assert not torch.equal(got["cond"], got["uncond"])
    out = tmp_path / "c"
    assert main(["interpret", "cache", "--random", "3", "--site", site, "--data", str(tmp_path / "s"), "--branch",
                 "uncond", "--out", str(out), "--heatmaps", "0", "--top-n", "1", "--quantiles", "0"]) == 0
    assert FeatureCache.load(out).info["data"]["branch"] == "uncond"


def test_streaming_topk_equals_a_full_store_computation(tmp_path):
    """harvest --dict --topk keeps, per feature, the N (sample, step) with the largest max-over-tokens
    code and that step's token map: the same as computing every code from a full-token store."""
    import torch

    from difflens.dictionaries.config import DictConfig
    from difflens.dictionaries.io import save
    from difflens.dictionaries.sae import TopKSAE
    from difflens.interpret.sources import StoreSource
    from difflens.interpret.topk import TopKAccumulator
    from difflens.store import Store
    from toy_fixtures import make_tiny_toy

    site, n = "transformer_blocks.1:img", 3
    toy = make_tiny_toy(tmp_path / "toy")
    from difflens.models.toy.adapter import ToyAdapter

    d = ToyAdapter.load(folder=toy).site_dim(site)
    torch.manual_seed(0)
    sae = TopKSAE(DictConfig(arch="topk", d_in=d, width=10, k=2, site=site, normalization="none"))
    save(sae, tmp_path / "sae")
    out = tmp_path / "s"
    rc = main(["harvest", "--model", str(toy), "--num-prompts", "5", "--seeds", "0", "--steps", "2", "--sites", site,
               "--batch-size", "2", "--dict", str(tmp_path / "sae"), "--topk", str(n), "--out", str(out), "-q"])
    assert rc == 0
    got = TopKAccumulator.load(out / "topk" / "sae")
    assert got.info["site"] == site and got.info["grid_hw"] == [16, 16]

    src = StoreSource(Store(out), sites=[site])
    (sids, acts), = list(src.iter_acts(site, src.sample_ids()))
    with torch.no_grad():
        codes = sae.encode(acts.reshape(-1, d)).reshape(len(sids), 2, -1, sae.num_latents)  # [n, S, T, F]
    for f in range(sae.num_latents):
        cands = []  # (value, arrival order = (unit, step, sample), sample, step)
        for i, sid in enumerate(sids.tolist()):
            for s in range(2):
                v = float(codes[i, s, :, f].max())
                if v > 0:
                    cands.append((-v, (sid // 2, s, sid), sid, s))
        want = sorted(cands)[:n]
        ex = got.examples(f)
        assert [(e["sample_id"], e["step"]) for e in ex] == [(w[2], w[3]) for w in want], f
        for e, w in zip(ex, want):
            assert e["value"] == pytest.approx(-w[0], rel=1e-5)
            i = list(sids).index(e["sample_id"])
            torch.testing.assert_close(e["map"], codes[i, e["step"], :, f], rtol=1e-5, atol=1e-6)
    assert int(got.frequency.sum()) == int((codes > 0).sum())
    assert sum(len(got.examples(f)) == n for f in range(sae.num_latents)) >= sae.num_latents // 2  # not vacuous
    mean, mx = got.profiles()  # [F, steps]: mean code over every token, mean per-image max
    torch.testing.assert_close(mean, codes.mean(dim=(0, 2)).T, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mx, codes.amax(dim=2).mean(0).T, rtol=1e-4, atol=1e-6)
    assert torch.equal(got.hist.sum(1), got.frequency)
    pos = codes[codes > 0]
    edges = TopKAccumulator.hist_edges()
    want_hist = torch.histc(torch.log2(pos.double()), bins=len(edges) - 1, min=-20, max=12)
    assert torch.equal(got.hist.sum(0).double(), want_hist)
    # the browser reads it like an interpretation (explanations empty), images from the harvest's store
    site_out = tmp_path / "site"
    assert main(["browse", "export", "--dict", str(tmp_path / "sae"), "--interp", str(out / "topk"), "--data", str(out),
                 "--out", str(site_out), "--max-features", "2"]) == 0
    import re

    pages = sorted((site_out / "features" / "sae").glob("*.html"))
    assert len(pages) == 2
    page = json.loads(re.search(r'id="difflens-data">(.*?)</script>', pages[0].read_text(), re.S).group(1))
    f = int(pages[0].stem)
    assert [t["sid"] for t in page["top"]] == [e["sample_id"] for e in got.examples(f)]
    assert all(t["img"] for t in page["top"]) and page["histogram"]["counts"] and len(page["profile_mean"]) == 2
    rc = main(["harvest", "--model", str(toy), "--num-prompts", "2", "--steps", "1", "--topk", "2",
               "--out", str(tmp_path / "x"), "-q"])
    assert rc == 2 and not (tmp_path / "x").exists()


def _random_sae(d: int, site: str, folder):
    from difflens.dictionaries.config import DictConfig
    from difflens.dictionaries.io import save
    from difflens.dictionaries.sae import TopKSAE

    save(TopKSAE(DictConfig(arch="topk", d_in=d, width=8, k=2, site=site, normalization="none")), folder)
    return folder


def _pages(site):
    import re

    out = {}
    for page in sorted((site / "features").glob("*/*.html")):
        out[page] = json.loads(re.search(r'id="difflens-data">(.*?)</script>', page.read_text(), re.S).group(1))
    return out


def test_generated_cache_gets_browser_pages_with_its_images(folders, tmp_path):
    """`interpret cache --generate` on a real model saves its images and prompts next to the cache
    (<out>/samples), and `browse export --data <out>/samples` shows them like a store's."""
    from difflens.models import load_adapter

    site = "transformer_blocks.0:img"
    sae = _random_sae(load_adapter(str(folders["flux"])).site_dim(site), site, tmp_path / "sae")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nblue sky over hills\na green door\n", encoding="utf-8")
    out = tmp_path / "interp" / "sae"
    assert main(["interpret", "cache", "--dict", str(sae), "--model", str(folders["flux"]), "--generate", "3",
                 "--prompts", str(prompts), "--steps", "2", "--out", str(out), "--heatmaps", "0", "--top-n", "2",
                 "--quantiles", "0", "--min-tokens", "1"]) == 0
    assert sorted(p.name for p in (out / "samples" / "images").iterdir()) == ["0.png", "1.png", "2.png"]
    site_out = tmp_path / "site"
    assert main(["browse", "export", "--dict", str(sae), "--interp", str(tmp_path / "interp"), "--data",
                 str(out / "samples"), "--out", str(site_out), "--max-features", "2"]) == 0
    pages = _pages(site_out)
    assert len(pages) == 2
    for data in pages.values():
        assert data["top"] and all(t["img"] for t in data["top"])
        assert {t["prompt"] for t in data["top"]} <= {"a red cat", "blue sky over hills", "a green door"}
    shown = {t["sid"] for data in pages.values() for t in data["top"]}
    assert {p.name for p in (site_out / "img").iterdir()} == {f"{s}.png" for s in shown}
    rc = main(["browse", "export", "--dict", str(sae), "--interp", str(tmp_path / "interp"), "--data", str(tmp_path),
               "--out", str(tmp_path / "bad")])
    assert rc == 2  # neither a store nor a samples folder: a usage error naming both


def test_generated_interpretation_run_is_browsed_without_data(tmp_path):
    """`interpret --generate` (the scoring pipeline) keeps its samples in <out>/samples, which the
    browser finds by itself from run.json."""
    from difflens.models.toy.adapter import ToyAdapter
    from toy_fixtures import make_tiny_toy

    site = "transformer_blocks.1:img"
    toy = make_tiny_toy(tmp_path / "toy")
    sae = _random_sae(ToyAdapter.load(folder=toy).site_dim(site), site, tmp_path / "sae")
    out = tmp_path / "run"
    assert main(["interpret", "--dict", str(sae), "--model", str(toy), "--generate", "6", "--steps", "2",
                 "--baselines", "none", "--n-features", "2", "--n-explain", "1", "--n-pos", "1", "--n-neg", "1",
                 "--top-n", "2", "--quantiles", "0", "--min-tokens", "1", "--no-heatmaps", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["data"]["kind"] == "generated"
    site_out = tmp_path / "site"
    assert main(["browse", "export", "--dict", str(sae), "--interp", str(out), "--out", str(site_out)]) == 0
    pages = _pages(site_out)
    assert any(data["top"] for data in pages.values())
    assert all(t["img"] and t["prompt"] for data in pages.values() for t in data["top"])
