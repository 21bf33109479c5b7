"""Three similarity measures between two representations of the same inputs.

* ``jaccard``: two ITDA dictionaries built on the same inputs in the same order are sets of
  inputs (an atom is identified by where it was sampled: sample, token, and step where steps are
  shared); their Jaccard index |A ∩ B| / |A ∪ B| is high when the two representations find the
  same inputs novel. Leask et al. (2025) identify atoms by prompt and token index the same way.
* ``linear_cka``: linear centred kernel alignment of paired rows,
  ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) on centred X [n, p], Y [n, q]; invariant to rotations and
  isotropic scaling of either side.
* ``svcca``: keep the top singular directions of each side (99 % of the variance), then the mean
  canonical correlation between the two reduced spaces (the singular values of Uxᵀ Uy).
"""

from __future__ import annotations

import numpy as np

from difflens.errors import DifflensError


def _keys(ids) -> set:
    a = np.asarray(ids)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise DifflensError(f"atom ids must be [n] or [n, fields], got shape {a.shape}")
    return set(map(tuple, a.tolist()))


def jaccard(ids_a, ids_b) -> float:
    """Jaccard index of two sets of atom ids (rows of an [n, fields] integer array); 1.0 for two empty sets."""
    a, b = _keys(ids_a), _keys(ids_b)
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise DifflensError(f"CKA/SVCCA need paired rows [n, p] and [n, q], got {x.shape} and {y.shape}")
    if x.shape[0] < 2:
        raise DifflensError("CKA/SVCCA need at least 2 paired rows")
    return x - x.mean(0), y - y.mean(0)


def linear_cka(x_NP, y_NQ) -> float:
    """Linear CKA of paired rows (see module docstring); 0 when either side is constant."""
    x, y = _paired(x_NP, y_NQ)
    cross = np.linalg.norm(y.T @ x) ** 2
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denom) if denom > 0 else 0.0


def _top_basis(x: np.ndarray, keep: float) -> np.ndarray:
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    var = s**2
    if var.sum() <= 0:
        return u[:, :0]
    n = int(np.searchsorted(np.cumsum(var) / var.sum(), keep) + 1)
    return u[:, : min(n, len(s))]


def svcca(x_NP, y_NQ, keep: float = 0.99) -> float:
    """Mean canonical correlation after reducing each side to the directions holding `keep` of its variance."""
    if not 0 < keep <= 1:
        raise DifflensError(f"svcca keep must be in (0, 1], got {keep}")
    x, y = _paired(x_NP, y_NQ)
    ux, uy = _top_basis(x, keep), _top_basis(y, keep)
    if ux.shape[1] == 0 or uy.shape[1] == 0:
        return 0.0
    rho = np.linalg.svd(ux.T @ uy, compute_uv=False)
    return float(np.clip(rho, 0, 1).mean())
