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


def _orthogonal_rows(n, d, seed, scale):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q.T[:n] * scale[:, None]


def test_itda_adds_the_rows_above_tau_in_batch_order_with_provenance():
    """Mutually orthogonal rows cannot explain each other: every row above τ becomes an atom,
    in batch order; rows the atoms already reconstruct (rescaled atoms) are not added."""
    d = 32
    g = torch.Generator().manual_seed(0)
    rows = _orthogonal_rows(26, d, seed=1, scale=2.0 + torch.rand(26, generator=g))
    itda = _itda(d_in=d, k=2)
    itda.init_from_data(0.5 * torch.randn(64, d, generator=g))
    first = rows[:16]
    above0 = itda.normalized_loss(first) > itda.cfg.itda_tau  # against no atoms: ℓ = ‖x‖² / var
    assert above0.all()
    stats = itda.partial_fit(first, None, {"sample_id": torch.arange(16), "token": torch.arange(16) + 100})
    assert stats["added"] == itda.num_atoms == 16 and stats["rounds"] == 1
    assert itda.provenance["sample_id"].tolist() == list(range(16))
    assert torch.equal(itda.provenance["token"], itda.provenance["sample_id"] + 100)
    x = torch.cat([first[:6] * 2.0, rows[16:]])  # rescaled atoms are free; the 10 new directions are not
    loss = itda.normalized_loss(x)
    above = loss > itda.cfg.itda_tau
    assert above.tolist() == [False] * 6 + [True] * 10
    stats = itda.partial_fit(x, None, {"sample_id": torch.arange(16) + 1000, "token": torch.arange(16)})
    assert stats["candidates"] == stats["added"] == 10 and itda.num_atoms == 26
    torch.testing.assert_close(itda.atoms_AD[16:], x[above] / x[above].norm(dim=1, keepdim=True))
    assert itda.provenance["sample_id"][16:].tolist() == (above.nonzero().squeeze(1) + 1000).tolist()
    torch.testing.assert_close(itda.atoms_AD.norm(dim=1), torch.ones(itda.num_atoms))


def test_rows_explained_by_an_atom_admitted_from_the_same_batch_are_not_added():
    """Five directions, each 20 times with small noise, in one batch: an empty dictionary used to take
    every row; admitted in rounds it takes one row per direction, like feeding rows one at a time."""
    d = 32
    base = _orthogonal_rows(5, d, seed=2, scale=torch.full((5,), 3.0))
    g = torch.Generator().manual_seed(3)
    x = base.repeat(20, 1) + 0.02 * torch.randn(100, d, generator=g)
    x = x[torch.randperm(100, generator=g)]
    itda = _itda(d_in=d, k=3)
    itda.init_from_data(0.5 * torch.randn(256, d, generator=g))
    itda.partial_fit(x, None, {"row": torch.arange(100)})
    one_by_one = _itda(d_in=d, k=3)
    one_by_one.var_ref.copy_(itda.var_ref)
    for i in range(100):
        one_by_one.partial_fit(x[i : i + 1], None, {})
    assert itda.num_atoms == one_by_one.num_atoms == 5
    assert (itda.normalized_loss(x) <= itda.cfg.itda_tau).all()


def test_dictionary_size_and_fvu_do_not_depend_on_the_batch_size():
    """The same rows in batches of 32 and of 1,024: within a few % in atoms and held-out FVU
    (before, the first batch alone gave 32 vs ~1,024 atoms)."""
    d, n_dirs = 48, 48
    g = torch.Generator().manual_seed(4)
    dirs = torch.randn(n_dirs, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)

    def sample(n):  # sparse non-negative mixtures of 2 of the directions, plus noise
        idx = torch.randint(0, n_dirs, (n, 2), generator=g)
        w = torch.rand(n, 2, generator=g) + 0.5
        return (w[:, :, None] * dirs[idx]).sum(1) + 0.05 * torch.randn(n, d, generator=g)

    x, held = sample(2048), sample(1024)

    def fvu(itda):
        return float((held - itda(held).x_hat).pow(2).sum() / (held - held.mean(0)).pow(2).sum())

    out = {}
    for bs in (32, 1024):
        itda = _itda(d_in=d, k=4, itda_tau=0.2)
        itda.init_from_data(x[:2048])
        for s in range(0, len(x), bs):
            itda.partial_fit(x[s : s + bs])
        out[bs] = (itda.num_atoms, fvu(itda))
    (n32, f32), (n1024, f1024) = out[32], out[1024]
    assert 100 < n32 < 1000 and f32 < 0.3  # a real dictionary, not a degenerate one
    assert abs(n1024 - n32) / n32 < 0.05, out
    assert abs(f1024 - f32) / f32 < 0.05, out


def test_early_exit_and_bf16_scores_keep_the_answer():
    atoms = unit(200, 32, seed=8).float()
    x = (unit(300, 32, seed=9).float() * 2) @ torch.eye(32) + atoms[:300 % 200].sum(0) * 0.1
    v, i, err = gradient_pursuit(x, atoms, 8, return_error=True)
    torch.testing.assert_close(err, (x - (v[:, :, None] * atoms[i]).sum(1)).pow(2).sum(1), rtol=1e-4, atol=1e-4)
    stop = float(err.median())
    v2, i2, err2 = gradient_pursuit(x, atoms, 8, stop_sq=stop, return_error=True)
    done = err2 <= stop
    assert 0 < int(done.sum()) < len(x)
    # rows that never reach the threshold run all iterations: the same code as without early exit
    torch.testing.assert_close(v2[~done], v[~done])
    assert torch.equal(i2[~done], i[~done])
    # rows that left early did so with a code whose error is what is reported, and at most 8 atoms
    torch.testing.assert_close(err2[done], (x[done] - (v2[done, :, None] * atoms[i2[done]]).sum(1)).pow(2).sum(1),
                               rtol=1e-4, atol=1e-4)
    assert ((err2 <= stop) == (err <= stop)).float().mean() > 0.95  # GP is close to monotone
    vb, ib, errb = gradient_pursuit(x, atoms, 8, scores_atoms=atoms.bfloat16(), return_error=True)
    assert float(errb.sum()) == pytest.approx(float(err.sum()), rel=0.02)  # bf16 only picks the atoms


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
    assert itda.num_atoms >= 16 and set(itda.provenance) == {"sample_id"}  # random 8-d rows need many atoms
    with pytest.raises(DifflensError, match="provenance"):
        itda.partial_fit(torch.randn(4, 8), None, {"token": torch.zeros(3, dtype=torch.long)})
