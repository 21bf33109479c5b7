"""The hook mechanism on its own: site names, globs, tracker bookkeeping, read/replace/splice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflens.errors import DifflensError
from difflens.hooks import HookSet, Site, SiteBinding, StepTracker, attach_hooks, batch_rows, expand_sites

AVAILABLE = [
    "transformer_blocks.0:img",
    "transformer_blocks.0:txt",
    "transformer_blocks.1:img",
    "transformer_blocks.1:txt",
    "single_transformer_blocks.0:img",
    "transformer_blocks.0.ff.net.0:img",
    "transformer_blocks.0.ff_context.net.0:txt",
    "single_transformer_blocks.0.act_mlp:img",
]


# ---- Site ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, module, stream",
    [
        ("transformer_blocks.1:img", "transformer_blocks.1", "img"),
        ("single_transformer_blocks.0:txt", "single_transformer_blocks.0", "txt"),
        ("transformer_blocks.1.ff.net.0", "transformer_blocks.1.ff.net.0", "img"),
        ("transformer_blocks.1.ff_context.net.0", "transformer_blocks.1.ff_context.net.0", "txt"),
        (" transformer_blocks.2 ", "transformer_blocks.2", "img"),
    ],
)
def test_site_parse_and_round_trip(text, module, stream):
    site = Site.parse(text)
    assert (site.module, site.stream) == (module, stream)
    assert Site.parse(str(site)) == site
    assert str(site) == f"{module}:{stream}"


@pytest.mark.parametrize("junk", ["", "   ", "a:b:c", "transformer_blocks.1:rgb", "1block", "a..b", ":img", "blk:"])
def test_site_parse_rejects_junk(junk):
    with pytest.raises(DifflensError):
        Site.parse(junk)


def test_sites_are_hashable_values():
    assert {Site.parse("transformer_blocks.1"), Site("transformer_blocks.1", "img")} == {Site("transformer_blocks.1")}


# ---- globs -----------------------------------------------------------------------------------
def test_glob_star_stays_within_one_component():
    assert expand_sites("transformer_blocks.*:img", AVAILABLE) == ["transformer_blocks.0:img", "transformer_blocks.1:img"]


def test_glob_double_star_crosses_components_and_stream_glob():
    got = expand_sites("transformer_blocks.0.**:*", AVAILABLE)
    assert got == ["transformer_blocks.0.ff.net.0:img", "transformer_blocks.0.ff_context.net.0:txt"]


def test_glob_without_stream_takes_default_stream():
    assert expand_sites("transformer_blocks.*", AVAILABLE) == ["transformer_blocks.0:img", "transformer_blocks.1:img"]
    assert expand_sites("transformer_blocks.0.ff_context.net.0", AVAILABLE) == ["transformer_blocks.0.ff_context.net.0:txt"]


def test_glob_lists_and_commas_keep_order_without_duplicates():
    got = expand_sites(["transformer_blocks.1:txt", "transformer_blocks.*:txt,single_transformer_blocks.0"], AVAILABLE)
    assert got == ["transformer_blocks.1:txt", "transformer_blocks.0:txt", "single_transformer_blocks.0:img"]


def test_glob_character_class():
    assert expand_sites("transformer_blocks.[!0]:img", AVAILABLE) == ["transformer_blocks.1:img"]


def test_unmatched_pattern_error_names_it_and_lists_sites():
    with pytest.raises(DifflensError) as e:
        expand_sites("transformer_blocks.9:img", AVAILABLE)
    assert "transformer_blocks.9:img" in str(e.value)
    assert "transformer_blocks.0:img" in str(e.value)
    with pytest.raises(DifflensError):
        expand_sites([], AVAILABLE)


# ---- HookSet / tracker ---------------------------------------------------------------------
def test_hookset_keeps_order_and_rejects_non_callables():
    f, g = (lambda a, c: None), (lambda a, c: a)
    hs = HookSet().add("transformer_blocks.0", f).add(Site("transformer_blocks.0", "txt"), g)
    assert [(str(s), fn) for s, fn in hs] == [("transformer_blocks.0:img", f), ("transformer_blocks.0:txt", g)]
    assert len(hs) == 2 and bool(hs) and not HookSet()
    with pytest.raises(DifflensError):
        hs.add("transformer_blocks.0", "not a function")


@pytest.mark.parametrize(
    "layout, cond, idx",
    [
        ("cond", [1, 1], [0, 1]),
        ("uncond", [0, 0], [0, 1]),
        ("cond_uncond", [1, 1, 0, 0], [0, 1, 0, 1]),
        ("uncond_cond", [0, 0, 1, 1], [0, 1, 0, 1]),
    ],
)
def test_batch_rows(layout, cond, idx):
    is_cond, sample_index = batch_rows(2, layout)
    assert is_cond.tolist() == [bool(c) for c in cond]
    assert sample_index.tolist() == idx
    assert is_cond.dtype == torch.bool and sample_index.dtype == torch.long


def test_tracker_counts_calls_within_a_step():
    tr = StepTracker(num_steps=3, grid_hw=(4, 4))
    with pytest.raises(RuntimeError):
        tr.set_batch([True], [0])
    tr.begin_step(0, 1000.0)
    with pytest.raises(RuntimeError):
        tr.context(Site("transformer_blocks.0"))  # no set_batch yet in this step
    tr.set_batch([True, True], [0, 1])
    tr.set_batch([False, False], [0, 1])
    ctx = tr.context(Site("transformer_blocks.0"))
    assert (ctx.step, ctx.timestep, ctx.call_index, ctx.num_steps, ctx.grid_hw) == (0, 1000.0, 1, 3, (4, 4))
    assert ctx.is_cond.tolist() == [False, False]
    tr.begin_step(1, 500.0)
    tr.set_batch([True], [0])
    assert tr.context(Site("transformer_blocks.0")).call_index == 0
    with pytest.raises(ValueError):
        tr.set_batch([True, False], [0])


# ---- attach_hooks on small real modules ----------------------------------------------------
class JointBlock(nn.Module):
    """Returns (txt, img) like a diffusers joint block."""

    def __init__(self, d: int):
        super().__init__()
        self.img = nn.Linear(d, d)
        self.txt = nn.Linear(d, d)

    def forward(self, hidden_states, encoder_hidden_states):
        return self.txt(encoder_hidden_states), self.img(hidden_states)


class TwoBlocks(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.transformer_blocks = nn.ModuleList([JointBlock(d), JointBlock(d)])

    def forward(self, img, txt):
        for blk in self.transformer_blocks:
            txt, img = blk(hidden_states=img, encoder_hidden_states=txt)
        return img, txt


BINDINGS = {
    f"transformer_blocks.{i}:{s}": SiteBinding(f"transformer_blocks.{i}", 8, "tuple", index=1 if s == "img" else 0)
    for i in range(2)
    for s in ("img", "txt")
}


def _tracker(rows: int = 2) -> StepTracker:
    tr = StepTracker(num_steps=1, grid_hw=(1, 3))
    tr.begin_step(0, 999.0)
    tr.set_batch(*batch_rows(rows, "cond"))
    return tr


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g)


def test_replacement_flows_downstream_and_hooks_are_removed():
    model = TwoBlocks()
    img, txt = _inputs()
    base_img, base_txt = model(img, txt)
    seen = []
    hs = HookSet()
    hs.add("transformer_blocks.0:img", lambda a, c: torch.zeros_like(a))
    hs.add("transformer_blocks.1:img", lambda a, c: seen.append(a.clone()))
    with attach_hooks(model, hs, BINDINGS, _tracker()):
        out_img, out_txt = model(img, txt)
    # block 1's image input was zeroed, so its output is its bias only
    assert torch.allclose(seen[0], model.transformer_blocks[1].img.bias.expand_as(seen[0]))
    assert torch.equal(out_txt, base_txt)  # txt stream untouched
    assert not torch.allclose(out_img, base_img)
    assert all(not m._forward_hooks for m in model.modules())
    again_img, _ = model(img, txt)
    assert torch.equal(again_img, base_img)


def test_hooks_on_one_site_chain_in_order_and_see_context():
    model = TwoBlocks()
    img, txt = _inputs()
    order = []

    def first(a, c):
        order.append(("first", c.site, c.step, c.timestep, c.sample_index.tolist()))
        return a + 1.0

    def second(a, c):
        order.append(("second", a.clone()))

    hs = HookSet().add("transformer_blocks.1:txt", first).add("transformer_blocks.1:txt", second)
    with attach_hooks(model, hs, BINDINGS, _tracker()):
        _, out_txt = model(img, txt)
    assert order[0][:5] == ("first", Site("transformer_blocks.1", "txt"), 0, 999.0, [0, 1])
    assert torch.equal(order[1][1], out_txt)  # second saw the first's replacement
    _, base_txt = model(img, txt)
    assert torch.allclose(out_txt, base_txt + 1.0)


def test_identity_hooks_are_bit_identical():
    model = TwoBlocks()
    img, txt = _inputs()
    base = model(img, txt)
    hs = HookSet()
    for site in BINDINGS:
        hs.add(site, lambda a, c: a.clone())
    with attach_hooks(model, hs, BINDINGS, _tracker()):
        out = model(img, txt)
    assert all(torch.equal(x, y) for x, y in zip(out, base))


def test_bad_returns_and_unknown_sites_raise_and_still_clean_up():
    model = TwoBlocks()
    img, txt = _inputs()
    hs = HookSet().add("transformer_blocks.0:img", lambda a, c: a[:, :1])
    with pytest.raises(DifflensError, match="shape"):
        with attach_hooks(model, hs, BINDINGS, _tracker()):
            model(img, txt)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(DifflensError, match="unknown site"):
        with attach_hooks(model, HookSet().add("transformer_blocks.7:img", lambda a, c: None), BINDINGS, _tracker()):
            pass


def test_hook_result_is_cast_to_the_activation_dtype():
    model = TwoBlocks().to(torch.bfloat16)
    img, txt = (t.to(torch.bfloat16) for t in _inputs())
    hs = HookSet().add("transformer_blocks.1:img", lambda a, c: a.float() * 0)
    with attach_hooks(model, hs, {k: v for k, v in BINDINGS.items()}, _tracker()):
        out_img, _ = model(img, txt)
    assert out_img.dtype == torch.bfloat16 and not out_img.any()


# ---- token-sliced sites on a real Flux single block ------------------------------------------
class SingleHost(nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

        torch.manual_seed(0)
        self.single_transformer_blocks = nn.ModuleList([FluxSingleTransformerBlock(16, 2, 8)])

    def forward(self, img, txt, temb):
        return self.single_transformer_blocks[0](hidden_states=img, encoder_hidden_states=txt, temb=temb)


MLP = "single_transformer_blocks.0.act_mlp"
TOKEN_BINDINGS = {f"{MLP}:{s}": SiteBinding(MLP, 64, "tokens", text_from="single_transformer_blocks.0") for s in ("img", "txt")}


def test_single_block_mlp_is_sliced_into_streams_and_spliced_back():
    host = SingleHost()
    g = torch.Generator().manual_seed(2)
    img, txt, temb = torch.randn(2, 6, 16, generator=g), torch.randn(2, 4, 16, generator=g), torch.randn(2, 16, generator=g)
    full = []
    handle = host.single_transformer_blocks[0].act_mlp.register_forward_hook(lambda m, a, o: full.append(o.clone()))
    rec: dict[str, list[torch.Tensor]] = {"img": [], "txt": []}
    hs = HookSet()
    hs.add(f"{MLP}:txt", lambda a, c: rec["txt"].append(a.clone()))
    hs.add(f"{MLP}:img", lambda a, c: rec["img"].append(a.clone()))
    hs.add(f"{MLP}:img", lambda a, c: torch.zeros_like(a))
    hs.add(f"{MLP}:txt", lambda a, c: rec["txt"].append(a.clone()))
    hs.add(f"{MLP}:img", lambda a, c: rec["img"].append(a.clone()))
    base_txt, base_img = host(img, txt, temb)
    with attach_hooks(host, hs, TOKEN_BINDINGS, _tracker()):
        out_txt, out_img = host(img, txt, temb)
    handle.remove()
    pre, _ = full  # the module's own output, before and during hooking (hooks run after it)
    assert rec["txt"][0].shape == (2, 4, 64) and rec["img"][0].shape == (2, 6, 64)
    assert torch.equal(torch.cat([rec["txt"][0], rec["img"][0]], dim=1), pre)
    assert torch.equal(rec["txt"][1], rec["txt"][0])  # zeroing img left the text slice alone
    assert not rec["img"][1].any()
    assert not torch.allclose(out_img, base_img)
    assert torch.equal(out_txt, base_txt)  # MLP and output projection are per token: text rows unchanged
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in host.modules())


def test_tracker_derives_each_rows_text_mask_from_its_branch():
    t = StepTracker(num_steps=1, grid_hw=(1, 1))
    cond = torch.tensor([[True, True, False], [True, False, False]])
    uncond = torch.tensor([[True, False, False], [True, False, False]])
    t.set_text_masks(cond, uncond)
    t.begin_step(0, 1.0)
    t.set_batch(*batch_rows(2, "uncond_cond"))
    ctx = t.context(Site.parse("transformer_blocks.0:txt"))
    assert ctx.text_mask.tolist() == [uncond[0].tolist(), uncond[1].tolist(), cond[0].tolist(), cond[1].tolist()]
    with pytest.raises(ValueError, match="text masks"):
        t.set_text_masks(cond, uncond[:, :2])


def test_toy_adapter_fills_the_text_mask_from_its_tokenizer():
    from difflens.models import load_adapter

    adapter = load_adapter("toy")
    seen = []
    hooks = HookSet().add("transformer_blocks.0:txt", lambda a, c: seen.append((a.shape, c.text_mask, c.is_cond)))
    prompts = ["a red circle", "a small blue nine on a green background"]
    adapter.generate(prompts, [0, 1], steps=1, hooks=hooks)
    (shape, mask, is_cond), = seen
    assert tuple(mask.shape) == tuple(shape[:2])
    real = {True: [len(p.split()) + 1 for p in prompts], False: [1, 1]}  # words + BOS; uncond rows read ""
    for r in range(len(is_cond)):
        k = real[bool(is_cond[r])][r % 2]
        assert mask[r].tolist() == [True] * k + [False] * (shape[1] - k)
