"""Sparse inference against a fixed dictionary of unit atoms: gradient pursuit and matching pursuit.

Both are batched over rows and return non-negative codes as (values [B, L], indices [B, L]),
at most L = n_iter distinct atoms per row (slots of repeated atoms are merged; unused slots
have value 0). Rows are processed in chunks so the [rows, atoms] score matrix stays small.

Gradient pursuit as Shabalin et al. (2025) describe it (docs/dictionaries.md):
    r = x − Σ w_f d_f ;  g = D r ;  S ← S ∪ {argmax g} ;  grad = 1_S ⊙ g ;  c = Dᵀ grad
    η = ⟨c, r⟩ / max(‖c‖², 1e-3) ;  w ← ReLU(w + η·grad)        repeated L times, keep the top k.

Cost. Each iteration needs one [B, D] @ [D, A] product — the scores of every atom against the
residual, used only to pick the next atom. Everything else works on the support: its atoms are
gathered once into a [B, L, D] buffer filled in place, and the support gradient, c, η and the
residual are small batched products, O(B·L·D). Two options make ITDA's construction cheap:

* ``scores_atoms``: a low-precision copy of the atoms (bf16) used for the argmax only; the support
  gradient and the coefficients stay in the input precision, so only the choice of atom can
  change, and only between atoms whose scores agree to bf16's ~3 digits.
* ``stop_sq``: rows whose squared residual falls to or below it leave the loop (construction only
  needs to know whether a row is reconstructed within τ). Remaining rows are compacted, so the
  product shrinks with them.
"""

from __future__ import annotations

import torch
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


def gradient_pursuit(
    x_BD: Tensor,
    atoms_AD: Tensor,
    n_iter: int,
    k: int | None = None,
    *,
    scores_atoms: Tensor | None = None,
    stop_sq: Tensor | float | None = None,
    return_error: bool = False,
):
    """Non-negative gradient pursuit (see module docstring); returns (values, indices) [B, min(k, n_iter)],
    plus the squared residual per row [B] when ``return_error`` (of the code before the top-k cut)."""
    n, a = x_BD.shape[0], atoms_AD.shape[0]
    if scores_atoms is not None and scores_atoms.shape != atoms_AD.shape:
        raise ValueError(f"scores_atoms has shape {tuple(scores_atoms.shape)}, atoms {tuple(atoms_AD.shape)}")
    stop = None
    if stop_sq is not None:
        stop = torch.as_tensor(stop_sq, dtype=x_BD.dtype, device=x_BD.device).expand(n)
    outs = [
        _gp_chunk(x_BD[sl], atoms_AD, n_iter, scores_atoms, None if stop is None else stop[sl]) for sl in _chunks(n, a)
    ]
    vals = torch.cat([o[0] for o in outs]) if outs else x_BD.new_zeros(0, n_iter)
    idx = torch.cat([o[1] for o in outs]) if outs else torch.zeros(0, n_iter, dtype=torch.long, device=x_BD.device)
    err = torch.cat([o[2] for o in outs]) if outs else x_BD.new_zeros(0)
    k = n_iter if k is None else min(k, n_iter)
    if k < n_iter:
        top = vals.topk(k, dim=1).indices
        vals, idx = vals.gather(1, top), idx.gather(1, top)
    return (vals, idx, err) if return_error else (vals, idx)


def _gp_chunk(x: Tensor, atoms: Tensor, L: int, scores_atoms: Tensor | None, stop: Tensor | None):
    b, d = x.shape
    out_w, out_idx, out_err = x.new_zeros(b, L), torch.zeros(b, L, dtype=torch.long, device=x.device), x.new_empty(b)
    if b == 0 or L == 0:
        return out_w, out_idx, x.pow(2).sum(1)
    sa = atoms if scores_atoms is None else scores_atoms
    rows = torch.arange(b, device=x.device)  # which output row each live row is
    idx = torch.zeros(b, L, dtype=torch.long, device=x.device)
    w = x.new_zeros(b, L)
    in_S = torch.zeros(b, L, dtype=torch.bool, device=x.device)  # slot holds a new support element
    A_S = x.new_empty(b, L, d)  # the support's atoms, filled one slot per iteration (slots ≥ n unread)
    r = x.clone()
    for i in range(L):
        j = (r.to(sa.dtype) @ sa.T).max(1).indices  # max(): much faster than argmax() for bf16 on CPU
        new = ~((idx[:, :i] == j[:, None]) & in_S[:, :i]).any(1)
        idx[:, i] = j
        in_S[:, i] = new
        A_S[:, i] = atoms[j]
        n = i + 1
        As = A_S[:, :n]
        grad = torch.bmm(As, r.unsqueeze(2)).squeeze(2) * in_S[:, :n]  # (D r) on the support, exact
        c = torch.bmm(grad.unsqueeze(1), As).squeeze(1)
        eta = (c * r).sum(1) / (c * c).sum(1).clamp_min(1e-3)
        w[:, :n] = (w[:, :n] + eta[:, None] * grad).relu_()
        r = x - torch.bmm(w[:, None, :n], As).squeeze(1)
        if stop is not None and i + 1 < L:
            err = r.pow(2).sum(1)
            done = err <= stop
            if bool(done.any()):
                out = rows[done]
                out_w[out], out_idx[out], out_err[out] = w[done], idx[done], err[done]
                live = (~done).nonzero().squeeze(1)
                rows, idx, w, in_S, r, x, stop = (t.index_select(0, live) for t in (rows, idx, w, in_S, r, x, stop))
                A_new = x.new_empty(live.numel(), L, d)  # copy only the filled slots
                A_new[:, :n] = A_S[:, :n].index_select(0, live)
                A_S = A_new
                if rows.numel() == 0:
                    break
    if rows.numel():
        out_w[rows], out_idx[rows], out_err[rows] = w, idx, r.pow(2).sum(1)
    vals, ix = merge_slots(out_w, out_idx)
    return vals, ix, out_err


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
