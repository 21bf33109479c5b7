"""ITDA: pursuit algorithms against brute force, atom addition rule, cap, provenance, pruning, checkpoints."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from difflens.dictionaries import DictConfig, build, io
from difflens.dictionaries.itda import ITDA, greedy_dedupe
from difflens.dictionaries.itda import build as itda_build
from difflens.dictionaries.pursuit import gradient_pursuit, matching_pursuit, merge_slots
from difflens.errors import DifflensError


def unit(n, d, seed):
    a = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a / a.norm(dim=1, keepdim=True)


def brute_force_nnls(x, atoms, L):
    """min over supports of size L of min_{w ≥ 0} ‖x − wᵀA_S‖² (exhaustive)."""
    A = atoms.numpy()
    best = np.inf
    for S in itertools.combinations(range(A.shape[0]), L):
        _, res = nnls(A[list(S)].T, x.numpy())
        best = min(best, res**2)
    return best


def loss_of(x, atoms, vals, idx):
    return float((x - (vals[:, :, None] * atoms[idx]).sum(1)).pow(2).sum(1).squeeze())


def test_gradient_pursuit_recovers_a_planted_code_like_brute_force():
    atoms = unit(14, 48, seed=0)  # near-orthogonal in 48 dims
    support = torch.tensor([[2, 7, 11]])
    w_true = torch.tensor([[1.5, 0.8, 2.0]], dtype=torch.float64)
    x = (w_true[:, :, None] * atoms[support]).sum(1)
    vals, idx = gradient_pursuit(x, atoms, n_iter=3)
    assert (vals >= 0).all() and int((vals > 0).sum()) <= 3
    assert set(idx[vals > 0].tolist()) == {2, 7, 11}
    gp = loss_of(x, atoms, vals, idx)
    best = brute_force_nnls(x[0], atoms, 3)
    assert best < 1e-12
    assert gp < 0.02 * float(x.pow(2).sum())  # one gradient step per atom: close to the exact fit


def test_gradient_pursuit_is_a_feasible_near_optimal_answer_on_random_problems():
    atoms = unit(10, 12, seed=1)
    x = unit(5, 12, seed=2) * 3
    vals, idx = gradient_pursuit(x, atoms, n_iter=2)
    for i in range(x.shape[0]):
        assert (vals[i] >= 0).all() and int((vals[i] > 0).sum()) <= 2
        gp = loss_of(x[i : i + 1], atoms, vals[i : i + 1], idx[i : i + 1])
        best = brute_force_nnls(x[i], atoms, 2)
        base = float(x[i].pow(2).sum())
        assert gp >= best - 1e-9  # brute force is a true lower bound for any feasible code
        assert gp <= best + 0.25 * (base - best) + 1e-9  # and GP gets most of the achievable reduction


def test_gradient_pursuit_follows_the_design_update():
    """One iteration by hand: S = {argmax D r}, η = ⟨c, r⟩ / max(‖c‖², 1e-3), w = ReLU(η·g)."""
    atoms = unit(6, 5, seed=3)
    x = unit(1, 5, seed=4) * 2
    g = atoms @ x[0]
    j = int(g.argmax())
    c = g[j] * atoms[j]
    eta = float(c @ x[0]) / max(float(c @ c), 1e-3)
    vals, idx = gradient_pursuit(x, atoms, n_iter=1)
    assert int(idx[0, 0]) == j
    assert float(vals[0, 0]) == pytest.approx(max(eta * float(g[j]), 0.0))


def test_matching_pursuit_option_recovers_orthonormal_codes():
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    atoms = q.T[:10]
    x = 2.0 * atoms[1] + 0.5 * atoms[4]
    vals, idx = matching_pursuit(x[None], atoms, n_iter=3)
    dense = torch.zeros(10, dtype=torch.float64).index_add_(0, idx[0], vals[0])
    torch.testing.assert_close(dense[[1, 4]], torch.tensor([2.0, 0.5], dtype=torch.float64))
    assert dense.abs().sum() == pytest.approx(2.5)
    cfg = DictConfig(arch="itda", d_in=16, width=100, k=3, normalization="none", itda_inference="mp")
    itda = build(cfg)
    itda.init_from_data(torch.randn(32, 16))
    itda._append(atoms.float(), {})
    torch.testing.assert_close(itda(x[None].float()).x_hat, x[None].float(), atol=1e-5, rtol=0)


def test_merge_slots_sums_repeats():
    v, i = merge_slots(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[5, 2, 5]]))
    assert dict(zip(i[0].tolist(), v[0].tolist())) == {2: 2.0, 5: 4.0, 0: 0.0}


def _itda(**kw):
    cfg = DictConfig(**({"arch": "itda", "d_in": 8, "width": 0, "k": 2, "normalization": "none", "itda_tau": 0.3} | kw))
    return ITDA(cfg)


def test_itda_adds_exactly_the_rows_above_tau_with_provenance():
    g = torch.Generator().manual_seed(0)
    first = torch.randn(16, 8, generator=g)
    itda = _itda()
    itda.init_from_data(first)
    above0 = itda.normalized_loss(first) > itda.cfg.itda_tau  # against no atoms: ℓ = ‖x‖² / var
    itda.partial_fit(first, None, {"sample_id": torch.arange(16), "token": torch.arange(16) + 100})
    n0 = itda.num_atoms
    assert n0 == int(above0.sum()) > 0
    assert sorted(itda.provenance["sample_id"].tolist()) == above0.nonzero().squeeze(1).tolist()
    assert torch.equal(itda.provenance["token"], itda.provenance["sample_id"] + 100)
    kept = above0.nonzero().squeeze(1)[:6]
    x = torch.cat([first[kept] * 2.0, torch.randn(10, 8, generator=g)])  # rescaled atoms are free; new rows are not
    loss = itda.normalized_loss(x)
    above = loss > itda.cfg.itda_tau
    assert 0 < int(above.sum()) < 16 and not above[: len(kept)].any()
    stats = itda.partial_fit(x, None, {"sample_id": torch.arange(16) + 1000, "token": torch.arange(16)})
    assert stats["added"] == int(above.sum()) and itda.num_atoms == n0 + int(above.sum())
    new = itda.atoms_AD[n0:]
    expected = x[above] / x[above].norm(dim=1, keepdim=True)
    order = loss[above].argsort(descending=True)  # worst reconstructed first
    torch.testing.assert_close(new, expected[order])
    prov = itda.provenance
    assert prov["sample_id"][n0:].tolist() == (above.nonzero().squeeze(1)[order] + 1000).tolist()
    torch.testing.assert_close(itda.atoms_AD.norm(dim=1), torch.ones(itda.num_atoms))


def test_itda_respects_its_cap_and_says_so():
    itda = _itda(width=10)
    with pytest.warns(UserWarning, match="cap of 10"):
        itda.partial_fit(torch.randn(25, 8), None, {"row": torch.arange(25)})
    assert itda.num_atoms == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        itda.partial_fit(torch.randn(25, 8) * 50, None, {"row": torch.arange(25)})
    assert itda.num_atoms == 10 and itda.provenance["row"].shape == (10,)


def test_pruning_removes_near_duplicates():
    base = unit(5, 8, seed=7).float()
    dup = base[[1, 3]] + 1e-3 * torch.randn(2, 8)
    dup /= dup.norm(dim=1, keepdim=True)
    itda = _itda()
    itda.init_from_data(torch.randn(32, 8))
    itda._append(torch.cat([base, dup]), {"row": torch.arange(7)})
    assert itda.prune(0.99) == 2
    assert itda.provenance["row"].tolist() == [0, 1, 2, 3, 4]
    keep = greedy_dedupe(torch.cat([base, base[:1]]), 0.99)
    assert keep.tolist() == [True] * 5 + [False]
    # with itda_prune_cosine set, duplicates are never added
    itda2 = _itda(itda_prune_cosine=0.95, itda_tau=0.0)
    x = torch.cat([base, base * 3.0])  # each direction twice
    itda2.partial_fit(x, None, {})
    assert itda2.num_atoms == 5


def test_itda_checkpoint_round_trip_keeps_atoms_and_provenance(tmp_path):
    x = torch.randn(64, 8)
    t = torch.full((64,), 500.0)
    itda = _itda(normalization="scalar")
    itda.init_from_data(x, t)
    itda.partial_fit(x, t, {"sample_id": torch.arange(64), "step": torch.full((64,), 3), "token": torch.arange(64) % 16})
    folder = io.save(itda, tmp_path / "itda")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "weights.safetensors"]
    loaded = io.load(folder)
    assert isinstance(loaded, ITDA) and loaded.num_atoms == itda.num_atoms
    assert loaded.provenance.keys() == itda.provenance.keys()
    for key, v in itda.provenance.items():
        assert torch.equal(loaded.provenance[key], v)
    assert torch.equal(loaded.encode(x, t), itda.encode(x, t))
    codes = loaded.encode(x, t)
    assert codes.shape == (64, itda.num_atoms) and int((codes != 0).sum(1).max()) <= 2
    torch.testing.assert_close(loaded.decode(codes, t), loaded(x, t).x_hat)


def test_build_reads_store_like_batches_and_bad_provenance_is_rejected(monkeypatch):
    monkeypatch.setenv("DIFFLENS_QUIET", "1")
    batches = [
        {"acts": torch.randn(32, 8), "timestep": torch.full((32,), 1.0), "sample_id": torch.arange(32) + 32 * i}
        for i in range(3)
    ]
    cfg = DictConfig(arch="itda", d_in=8, k=2, normalization="none", itda_tau=0.5)
    itda = itda_build(batches, cfg)
    assert itda.num_atoms >= 32 and set(itda.provenance) == {"sample_id"}
    with pytest.raises(DifflensError, match="provenance"):
        itda.partial_fit(torch.randn(4, 8), None, {"token": torch.zeros(3, dtype=torch.long)})
