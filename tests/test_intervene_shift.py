"""The object edit on a text stream: CodeShift (codes moved per token, error term kept) and the
per-token mean codes of the object's context it is built from (intervene/study_shift.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflens.errors import DifflensError
from difflens.intervene import generate_with
from difflens.intervene import CodeShift
from difflens.intervene.study_shift import WORD, context_code_means, shift_delta

from test_intervene import PROMPT, PROMPT2, run_with_probe, tiny_sae

SITE = "context_embedder:txt"  # the text tokens entering block 0
PROMPTS = [f"a large {c} {o} in the center on a {b} plain background"
           for c, o, b in (("red", "circle", "black"), ("blue", "square", "gray"), ("green", "circle", "navy"))]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from toy_fixtures import make_tiny_toy

    from difflens.models.toy.adapter import ToyAdapter

    return ToyAdapter.load(folder=make_tiny_toy(tmp_path_factory.mktemp("tiny_toy_shift")))


@pytest.fixture(scope="module")
def sae(adapter):
    return tiny_sae(adapter.site_dim(SITE), width=32, k=3, site=SITE, seed=3)


@pytest.fixture(scope="module")
def store(adapter, tmp_path_factory):
    from test_splice import tiny_store

    return tiny_store(adapter, tmp_path_factory.mktemp("shift_store") / "store", PROMPTS, SITE)


def test_zero_shift_is_bit_identical(adapter, sae):
    clean = adapter.generate([PROMPT, PROMPT2], [0, 1], steps=2)
    iv = CodeShift(sae, torch.zeros(sae.num_latents))
    gen = generate_with(adapter, [PROMPT, PROMPT2], [0, 1], [iv], steps=2)
    assert iv.steps_applied() == [0, 1]  # it ran and wrote back
    assert np.array_equal(gen.images, clean.images)


def test_per_token_shift_moves_only_its_tokens_by_the_decoded_change(adapter, sae):
    T = adapter.model.cfg.max_text_length
    delta = torch.zeros(T, sae.num_latents)
    delta[2, 5] = 3.0
    delta[4, [1, 7]] = -50.0  # would go below zero: codes that were >= 0 stay >= 0
    iv = CodeShift(sae, delta, branch="cond")
    _, pre, post = run_with_probe(adapter, [iv], site=SITE)
    for key, (x, is_cond, _) in pre.items():
        y = post[key][0]
        moved = (y - x).norm(dim=-1) > 1e-6  # [B, T]
        assert not moved[~is_cond].any() and not moved[:, [0, 1, 3, *range(5, T)]].any() and moved[is_cond, 2].all()
        with torch.no_grad():
            c = sae.encode(x[is_cond][:, 2])
            c2 = c.clone()
            c2[:, 5] += 3.0
            want = x[is_cond][:, 2] + sae.decode(c2) - sae.decode(c)
            c4 = sae.encode(x[is_cond][:, 4])
            c4b = c4.clone()
            c4b[:, [1, 7]] = 0
            want4 = x[is_cond][:, 4] + sae.decode(c4b) - sae.decode(c4)
        assert torch.allclose(y[is_cond][:, 2], want, atol=1e-5)
        assert torch.allclose(y[is_cond][:, 4], want4, atol=1e-5)


def test_shift_shape_errors(adapter, sae):
    with pytest.raises(DifflensError, match="dictionary's width"):
        CodeShift(sae, torch.zeros(sae.num_latents + 1))
    with pytest.raises(DifflensError, match="one row per token"):
        generate_with(adapter, [PROMPT], [0], [CodeShift(sae, torch.zeros(3, sae.num_latents))], steps=1)


def test_context_means_and_the_delta_they_give(adapter, sae, store):
    from difflens.world.groundtruth import ToyWorld

    truth, tok = ToyWorld(), adapter.model.tokenizer
    means = context_code_means(sae, store, "object", tok, truth=truth)
    assert {(WORD, "object=circle"), (WORD, "object=square")} <= set(means)
    # the circle word's mean: by hand, over the store rows of that word (token 4: <bos> a large red circle)
    meta = store.meta(SITE, ["sample_id", "token", "timestep"])
    circle = {s["sample_id"] for s in store.samples() if "circle" in s["prompt"]}
    rows = np.flatnonzero(np.isin(meta["sample_id"], list(circle)) & (meta["token"] == 4))
    with torch.no_grad():
        want = sae.encode(store.read_rows(SITE, rows).float()).mean(0)
    assert torch.allclose(means[(WORD, "object=circle")], want, atol=1e-5)
    word = context_code_means(sae, store, "object", tok, truth=truth, word_only=True)  # the steer's cheaper pass
    assert {k for k in word if k[0] != WORD} == set() and all(torch.equal(v, means[k]) for k, v in word.items())
    delta = shift_delta(means, PROMPTS[0], "object=circle", "object=square", tok, truth=truth, n_features=2, scale=2.0)
    assert delta.shape == (adapter.model.cfg.max_text_length, sae.num_latents)
    assert not delta[:4].any() and delta[4].any()  # nothing before the object word
    assert int((delta != 0).sum(1).max()) <= 2
    d = means[(WORD, "object=square")] - means[(WORD, "object=circle")]
    top = torch.topk(d.abs(), 2).indices
    assert torch.allclose(delta[4, top], 2.0 * d[top])
    assert shift_delta(means, PROMPTS[1], "object=circle", "object=square", tok, truth=truth) is None  # no circle named
    assert shift_delta(means, PROMPTS[0], "object=circle", "object=seven", tok, truth=truth) is None  # not in the store
    img = tiny_sae(adapter.site_dim("transformer_blocks.1:img"), site="transformer_blocks.1:img")
    with pytest.raises(DifflensError, match="text stream"):
        context_code_means(img, store, "object", tok, truth=truth)


def test_object_shift_option_parses():
    from difflens.intervene.cli import _object_shift

    assert _object_shift("8,1.5") == (8, 1.5) and _object_shift("off") is None
    for bad in ("8", "x,1", "0,1", "4,-1"):
        with pytest.raises(DifflensError, match="--object-shift"):
            _object_shift(bad)
