"""Metric definitions against hand-computed values (docs/architecture.md, "Metrics": FVU, EV, L0, dead)."""

import json
import math

import pytest
import torch

from difflens.evaluate.metrics import ReconAccumulator, SparseCodes, cosine_rows, fvu

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X_HAT = torch.tensor([[1.0, 1.0], [2.0, 4.0]])
# Σ‖x − x̂‖² = 1 + 1 = 2;  x̄ = (2, 3);  Σ‖x − x̄‖² = 2 + 2 = 4
COS = (3 / math.sqrt(10) + 22 / (5 * math.sqrt(20))) / 2


def test_hand_computed_overall():
    acc = ReconAccumulator()
    acc.update(X, X_HAT, torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, 0.0]]))
    r = acc.result()
    assert r["n"] == 2
    assert r["fvu"] == pytest.approx(0.5)
    assert r["explained_variance"] == pytest.approx(0.5)
    assert r["mse"] == pytest.approx(2 / 4)
    assert r["cosine"] == pytest.approx(COS)
    assert r["l0"] == pytest.approx(1.0)
    assert r["dead_fraction"] == pytest.approx(1 / 3)  # latent 2 never fires
    assert r["dead_window_tokens"] == 2


def test_fvu_is_exact_across_batches():
    """One row per batch has zero within-batch variance; the streaming FVU must still be 0.5."""
    acc = ReconAccumulator()
    acc.update(X[:1], X_HAT[:1])
    acc.update(X[1:], X_HAT[1:])
    assert acc.result()["fvu"] == pytest.approx(0.5)
    assert fvu(X, X_HAT) == pytest.approx(0.5)


def test_fvu_uses_the_mean_not_zero():
    """Adding a constant offset to x and x̂ changes nothing (x̄ is subtracted)."""
    off = torch.tensor([100.0, -50.0])
    assert fvu(X + off, X_HAT + off) == pytest.approx(0.5, rel=1e-9)
    assert fvu(X, X) == 0.0


def test_dead_window_counts_last_n_tokens():
    codes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    x = torch.randn(3, 4)
    acc = ReconAccumulator(dead_window=2)
    acc.update(x[:2], x[:2], codes[:2])
    acc.update(x[2:], x[2:], codes[2:])
    r = acc.result()
    assert r["dead_window_tokens"] == 2
    assert acc.dead_mask().tolist() == [True, False, False]  # latent 0 last fired at token 1 of 3
    assert r["dead_fraction"] == pytest.approx(1 / 3)
    # negative activations count as activity (ReLU-free archs), zeros do not
    acc2 = ReconAccumulator()
    acc2.update(x[:1], x[:1], torch.tensor([[-0.5, 0.0, 0.0]]))
    assert acc2.dead_mask().tolist() == [False, True, True]


def test_buckets_by_step_and_by_timestep():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0], [2.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    codes = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 3.0]])
    t = torch.tensor([0.9, 0.9, 0.3, 0.3])
    acc = ReconAccumulator()
    acc.update(x, x_hat, codes, timestep=t, step=torch.tensor([0, 0, 2, 2]))
    rows = acc.result()["by_timestep"]
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0]["timestep"] == pytest.approx(0.9)
    assert rows[0]["fvu"] == pytest.approx(0.5)  # the X / X_HAT pair above
    # bucket 2: x = (0,0),(2,0); x̄ = (1,0); Σ‖x−x̄‖² = 2; Σ‖x−x̂‖² = 1
    assert rows[1]["fvu"] == pytest.approx(0.5)
    assert rows[1]["l0"] == pytest.approx(0.5)
    assert rows[0]["l0"] == pytest.approx(1.5)
    assert rows[1]["cosine"] == pytest.approx(0.5)  # zero row counts as cosine 0
    by_t = ReconAccumulator()
    by_t.update(x, x_hat, codes, timestep=t)
    rows_t = by_t.result()["by_timestep"]
    assert [r["timestep"] for r in rows_t] == pytest.approx([0.3, 0.9])
    assert "step" not in rows_t[0]


def test_zero_variance_gives_nan_not_a_crash():
    x = torch.ones(3, 2)
    acc = ReconAccumulator()
    acc.update(x, x * 0)
    assert math.isnan(acc.result()["fvu"])
    assert acc.result()["mse"] == pytest.approx(1.0)


def test_cosine_rows_zero_vectors():
    c = cosine_rows(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    assert c.tolist() == [0.0, 1.0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must both be"):
        ReconAccumulator().update(torch.zeros(2, 3), torch.zeros(2, 4))


def test_sparse_codes_give_the_same_numbers_as_dense():
    dense = torch.tensor([[0.0, 1.5, 0.0, 0.0], [2.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    sparse = SparseCodes(torch.tensor([[1.5, 0.0], [2.0, 0.5], [0.0, 0.0]]), torch.tensor([[1, 0], [0, 3], [0, 0]]), 4)
    x = torch.randn(3, 2)
    t, st = torch.tensor([5.0, 5.0, 7.0]), torch.tensor([0, 0, 1])
    results = []
    for codes in (dense, sparse):
        acc = ReconAccumulator(dead_window=2)
        acc.update(x[:2], x[:2] * 0.5, codes[:2], timestep=t[:2], step=st[:2])
        acc.update(x[2:], x[2:] * 0.5, codes[2:], timestep=t[2:], step=st[2:])
        results.append((acc.result(), acc.dead_mask().tolist()))
    assert json.dumps(results[0]) == json.dumps(results[1])  # (NaN-safe equality)
    assert results[0][1] == [False, True, True, False]  # last 2 tokens: latents 0 and 3 fired
    assert results[0][0]["l0"] == pytest.approx(1.0)
