"""Every registered dictionary architecture steers, edits and reports like the others.

The list comes from the registry (`ARCHITECTURES`), so an architecture added later is covered
without touching this file. Dictionaries are fitted on the tiny toy model's own activations.
"""

from __future__ import annotations

import json

import pytest
import torch

from difflens.dictionaries import ARCHITECTURES, DictConfig, build
from difflens.dictionaries.base import family
from difflens.hooks import HookSet
from difflens.intervene import Ablate, Steer, generate_with

PROMPT = "a large red circle in the top left on a black plain background"
SITE = "transformer_blocks.1:img"
ARCHS = sorted(ARCHITECTURES)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from toy_fixtures import make_tiny_toy

    from difflens.models.toy.adapter import ToyAdapter

    return ToyAdapter.load(folder=make_tiny_toy(tmp_path_factory.mktemp("tiny_toy")))


def keep(store):
    def hook(acts, ctx):
        store[(ctx.step, ctx.call_index)] = (acts.detach().float().clone(), float(ctx.timestep))

    return hook


def probe(adapter, interventions, steps=3):
    """The site's (activations, timestep) just before and just after the interventions, per call."""
    pre, post = {}, {}
    generate_with(adapter, [PROMPT], [0], interventions, steps=steps,
                  pre_hooks=HookSet([(SITE, keep(pre))]), extra_hooks=HookSet([(SITE, keep(post))]))
    return pre, post


@pytest.fixture(scope="module")
def acts(adapter):
    """[N, D] activations at SITE (all steps, both branches) with their timesteps."""
    pre, _ = probe(adapter, [])
    xs, ts = [], []
    for _key, (x, t) in sorted(pre.items()):
        flat = x.reshape(-1, x.shape[-1])
        xs.append(flat)
        ts.append(torch.full((flat.shape[0],), t))
    return torch.cat(xs), torch.cat(ts)


@pytest.fixture(scope="module")
def dictionaries(adapter, acts):
    x, t = acts
    out = {}
    for arch in ARCHS:
        extra = {"matryoshka_prefixes": [16, 32, 64]} if arch == "matryoshka" else {}
        cfg = DictConfig(arch=arch, d_in=adapter.site_dim(SITE), width=64 if arch != "itda" else 4096, k=4, site=SITE, model="toy",
                         normalization="scalar", init_seed=0, **extra)
        d = build(cfg)
        if arch == "itda":
            d.partial_fit(x, t)
        else:
            d.init_from_data(x, t)
            with torch.no_grad():  # not transpose-tied, so edits leave an error term
                g = torch.Generator().manual_seed(1)
                for name, p in d.named_parameters():
                    if name.startswith("W_enc"):
                        p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
        out[arch] = d.eval()
    return out


def test_the_registry_names_the_families():
    assert {a: family(a) for a in ARCHS} == {
        "batchtopk": "sae", "itda": "itda", "jumprelu": "sae", "matryoshka": "sae", "relu": "sae",
        "tide": "tide", "topk": "sae",
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_source_kind_comes_from_the_registry(arch, dictionaries):
    from difflens.interpret.features import DictionaryFeatures

    assert DictionaryFeatures(dictionaries[arch]).kind == family(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_steer_adds_the_unit_decoder_direction(arch, adapter, dictionaries):
    d = dictionaries[arch]
    f = 3
    pre, post = probe(adapter, [Steer(d, [f], 2.5, mode="absolute")])
    u = d.decoder_directions()[f].detach().float()
    assert abs(float(u.norm()) - 1) < 1e-5
    for key in pre:
        delta = (post[key][0] - pre[key][0]).reshape(-1, u.numel())
        assert torch.allclose(delta, (2.5 * u).expand_as(delta), atol=2e-4), f"{arch} at {key}"


@pytest.mark.parametrize("arch", ARCHS)
def test_ablate_removes_exactly_the_features_decoded_contribution(arch, adapter, dictionaries, acts):
    d = dictionaries[arch]
    x_all, t_all = acts
    with torch.no_grad():  # the two features most often active on this model's activations
        fired = (d.encode(x_all, t_all) != 0).sum(0)
    feats = [int(i) for i in fired.argsort(descending=True)[:2]]
    pre, post = probe(adapter, [Ablate(d, feats)])
    changed = 0
    for key, (x, t) in pre.items():
        x = x.reshape(-1, d.d_in)
        t = torch.full((x.shape[0],), t)
        with torch.no_grad():
            c = d.encode(x, t)
            c0 = c.clone()
            c0[:, feats] = 0
            want = x + d.decode(c0, t) - d.decode(c, t)
        got = post[key][0].reshape(-1, d.d_in)
        assert torch.allclose(got, want, atol=2e-4), f"{arch} at {key}"
        changed += int((got - x).abs().amax(1).gt(1e-6).sum())
    assert changed > 0, f"ablating {arch}'s most frequent features changed no token"


@pytest.mark.parametrize("arch", ["jumprelu", "matryoshka"])
def test_steer_cli_on_the_new_architectures(arch, adapter, dictionaries, tmp_path, monkeypatch, capsys):
    import difflens.models
    from difflens.cli import main
    from difflens.dictionaries.io import save

    monkeypatch.setattr(difflens.models, "load_adapter", lambda *a, **k: adapter)
    save(dictionaries[arch], tmp_path / arch)
    out = tmp_path / "steer.png"
    rc = main(["steer", "--dict", str(tmp_path / arch), "--steps", "3", "--feature", "3", "--scales=-4,0,4",
               "--scale-mode", "absolute", "--prompt", PROMPT, "--seed", "1", "--out", str(out)])
    assert rc == 0 and out.is_file()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["scales"] == [-4.0, 0.0, 4.0] and "steer features 3" in meta["intervention"]


@pytest.mark.parametrize("arch", ["jumprelu", "matryoshka"])
def test_new_architectures_change_the_image_and_their_noop_edits_do_not(arch, adapter, dictionaries, acts):
    """End to end on the generated images: steering and ablating a JumpReLU / Matryoshka feature
    changes the picture; scaling its codes by 1 and steering by 0 leave it bit-identical."""
    import numpy as np

    from difflens.intervene import Scale

    d = dictionaries[arch]
    x_all, t_all = acts
    with torch.no_grad():
        fired = (d.encode(x_all, t_all) != 0).sum(0)
    feats = [int(i) for i in fired.argsort(descending=True)[:2]]
    assert int(fired[feats[0]]) > 0, f"no {arch} feature fires on the toy model's activations"

    def image(interventions):
        return generate_with(adapter, [PROMPT], [0], interventions, steps=3).images

    clean = image([])
    for noop in (Scale(d, feats, 1.0), Steer(d, feats, 0.0, mode="absolute")):
        assert np.array_equal(image([noop]), clean), f"{arch}: {noop.describe()} changed the image"
    for edit in (Steer(d, [feats[0]], 8.0, mode="absolute"), Ablate(d, feats), Scale(d, feats, 4.0)):
        edited = image([edit])
        assert edited.shape == clean.shape
        assert not np.array_equal(edited, clean), f"{arch}: {edit.describe()} left the image unchanged"
