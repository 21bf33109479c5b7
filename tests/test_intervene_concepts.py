"""Interventions where concepts are decided: token selection on text streams (indices, or where a
dictionary's features fire), transfer from a shared recording, and the concept study end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflens.errors import DifflensError
from difflens.intervene import FiresOn, Steer, Transfer, generate_with, record_activations

from test_intervene import PROMPT, PROMPT2, run_with_probe, tiny_sae

TXT = "transformer_blocks.0:txt"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from toy_fixtures import make_tiny_toy

    from difflens.models.toy.adapter import ToyAdapter

    return ToyAdapter.load(folder=make_tiny_toy(tmp_path_factory.mktemp("tiny_toy_c")))


@pytest.fixture(scope="module")
def txt_sae(adapter):
    return tiny_sae(adapter.site_dim(TXT), width=32, k=3, site=TXT, seed=4)


def test_tokens_select_text_positions_only(adapter, txt_sae):
    iv = Steer(txt_sae, [3], 2.0, mode="absolute", tokens=[1, 3])
    _, pre, post = run_with_probe(adapter, [iv], site=TXT)
    for key, (a, _, _) in pre.items():
        moved = (post[key][0] - a).norm(dim=-1) > 1e-6  # [B, N]
        assert moved[:, [1, 3]].all() and moved.sum() == 2 * a.shape[0]
    assert all(e["tokens"] == 2 for e in iv.log)


def test_token_selection_errors(adapter, txt_sae):
    from difflens.intervene import Region

    img_sae = tiny_sae(adapter.site_dim("transformer_blocks.1:img"))
    with pytest.raises(DifflensError, match="not both"):
        Steer(img_sae, [3], 1.0, tokens=[1], region=Region.parse("0,0,2,2", units="tokens"))
    with pytest.raises(DifflensError, match="token indices"):
        Steer(txt_sae, [3], 1.0, tokens=["a"])
    with pytest.raises(DifflensError, match="out of range"):
        generate_with(adapter, [PROMPT], [0], [Steer(txt_sae, [3], 1.0, mode="absolute", tokens=[999])], steps=2)
    with pytest.raises(DifflensError, match="FiresOn"):
        Steer(txt_sae, [3], 1.0, where=[1, 2])


def test_fires_on_acts_exactly_where_the_features_fire(adapter, txt_sae):
    watch = [0, 5, 9]
    iv = Steer(txt_sae, [3], 2.0, mode="absolute", where=FiresOn(txt_sae, watch))
    _, pre, post = run_with_probe(adapter, [iv], site=TXT)
    some = False
    for key, (a, _, _) in pre.items():
        B, N, D = a.shape
        t = torch.full((B * N,), 1000.0)  # codes of a TopK SAE without timestep conditioning
        fires = (txt_sae.encode(a.reshape(-1, D), t)[:, watch] > 0).any(1).reshape(B, N)
        moved = (post[key][0] - a).norm(dim=-1) > 1e-6
        assert torch.equal(moved, fires)
        some |= bool(fires.any()) and not bool(fires.all())
    assert some, "the test needs tokens where the features fire and tokens where they do not"


def test_transfer_from_a_shared_recording_matches_a_fresh_reference(adapter, txt_sae):
    one = record_activations(adapter, [PROMPT2], [5], TXT, steps=3)
    a = generate_with(adapter, [PROMPT], [0], [Transfer(txt_sae, (PROMPT2, 5), [1, 2, 3])], steps=3)
    b = generate_with(adapter, [PROMPT], [0], [Transfer(txt_sae, (one, 0), [1, 2, 3])], steps=3)
    assert np.array_equal(a.images, b.images)
    # In a recording of several samples, the index picks the reference: sample 1 is the target itself.
    rec = record_activations(adapter, [PROMPT2, PROMPT], [5, 0], TXT, steps=3)
    clean = adapter.generate([PROMPT], [0], steps=3)
    same = generate_with(adapter, [PROMPT], [0], [Transfer(txt_sae, (rec, 1))], steps=3)
    assert np.abs(same.images.astype(int) - clean.images.astype(int)).max() <= 2
    with pytest.raises(DifflensError, match="no sample 7"):
        generate_with(adapter, [PROMPT], [0], [Transfer(txt_sae, (rec, 7), [1])], steps=3)
    img_sae = tiny_sae(adapter.site_dim("transformer_blocks.1:img"))
    with pytest.raises(DifflensError, match="recording is of site"):
        Transfer(img_sae, (rec, 0), [1])
    short = record_activations(adapter, [PROMPT2], [5], TXT, steps=2)
    with pytest.raises(DifflensError, match="lacks steps"):
        generate_with(adapter, [PROMPT], [0], [Transfer(txt_sae, (short, 0), [1])], steps=3)


def test_concept_study_end_to_end(adapter, tmp_path):
    from test_splice import tiny_store

    from difflens.intervene.study_concepts import ROWS, run_concept_study
    from difflens.world.classifier import FactorClassifier

    prompts = [f"a large {c} {o} in the center on a {b} plain background"
               for c, o, b in (("red", "circle", "black"), ("blue", "square", "gray"), ("green", "two", "navy"))]
    store = tiny_store(adapter, tmp_path / "store", prompts, TXT)
    torch.manual_seed(0)
    clf = FactorClassifier().eval()  # random weights: the numbers mean nothing, the bookkeeping does
    dicts = {"a": tiny_sae(adapter.site_dim(TXT), width=32, k=3, site=TXT, seed=1),
             "b": tiny_sae(adapter.site_dim(TXT), width=32, k=3, site=TXT, seed=2)}
    n = 4
    res = run_concept_study(adapter, dicts, store, tmp_path / "out", n=n, steps=2, classifier=clf, batch_size=4,
                            show_progress=False)
    assert set(res["dictionaries"]) == {"a", "b"}
    for d in res["dictionaries"].values():
        assert list(d["rows"]) == list(ROWS)
        for row, e in d["rows"].items():
            assert 0 <= e["eligible"] <= n and e["mse_outside_box"] >= 0
            assert e["success_rate"] is None or 0 <= e["success_rate"] <= 1
        assert "control_random_features" in d["rows"]["color ablation"]
        assert "control_random_direction" in d["rows"]["color steer"]
        assert d["rows"]["object edit"]["recipe"].startswith("code shift")  # a text-stream dictionary: the object's context
    assert set(res["references"]) == {"difference of means", "random direction", "prompt changed: color",
                                      "prompt changed: object"}
    # clean + 3 reference recordings (colour, object, background; the prompt-changed rows reuse their
    # images) + at most 2 x (7 rows + 2 controls) + 2 steering references; cases a row does not count
    # (the clean image misreads the factor) or leaves alone (no features) keep their clean image.
    assert n * 4 <= res["images"] <= n * (1 + 3 + 2 * 9 + 2)
    on_disk = json.loads((tmp_path / "out" / "concepts.json").read_text())
    assert on_disk["n_cases"] == n and (tmp_path / "out" / "concepts.png").is_file()
    img = tiny_sae(adapter.site_dim("transformer_blocks.1:img"), site="transformer_blocks.1:img")
    with pytest.raises(DifflensError, match="pair with no dictionary"):
        run_concept_study(adapter, dicts, store, n=n, image_dictionaries={"c": img}, classifier=clf, show_progress=False)
    with pytest.raises(DifflensError, match=r"lacks sites \['transformer_blocks.1:img'\]"):
        run_concept_study(adapter, dicts, store, n=n, image_dictionaries={"a": img}, classifier=clf, show_progress=False)
    assert "| color edit |" in (tmp_path / "out" / "concepts.md").read_text()
    with pytest.raises(DifflensError, match="pair with no dictionary"):
        run_concept_study(adapter, dicts, store, n=n, steer_dictionaries={"c": img}, classifier=clf, show_progress=False)
    # a second steering site (here another dictionary at the same site): its push joins the row's
    more = {"a": tiny_sae(adapter.site_dim(TXT), width=32, k=3, site=TXT, seed=3)}
    two = run_concept_study(adapter, {"a": dicts["a"]}, store, tmp_path / "two", n=n, steps=2, classifier=clf, batch_size=4,
                            rows=["color steer"], references=(), steer_dictionaries=more, show_progress=False)
    assert two["steer"]["also_at"] == {"a": TXT} and "also at" in (tmp_path / "two" / "concepts.md").read_text()
    assert "control_random_direction" in two["dictionaries"]["a"]["rows"]["color steer"]
    with pytest.raises(DifflensError, match="unknown study rows"):
        run_concept_study(adapter, dicts, store, None, n=2, rows=["colour edit"], classifier=clf)
    img = {"i": tiny_sae(adapter.site_dim("transformer_blocks.1:img"))}
    with pytest.raises(DifflensError, match="lacks sites"):
        run_concept_study(adapter, img, store, None, n=2, classifier=clf)


def test_object_rows_run_on_the_object_dictionary_at_its_site(adapter, tmp_path):
    """`object_dictionaries`: a name's object rows run on its partner at another site (what the demo
    does at context_embedder:txt), its other rows are unchanged, and every table row says its site."""
    from test_splice import tiny_store

    from difflens.intervene.study_concepts import markdown, run_concept_study
    from difflens.world.classifier import FactorClassifier

    ctx = "context_embedder:txt"
    prompts = [f"a large {c} {o} in the center on a {b} plain background"
               for c, o, b in (("red", "circle", "black"), ("blue", "square", "gray"), ("green", "two", "navy"))]
    store = tiny_store(adapter, tmp_path / "store", prompts, [TXT, ctx])
    torch.manual_seed(0)
    clf = FactorClassifier().eval()
    dicts = {"a": tiny_sae(adapter.site_dim(TXT), width=32, k=3, site=TXT, seed=1)}
    objs = {"a": tiny_sae(adapter.site_dim(ctx), width=32, k=3, site=ctx, seed=3)}
    rows = ("color edit", "object edit", "object transfer (all features)")
    kw = dict(n=4, steps=2, classifier=clf, batch_size=4, show_progress=False, rows=rows, references=())
    res = run_concept_study(adapter, dicts, store, tmp_path / "out", object_dictionaries=objs, **kw)
    a = res["dictionaries"]["a"]
    assert a["site"] == TXT and a["object_dictionary"]["site"] == ctx
    assert "site" not in a["rows"]["color edit"]
    assert {a["rows"][r]["site"] for r in rows[1:]} == {ctx}
    assert res["images"] == 4 + sum(e["images"] for e in a["rows"].values())  # clean + each row's own images
    plain = run_concept_study(adapter, dicts, store, None, **kw)["dictionaries"]["a"]
    assert "object_dictionary" not in plain and "site" not in plain["rows"]["object edit"]
    assert a["rows"]["color edit"] == plain["rows"]["color edit"]
    md = markdown(res)
    assert f"| color edit at `{TXT}` |" in md and f"| object edit at `{ctx}` |" in md and "| a |" in md
    assert f"(`{TXT}`)" in markdown({**res, "dictionaries": {"a": {**a, "rows": {"color edit": a["rows"]["color edit"]}}}})
    with pytest.raises(DifflensError, match="object dictionaries .* pair with no dictionary"):
        run_concept_study(adapter, dicts, store, object_dictionaries={"b": objs["a"]}, **kw)


@pytest.mark.parametrize("family", ["flux", "sd3"])  # MM-DiTs: PixArt and DiT have no text stream
def test_text_and_image_sites_in_one_run_on_tiny_pipelines(family, tmp_path):
    """The study's mechanics on real diffusers pipelines: a text-stream steer at chosen tokens of the
    conditional rows and an image-stream edit where a feature fires, in one generation."""
    from difflens.intervene import CodeEdit
    from difflens.models import load_adapter
    from difflens.models.tiny import save_tiny_pipeline

    adapter = load_adapter(str(save_tiny_pipeline(family, tmp_path / family)))
    size = {"height": 32, "width": 32} if family == "flux" else {}
    txt, img = "transformer_blocks.0:txt", "transformer_blocks.1:img"
    s_txt = tiny_sae(adapter.site_dim(txt), width=16, k=2, site=txt, seed=1)
    s_img = tiny_sae(adapter.site_dim(img), width=16, k=2, site=img, seed=2)
    steer = Steer(s_txt, [0], 5.0, mode="absolute", tokens=[0, 1], branch="cond")
    edit = CodeEdit(s_img, [("scale", [1, 2, 3], -2.0)], where=FiresOn(s_img, [1, 2, 3]))
    clean = adapter.generate(["a red cat"], [0], steps=2, **size)
    gen = generate_with(adapter, ["a red cat"], [0], [steer, edit], steps=2, **size)
    assert steer.steps_applied() == [0, 1] and edit.steps_applied()
    assert all(cond for e in steer.log for _, cond in e["rows"]) and all(e["tokens"] == 2 for e in steer.log)
    assert all(0 < e["tokens"] for e in edit.log)
    assert not np.array_equal(gen.images, clean.images)


def test_edit_where_its_features_fire_equals_the_plain_edit(adapter, txt_sae):
    """Ablating features only where they fire is the plain ablation (elsewhere their codes are 0);
    the edit reuses the codes FiresOn computed, which must not change the result."""
    from difflens.intervene import Ablate

    feats = [0, 5, 9]
    _, pre, a = run_with_probe(adapter, [Ablate(txt_sae, feats, where=FiresOn(txt_sae, feats))], site=TXT)
    _, _, b = run_with_probe(adapter, [Ablate(txt_sae, feats)], site=TXT)
    for key in pre:
        assert torch.allclose(a[key][0], b[key][0], atol=1e-5)


def _tiny_itda(adapter, site, seed=0):
    from difflens.dictionaries.config import DictConfig
    from difflens.dictionaries.itda import ITDA

    d = adapter.site_dim(site)
    itda = ITDA(DictConfig(arch="itda", d_in=d, width=48, k=3, site=site, normalization="none", itda_tau=0.5))
    rec = record_activations(adapter, [PROMPT, PROMPT2], [3, 4], site, steps=3)
    x = torch.cat([a.reshape(-1, d) for a, _, _ in rec.acts.values()])
    pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:48]
    itda.partial_fit(x[pick], torch.full((48,), 500.0))
    assert itda.num_atoms > 0
    return itda.eval()


@pytest.mark.parametrize("kind", ["topk", "itda"])
def test_batched_per_case_interventions_equal_the_per_case_path(adapter, txt_sae, kind):
    """A batch of cases, each with its own edit / steer / transfer (per-sample codes), gives the
    same images whether each case runs as its own hook or all run as one `Batched` hook."""
    from difflens.intervene import Batched, CodeEdit, batch_interventions
    from difflens.intervene.study_items import Item, generate_items

    d = txt_sae if kind == "topk" else _tiny_itda(adapter, TXT)
    width = int(d.num_latents)
    items = [Item(p, s, "red", "circle", "center", "black") for p, s in
             ((PROMPT, 0), (PROMPT2, 1), (PROMPT, 2), (PROMPT2, 3), (PROMPT, 4))]
    ref = record_activations(adapter, [PROMPT2, PROMPT, PROMPT2, PROMPT, PROMPT2], [9, 8, 7, 6, 5], TXT, steps=3)

    def make(k, j):
        f = [k % width, (3 * k + 1) % width]
        if k % 3 == 0:
            return [CodeEdit(d, [("ablate", [f[0]], None), ("clamp", [f[1]], 2.0 + k)], samples=[j], branch="cond")]
        if k % 3 == 1:
            return [Steer(d, [f[1]], 1.5, mode="absolute", where=FiresOn(d, list(range(width))), samples=[j])]
        return [Transfer(d, (ref, j), None if k == 2 else f, samples=[j])]

    one_by_one = generate_items(adapter, items, make, steps=3, batch_size=5, batched=False)
    together = generate_items(adapter, items, make, steps=3, batch_size=5, batched=True)
    clean = generate_items(adapter, items, None, steps=3, batch_size=5)
    assert not np.array_equal(one_by_one, clean)
    assert np.array_equal(one_by_one, together)
    # The grouping: one Batched per site for disjoint samples; a repeated sample starts a new group.
    ivs = [iv for k in range(4) for iv in make(k, k)] + make(4, 0)
    grouped = batch_interventions(ivs)
    assert [type(g).__name__ for g in grouped] == ["Batched", "Steer"]
    assert len(grouped[0].members) == 4
    with pytest.raises(DifflensError, match="share the site and token selection"):
        Batched([Steer(d, [1], 1.0, tokens=[1], samples=[0]), Steer(d, [1], 1.0, samples=[1])])


# ---- the colour-steer row's settings ----------------------------------------------------------------
def test_steer_random_direction_has_the_same_norm_at_the_same_tokens(adapter, txt_sae):
    """The steer's control: the same per-token length, at the same tokens, along another direction."""
    feats = [3, 7]
    a = Steer(txt_sae, feats, 2.0, mode="absolute", tokens=[1, 3])
    b = Steer(txt_sae, feats, 2.0, mode="absolute", tokens=[1, 3], random_direction=5)
    _, pre, post_a = run_with_probe(adapter, [a], site=TXT)
    _, _, post_b = run_with_probe(adapter, [b], site=TXT)
    key = next(iter(pre))
    da, db = post_a[key][0] - pre[key][0], post_b[key][0] - pre[key][0]
    assert torch.allclose(da.norm(dim=-1), db.norm(dim=-1), atol=1e-4)
    moved = db.norm(dim=-1) > 1e-6
    assert moved[:, [1, 3]].all() and moved.sum() == 2 * db.shape[0]
    cos = torch.nn.functional.cosine_similarity(da[:, 1], db[:, 1], dim=-1)
    assert (cos.abs() < 0.9).all()  # another direction
    assert "random direction" in b.describe()


def test_steer_recipe_builds_the_rows_interventions_and_zero_scale_is_clean(adapter, txt_sae):
    from difflens.intervene.study_concept_steer import SteerRecipe, steer_interventions
    from difflens.intervene.study_items import Item, generate_items
    from difflens.intervene.region import Window

    img = tiny_sae(adapter.site_dim("transformer_blocks.1:img"), site="transformer_blocks.1:img")

    class Case(Item):
        to_color = "blue"

    case = Case(PROMPT, 0, "red", "circle", "center", "black")
    feats = {"color=red": [0, 5, 9, 11], "color=blue": [1, 2, 4, 6]}
    fmax = {f: 2.0 for fs in feats.values() for f in fs}
    kw = dict(text=txt_sae, feats=feats, fmax=fmax, branch="both", window=Window.all(), image=img, image_feats=feats,
              image_max=fmax)
    [one] = steer_interventions(SteerRecipe(scale=2.5, mode="feature-max"), case, 0, **kw)
    assert steer_interventions(SteerRecipe(mode="token-norm"), case, 0, **kw)[0].mode == "token-norm"
    assert one.scale == 2.5 and one.mode == "feature-max" and one.features == (1, 2, 4, 6) and one.where.features == (0, 5, 9, 11)
    assert one.random_direction is None and one.branch == "cond"  # the recipe's default, not the study's
    assert SteerRecipe().mode == "code-means" and SteerRecipe().scale == 2.5
    assert steer_interventions(SteerRecipe(branch=None, mode="feature-max"), case, 0, **kw)[0].branch == "both"
    txt, im = steer_interventions(SteerRecipe(tokens="all", image_scale=0.5, n_features=2, branch="cond", mode="feature-max"), case, 3,
                                  control=7, **kw)
    assert txt.where is None and txt.features == (1, 2) and txt.branch == "cond" and txt.random_direction == 7
    assert im.site != txt.site and im.region is not None and im.scale == 0.5 and im.branch == "both" and im.samples == (3,)
    assert steer_interventions(SteerRecipe(), Case(PROMPT, 0, "green", "circle", "center", "black"), 0, **kw) == []
    # A zero-scale steer (text and image stream) leaves the generation bit-identical to the clean one.
    items = [case, Case(PROMPT2, 1, "red", "square", "center", "gray")]
    clean = generate_items(adapter, items, None, steps=2)
    zero = SteerRecipe(scale=0.0, image_scale=0.0, tokens="all", mode="feature-max")
    assert np.array_equal(generate_items(adapter, items, lambda k, j: steer_interventions(zero, items[k], j, **kw), steps=2),
                          clean)
    some = SteerRecipe(scale=1.0, tokens="all", mode="feature-max")
    assert not np.array_equal(
        generate_items(adapter, items, lambda k, j: steer_interventions(some, items[k], j, **kw), steps=2), clean)
    for bad, match in (({"tokens": "word"}, "fires, all, after, phrase"), ({"mode": "absolute"}, "token-norm"), ({"branch": "x"}, "both"), ({"image_scale": -1}, ">= 0"),
                       ({"n_features": 0}, ">= 1")):
        with pytest.raises(DifflensError, match=match):
            SteerRecipe(**bad)


def test_steer_options_parse_into_the_recipe():
    from difflens.cli import build_parser
    from difflens.intervene.cli import _steer_recipe
    from difflens.intervene.study_concept_steer import SteerRecipe

    base = ["intervene-study", "--model", "toy", "--dict", "d", "--data", "s", "--out", "o"]
    args = build_parser().parse_args(base + ["--steer-scale", "2.5", "--steer-tokens", "all", "--steer-branch", "cond",
                                             "--steer-window", "0:6", "--steer-features", "5", "--steer-mode", "token-norm"])
    r = _steer_recipe(args)
    assert (r.scale, r.tokens, r.branch, r.n_features, r.image_scale, r.mode) == (2.5, "all", "cond", 5, 0.0, "token-norm")
    assert r.window.describe() == SteerRecipe(window=r.window).describe()["window"] and "0" in r.window.describe()
    assert _steer_recipe(build_parser().parse_args(base)) == SteerRecipe()
    with pytest.raises(DifflensError, match="--image-dict"):
        _steer_recipe(build_parser().parse_args(base + ["--steer-image-scale", "0.3"]))


def test_steer_setup_modes_tokens_after_and_code_means(adapter, txt_sae):
    """The steer's store-calibrated modes: "after" steers the colour word and every later token but
    the background's words; feature-mean uses the mean code at the word; equal-norm gives every
    colour the same push norm; code-means adds per token the target's positive excess only."""
    from difflens.intervene.study_concept_steer import SteerRecipe, SteerSetup, steer_interventions
    from difflens.intervene.study_items import Item
    from difflens.intervene.region import Window
    from difflens.intervene.study_shift import WORD

    truth, tok = adapter.ground_truth(), adapter.model.tokenizer

    class Case(Item):
        to_color = "blue"

    prompt = truth.describe({"color": "red", "object": "circle", "position": "center", "bgcolor": "black"})
    case = Case(prompt, 0, "red", "circle", "center", "black")
    feats = {"color=red": [0, 5], "color=blue": [1, 2], "color=green": [3]}
    fmax = {0: 1.0, 5: 1.0, 1: 2.0, 2: 2.0, 3: 8.0}
    kw = dict(text=txt_sae, feats=feats, fmax=fmax, branch="both", window=Window.all())
    with pytest.raises(DifflensError, match="SteerSetup"):
        steer_interventions(SteerRecipe(tokens="after", mode="feature-max"), case, 0, **kw)
    with pytest.raises(DifflensError, match="tokenizer"):
        SteerSetup(SteerRecipe(tokens="after", mode="feature-max"), txt_sae, None, feats, fmax)
    setup = SteerSetup(SteerRecipe(tokens="after", mode="feature-max"), txt_sae, None, feats, fmax, tokenizer=tok, truth=truth)
    word, after = setup.positions(prompt)
    lab = truth.text_labels(prompt, tok)
    ids = {c: i for i, c in enumerate(truth.concepts)}
    assert (lab[word] >> ids["color=red"]) & 1 and after[0] == word and after[-1] == len(lab) - 1
    bg = [t for t in range(len(lab)) if any((lab[t] >> i) & 1 for c, i in ids.items() if c.startswith(("bgcolor=", "bg=")))]
    assert (lab[bg[0]] >> ids["bgcolor=black"]) & 1 and not set(bg) & set(after) and len(after) == len(lab) - word - len(bg)
    assert setup.positions(prompt, phrase=True)[1] == list(range(word, bg[0]))
    [one] = steer_interventions(SteerRecipe(tokens="after", mode="feature-max"), case, 0, setup=setup, **kw)
    assert one.where is None and one.tokens == tuple(after) and one.features == (1, 2)
    # equal-norm: the push of every colour rescaled to the mean norm; a weak colour is pushed harder
    eq = SteerSetup(SteerRecipe(mode="equal-norm"), txt_sae, None, feats, fmax)
    [e] = steer_interventions(SteerRecipe(mode="equal-norm"), case, 0, setup=eq, **kw)
    k = (sum(eq.norms.values()) / len(eq.norms)) / eq.norms["color=blue"]
    assert e.mode == "feature-max" and e.feature_max == pytest.approx({1: 2.0 * k, 2: 2.0 * k}) and k > 1
    # feature-mean and code-means from given code means (what SteerSetup reads from the store)
    F = txt_sae.num_latents
    means = {}
    for c, hot in (("color=blue", {1: 3.0, 2: 0.5, 7: 2.0}), ("color=red", {1: 1.0, 7: 4.0}), ("color=green", {1: 1.0})):
        v = torch.zeros(F)
        for f, x in hot.items():
            v[f] = x
        means[(WORD, c)] = v
        for t in set(tok([prompt])[0][0].tolist()):
            means[(t, c)] = v * 0.5
    for mode in ("feature-mean", "code-means"):
        setup = SteerSetup(SteerRecipe(tokens="after", mode="feature-max"), txt_sae, None, feats, fmax, tokenizer=tok, truth=truth)
        setup.means = means
        got = steer_interventions(SteerRecipe(mode=mode, tokens="after", n_features=2), case, 0, setup=setup, **kw)
        if mode == "feature-mean":
            assert [g.feature_max for g in got] == [{1: 3.0, 2: 0.5}]
        else:  # blue's excess over red and green: feature 1 (3 - 1), 2 (0.5); 7 is below red's, so not added
            assert [g.tokens for g in got] == [(t,) for t in after]
            assert got[0].feature_max == pytest.approx({1: 2.0, 2: 0.5}) and got[1].feature_max == pytest.approx({1: 1.0, 2: 0.25})
    setup = SteerSetup(SteerRecipe(mode="feature-max"), txt_sae, None, feats, fmax, tokenizer=tok, truth=truth)
    setup.means = means
    [w] = steer_interventions(SteerRecipe(mode="code-means"), case, 0, setup=setup, control=3, **kw)
    assert w.where is not None and w.random_direction == 3 and w.feature_max == pytest.approx({1: 2.0, 2: 0.5})
