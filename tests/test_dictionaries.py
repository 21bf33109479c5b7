"""SAEs (TopK, BatchTopK, ReLU), TIDE, normalisation, sparse kernels and checkpoints."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from difflens.dictionaries import DictConfig, build, io
from difflens.dictionaries.kernels import topk_rows
from difflens.dictionaries.normalize import Normalizer
from difflens.dictionaries.sae import geometric_median, topk_flat
from difflens.errors import DifflensError

D, F, K = 16, 128, 4
DATA = Path(__file__).parent / "data"


def make(arch="topk", *, fast=True, norm="scalar", width=F, k=K, **kw):
    cfg = DictConfig(arch=arch, d_in=D, width=width, k=k, normalization=norm, site="blocks.1:img", model="toy", **kw)
    return build(cfg, fast=fast)


def data(n=256, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.2, 3.0, d) + 0.7  # anisotropic, off-centre
    t = torch.randint(0, 4, (n,), generator=g).float() * 250.0
    return x, t


# ---- config ------------------------------------------------------------------------------------------
def test_config_round_trip_keeps_unknown_future_keys():
    cfg = DictConfig(arch="tide", d_in=8, width=32, k=2)
    d = cfg.to_dict() | {"from_the_future": [1, 2]}
    back = DictConfig.from_dict(d)
    assert back.arch == "tide" and back.width == 32 and back.unknown == {"from_the_future": [1, 2]}
    assert back.to_dict() == d


def test_registry_is_the_one_list_of_architectures():
    from difflens.dictionaries import ARCHITECTURES
    from difflens.dictionaries.config import CONFIGS, TopKConfig
    from difflens.train.config import DictSpec

    assert set(ARCHITECTURES) == set(CONFIGS) >= {"topk", "batchtopk", "relu", "tide", "itda"}
    for name, cls in ARCHITECTURES.items():
        assert cls.arch == name and CONFIGS[name] is cls.config_class
        assert type(DictConfig(arch=name, d_in=8, width=32, k=2)) is cls.config_class
    # per-architecture fields: TopK has no TIDE or ITDA knobs, TIDE extends TopK
    assert "tide_hidden" not in TopKConfig.field_names() and "l1_coeff" not in TopKConfig.field_names()
    with pytest.raises(TypeError):
        DictConfig(arch="topk", d_in=8, width=32, k=2, tide_hidden=4)
    # the trainer's spec validation asks the registry: an unknown arch lists the registered ones
    with pytest.raises(DifflensError, match="use one of .*batchtopk.*topk"):
        DictSpec(name="x", arch="sparse", site="s", width=8, k=2)
    with pytest.raises(DifflensError, match="needs k"):
        DictSpec(name="x", arch="topk", site="s", width=8)
    assert DictSpec(name="x", arch="relu", site="s", width=8).k is None  # ReLU needs no k


def test_a_new_architecture_registers_once_and_the_trainer_accepts_it():
    from dataclasses import dataclass

    from difflens.dictionaries import ARCHITECTURES
    from difflens.dictionaries.base import register
    from difflens.dictionaries.config import CONFIGS, TopKConfig
    from difflens.dictionaries.sae import TopKSAE
    from difflens.train.config import DictSpec

    @dataclass
    class WideConfig(TopKConfig):
        wide_knob: int = 3

    try:
        @register("wide-test", WideConfig)
        class Wide(TopKSAE):
            pass

        cfg = DictConfig(arch="wide-test", d_in=8, width=16, k=2, wide_knob=5)
        assert isinstance(cfg, WideConfig) and DictConfig.from_dict(cfg.to_dict()) == cfg
        assert isinstance(build(cfg), Wide)
        DictSpec(name="w", arch="wide-test", site="s", width=16, k=2)
    finally:
        ARCHITECTURES.pop("wide-test", None)
        CONFIGS.pop("wide-test", None)


def test_every_registered_architecture_declares_its_report_family():
    from difflens.dictionaries import ARCHITECTURES
    from difflens.dictionaries.base import Dictionary, family, register
    from difflens.dictionaries.config import CONFIGS, TopKConfig

    assert {"topk", "batchtopk", "relu", "jumprelu", "matryoshka", "tide", "itda"} <= set(ARCHITECTURES)
    for name, cls in ARCHITECTURES.items():
        assert isinstance(cls.family, str) and cls.family, name
        assert family(name) == cls.family
    expected = {"topk": "sae", "batchtopk": "sae", "relu": "sae", "jumprelu": "sae", "matryoshka": "sae",
                "tide": "tide", "itda": "itda"}
    assert {a: family(a) for a in expected} == expected
    assert family("from-a-newer-difflens") == "from-a-newer-difflens"
    # a class with no family is refused at registration, with the fix in the message
    with pytest.raises(TypeError, match="family = "):
        @register("familyless-test", TopKConfig)
        class Familyless(Dictionary):
            pass
    assert "familyless-test" not in ARCHITECTURES and "familyless-test" not in CONFIGS


def test_flat_configs_of_earlier_checkpoints_load_per_architecture():
    """cfg.json used to carry every architecture's fields; they are dropped, future keys kept."""
    from difflens.dictionaries.config import ITDAConfig, TIDEConfig

    flat = json.loads((DATA / "ckpt_v1" / "tide" / "cfg.json").read_text())["config"]
    assert "itda_tau" in flat and "l1_coeff" in flat  # the old flat format
    cfg = DictConfig.from_dict(flat | {"from_the_future": 1})
    assert isinstance(cfg, TIDEConfig) and cfg.tide_hidden == 4 and cfg.unknown == {"from_the_future": 1}
    assert "itda_tau" not in cfg.to_dict()
    itda = DictConfig.from_dict(flat | {"arch": "itda", "width": 0, "itda_inference": "mp"})
    assert isinstance(itda, ITDAConfig) and itda.itda_inference == "mp" and itda.unknown == {}


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "tide", "itda"])
def test_checkpoints_written_before_the_registry_load_and_reconstruct_the_same(arch):
    """tests/data/ckpt_v1 was written by the flat-config code (commit 4d0dedb); same x_hat now."""
    from safetensors.torch import load_file

    d = io.load(DATA / "ckpt_v1" / arch)
    assert d.arch == arch and type(d.cfg) is d.config_class
    ref = load_file(str(DATA / "ckpt_v1" / "expected.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(d(ref["x"], ref["t"]).x_hat, ref[f"xhat_{arch}"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"arch": "sparse"}, "arch"),
        ({"k": 64}, "exceeds width"),
        ({"normalization": "zscore"}, "normalization"),
        ({"d_in": 0}, "d_in"),
    ],
)
def test_config_rejects_bad_values_with_a_fix(kw, msg):
    base = {"arch": "topk", "d_in": 8, "width": 32, "k": 4}
    with pytest.raises(DifflensError, match=msg):
        DictConfig(**(base | kw))


# ---- shapes and interface ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "tide", "jumprelu", "matryoshka"])
def test_shapes_and_unit_decoder_directions(arch):
    x, t = data()
    sae = make(arch, norm="pca-whiten")
    sae.init_from_data(x, t)
    out = sae(x, t)
    assert out.x_hat.shape == x.shape and out.loss.ndim == 0
    assert sae.encode(x, t).shape == (x.shape[0], F)
    assert sae.decode(sae.encode(x, t), t).shape == x.shape
    dirs = sae.decoder_directions()
    assert dirs.shape == (F, D)
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(F))
    assert out.codes.shape == (x.shape[0], F)


def test_wrong_width_input_is_a_clear_error():
    sae = make()
    with pytest.raises(DifflensError, match="d_in=16"):
        sae.encode(torch.randn(4, D + 1))


def test_decoder_directions_are_raw_space_directions_under_whitening():
    """Adding direction f in raw space must move the normalised input along W_dec_f."""
    x, t = data()
    sae = make(norm="pca-whiten")
    sae.init_from_data(x, t)
    dirs = sae.decoder_directions()
    moved = sae.norm.apply(x[:1] + dirs[3:4], None) - sae.norm.apply(x[:1], None)
    cos = torch.nn.functional.cosine_similarity(moved, sae.W_dec_FD[3:4].detach())
    assert float(cos) > 0.999


# ---- TopK / BatchTopK selection -----------------------------------------------------------------------------
def test_topk_has_exactly_k_active_per_row():
    x, t = data()
    sae = make()
    sae.init_from_data(x, t)
    with torch.no_grad():
        sae.b_enc_F.fill_(10.0)  # every selected pre-activation positive
    codes = sae.encode(x)
    assert ((codes != 0).sum(1) == K).all()
    out = sae(x)
    assert ((out.codes != 0).sum(1) == K).all()
    torch.testing.assert_close(out.codes, codes)
    vals, idx = sae.encode_sparse(x)
    assert vals.shape == (x.shape[0], K)
    torch.testing.assert_close(torch.zeros_like(codes).scatter(1, idx, vals), codes)


def test_grouped_topk_is_exact():
    pre = torch.randn(64, 4096)
    v, i = topk_rows(pre, 8)  # 128 groups >= 4k: the two-stage path
    ref_v, ref_i = pre.topk(8, dim=1)
    torch.testing.assert_close(v.sort(1).values, ref_v.sort(1).values)
    assert torch.equal(i.sort(1).values, ref_i.sort(1).values)
    torch.testing.assert_close(pre.gather(1, i), v)


def test_topk_flat_is_exact():
    x = torch.randn(200_000)
    v, i = topk_flat(x, 3000)
    assert torch.equal(i.sort().values, x.topk(3000).indices.sort().values)
    torch.testing.assert_close(x[i], v)


def test_batchtopk_selects_k_times_batch_and_uses_saved_threshold(tmp_path):
    x, t = data(n=128)
    sae = make("batchtopk")
    sae.init_from_data(x, t)
    with torch.no_grad():
        sae.b_enc_F.add_(torch.linspace(-1, 3, F))  # uneven latents -> rows get different counts
    sae.train()
    out = sae(x)
    nnz = (out.codes != 0).sum(1)
    assert int(nnz.sum()) == K * x.shape[0]
    assert nnz.min() < nnz.max()  # varies per row
    theta = float(sae.threshold)
    assert theta > 0
    sae.eval()
    with torch.no_grad():
        pre = sae._pre(sae.norm.apply(x))
    expected = torch.where(pre > theta, pre.relu(), torch.zeros_like(pre))
    torch.testing.assert_close(sae.encode(x), expected)
    io.save(sae, tmp_path / "b")
    loaded = io.load(tmp_path / "b")
    assert float(loaded.threshold) == theta
    torch.testing.assert_close(loaded.encode(x), expected)


# ---- training hooks -----------------------------------------------------------------------------------------
def test_encoder_is_decoder_transpose_at_init():
    sae = make()
    torch.testing.assert_close(sae.W_enc_FD, sae.W_dec_FD)  # pre = x @ W_enc_FDᵀ, i.e. W_enc = W_decᵀ
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(F))
    x = torch.randn(3, D)
    torch.testing.assert_close(sae._pre(x), (x - sae.b_dec_D) @ sae.W_dec_FD.T + sae.b_enc_F)


def test_b_dec_is_the_geometric_median_of_the_first_batch():
    x, t = data()
    sae = make(norm="none")
    sae.init_from_data(x, t)
    gm = sae.b_dec_D.detach()
    cost = lambda m: (x - m).norm(dim=1).sum()  # noqa: E731
    assert cost(gm) <= cost(x.mean(0)) + 1e-4
    for _ in range(5):  # a local optimum: random nudges do not improve it
        assert cost(gm) <= cost(gm + 0.05 * torch.randn(D)) + 1e-4
    torch.testing.assert_close(geometric_median(torch.tensor([[0.0], [1.0], [10.0]])), torch.tensor([1.0]), atol=1e-3, rtol=0)


def test_parallel_gradient_removed_and_rows_renormalised_after_step():
    x, t = data()
    sae = make()
    sae.init_from_data(x, t)
    sae.train()
    sae(x).loss.backward()
    g0 = sae.W_dec_FD.grad.clone()
    assert (g0 * sae.W_dec_FD).sum(1).abs().max() > 1e-6  # there was a parallel component
    sae.before_optimizer_step()
    par = (sae.W_dec_FD.grad * sae.W_dec_FD).sum(1)
    assert par.abs().max() < 1e-6
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    opt.step()
    assert (sae.W_dec_FD.norm(dim=1) - 1).abs().max() > 1e-3  # Adam broke the norms...
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec_FD.norm(dim=1), torch.ones(F))  # ...and the hook restores them


def test_dead_tracker_counts_tokens_since_last_fire():
    x, t = data(n=64)
    sae = make(dead_after_tokens=150)
    sae.init_from_data(x, t)
    sae.train()
    sae(x)
    fired = sae.tokens_since_fired_F == 0
    assert fired.sum() > 0 and (sae.tokens_since_fired_F[~fired] == 64).all()
    sae(x)
    assert not sae.dead_mask().any()
    sae(x)  # 192 >= 150 tokens: latents that never fired are now dead
    assert torch.equal(sae.dead_mask(), ~fired)
    assert sae.dead_fraction() == pytest.approx(float((~fired).float().mean()))
    sae.eval()
    before = sae.tokens_since_fired_F.clone()
    sae(x)
    assert torch.equal(before, sae.tokens_since_fired_F)  # inference does not count


@pytest.mark.parametrize("fast", [True, False])
def test_auxk_gradient_touches_only_dead_latents(fast):
    x, t = data()
    sae = make(fast=fast, dead_after_tokens=1, k_aux=8)
    sae.init_from_data(x, t)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    sae.tokens_since_fired_F.copy_(dead.long() * 10)
    sae.train()
    out = sae(x)
    assert "auxk" in out.losses and float(out.losses["auxk"].detach()) > 0
    out.losses["auxk"].backward()
    for W in (sae.W_dec_FD, sae.W_enc_FD):
        assert W.grad[~dead].abs().max() == 0
        assert W.grad[dead].abs().sum(1).gt(0).sum() > 0
    assert sae.b_enc_F.grad[~dead].abs().max() == 0


@pytest.mark.parametrize("arch, fast", [("topk", True), ("topk", False), ("batchtopk", True)])
def test_auxk_is_gao_normalised_relative_to_the_main_loss(arch, fast):
    """Independent computation from the weights: aux/main equals the reference's
    (1/32)·‖ê − e‖²/‖e − ē‖² over ‖x − x̂‖²/‖x − x̄‖² (both normalised the same way)."""
    x, t = data()
    sae = make(arch, fast=fast, dead_after_tokens=1, k_aux=8)
    sae.init_from_data(x, t)
    dead = torch.arange(F) % 3 == 0
    sae.tokens_since_fired_F.copy_(dead.long() * 10)
    sae.train()
    out = sae(x)
    with torch.no_grad():
        xn = sae.norm.apply(x, None).double()
        W_enc, W_dec = sae.W_enc_FD.double(), sae.W_dec_FD.double()
        pre = (xn - sae.b_dec_D.double()) @ W_enc.T + sae.b_enc_F.double()
        if arch == "topk":
            keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(K, dim=1).indices, True)
        else:  # the k·B largest entries of the whole batch
            keep = pre >= pre.reshape(-1).topk(K * x.shape[0]).values.min()
        x_hat = torch.where(keep, pre, 0).relu() @ W_dec + sae.b_dec_D.double()
        e = xn - x_hat
        pre_dead = torch.where(dead, pre, -torch.inf)
        kd = pre_dead.topk(8, dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, kd.indices, kd.values.clamp_min(0).nan_to_num(0))
        e_hat = z_aux @ W_dec
        main_ref = e.pow(2).sum() / (xn - xn.mean(0)).pow(2).sum()
        aux_ref = (1 / 32) * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        ratio = float(out.losses["auxk"]) / float(out.losses["mse"])
    assert ratio == pytest.approx(float(aux_ref / main_ref), rel=1e-4)
    # and the main term is the MSE in normalised space, as the logs have always shown it
    assert float(out.losses["mse"].detach()) == pytest.approx(float(e.pow(2).mean()), rel=1e-4)


def test_a_latent_selected_with_a_zero_code_does_not_count_as_firing():
    """k = width selects every latent; latent 3's pre-activation is always < 0 so its code is 0."""
    x, t = data(n=64)
    sae = make(width=8, k=8, dead_after_tokens=100, auxk=False)
    sae.init_from_data(x, t)
    with torch.no_grad():
        sae.b_enc_F[3] = -1e3
        sae.b_enc_F[[0, 1, 2, 4, 5, 6, 7]] = 1e3
    sae.train()
    for _ in range(2):
        out = sae(x)
    assert (out.codes[:, 3] == 0).all() and (out.codes[:, [0, 1, 2, 4]] > 0).all()
    assert sae.dead_mask().tolist() == [False, False, False, True, False, False, False, False]


def test_auxk_off_or_no_dead_latents_gives_no_aux_loss():
    x, t = data()
    for kw in ({"auxk": False, "dead_after_tokens": 1}, {"dead_after_tokens": 10**9}):
        sae = make(**kw)
        sae.init_from_data(x, t)
        sae.tokens_since_fired_F.fill_(5)
        sae.train()
        assert "auxk" not in sae(x).losses


def test_training_reuses_one_preactivation_buffer_and_eval_frees_it():
    x, t = data()
    sae = make()
    sae.init_from_data(x, t)
    sae.train()
    sae(x)
    ptr = sae._ws.data_ptr()
    sae(x)
    assert sae._ws.data_ptr() == ptr and sae._ws.shape == (x.shape[0], F)
    sae.eval()
    assert sae._ws is None
    sae(x)
    assert sae._ws is None  # inference keeps no buffer


def test_lr_scale_follows_width():
    assert make(width=2**14, k=4).lr_scale() == pytest.approx(1.0)
    assert make(width=2**12, k=4).lr_scale() == pytest.approx(2.0)


def test_relu_l1_is_weighted_by_decoder_norms():
    x, t = data()
    sae = make("relu", l1_coeff=3.0)
    sae.init_from_data(x, t)
    with torch.no_grad():
        sae.W_dec_FD.mul_(torch.linspace(0.5, 2.0, F)[:, None])
    out = sae(x)
    z = out.codes
    expected = 3.0 / D * (z * sae.W_dec_FD.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(out.losses["l1"], expected)
    assert not sae.cfg.decoder_unit_norm  # the L1 weighting would be moot otherwise


# ---- fast path = dense reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch, negative_dead", [("topk", False), ("topk", True), ("batchtopk", False), ("tide", False)])
def test_fast_and_dense_agree_on_outputs_and_gradients(arch, negative_dead):
    x, t = data()
    fast, dense = make(arch, fast=True, dead_after_tokens=1, k_aux=8), make(arch, fast=False, dead_after_tokens=1, k_aux=8)
    fast.init_from_data(x, t)
    if arch == "tide":  # move the FiLM off the identity so its gradient path is exercised too
        with torch.no_grad():
            for p in fast.film.mlp[2].parameters():
                p.normal_(0, 0.05)
    dead = torch.arange(F) % 4 == 0
    if negative_dead:  # many AuxK picks then have pre <= 0 and are dropped from the sparse pattern
        with torch.no_grad():
            fast.b_enc_F[dead] -= 1.0
    dense.load_state_dict(fast.state_dict())
    for m in (fast, dense):
        m.tokens_since_fired_F.copy_(dead.long() * 10)
        m.train()
    of, od = fast(x, t), dense(x, t)
    assert set(of.losses) == {"mse", "auxk"}
    torch.testing.assert_close(of.x_hat, od.x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(of.codes, od.codes, atol=1e-5, rtol=1e-5)
    for name in of.losses:
        torch.testing.assert_close(of.losses[name], od.losses[name], atol=1e-6, rtol=1e-5)
    of.loss.backward()
    od.loss.backward()
    pd = dict(dense.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, pd[name].grad, atol=1e-6, rtol=1e-4, msg=f"gradient of {name}")


def test_fast_path_under_bf16_autocast_matches_the_dense_reference_under_autocast():
    x, t = data()
    fast, dense = make(dead_after_tokens=1, k_aux=8), make(fast=False, dead_after_tokens=1, k_aux=8)
    fast.init_from_data(x, t)
    dense.load_state_dict(fast.state_dict())
    for m in (fast, dense):
        m.tokens_since_fired_F[::4] = 10
        m.train()
    ref32 = fast(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        of, od = fast(x), dense(x)
    assert of.x_hat.dtype == torch.float32
    # same bf16 GEMM -> same selection; the sparse decode differs from the dense one by rounding only
    assert float((of.indices.sort(1).values == od.codes.topk(K, dim=1).indices.sort(1).values).float().mean()) > 0.95
    rel = lambda a, b: float((a.detach() - b.detach()).norm() / b.detach().norm())  # noqa: E731
    assert rel(of.x_hat, od.x_hat) < 0.02
    assert rel(of.x_hat, ref32.x_hat) < 0.2  # near-ties may flip in bf16
    of.loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in fast.parameters())


# ---- normalisation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["none", "scalar", "per-timestep", "pca-whiten"])
def test_normalisation_is_invertible_and_checkpointed(mode, tmp_path):
    x, t = data(n=512)
    sae = make(norm=mode)
    sae.init_from_data(x, t)
    xn = sae.norm.apply(x, t)
    torch.testing.assert_close(sae.norm.invert(xn, t), x, atol=1e-4, rtol=1e-4)
    if mode != "none":
        assert float(xn.pow(2).sum(1).mean()) == pytest.approx(D, rel=0.05)  # E‖x_n‖² = d
    if mode == "pca-whiten":
        cov = torch.cov(xn.T)
        torch.testing.assert_close(cov, torch.eye(D), atol=1e-3, rtol=0)
    if mode == "per-timestep":
        for c in sae.norm.centers_T:
            assert xn[t == c].mean(0).abs().max() < 1e-4  # each bucket centred
    # a "perfect dictionary": decoding the exact normalised input returns the raw input
    torch.testing.assert_close(sae.norm.invert(sae.norm.apply(x[:5], t[:5]), t[:5]), x[:5], atol=1e-4, rtol=1e-4)
    io.save(sae, tmp_path / "n")
    loaded = io.load(tmp_path / "n")
    torch.testing.assert_close(loaded.norm.apply(x, t), xn)
    summary = json.loads((tmp_path / "n" / "cfg.json").read_text())["normalization"]
    assert summary["mode"] == mode


def test_unfitted_normalisation_says_what_to_do():
    sae = make(norm="scalar")
    with pytest.raises(DifflensError, match="init_from_data"):
        sae.encode(torch.randn(2, D))
    per_t = Normalizer("per-timestep", D)
    per_t.fit(*data())
    with pytest.raises(DifflensError, match="timesteps"):
        per_t.apply(torch.randn(2, D))


# ---- TIDE -------------------------------------------------------------------------------------------------------
def test_tide_is_the_identity_modulation_at_init():
    x, t = data()
    tide, topk = make("tide"), make("topk")
    tide.init_from_data(x, t)
    sd = {k: v for k, v in tide.state_dict().items() if not k.startswith(("film.", "t_range"))}
    topk.load_state_dict(sd)
    scale, shift = tide.film(t)
    assert scale.abs().max() == 0 and shift.abs().max() == 0
    xn = tide.norm.apply(x, t)
    assert torch.equal(tide._to_sae_space(xn, (scale, shift)), xn)
    torch.testing.assert_close(tide(x, t).x_hat, topk(x, t).x_hat)
    torch.testing.assert_close(tide.encode(x, t), topk.encode(x, t))


def test_tide_inverts_its_film_and_needs_timesteps():
    x, t = data()
    tide = make("tide")
    tide.init_from_data(x, t)
    with torch.no_grad():
        for p in tide.film.mlp[2].parameters():
            p.normal_(0, 1.0)  # large: the bounded scale must keep the FiLM invertible
    film = tide._film(t)
    assert (1 + film[0]).min() >= 1 - tide.cfg.tide_max_scale - 1e-6
    xn = tide.norm.apply(x, t)
    torch.testing.assert_close(tide._from_sae_space(tide._to_sae_space(xn, film), film), xn, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(tide.encode(x, t), tide.encode(x, torch.zeros_like(t)))  # codes depend on t
    with pytest.raises(DifflensError, match="timestep"):
        tide.encode(x)
    assert tide.decoder_directions(t=500.0).shape == (F, D)


# ---- checkpoints --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "tide", "jumprelu", "matryoshka"])
def test_checkpoint_round_trip_without_pickle(arch, tmp_path):
    x, t = data()
    sae = make(arch, norm="per-timestep")
    sae.init_from_data(x, t)
    sae.train()
    sae(x, t)
    sae.eval()
    folder = io.save(sae, tmp_path / "d", extra={"store_fingerprint": "abc123", "training": {"lr": 2e-4}, "note": "hi"})
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "weights.safetensors"]
    raw = (folder / "weights.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    json.loads(raw[8 : 8 + header_len])  # a safetensors header, not a pickle
    assert b"\x80\x04" not in raw[:2]
    meta = json.loads((folder / "cfg.json").read_text())
    assert meta["architecture"] == arch and meta["site"] == "blocks.1:img" and meta["d_in"] == D
    assert meta["store_fingerprint"] == "abc123" and meta["training"] == {"lr": 2e-4}
    assert meta["library_version"]
    loaded = io.load(folder)
    assert type(loaded) is type(sae)
    assert torch.equal(loaded.encode(x, t), sae.encode(x, t))
    assert torch.equal(loaded.tokens_since_fired_F, sae.tokens_since_fired_F)


def test_checkpoint_errors_are_clear(tmp_path):
    x, t = data()
    sae = make()
    sae.init_from_data(x, t)
    folder = io.save(sae, tmp_path / "d")
    with pytest.raises(DifflensError, match="site"):
        io.load(folder, expect_site="blocks.2:img")
    with pytest.raises(DifflensError, match="width 3072"):
        io.load(folder, expect_d_in=3072)
    with pytest.raises(DifflensError, match="no dictionary"):
        io.load(tmp_path / "nothing")
    w = folder / "weights.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])
    with pytest.raises(DifflensError, match="weights.safetensors is corrupt"):
        io.load(folder)
    w.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DifflensError, match="weights.safetensors"):
        io.load(folder)
    w.write_bytes(good)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(DifflensError, match="cfg.json is corrupt"):
        io.load(folder)


def test_save_into_a_folder_with_other_files_keeps_them_and_detects_torn_pairs(tmp_path):
    x, t = data()
    sae = make()
    sae.init_from_data(x, t)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")
    io.save(sae, folder)
    first_cfg = (folder / "cfg.json").read_text()
    io.save(sae, folder)  # a second save replaces both files...
    assert (folder / "metrics.jsonl").read_text() == "{}\n"  # ...and leaves the trainer's logs alone
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "metrics.jsonl", "weights.safetensors"]
    (folder / "cfg.json").write_text(first_cfg)  # as if the process died between the two renames
    with pytest.raises(DifflensError, match="different saves"):
        io.load(folder)


def test_difflens_load_entry_point(tmp_path):
    import difflens

    x, t = data()
    sae = make()
    sae.init_from_data(x, t)
    io.save(sae, tmp_path / "d")
    assert torch.equal(difflens.load(tmp_path / "d", expect_d_in=D).encode(x), sae.encode(x))


# ---- it learns ----------------------------------------------------------------------------------------------------
def test_topk_sae_learns_a_planted_dictionary():
    g = torch.Generator().manual_seed(0)
    d, n_feat, k = 32, 64, 3
    true = torch.randn(n_feat, d, generator=g)
    true /= true.norm(dim=1, keepdim=True)

    def batch(n=256):
        idx = torch.rand(n, n_feat, generator=g).topk(k, dim=1).indices
        codes = torch.zeros(n, n_feat).scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
        return codes @ true

    cfg = DictConfig(arch="topk", d_in=d, width=128, k=k, normalization="scalar", dead_after_tokens=20_000)
    sae = build(cfg)
    sae.init_from_data(batch(2048))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3, betas=(0.0, 0.99))
    sae.train()
    for _ in range(300):
        opt.zero_grad()
        sae(batch()).loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    sae.eval()
    x = batch(2048)
    with torch.no_grad():
        x_hat = sae(x).x_hat
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.1
    # the planted directions are recovered by decoder rows
    cos = (true @ sae.decoder_directions().T).amax(1)
    assert float((cos > 0.9).float().mean()) > 0.9


# ---- JumpReLU and Matryoshka BatchTopK --------------------------------------------------------------
def test_jumprelu_codes_and_straight_through_gradients_match_an_independent_computation():
    x, t = data()
    sae = make("jumprelu", l0_coeff=0.01, jumprelu_bandwidth=0.5)
    sae.init_from_data(x, t)
    sae.train()
    out = sae(x)
    out.loss.backward()
    with torch.no_grad():
        xn = sae.norm.apply(x, None).double()
        W_enc, W_dec = sae.W_enc_FD.double(), sae.W_dec_FD.double()
        pre = (xn - sae.b_dec_D.double()) @ W_enc.T + sae.b_enc_F.double()
        theta, eps, lam = sae.threshold_F.double(), 0.5, 0.01
        z = torch.where(pre > theta, pre, 0.0)
        x_hat = z @ W_dec + sae.b_dec_D.double()
        B = x.shape[0]
        mse = (x_hat - xn).pow(2).mean()
        l0 = (pre > theta).double().sum(1).mean()
        g_z = 2 * (x_hat - xn) @ W_dec.T / xn.numel()  # d mse / d z
        kern = ((pre - theta).abs() / eps < 0.5).double()
        g_theta = (g_z * (-theta / eps) * kern).sum(0) + lam / B * (-kern / eps).sum(0)
    torch.testing.assert_close(out.codes.double(), z, atol=1e-5, rtol=1e-5)
    assert float(out.losses["mse"].detach()) == pytest.approx(float(mse), rel=1e-5)
    assert float(out.losses["l0"].detach()) == pytest.approx(lam * float(l0), rel=1e-6)
    assert kern.sum() > 0  # the kernel is exercised
    torch.testing.assert_close(sae.log_threshold_F.grad.double(), g_theta * theta, atol=1e-7, rtol=1e-4)


def test_jumprelu_thresholds_start_at_l0_k_and_the_l0_penalty_sparsifies():
    x, t = data(n=256)
    res = {}
    for lam in (0.0, 0.3):
        sae = make("jumprelu", l0_coeff=lam, k=8, width=32)
        sae.init_from_data(x, t)
        sae.eval()
        assert float((sae.encode(x) != 0).sum(1).float().mean()) == pytest.approx(8, rel=0.1)
        sae.train()
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            sae(x).loss.backward()
            opt.step()
        res[lam] = float(sae(x).l0)
    assert res[0.3] < 0.7 * res[0.0]


def test_matryoshka_losses_are_the_nested_prefix_reconstructions():
    x, t = data()
    sae = make("matryoshka", k=4, matryoshka_prefixes=[16, 48, F], dead_after_tokens=1, k_aux=8)
    sae.init_from_data(x, t)
    sae.tokens_since_fired_F[::5] = 10
    sae.train()
    out = sae(x)
    with torch.no_grad():
        xn = sae.norm.apply(x, None).double()
        pre = (xn - sae.b_dec_D.double()) @ sae.W_enc_FD.double().T + sae.b_enc_F.double()
        keep = pre >= pre.reshape(-1).topk(4 * x.shape[0]).values.min()
        z = torch.where(keep, pre, 0).relu()
        W, b = sae.W_dec_FD.double(), sae.b_dec_D.double()
        rec = {m: z[:, :m] @ W[:m] + b for m in (16, 48, F)}
        mse = {m: float((r - xn).pow(2).mean()) for m, r in rec.items()}
    assert set(out.losses) == {"mse", "prefix_mse", "auxk"}
    assert float(out.losses["mse"].detach()) == pytest.approx(mse[F], rel=1e-4)
    assert float(out.losses["prefix_mse"].detach()) == pytest.approx(mse[16] + mse[48], rel=1e-4)
    torch.testing.assert_close(out.codes.double(), z, atol=1e-5, rtol=1e-5)
    # inference is BatchTopK's fixed threshold
    sae.eval()
    codes = sae.encode(x)
    assert torch.equal(codes != 0, sae._pre(sae.norm.apply(x, None)) > sae.threshold)
    with pytest.raises(DifflensError, match="end at width"):
        DictConfig(arch="matryoshka", d_in=8, width=32, k=2, matryoshka_prefixes=[8, 16])
