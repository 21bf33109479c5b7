"""Interventions on the tiny toy model: identity under no-op edits, regions, windows, several at once,
CFG branches, transfer, scale modes, and the errors users hit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from difflens.dictionaries.config import DictConfig
from difflens.dictionaries.sae import TopKSAE
from difflens.errors import DifflensError
from difflens.hooks import HookSet
from difflens.intervene import (
    Ablate,
    Clamp,
    CodeEdit,
    Region,
    Scale,
    Splice,
    Steer,
    Transfer,
    Window,
    generate_with,
    recorder,
    steer_sweep,
)

PROMPT = "a large red circle in the top left on a black plain background"
PROMPT2 = "a small blue square in the bottom right on a gray dots background"
SITE = "transformer_blocks.1:img"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from toy_fixtures import make_tiny_toy

    from difflens.models.toy.adapter import ToyAdapter

    folder = make_tiny_toy(tmp_path_factory.mktemp("tiny_toy"))
    return ToyAdapter.load(folder=folder)


def tiny_sae(d: int, width: int = 64, k: int = 4, site: str = SITE, seed: int = 0) -> TopKSAE:
    sae = TopKSAE(DictConfig(arch="topk", d_in=d, width=width, k=k, site=site, normalization="none", init_seed=seed))
    with torch.no_grad():  # random but not transpose-tied, so reconstructions are imperfect
        g = torch.Generator().manual_seed(seed + 1)
        sae.W_enc_FD.add_(0.3 * torch.randn(sae.W_enc_FD.shape, generator=g))
        sae.b_dec_D.normal_(0, 0.1, generator=g)
    return sae.eval()


@pytest.fixture(scope="module")
def sae(adapter):
    return tiny_sae(adapter.site_dim(SITE))


@pytest.fixture(scope="module")
def clean(adapter):
    return adapter.generate([PROMPT, PROMPT2], [0, 1], steps=3)


def run_with_probe(adapter, interventions, prompts=(PROMPT, PROMPT2), seeds=(0, 1), site=SITE, **kw):
    """Generate and record the site's activations just before and just after the interventions."""
    pre, post = {}, {}
    gen = generate_with(
        adapter, list(prompts), list(seeds), interventions, steps=3,
        pre_hooks=HookSet([(site, recorder(pre))]), extra_hooks=HookSet([(site, recorder(post))]), **kw,
    )
    return gen, pre, post


# ---- identity -----------------------------------------------------------------------------------
def test_noop_edits_are_bit_identical(adapter, sae, clean):
    ivs = [Scale(sae, list(range(sae.num_latents)), 1.0), Steer(sae, [3], 0.0, mode="absolute")]
    gen = generate_with(adapter, [PROMPT, PROMPT2], [0, 1], ivs, steps=3)
    assert all(iv.steps_applied() == [0, 1, 2] for iv in ivs)  # the hooks really ran and wrote back
    assert np.array_equal(gen.images, clean.images)
    assert torch.equal(gen.latents, clean.latents)


def test_splice_with_error_term_reproduces_clean(adapter, sae, clean):
    gen = generate_with(adapter, [PROMPT, PROMPT2], [0, 1], [Splice(sae, keep_error=True)], steps=3)
    assert (gen.latents - clean.latents).abs().max().item() < 1e-4
    assert np.abs(gen.images.astype(int) - clean.images.astype(int)).max() <= 1
    spliced = generate_with(adapter, [PROMPT, PROMPT2], [0, 1], [Splice(sae)], steps=3)
    assert (spliced.latents - clean.latents).abs().max().item() > 1e-3  # the reconstruction is imperfect


def test_edits_change_the_image(adapter, sae, clean):
    gen = generate_with(adapter, [PROMPT, PROMPT2], [0, 1], [Ablate(sae, range(sae.num_latents))], steps=3)
    assert not np.array_equal(gen.images, clean.images)
    gen = generate_with(adapter, [PROMPT, PROMPT2], [0, 1], [Clamp(sae, [5], 20.0)], steps=3)
    assert not np.array_equal(gen.images, clean.images)


def test_ablation_writes_back_x_minus_the_feature_contribution(adapter, sae):
    _, pre, post = run_with_probe(adapter, [Ablate(sae, [7, 9])])
    x = pre[(0, 0)][0].reshape(-1, sae.d_in)
    t = torch.full((x.shape[0],), 1000.0)
    codes = sae.encode(x, t)
    expected = x - codes[:, [7, 9]] @ sae.W_dec_FD[[7, 9]].detach()
    assert torch.allclose(post[(0, 0)][0].reshape(-1, sae.d_in), expected, atol=1e-5)


# ---- regions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", ["steer", "edit"])
def test_region_leaves_tokens_outside_untouched(adapter, sae, make):
    region = Region.parse("0,0,16,8")  # pixels: columns 0..15, rows 0..7 -> tokens cols 0..7, rows 0..3
    iv = Steer(sae, [3], 2.0, mode="absolute", region=region) if make == "steer" else Clamp(sae, [3], 5.0, region=region)
    _, pre, post = run_with_probe(adapter, [iv])
    inside = np.zeros((16, 16), bool)
    inside[0:4, 0:8] = True
    inside = torch.from_numpy(inside.reshape(-1))
    for key in pre:
        delta = (post[key][0] - pre[key][0]).abs().amax(dim=-1)  # [B, N]
        assert torch.all(delta[:, ~inside] == 0), f"change outside the region at {key}"
        assert torch.all(delta[:, inside] > 0), f"no change inside the region at {key}"


def test_region_resolution_pixels_tokens_and_masks():
    box_px = Region.parse("4,0,8,2").resolve((16, 16), (32, 32)).reshape(16, 16)
    assert box_px.sum() == 2 and box_px[0, 2] and box_px[0, 3]
    box_tok = Region.parse("2,0,4,1", units="tokens").resolve((16, 16)).reshape(16, 16)
    assert torch.equal(box_px, box_tok)
    m = np.zeros((32, 32), bool)
    m[16:, 16:] = True
    got = Region(mask=m).resolve((16, 16)).reshape(16, 16)
    assert got[8:, 8:].all() and got.sum() == 64
    small = np.zeros((4, 4), bool)  # a coarser mask than the grid is upsampled
    small[0, 0] = True
    assert Region(mask=small).resolve((16, 16)).reshape(16, 16)[:4, :4].all()


def test_region_from_png(tmp_path):
    from PIL import Image

    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:16, :16] = 255
    Image.fromarray(arr).save(tmp_path / "m.png")
    got = Region.from_png(tmp_path / "m.png").resolve((16, 16)).reshape(16, 16)
    assert got[:8, :8].all() and got.sum() == 64


@pytest.mark.parametrize(
    "make",
    [
        lambda: Region.parse("8,8,4,12"),  # x1 < x0
        lambda: Region.parse("1,2,3"),
        lambda: Region.parse("a,b,c,d"),
        lambda: Region.parse("-1,0,4,4"),
        lambda: Region.parse("0,0,40,8").resolve((16, 16), (32, 32)),  # beyond the image
        lambda: Region.parse("0,0,17,8", units="tokens").resolve((16, 16)),
        lambda: Region.parse("0,0,0.5,0.5").resolve((16, 16), (32, 32)),  # covers no token centre
        lambda: Region(mask=np.zeros((32, 32), bool)).resolve((16, 16)),
        lambda: Region(mask=np.zeros(5, bool)),
        lambda: Region.from_png("/nonexistent/mask.png"),
    ],
)
def test_bad_regions_raise_clear_errors(make):
    with pytest.raises(DifflensError):
        make()


def test_region_on_text_site_is_refused(sae):
    with pytest.raises(DifflensError, match="text stream"):
        Steer(direction=torch.ones(32), site="transformer_blocks.1:txt", region=Region.parse("0,0,4,4"))


# ---- windows ------------------------------------------------------------------------------------
def test_step_window_limits_the_hook_to_chosen_steps(adapter, sae):
    iv = Steer(sae, [3], 3.0, mode="absolute", window=Window.range(1, 2))
    _, pre, post = run_with_probe(adapter, [iv])
    assert iv.steps_applied() == [1]
    for (step, call), (a, _, _) in pre.items():
        changed = not torch.equal(a, post[(step, call)][0])
        assert changed == (step == 1)


def test_timestep_window_and_explicit_steps(adapter, sae):
    ts = adapter.timesteps(3)
    iv = Steer(sae, [3], 1.0, mode="absolute", window=Window(timesteps=(ts[0] - 1, ts[0] + 1)))
    iv2 = Steer(sae, [4], 1.0, mode="absolute", window=Window.parse(steps="0,2"))
    generate_with(adapter, [PROMPT], [0], [iv, iv2], steps=3)
    assert iv.steps_applied() == [0]
    assert iv2.steps_applied() == [0, 2]


def test_window_that_selects_nothing_is_an_error(adapter, sae):
    with pytest.raises(DifflensError, match="selects none"):
        generate_with(adapter, [PROMPT], [0], [Steer(sae, [3], 1.0, window=Window.range(5, 9))], steps=3)
    for bad in ("5:2", "x:y", "-1:3", ","):
        with pytest.raises(DifflensError):
            Window.parse(steps=bad)
    with pytest.raises(DifflensError):
        Window.parse(timesteps="900:100")


# ---- several at once ------------------------------------------------------------------------------
def test_several_interventions_in_one_generation(adapter, sae):
    other_site = "transformer_blocks.0:img"
    sae0 = tiny_sae(adapter.site_dim(other_site), site=other_site, seed=3)
    s1 = Steer(sae, [3], 1.5, mode="absolute")
    s2 = Steer(sae, [8], -2.0, mode="absolute", window=Window.range(0, 2))
    ab = Ablate(sae0, [1, 2, 3])
    _, pre, post = run_with_probe(adapter, [s1, ab, s2])
    assert s1.steps_applied() == [0, 1, 2] and s2.steps_applied() == [0, 1] and ab.steps_applied() == [0, 1, 2]
    dirs = sae.decoder_directions()
    for (step, call), (a, _, _) in pre.items():
        want = 1.5 * dirs[3] + (-2.0 * dirs[8] if step < 2 else 0)
        got = post[(step, call)][0] - a
        assert torch.allclose(got, want.expand_as(got), atol=1e-5)


# ---- CFG branches ----------------------------------------------------------------------------------
@pytest.mark.parametrize("branch", ["cond", "uncond", "both"])
def test_cfg_branch_selection(adapter, sae, branch):
    iv = Steer(sae, [3], 2.0, mode="absolute", branch=branch)
    _, pre, post = run_with_probe(adapter, [iv])
    for key, (a, is_cond, _) in pre.items():
        changed = (post[key][0] - a).abs().amax(dim=(1, 2)) > 0  # per row
        want = {"cond": is_cond, "uncond": ~is_cond, "both": torch.ones_like(is_cond)}[branch]
        assert torch.equal(changed, want)
    flags = {c for e in iv.log for _, c in e["rows"]}
    assert flags == {"cond": {True}, "uncond": {False}, "both": {True, False}}[branch]


def test_uncond_branch_without_cfg_warns_and_changes_nothing(adapter, sae):
    clean = adapter.generate([PROMPT], [0], steps=3, guidance=1.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gen = generate_with(adapter, [PROMPT], [0], [Steer(sae, [3], 5.0, branch="uncond")], steps=3, guidance=1.0)
    assert any("never acted" in str(x.message) for x in w)
    assert np.array_equal(gen.images, clean.images)


def test_samples_restrict_to_chosen_batch_entries(adapter, sae, clean):
    gen = generate_with(adapter, [PROMPT, PROMPT2], [0, 1], [Steer(sae, [3], 50.0, mode="absolute", samples=[1])], steps=3)
    assert np.array_equal(gen.images[0], clean.images[0])
    assert not np.array_equal(gen.images[1], clean.images[1])


# ---- scale modes ---------------------------------------------------------------------------------
def test_scale_modes_set_the_step_length(adapter, sae):
    def delta_norm(iv):
        _, pre, post = run_with_probe(adapter, [iv], prompts=[PROMPT], seeds=[0])
        a = pre[(0, 0)][0]
        return (post[(0, 0)][0] - a).norm(dim=-1), a

    d, _ = delta_norm(Steer(sae, [3], 2.5, mode="absolute"))
    assert torch.allclose(d, torch.full_like(d, 2.5), atol=1e-4)
    d, a = delta_norm(Steer(sae, [3], 0.8, mode="token-norm"))
    want = 0.8 * a.norm(dim=-1).mean(dim=-1, keepdim=True)  # per row: the mean token norm
    assert torch.allclose(d, want.expand_as(d), rtol=1e-4)
    d, _ = delta_norm(Steer(sae, [3], 0.5, mode="feature-max", feature_max={3: 4.0}))
    assert torch.allclose(d, torch.full_like(d, 2.0), atol=1e-4)  # unit decoder rows, no normalisation
    with pytest.raises(DifflensError, match="feature-max"):
        generate_with(adapter, [PROMPT], [0], [Steer(sae, [3], 1.0, mode="feature-max")], steps=3)


# ---- transfer ---------------------------------------------------------------------------------------
def test_transfer_swaps_codes_from_the_reference(adapter, sae):
    ref_prompt, ref_seed = PROMPT2, 5
    region = Region.parse("0,0,8,8", units="tokens")
    iv = Transfer(sae, (ref_prompt, ref_seed), features=[2, 3, 4], region=region)
    _, pre, post = run_with_probe(adapter, [iv], prompts=[PROMPT], seeds=[0])
    refrec: dict = {}
    ref = generate_with(adapter, [ref_prompt], [ref_seed], [], steps=3, extra_hooks=HookSet([(SITE, recorder(refrec))]))
    assert ref.images.shape == iv.reference_image[None].shape
    inside = region.resolve((16, 16))
    x = pre[(0, 0)][0].reshape(-1, sae.d_in)
    xr = refrec[(0, 0)][0].reshape(-1, sae.d_in)
    t = torch.full((x.shape[0],), 1000.0)
    c, cr = sae.encode(x, t), sae.encode(xr, t)
    c2 = c.clone()
    c2[:, [2, 3, 4]] = cr[:, [2, 3, 4]]
    want = x + sae.decode(c2, t) - sae.decode(c, t)
    rows = inside.repeat(x.shape[0] // inside.numel())
    got = post[(0, 0)][0].reshape(-1, sae.d_in)
    assert torch.allclose(got[rows], want[rows], atol=1e-5)
    assert torch.equal(got[~rows], x[~rows])


def test_transfer_from_itself_is_identity(adapter, sae):
    clean = adapter.generate([PROMPT], [0], steps=3)
    gen = generate_with(adapter, [PROMPT], [0], [Transfer(sae, (PROMPT, 0))], steps=3)
    assert np.abs(gen.images.astype(int) - clean.images.astype(int)).max() <= 1


# ---- errors ---------------------------------------------------------------------------------------
def test_unknown_features_and_bad_arguments(adapter, sae):
    with pytest.raises(DifflensError, match=r"ids 0\.\.63"):
        Steer(sae, [64], 1.0)
    with pytest.raises(DifflensError, match="out of range"):
        Ablate(sae, [-1])
    with pytest.raises(DifflensError):
        Clamp(sae, [1], "big")
    with pytest.raises(DifflensError):
        Steer(sae, [1], 1.0, mode="sideways")
    with pytest.raises(DifflensError):
        Steer(sae, [1], 1.0, branch="left")
    wrong = tiny_sae(16, site=SITE)
    with pytest.raises(DifflensError, match="d_in"):
        generate_with(adapter, [PROMPT], [0], [Ablate(wrong, [1])], steps=3)
    with pytest.raises(DifflensError, match="site"):
        generate_with(adapter, [PROMPT], [0], [Steer(direction=torch.ones(32), site="transformer_blocks.9:img")], steps=3)
    with pytest.raises(DifflensError, match="samples"):
        generate_with(adapter, [PROMPT], [0], [Steer(sae, [1], 1.0, samples=[3])], steps=3)


# ---- sweep ----------------------------------------------------------------------------------------
def test_steer_sweep_puts_clean_first_and_zero_scale_matches_it(adapter, sae):
    out = steer_sweep(adapter, sae, [3], [-4.0, 0.0, 4.0], PROMPT, 0, steps=3, mode="absolute")
    assert out["images"].shape == (4, 32, 32, 3)
    assert out["labels"][0].startswith("unsteered")
    assert np.array_equal(out["images"][0], out["images"][2])
    assert not np.array_equal(out["images"][0], out["images"][3])
