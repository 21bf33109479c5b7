"""Activation patching (difflens.trace): the identity and full-patch properties on the tiny toy model
and the tiny random Flux / SD3 / PixArt / DiT pipelines, hooks firing only at chosen cells, regions,
readouts and the grid's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from difflens.errors import DifflensError
from difflens.models.tiny import save_tiny_pipeline
from difflens.trace import Cell, NO_PATCH, Pair, PixelReadout, block_sites, conditioning_sites, patched_generate, record_source
from difflens.trace.patching import patch_hooks, with_sites
from difflens.trace.readouts import FunctionReadout, WorldReadout
from difflens.trace.run import step_windows, trace

TGT = "a large red circle in the top left on a black plain background"
SRC = "a large blue circle in the top left on a black plain background"
STEPS = 3


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from toy_fixtures import make_tiny_toy

    from difflens.models.toy.adapter import ToyAdapter

    return ToyAdapter.load(folder=make_tiny_toy(tmp_path_factory.mktemp("tiny_toy_trace")))


def _all_sites(adapter):
    return block_sites(adapter) + list(conditioning_sites(adapter))


def _source(adapter, prompts, steps, **size):
    sites = _all_sites(adapter)
    return sites, record_source(adapter, prompts, list(range(len(prompts))), sites, steps=steps,
                                extra=conditioning_sites(adapter), **size)


def test_toy_sites_and_conditioning(toy):
    sites = block_sites(toy)
    assert "transformer_blocks.0:img" in sites and "transformer_blocks.0:txt" in sites
    assert not any(".ff." in s or "act_mlp" in s for s in sites)
    assert list(conditioning_sites(toy)) == ["time_text_embed:txt"]
    with with_sites(toy, conditioning_sites(toy)):
        assert "time_text_embed:txt" in toy.site_bindings()
    assert "time_text_embed:txt" not in toy.site_bindings()  # restored


def test_no_patch_is_bit_identical_and_full_patch_is_the_source(toy):
    sites, src = _source(toy, [SRC, TGT], STEPS)
    clean = np.asarray(toy.generate([TGT, SRC], [0, 1], steps=STEPS).images)
    full = Cell(tuple(sites), tuple(range(STEPS)), "both")
    # target 0 <- source pair 0 (SRC), target 1 <- source pair 1 (TGT): full patches swap the images
    imgs = patched_generate(toy, [TGT, SRC, TGT, SRC], [0, 1, 0, 1], [NO_PATCH, NO_PATCH, full, full], [0, 1, 0, 1], src,
                            steps=STEPS, extra=conditioning_sites(toy))
    nothing = patched_generate(toy, [TGT, SRC], [0, 1], [NO_PATCH, NO_PATCH], [0, 1], src, steps=STEPS)
    assert np.array_equal(nothing, clean)  # no hooks at all
    assert np.abs(imgs[:2].astype(int) - np.asarray(toy.generate([TGT, SRC, TGT, SRC], [0, 1, 0, 1], steps=STEPS).images[:2],
                                                                 int)).max() == 0
    assert np.abs(imgs[2].astype(int) - src.images[0].astype(int)).max() <= 1
    assert np.abs(imgs[3].astype(int) - src.images[1].astype(int)).max() <= 1
    assert np.abs(clean[0].astype(int) - src.images[0].astype(int)).max() > 20  # the prompts do differ


def test_without_the_conditioning_vector_the_full_patch_is_incomplete(toy):
    sites = block_sites(toy)
    src = record_source(toy, [SRC], [0], sites, steps=STEPS)
    img = patched_generate(toy, [TGT], [0], [Cell(tuple(sites), tuple(range(STEPS)), "both")], [0], src, steps=STEPS)
    assert np.abs(img[0].astype(int) - src.images[0].astype(int)).max() > 1  # pooled text still enters norm_out


def test_patches_fire_only_at_the_chosen_site_step_branch_and_tokens(toy):
    sites = _all_sites(toy)
    src = record_source(toy, [SRC], [7], sites, steps=STEPS, extra=conditioning_sites(toy))  # other noise: rows all differ
    site = "transformer_blocks.1:img"
    region = np.zeros((1, 256), bool)
    region[0, :40] = True
    cases = [Cell((site,), (1,), "cond"), Cell((site,), (2,), "uncond"), Cell((site,), (0, 2), "both", region="box")]
    seen = {}

    def probe(a, ctx):
        seen[(ctx.step, ctx.call_index)] = (a.detach().clone(), ctx.is_cond.clone(), ctx.sample_index.clone())

    hs = patch_hooks(cases, [0, 0, 0], src, regions={"box": region})
    hs.add(site, probe)  # runs after the patch on the same site
    toy.generate([TGT] * 3, [0] * 3, steps=STEPS, hooks=hs)
    for step in range(STEPS):
        a, cond, sidx = seen[(step, 0)]
        s_acts, s_cond, _ = src.acts[(site, step, 0)]
        for r in range(a.shape[0]):
            j, c = int(sidx[r]), bool(cond[r])
            srow = s_acts[int(np.nonzero((s_cond == c).numpy())[0][0])]
            same = (a[r] == srow).all(-1)  # [tokens] equal to the source
            if j == 0:
                want = step == 1 and c
                assert bool(same.all()) == want
            elif j == 1:
                assert bool(same.all()) == (step == 2 and not c)
            else:
                if step in (0, 2):
                    assert bool(same[:40].all()) and not bool(same[40:].any())
                else:
                    assert not bool(same.any())


def test_readouts():
    t = np.zeros((2, 4, 4, 3), np.uint8)
    s = np.full((2, 4, 4, 3), 200, np.uint8)
    mid = np.full((2, 4, 4, 3), 100, np.uint8)
    assert np.allclose(PixelReadout()(mid, t, s)["source"], 0.5)
    assert np.allclose(PixelReadout()(s, t, s)["source"], 1.0) and np.allclose(PixelReadout()(t, t, s)["source"], 0.0)
    fr = FunctionReadout(lambda im, a, b: np.ones(len(im)))
    assert fr(mid, t, s)["source"].tolist() == [1.0, 1.0]
    with pytest.raises(DifflensError):
        FunctionReadout(lambda im, a, b: np.ones(3))(mid, t, s)
    reads = {"color": ["blue", "red"], "object": ["circle", "circle"]}
    wr = WorldReadout(lambda im, f: reads[f] if im is mid else ["red", "circle"] if f == "color" else ["circle", "square"], "color", ["object"])
    out = wr(mid, t, s, source_values=["blue", "blue"])
    assert out["source"].tolist() == [1.0, 0.0] and out["kept"].tolist() == [1.0, 0.0]


def test_trace_grid_on_the_toy_model(toy, tmp_path):
    pairs = [Pair(TGT, SRC, 0), Pair(SRC, TGT, 1)]
    res = trace(toy, pairs, PixelReadout(), sites=["transformer_blocks.1:img", "transformer_blocks.1:txt"], steps=STEPS,
                branches=("both", "cond"), batch_size=16, show_progress=False)
    labels = [c["label"] for c in res.cells]
    assert len(labels) == 1 + 3 * len(step_windows(STEPS)) * 2 + 2
    assert res.cell("none", "none", "both")["source"] == 0.0
    assert res.cell("all sites", "all", "both")["source"] > 0.99
    assert all(0 <= c["source"] <= 1 and c["n"] == 2 for c in res.cells)
    from difflens.trace import report

    md = report.markdown([res])
    assert "transformer_blocks.1" in md and "| site |" in md
    png = report.heatmap([res], tmp_path / "t.png")
    assert png is not None and png.stat().st_size > 1000
    json.dumps(res.to_dict())


def test_trace_errors(toy):
    with pytest.raises(DifflensError, match="pair"):
        trace(toy, [], PixelReadout(), steps=STEPS)
    with pytest.raises(DifflensError, match="site"):
        trace(toy, [Pair(TGT, SRC, 0)], PixelReadout(), sites=["nope.3:img"], steps=STEPS)
    with pytest.raises(DifflensError, match="branch"):
        Cell(("transformer_blocks.1:img",), (0,), "sideways")


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "dit"])
def test_trace_properties_on_tiny_pipelines(family, tmp_path):
    from difflens.models import load_adapter

    adapter = load_adapter(str(save_tiny_pipeline(family, tmp_path / family)))
    prompts = ["207", "goldfish"] if family == "dit" else ["a red cat", "blue sky"]
    size = {"height": 32, "width": 32} if family == "flux" else {}
    steps = 2
    sites = _all_sites(adapter)
    extra = conditioning_sites(adapter)
    src = record_source(adapter, [prompts[1]], [0], sites, steps=steps, extra=extra, **size)
    full = Cell(tuple(sites), tuple(range(steps)), "both")
    one = Cell((block_sites(adapter)[0],), (1,), "cond")
    imgs = patched_generate(adapter, [prompts[0]] * 3, [0] * 3, [NO_PATCH, full, one], [0, 0, 0], src, steps=steps,
                            extra=extra, **size)
    ref = np.asarray(adapter.generate([prompts[0]] * 3, [0] * 3, steps=steps, **size).images)
    clean = ref[:1]
    assert np.array_equal(imgs[0], ref[0])
    assert np.abs(imgs[1].astype(int) - src.images[0].astype(int)).max() <= 1
    assert np.abs(clean[0].astype(int) - src.images[0].astype(int)).max() > 1
    # a one-cell patch fired (and moved the image) at step 1 only: steps before it are untouched
    assert not np.array_equal(imgs[2], ref[2]) or family == "dit"


def test_demo_trace_writes_its_outputs(toy, tmp_path):
    from difflens.trace.demo import run_trace_demo

    res = run_trace_demo(tmp_path / "trace", toy, factors=("color",), n_pairs=1, steps=2, show_progress=False)
    js = json.loads((tmp_path / "trace" / "trace.json").read_text())
    assert js["pair_selection"]["color"]["candidates"] == 2
    assert (tmp_path / "trace" / "trace.md").exists() and isinstance(res["summary"], list)


def test_difference_of_means_direction():
    import torch

    from difflens.intervene import concept_direction
    from difflens.world import vocab as V

    red, blue = 1 << V.CONCEPT_ID["color=red"], 1 << V.CONCEPT_ID["color=blue"]
    labels = np.array([red, red, blue, 0], np.int64)
    X = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0]])

    class FakeStore:
        root, sites = "mem", ["s:img"]

        def meta(self, site, cols):
            return {"step": np.zeros(4, int), "labels": labels}

        def read_rows(self, site, rows):
            return X[torch.as_tensor(rows)]

    d = concept_direction(FakeStore(), "s:img", "color=red")
    assert torch.allclose(d, torch.tensor([3.0, -2.0]))
    d2 = concept_direction(FakeStore(), "s:img", "color=red", against=["color=blue"])
    assert torch.allclose(d2, torch.tensor([3.0, -1.0]))
    with pytest.raises(DifflensError, match="unknown concept"):
        concept_direction(FakeStore(), "s:img", "colour=red")


def test_summary_names_every_site_tied_at_the_best_score():
    """The demo's one-line summary must not pick one of several equally decisive sites at random."""
    from difflens.trace import report
    from difflens.trace.run import TraceResult

    def cell(site, source):
        return {"site": site, "window": "0-11", "branch": "both", "steps": list(range(12)), "source": source, "kept": 1.0}

    res = TraceResult("color", ["a:img", "b:txt", "c:img"], [("0-11", tuple(range(12)))], ["both"],
                      cells=[cell("a:img", 1.0), cell("b:txt", 1.0), cell("c:img", 0.25), cell("none", 0.0)])
    line = report.summary_lines([res])[0]
    assert line.startswith("color: best a:img, b:txt steps 0-11 both 100% (tied)") and "c:img" not in line
    res.cells[1]["source"] = 0.5
    assert report.summary_lines([res])[0] == "color: best a:img steps 0-11 both 100%"
