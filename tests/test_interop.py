"""Interop with the REAL sparsify and SAELens packages, and the hub through a local stand-in (no network).

Each round trip compares codes and reconstructions computed by the other library on the same
inputs with difflens's own, so a wrong fold of the normalisation (the silent failure of a naive
tensor rename) fails here.
"""

from __future__ import annotations

import json

import pytest
import sae_lens  # the dev extra installs both peers: `make test` runs these round trips
import sparsify
import torch

import difflens
from difflens.cli import main
from difflens.dictionaries import DictConfig, build, interop, io
from difflens.errors import DifflensError


D, F, K = 16, 64, 4
SITE = "transformer_blocks.1:img"


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) * torch.linspace(0.2, 3.0, D) + 0.7  # anisotropic, off-centre


def trained(arch, norm="scalar", steps=15, **kw):
    x = data()
    d = build(DictConfig(arch=arch, d_in=D, width=F, k=K, normalization=norm, site=SITE, model="toy", **kw))
    d.init_from_data(x)
    d.train()
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    for _ in range(steps):  # a few steps so biases and thresholds are not at their init values
        opt.zero_grad()
        d(x).loss.backward()
        opt.step()
        d.after_optimizer_step()
    return d.eval()


def reference(d, x):
    with torch.no_grad():
        out = d(x)
        return out.codes, out.x_hat


def assert_same(codes, x_hat, ref_codes, ref_x_hat):
    assert torch.equal(codes != 0, ref_codes != 0)  # the same active latents on every row
    torch.testing.assert_close(codes, ref_codes, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x_hat, ref_x_hat, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("norm", ["scalar", "pca-whiten"])
def test_topk_round_trips_through_sparsify(norm, tmp_path):
    d = trained("topk", norm)
    x = data(seed=1)
    ref_codes, ref_x_hat = reference(d, x)
    out = interop.export(d, tmp_path / "sp", "sparsify")
    sc = sparsify.SparseCoder.load_from_disk(out)
    with torch.no_grad():
        enc = sc.encode(x)
        codes = torch.zeros_like(ref_codes).scatter_(1, enc.top_indices, enc.top_acts.float())
        assert_same(codes, sc.decode(enc.top_acts, enc.top_indices), ref_codes, ref_x_hat)
    back = difflens.load(out)  # and back into difflens
    assert back.arch == "topk" and back.cfg.site == SITE
    assert_same(*reference(back, x), ref_codes, ref_x_hat)


def test_a_folder_written_by_sparsify_loads_in_difflens(tmp_path):
    torch.manual_seed(0)
    sc = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=F, k=K))
    with torch.no_grad():
        sc.encoder.bias.normal_()
        sc.b_dec.normal_()
    sc.save_to_disk(tmp_path / "native")
    x = data(seed=2)
    d = difflens.load(tmp_path / "native")
    with torch.no_grad():
        enc = sc.encode(x)
        codes = torch.zeros(x.shape[0], F).scatter_(1, enc.top_indices, enc.top_acts)
        assert_same(*reference(d, x), codes, sc.decode(enc.top_acts, enc.top_indices))


@pytest.mark.parametrize(
    "arch, norm",
    [("topk", "scalar"), ("jumprelu", "pca-whiten"), ("batchtopk", "scalar"), ("matryoshka", "scalar"), ("relu", "scalar")],
)
def test_round_trips_through_saelens(arch, norm, tmp_path):
    d = trained(arch, norm)
    x = data(seed=1)
    ref_codes, ref_x_hat = reference(d, x)
    out = interop.export(d, tmp_path / "sl", "saelens")
    sae = sae_lens.SAE.load_from_disk(str(out))
    with torch.no_grad():
        codes = sae.encode(x)
        assert_same(codes, sae.decode(codes), ref_codes, ref_x_hat)
    back = difflens.load(out)
    assert back.arch == {"batchtopk": "jumprelu", "matryoshka": "jumprelu"}.get(arch, arch)
    assert_same(*reference(back, x), ref_codes, ref_x_hat)


def test_a_saelens_folder_without_b_dec_on_the_input_loads(tmp_path):
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.3)
        sae.threshold.uniform_(0.05, 0.5)
    sae.save_model(tmp_path / "native")
    x = data(seed=3)
    d = difflens.load(tmp_path / "native")
    with torch.no_grad():
        codes = sae.encode(x)
        assert_same(*reference(d, x), codes, sae.decode(codes))


def test_timestep_dependent_dictionaries_are_refused_with_the_reason(tmp_path):
    x, t = data(), torch.randint(0, 4, (256,)).float() * 250
    tide = build(DictConfig(arch="tide", d_in=D, width=F, k=K))
    tide.init_from_data(x, t)
    with pytest.raises(DifflensError, match="TIDE.*timestep"):
        interop.export(tide, tmp_path / "a", "saelens")
    pt = build(DictConfig(arch="topk", d_in=D, width=F, k=K, normalization="per-timestep"))
    pt.init_from_data(x, t)
    with pytest.raises(DifflensError, match="per-timestep normalisation"):
        interop.export(pt, tmp_path / "b", "sparsify")
    with pytest.raises(DifflensError, match="sparsify holds TopK SAEs only"):
        interop.export(trained("jumprelu", steps=1), tmp_path / "c", "sparsify")
    assert not any(tmp_path.iterdir())  # nothing half written


def test_itda_exports_its_atoms_as_a_decoder_with_a_note(tmp_path):
    x = data(n=512)
    itda = build(DictConfig(arch="itda", d_in=D, width=0, k=K, normalization="scalar", itda_tau=0.2))
    itda.init_from_data(x)
    itda.partial_fit(x, None, {"sample_id": torch.arange(512)})
    out = interop.export(itda, tmp_path / "it", "saelens")
    note = (out / interop.NOTE_NAME).read_text()
    assert "atoms" in note and "NOT ITDA's codes" in note
    sae = sae_lens.SAE.load_from_disk(str(out))
    torch.testing.assert_close(sae.W_dec.detach(), itda.decoder_directions(), atol=1e-6, rtol=1e-5)


def test_export_cli_writes_saelens_and_refuses_tide(tmp_path, capsys):
    d = trained("topk")
    io.save(d, tmp_path / "topk")
    assert main(["export", "--format", "saelens", str(tmp_path / "topk"), str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "saelens"
    assert (tmp_path / "out" / "sae_weights.safetensors").is_file()
    tide = build(DictConfig(arch="tide", d_in=D, width=F, k=K))
    tide.init_from_data(data(), torch.zeros(256))
    io.save(tide, tmp_path / "tide")
    assert main(["export", "--format", "sparsify", str(tmp_path / "tide"), str(tmp_path / "o2")]) == 2
    assert "timestep" in capsys.readouterr().err and not (tmp_path / "o2").exists()


# ---- the hub, through a local stand-in ------------------------------------------------------------------
def _as_hf_cache(cache, repo_id: str, repo_folder, sha="0" * 40):
    """Lay `repo_folder` out the way huggingface_hub's cache does (snapshots/<sha> + refs/main)."""
    import shutil

    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(repo_folder, root / "snapshots" / sha)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)


def test_push_then_load_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({
        "model": "toy", "dtype": "bf16",
        "harvest_config": {"model": "toy", "num_prompts": 160, "steps": 12, "record_steps": [0, 3, 6, 9, 11]},
    }))
    d = trained("topk")
    folder = io.save(d, tmp_path / "dict", extra={"store": str(store), "step": 15, "training": {"lr": 3e-3, "steps": 15}})
    (folder / "metrics.jsonl").write_text(json.dumps({"kind": "final", "fvu": 0.125, "l0": 4.0, "dead_fraction": 0.0}) + "\n")
    hub_repo = tmp_path / "hub" / "org" / "repo"

    def upload(staged, repo_id, path_in_repo, revision):  # stands in for HfApi.upload_folder
        import shutil

        assert repo_id == "org/repo" and revision is None
        shutil.copytree(staged, hub_repo / path_in_repo)
        return "local://commit"

    assert difflens.dictionaries.hub.push(folder, "hf:org/repo/blocks1", upload=upload) == "local://commit"
    card = (hub_repo / "blocks1" / "README.md").read_text()
    for needle in (SITE, "| model | toy |", "| num_prompts | 160 |", "| record_steps | [0, 3, 6, 9, 11] |", "| fvu | 0.125 |"):
        assert needle in card, needle

    cache = tmp_path / "hf_cache"
    _as_hf_cache(cache, "org/repo", hub_repo)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = difflens.load("hf:org/repo/blocks1")
    x = data(seed=4)
    assert_same(*reference(loaded, x), *reference(d, x))
    with pytest.raises(DifflensError, match="not in the local Hugging Face cache"):
        difflens.load("hf:org/missing")
    with pytest.raises(DifflensError, match="ORG and REPO"):
        difflens.load("hf:justone")
