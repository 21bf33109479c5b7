"""Sparse inference against a fixed dictionary of unit atoms: gradient pursuit and matching pursuit.

Both are batched over rows and return non-negative codes as (values [B, L], indices [B, L]),
at most L = n_iter distinct atoms per row (slots of repeated atoms are merged; unused slots
have value 0). Rows are processed in chunks so the [rows, atoms] correlation matrix stays small.

Gradient pursuit, exactly as DESIGN.md §3 (Shabalin et al. 2025):
    r = x − Σ w_f d_f ;  g = D r ;  S ← S ∪ {argmax g} ;  grad = 1_S ⊙ g ;  c = Dᵀ grad
    η = ⟨c, r⟩ / max(‖c‖², 1e-3) ;  w ← ReLU(w + η·grad)        repeated L times, keep the top k.
The supported coefficients and atoms are kept compactly ([B, L] and gathered rows), so each
iteration costs one [B, D] @ [D, A] product (for the argmax) plus O(B·L·D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunks(n: int, n_atoms: int, budget: int = 1 << 25):
    step = max(1, min(n, budget // max(n_atoms, 1)))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def merge_slots(values_BL: Tensor, indices_BL: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the values of repeated indices within a row; freed slots become (0, 0)."""
    b, L = indices_BL.shape
    if L == 0:
        return values_BL, indices_BL
    s_idx, order = indices_BL.sort(dim=1)
    s_val = values_BL.gather(1, order)
    first = torch.ones_like(s_idx, dtype=torch.bool)
    first[:, 1:] = s_idx[:, 1:] != s_idx[:, :-1]
    run = first.long().cumsum(1) - 1
    vals = torch.zeros_like(s_val).scatter_add_(1, run, s_val)
    idx = torch.zeros_like(s_idx).scatter_(1, run, s_idx)
    return vals, idx


def gradient_pursuit(x_BD: Tensor, atoms_AD: Tensor, n_iter: int, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Non-negative gradient pursuit (see module docstring); returns (values, indices) [B, min(k, n_iter)]."""
    outs = [_gp_chunk(x_BD[sl], atoms_AD, n_iter) for sl in _chunks(x_BD.shape[0], atoms_AD.shape[0])]
    vals = torch.cat([o[0] for o in outs]) if outs else x_BD.new_zeros(0, n_iter)
    idx = torch.cat([o[1] for o in outs]) if outs else torch.zeros(0, n_iter, dtype=torch.long, device=x_BD.device)
    k = n_iter if k is None else min(k, n_iter)
    if k < n_iter:
        top = vals.topk(k, dim=1).indices
        vals, idx = vals.gather(1, top), idx.gather(1, top)
    return vals, idx


def _gp_chunk(x: Tensor, atoms: Tensor, L: int) -> tuple[Tensor, Tensor]:
    b = x.shape[0]
    idx = torch.zeros(b, L, dtype=torch.long, device=x.device)
    w = x.new_zeros(b, L)
    in_S = torch.zeros(b, L, dtype=torch.bool, device=x.device)  # slot holds a new support element
    r = x.clone()
    for i in range(L):
        g_BA = r @ atoms.T
        j = g_BA.argmax(1)
        new = ~((idx[:, :i] == j[:, None]) & in_S[:, :i]).any(1)
        idx[:, i] = j
        in_S[:, i] = new
        n = i + 1
        grad = g_BA.gather(1, idx[:, :n]) * in_S[:, :n]
        c = F.embedding_bag(idx[:, :n], atoms, mode="sum", per_sample_weights=grad)
        eta = (c * r).sum(1) / (c * c).sum(1).clamp_min(1e-3)
        w[:, :n] = (w[:, :n] + eta[:, None] * grad).relu()
        r = x - F.embedding_bag(idx[:, :n], atoms, mode="sum", per_sample_weights=w[:, :n])
    return merge_slots(w, idx)


def matching_pursuit(x_BD: Tensor, atoms_AD: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    """Non-negative matching pursuit: pick the atom most correlated with the residual, take its
    full correlation as the coefficient, subtract, repeat; stop a row when no correlation is > 0."""
    vals_all, idx_all = [], []
    for sl in _chunks(x_BD.shape[0], atoms_AD.shape[0]):
        r = x_BD[sl].clone()
        b = r.shape[0]
        vals = r.new_zeros(b, n_iter)
        idx = torch.zeros(b, n_iter, dtype=torch.long, device=r.device)
        for i in range(n_iter):
            g, j = (r @ atoms_AD.T).max(1)
            g = g.clamp_min(0)
            vals[:, i], idx[:, i] = g, j
            r -= g[:, None] * atoms_AD[j]
        v, ix = merge_slots(vals, idx)
        vals_all.append(v)
        idx_all.append(ix)
    if not vals_all:
        return x_BD.new_zeros(0, n_iter), torch.zeros(0, n_iter, dtype=torch.long, device=x_BD.device)
    return torch.cat(vals_all), torch.cat(idx_all)
