"""Splice evaluation on the tiny toy model: exact dictionaries recover everything, the error-term
check reproduces the clean run, mean ablation is the zero point, store and prompt inputs both work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflens.dictionaries.config import DictConfig
from difflens.dictionaries.sae import TopKSAE
from difflens.errors import DifflensError
from difflens.evaluate.splice import evaluate_splice, image_mse, psnr_db

PROMPTS = [
    "a large red circle in the top left on a black plain background",
    "a small blue square in the bottom right on a gray dots background",
    "a large green seven in the center on a navy plain background",
]
SITE = "transformer_blocks.1:img"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from toy_fixtures import make_tiny_toy

    from difflens.models.toy.adapter import ToyAdapter

    return ToyAdapter.load(folder=make_tiny_toy(tmp_path_factory.mktemp("tiny_toy_splice")))


def exact_sae(d: int, site: str = SITE) -> TopKSAE:
    """W = [I; -I], k = d: the codes are the positive and negative parts of x, so x̂ = x exactly."""
    sae = TopKSAE(DictConfig(arch="topk", d_in=d, width=2 * d, k=d, site=site, normalization="none"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.cat([eye, -eye]))
        sae.W_dec_FD.copy_(torch.cat([eye, -eye]))
    return sae.eval()


def poor_sae(d: int, site: str = SITE, seed: int = 0) -> TopKSAE:
    sae = TopKSAE(DictConfig(arch="topk", d_in=d, width=48, k=2, site=site, normalization="none", init_seed=seed))
    return sae.eval()


def test_metric_helpers():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 255
    assert np.allclose(image_mse(a, b), [0.0, 1.0])
    assert psnr_db(0.0) == float("inf") and abs(psnr_db(0.01) - 20.0) < 1e-9


def test_exact_dictionary_recovers_fully_and_poor_one_less(adapter):
    d = adapter.site_dim(SITE)
    res = evaluate_splice(
        {"exact": exact_sae(d), "poor": poor_sae(d)}, PROMPTS, adapter, steps=3, show_progress=False
    )
    assert res["n_prompts"] == 3 and res["steps"] == 3
    mean = res["mean_ablation"][SITE]
    assert mean["mse"] > 0 and "clean run" in mean["source"]
    exact, poor = res["dictionaries"]
    assert exact["name"] == "exact" and exact["splice"]["mse"] < 1e-8
    assert exact["fidelity_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert poor["splice"]["mse"] > 1e-5
    assert poor["fidelity_recovered"] < exact["fidelity_recovered"]
    for e in (exact, poor):
        chk = e["error_term_check"]
        assert chk["passed"] and chk["max_pixel_diff_levels"] <= 1 and chk["max_latent_diff"] < 1e-3


def test_window_as_cli_passes_it_and_grids(adapter, tmp_path):
    d = adapter.site_dim(SITE)
    res = evaluate_splice([poor_sae(d)], PROMPTS[:2], adapter, steps=(1, 3), out_dir=tmp_path, show_progress=False)
    assert res["window"] == "steps 1:3" and res["steps"] == adapter.model.cfg.steps_default
    name = res["dictionaries"][0]["name"]
    assert name.startswith("topk-w48-k2@")
    assert (tmp_path / "splice_0.png").is_file()
    full = evaluate_splice([poor_sae(d)], PROMPTS[:2], adapter, steps=3, show_progress=False)
    late = evaluate_splice([poor_sae(d)], PROMPTS[:2], adapter, steps=3, window=(2, 3), show_progress=False)
    # Splicing only the last step disturbs the image less than splicing all of them.
    assert late["dictionaries"][0]["splice"]["mse"] < full["dictionaries"][0]["splice"]["mse"]


def test_classifier_adherence_is_reported(adapter):
    from difflens.world.classifier import FactorClassifier
    from difflens.world.groundtruth import ToyWorld

    torch.manual_seed(0)
    truth = ToyWorld(FactorClassifier().eval())
    res = evaluate_splice([exact_sae(adapter.site_dim(SITE))], PROMPTS, adapter, steps=3, ground_truth=truth, show_progress=False)
    adh = res["clean"]["adherence"]
    assert set(adh) >= {"color", "object", "prompt"}
    assert res["dictionaries"][0]["splice"]["adherence"] == adh  # exact splice = clean images


def test_store_input_uses_its_prompts_and_statistics(adapter, tmp_path):
    store = tiny_store(adapter, tmp_path / "store", PROMPTS, SITE)
    res = evaluate_splice([poor_sae(adapter.site_dim(SITE))], store, adapter, n_prompts=2, show_progress=False)
    assert res["n_prompts"] == 2 and set(res["prompts"]) <= set(PROMPTS)
    assert res["steps"] == 3  # from the store's harvest config
    assert "store statistics" in res["mean_ablation"][SITE]["source"]
    assert res["dictionaries"][0]["error_term_check"]["passed"]


def tiny_store(adapter, path, prompts, site, seeds=(0,), steps=3):
    """A small store recorded from one generation (all tokens, cond rows, toy-world token labels);
    `site` may be a list of sites, recorded together."""
    from difflens.harvest.record import UnitRecorder
    from difflens.harvest.run import labels_and_records, plan_samples
    from difflens.hooks import HookSet, Site
    from difflens.store import Store, StoreWriter
    from difflens.world.groundtruth import ToyWorld

    truth = ToyWorld()
    samples = plan_samples(list(prompts), list(seeds), None, truth)
    sites = [site] if isinstance(site, str) else list(site)
    tokenizer = getattr(adapter.model, "tokenizer", None) if any(s.endswith(":txt") for s in sites) else None
    token_labels, text_labels, records = labels_and_records(samples, truth, tokenizer)
    rec = UnitRecorder(
        sample_ids=np.array([s.sample_id for s in samples]),
        prompt_ids=np.array([s.prompt_id for s in samples]),
        seeds=np.array([s.seed for s in samples]),
        keep=lambda n: n,
        record_steps=None,
        cond_only=True,
        token_seed=0,
        token_labels=token_labels,
        text_labels=text_labels,
    )
    adapter.generate([s.prompt for s in samples], [s.seed for s in samples], steps=steps,
                     hooks=HookSet([(s, rec.hook_for(Site.parse(s))) for s in sites]))
    w = StoreWriter.open(path, model=adapter.model_id, sites={s: adapter.site_dim(s) for s in sites}, dtype="fp32",
                         harvest_config={"steps": steps, "guidance": None, "seeds": list(seeds)})
    w.write_unit("u0000000", rec.rows(), samples=records)
    w.finalize()
    return Store(path)


def test_bad_inputs(adapter):
    d = adapter.site_dim(SITE)
    with pytest.raises(DifflensError):
        evaluate_splice([], PROMPTS, adapter, steps=3)
    with pytest.raises(DifflensError):
        evaluate_splice([poor_sae(d)], [], adapter, steps=3)
    with pytest.raises(DifflensError, match="selects none"):
        evaluate_splice([poor_sae(d)], PROMPTS, adapter, steps=3, window=(5, 9))
    with pytest.raises(DifflensError):
        evaluate_splice([poor_sae(16)], PROMPTS, adapter, steps=3)  # wrong width for the site
