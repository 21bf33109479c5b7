"""Adapters over real diffusers pipelines (tiny random weights): sites, step/CFG bookkeeping,
hook effects on images, loading and its errors, and the `sites` verb."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflens.errors import DifflensError
from difflens.hooks import HookSet
from difflens.models import load_adapter
from difflens.models.flux import FluxAdapter
from difflens.models.sd3 import SD3Adapter
from difflens.models.tiny import tiny_pipeline

STEPS = 2
GRID = (8, 8)  # 32 px / (2x VAE * 2x patch or 2x2 packing)


pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def folders(tiny_folders):
    return tiny_folders  # saved once per session (conftest.TinyFolders)


@pytest.fixture(scope="module")
def flux():
    return FluxAdapter(tiny_pipeline("flux"), model_id="tiny-flux-schnell")


@pytest.fixture(scope="module")
def flux_dev(folders):
    return load_adapter(str(folders["flux-dev"]))


@pytest.fixture(scope="module")
def sd3():
    return SD3Adapter(tiny_pipeline("sd3"), model_id="tiny-sd3")


@pytest.fixture(scope="module")
def pixart(folders):
    return load_adapter(str(folders["pixart"]))


@pytest.fixture(scope="module")
def dit(folders):
    return load_adapter(str(folders["dit"]))


# family -> prompts, size kwargs, CFG layout of one call (is_cond per row), text tokens per txt site
FAMILIES = {
    "flux": (["a red cat", "blue sky"], {"height": 32, "width": 32}, [True, True], 512),  # T5 pads to 512
    "flux_dev": (["a red cat", "blue sky"], {"height": 32, "width": 32}, [True, True], 512),
    "sd3": (["a red cat", "blue sky"], {}, [False, False, True, True], 16 + 256),  # CLIP 16 + T5 256
    "pixart": (["a red cat", "blue sky"], {}, [False, False, True, True], None),
    "dit": (["207", "goldfish"], {}, [True, True, False, False], None),
}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    name = request.param
    prompts, size, layout, n_txt = FAMILIES[name]
    return name, request.getfixturevalue(name), prompts, size, layout, n_txt


def _gen(adapter, prompts, size, hooks=None, **kw):
    return adapter.generate(prompts, list(range(len(prompts))), steps=STEPS, hooks=hooks, **size, **kw)


def _no_hooks_left(adapter) -> bool:
    mods = adapter.transformer.modules()
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in mods) and "step" not in vars(
        adapter.pipe.scheduler
    )


# ---- site tables -----------------------------------------------------------------------------
def test_flux_site_table(flux):
    sites = flux.sites()
    blocks = [f"transformer_blocks.{i}:{s}" for i in range(2) for s in ("img", "txt")]
    singles = [f"single_transformer_blocks.{i}:{s}" for i in range(2) for s in ("img", "txt")]
    assert sites[:8] == blocks + singles
    assert "transformer_blocks.1.ff.net.0:img" in sites
    assert "transformer_blocks.1.ff_context.net.0:txt" in sites
    assert "single_transformer_blocks.1.act_mlp:txt" in sites
    assert sites[-1] == "context_embedder:txt" and flux.site_dim("context_embedder:txt") == 32
    assert len(sites) == 17
    assert flux.default_site() == "transformer_blocks.1:img"
    assert flux.site_dim("transformer_blocks.0:txt") == 32
    assert flux.site_dim("transformer_blocks.0.ff.net.0") == 128  # 4x MLP
    assert flux.site_dim("single_transformer_blocks.0.act_mlp:img") == 128
    with pytest.raises(DifflensError, match="transformer_blocks.5:img"):
        flux.site_dim("transformer_blocks.5:img")


def test_sd3_last_block_has_no_text_site(sd3):
    assert sd3.sites() == [
        "transformer_blocks.0:img",
        "transformer_blocks.0:txt",
        "transformer_blocks.1:img",
        "transformer_blocks.0.ff.net.0:img",
        "transformer_blocks.0.ff_context.net.0:txt",
        "transformer_blocks.1.ff.net.0:img",
    ]


@pytest.mark.parametrize("name", ["pixart", "dit"])
def test_cross_attention_models_have_image_sites_only(name, request):
    adapter = request.getfixturevalue(name)
    assert adapter.sites() == [
        "transformer_blocks.0:img",
        "transformer_blocks.1:img",
        "transformer_blocks.0.ff.net.0:img",
        "transformer_blocks.1.ff.net.0:img",
    ]
    assert [adapter.site_dim(s) for s in adapter.sites()] == [32, 32, 128, 128]
    assert adapter.resolve_sites("transformer_blocks.*") == ["transformer_blocks.0:img", "transformer_blocks.1:img"]


# ---- what hooks see --------------------------------------------------------------------------
def test_recorded_shapes_steps_timesteps_and_cfg_rows(family):
    name, adapter, prompts, size, layout, n_txt = family
    calls = []
    hooks = HookSet()
    for site in adapter.sites():
        hooks.add(site, lambda a, c: calls.append((a.shape, c)))
    gen = _gen(adapter, prompts, size, hooks)

    assert len(calls) == STEPS * len(adapter.sites())
    for shape, ctx in calls:
        dim = adapter.site_dim(ctx.site)
        tokens = GRID[0] * GRID[1] if ctx.site.stream == "img" else n_txt
        assert tuple(shape) == (len(layout), tokens, dim), ctx.site
        assert ctx.is_cond.tolist() == layout
        assert ctx.sample_index.tolist() == [0, 1] * (len(layout) // 2)
        assert ctx.call_index == 0 and ctx.num_steps == STEPS and ctx.grid_hw == GRID
        assert ctx.timestep == gen.timesteps[ctx.step]
    assert sorted({c.step for _, c in calls}) == list(range(STEPS))
    assert gen.grid_hw == GRID
    assert gen.images.shape == (2, 32, 32, 3) and gen.images.dtype == np.uint8
    assert gen.timesteps == adapter.timesteps(STEPS, **size)
    assert len(set(gen.timesteps)) == STEPS


def test_flux_true_cfg_calls_twice_per_step_cond_first(flux):
    seen = []
    hooks = HookSet().add("transformer_blocks.0:img", lambda a, c: seen.append((c.step, c.call_index, c.is_cond.tolist())))
    plain = _gen(flux, ["a red cat"], {"height": 32, "width": 32})
    cfg = _gen(flux, ["a red cat"], {"height": 32, "width": 32}, hooks, true_cfg_scale=3.0, negative_prompt="blur")
    assert seen == [(0, 0, [True]), (0, 1, [False]), (1, 0, [True]), (1, 1, [False])]
    assert cfg.timesteps == plain.timesteps
    assert not np.array_equal(cfg.images, plain.images)


def _real_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True).input_ids)


@pytest.mark.parametrize("name", ["flux", "sd3", "pixart", "dit"])
def test_text_mask_marks_each_rows_real_prompt_tokens(name, request):
    """Every txt-site call carries [rows, L] text_mask: a prefix of True as long as the row's own
    prompt (negative prompt for uncond rows) tokenises to, padding False; none without a text stream."""
    adapter = request.getfixturevalue(name)
    prompts, size, layout, n_txt = FAMILIES[name]
    seen = []
    hooks = HookSet()
    for site in adapter.sites():
        hooks.add(site, lambda a, c: seen.append((c.site.stream, a.shape[1], c)))
    kw = {"true_cfg_scale": 2.0, "negative_prompt": "blur"} if name == "flux" else {}
    _gen(adapter, prompts, size, hooks, **kw)
    if n_txt is None:
        assert all(c.text_mask is None for _, _, c in seen)
        return
    pipe = adapter.pipe
    for stream, n, ctx in seen:
        mask = ctx.text_mask
        assert mask.dtype == torch.bool and tuple(mask.shape) == (len(ctx.is_cond), n_txt)
        for r in range(len(ctx.is_cond)):
            text = prompts[int(ctx.sample_index[r])] if ctx.is_cond[r] else ("blur" if name == "flux" else "")
            if name == "flux":
                parts = [(pipe.tokenizer_2, 512)]
            else:
                parts = [(pipe.tokenizer, 16), (pipe.tokenizer_3, 256)]
            start = 0
            for tok, length in parts:
                k = _real_tokens(tok, text)
                seg = mask[r, start:start + length].tolist()
                assert seg == [True] * k + [False] * (length - k), (name, r, text)
                start += length
    assert {s for s, _, _ in seen} == {"img", "txt"}


def test_harvest_samples_only_real_text_tokens_on_a_real_pipeline(flux, tmp_path):
    from difflens.harvest.config import HarvestConfig
    from difflens.harvest.run import harvest
    from difflens.store import Store

    cfg = HarvestConfig(model="tiny-flux", sites=["transformer_blocks.0:txt"], steps=STEPS, tokens_per_image=3,
                        height=32, width=32)
    harvest(tmp_path / "s", cfg, ["a cat", "sky"], adapter=flux)
    meta = Store(tmp_path / "s").meta("transformer_blocks.0:txt", ["token", "attn_mask", "prompt_id"])
    real = {pid: _real_tokens(flux.pipe.tokenizer_2, p) for pid, p in enumerate(["a cat", "sky"])}
    assert len(meta["token"]) == 2 * STEPS * 3
    assert (meta["attn_mask"] == 1).all()
    assert all(t < real[int(p)] for t, p in zip(meta["token"], meta["prompt_id"]))


def test_dit_without_guidance_has_only_conditional_rows(dit):
    seen = []
    hooks = HookSet().add("transformer_blocks.0:img", lambda a, c: seen.append((a.shape[0], c.is_cond.tolist())))
    dit.generate(["3"], [0], steps=STEPS, guidance=1.0, hooks=hooks)
    assert seen == [(1, [True])] * STEPS


def test_flux_dev_guidance_embedding_changes_images(flux_dev):
    size = {"height": 32, "width": 32}
    low = _gen(flux_dev, ["a red cat"], size, guidance=1.0)
    high = _gen(flux_dev, ["a red cat"], size, guidance=8.0)
    assert not np.array_equal(low.images, high.images)


# ---- hooks change images exactly when they should ------------------------------------------
def test_identity_hooks_leave_images_bit_identical(family):
    name, adapter, prompts, size, *_ = family
    base = _gen(adapter, prompts, size)
    hooks = HookSet()
    for i, site in enumerate(adapter.sites()):
        hooks.add(site, (lambda a, c: a.clone()) if i % 2 else (lambda a, c: a))
    assert np.array_equal(_gen(adapter, prompts, size, hooks).images, base.images)
    assert _no_hooks_left(adapter)


def test_modifying_hook_changes_images_and_is_removed_afterwards(family):
    name, adapter, prompts, size, *_ = family
    base = _gen(adapter, prompts, size)
    site = adapter.default_site()
    direction = torch.randn(adapter.site_dim(site), generator=torch.Generator().manual_seed(0))
    hooks = HookSet().add(site, lambda a, c: a + 3.0 * direction.to(a.dtype))
    steered = _gen(adapter, prompts, size, hooks)
    assert np.abs(steered.images.astype(int) - base.images.astype(int)).mean() > 1.0
    assert _no_hooks_left(adapter)
    assert np.array_equal(_gen(adapter, prompts, size).images, base.images)


def test_text_tokens_entering_block_0_are_a_site(flux):
    """`context_embedder:txt` fires once per transformer call with the padded T5 sequence, and an
    edit there reaches block 0's image stream (a block-0 text-output edit cannot)."""
    size = {"height": 32, "width": 32}
    seen, img0 = [], {}

    def record(tag):  # block 0's image output at the first transformer call
        def hook(a, c):
            img0.setdefault(tag, a.clone())
        return hook

    hooks = HookSet().add("context_embedder:txt", lambda a, c: seen.append((tuple(a.shape), c.text_mask.sum(1).tolist())))
    base = _gen(flux, ["a red cat", "blue sky"], size, hooks.add("transformer_blocks.0:img", record("clean")))
    assert len(seen) == STEPS and seen[0][0] == (2, 512, 32)
    assert seen[0][1] == [_real_tokens(flux.pipe.tokenizer_2, p) for p in ("a red cat", "blue sky")]
    push = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(0))  # not constant: LayerNorm removes that
    for site, tag in (("context_embedder:txt", "early"), ("transformer_blocks.0:txt", "late")):
        hooks = HookSet().add(site, lambda a, c: a + push.to(a.dtype)).add("transformer_blocks.0:img", record(tag))
        edited = _gen(flux, ["a red cat", "blue sky"], size, hooks)
        assert not np.array_equal(edited.images, base.images)
    assert not torch.equal(img0["early"], img0["clean"])
    assert torch.equal(img0["late"], img0["clean"])
    assert _no_hooks_left(flux)


def test_a_failing_hook_still_leaves_the_model_clean(flux):
    size = {"height": 32, "width": 32}
    base = _gen(flux, ["a red cat"], size)

    def boom(a, c):
        raise ValueError("hook failed")

    with pytest.raises(ValueError, match="hook failed"):
        _gen(flux, ["a red cat"], size, HookSet().add("transformer_blocks.0:img", boom))
    assert _no_hooks_left(flux)
    assert np.array_equal(_gen(flux, ["a red cat"], size).images, base.images)


def test_each_sample_depends_on_its_own_seed_not_the_batch(flux):
    size = {"height": 32, "width": 32}
    pair = flux.generate(["a red cat", "blue sky"], [5, 9], steps=STEPS, **size)
    alone = flux.generate(["blue sky"], [9], steps=STEPS, **size)
    other_seed = flux.generate(["blue sky"], [10], steps=STEPS, **size)
    assert np.abs(pair.images[1].astype(int) - alone.images[0].astype(int)).max() <= 1
    assert not np.array_equal(alone.images[0], other_seed.images[0])


# ---- bad input -------------------------------------------------------------------------------
def test_unknown_site_is_refused_before_running(sd3):
    with pytest.raises(DifflensError, match=r"unknown site transformer_blocks\.1:txt"):
        _gen(sd3, ["x"], {}, HookSet().add("transformer_blocks.1:txt", lambda a, c: None))
    assert _no_hooks_left(sd3)


def test_generate_argument_errors(flux, dit):
    size = {"height": 32, "width": 32}
    with pytest.raises(DifflensError, match="guidance"):
        flux.generate(["x"], [0], steps=STEPS, guidance=3.5, **size)
    with pytest.raises(DifflensError, match="multiples of 4"):
        flux.generate(["x"], [0], steps=STEPS, height=30, width=32)
    with pytest.raises(DifflensError, match="seed"):
        flux.generate(["x", "y"], [0], steps=STEPS, **size)
    with pytest.raises(DifflensError, match="steps"):
        flux.generate(["x"], [0], steps=0, **size)
    with pytest.raises(DifflensError, match="only generates 32x32"):
        dit.generate(["3"], [0], steps=STEPS, height=64)
    with pytest.raises(DifflensError, match="unknown DiT class 'zebra crossing'"):
        dit.generate(["zebra crossing"], [0], steps=STEPS)
    with pytest.raises(DifflensError, match="out of range"):
        dit.generate(["1000"], [0], steps=STEPS)


def test_dit_names_resolve_through_id2label(dit):
    assert dit.class_ids(["207", "Goldfish", "tench", "golden retriever"]) == [207, 1, 0, 207]


# ---- loading ---------------------------------------------------------------------------------
def test_bf16_load_generates(folders):
    adapter = load_adapter(str(folders["dit"]), dtype="bf16")
    assert adapter.dtype == torch.bfloat16
    assert adapter.transformer.dtype == torch.bfloat16
    gen = adapter.generate(["207"], [0], steps=STEPS)
    assert gen.images.shape == (1, 32, 32, 3) and gen.images.std() > 0


def test_fp16_on_cpu_is_refused(folders):
    with pytest.raises(DifflensError, match="fp16 is not supported on CPU"):
        load_adapter(str(folders["dit"]), dtype="fp16")
    with pytest.raises(DifflensError, match="unknown dtype"):
        load_adapter(str(folders["dit"]), dtype="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_nf4_without_bitsandbytes_or_cuda_is_a_clear_error(folders):
    with pytest.raises(DifflensError) as e:
        load_adapter(str(folders["dit"]), quantize="nf4")
    msg = str(e.value)
    assert "nf4" in msg and "CUDA" in msg and "drop --quantize" in msg
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert "bitsandbytes" in msg
    with pytest.raises(DifflensError, match="only choice is nf4"):
        load_adapter(str(folders["dit"]), quantize="int8")
    with pytest.raises(DifflensError, match="no CUDA"):
        load_adapter(str(folders["dit"]), device="cuda")


def test_model_resolution_errors(tmp_path):
    with pytest.raises(DifflensError, match="Download it first"):
        load_adapter("difflens-test/no-such-model")
    with pytest.raises(DifflensError, match="not found"):
        load_adapter(str(tmp_path / "missing" / "folder"))
    with pytest.raises(DifflensError, match="no model_index.json"):
        load_adapter(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(DifflensError, match="no adapter for; supported: DiTPipeline"):
        load_adapter(str(tmp_path))


# ---- the tiny builders (difflens.models.tiny) -------------------------------------------------
def test_every_tiny_family_saves_a_folder_that_loads_as_its_adapter(folders):
    from difflens.models.dit import DiTAdapter
    from difflens.models.pixart import PixArtAdapter
    from difflens.models.tiny import FAMILIES

    expected = {"flux": (FluxAdapter, "FluxPipeline", "FluxTransformer2DModel"),
                "flux-dev": (FluxAdapter, "FluxPipeline", "FluxTransformer2DModel"),
                "sd3": (SD3Adapter, "StableDiffusion3Pipeline", "SD3Transformer2DModel"),
                "pixart": (PixArtAdapter, "PixArtSigmaPipeline", "PixArtTransformer2DModel"),
                "dit": (DiTAdapter, "DiTPipeline", "DiTTransformer2DModel")}
    assert list(FAMILIES) == list(expected)
    for family, (adapter_cls, pipe_cls, transformer_cls) in expected.items():
        adapter = load_adapter(str(folders[family]))  # conftest saves each with save_tiny_pipeline
        assert type(adapter) is adapter_cls and type(adapter.pipe).__name__ == pipe_cls, family
        assert type(adapter.transformer).__name__ == transformer_cls, family
        assert adapter.transformer.config.get("guidance_embeds", False) == (family == "flux-dev"), family


def test_tiny_pipeline_seeds_clip_length_and_errors(tmp_path):
    from difflens.models.tiny import save_tiny_pipeline

    weight = [tiny_pipeline("dit", seed=s).transformer.pos_embed.proj.weight for s in (0, 0, 1)]
    assert torch.equal(weight[0], weight[1]) and not torch.equal(weight[0], weight[2])
    sd3 = tiny_pipeline("sd3", clip_length=77)
    assert sd3.tokenizer.model_max_length == sd3.tokenizer_2.model_max_length == 77
    assert sd3.text_encoder.config.max_position_embeddings == 77
    with pytest.raises(DifflensError, match="no tiny pipeline for family 'sdxl': choose one of flux, flux-dev, sd3, pixart, dit"):
        tiny_pipeline("sdxl")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(DifflensError, match="pass a new folder"):
        save_tiny_pipeline("dit", tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]


# ---- the `sites` verb ------------------------------------------------------------------------
def test_sites_verb_lists_sites_dims_and_default(folders, capsys):
    from difflens.cli import main

    assert main(["sites", "--model", str(folders["flux-dev"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = dict(line.split() for line in lines[:-1])
    assert rows["transformer_blocks.0:img"] == "32"
    assert rows["single_transformer_blocks.1.act_mlp:txt"] == "128"
    assert rows["context_embedder:txt"] == "32"
    assert len(rows) == 17
    assert lines[-1] == "default: transformer_blocks.1:img"

    assert main(["sites", "--model", str(folders["dit"]), "--model-dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp16" in err[0]
