"""Spatial metrics of feature maps on the token grid: Moran's I (coherence) and IoU with a concept mask.

Moran's I with rook (4-neighbour) adjacency, each adjacent pair counted once:

    I = (N / P) * sum_{pairs (i,j)} (x_i - m)(x_j - m) / sum_i (x_i - m)^2

N tokens, P adjacent pairs, m the map's mean. +1 for smooth blobs, 0 for noise (-1/(N-1) in
expectation), -1 for a checkerboard. Undefined (NaN) for a constant map.
"""

from __future__ import annotations

import numpy as np


def morans_i(maps_NHW: np.ndarray) -> np.ndarray:
    """Moran's I of each map [..., H, W] (rook adjacency); NaN where the map is constant."""
    x = np.asarray(maps_NHW, np.float64)
    H, W = x.shape[-2:]
    xc = x - x.mean(axis=(-2, -1), keepdims=True)
    num = (xc[..., :, :-1] * xc[..., :, 1:]).sum((-2, -1)) + (xc[..., :-1, :] * xc[..., 1:, :]).sum((-2, -1))
    den = (xc**2).sum((-2, -1))
    pairs = H * (W - 1) + (H - 1) * W
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (H * W / pairs) * num / den
    return np.where(den > 1e-12 * np.maximum((x**2).sum((-2, -1)), 1e-30), out, np.nan)


def iou(a_NT: np.ndarray, b_NT: np.ndarray) -> np.ndarray:
    """Per-row IoU of two boolean masks [..., T]; NaN where both are empty."""
    a, b = np.asarray(a_NT, bool), np.asarray(b_NT, bool)
    inter = (a & b).sum(-1)
    union = (a | b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


class SpatialAccumulator:
    """Streams feature maps [n_maps, T, F] and keeps, per feature, the sum and count of Moran's I over
    maps where the feature is active on >= `min_tokens` tokens, and (with labels) the sum of per-map
    IoU between the active tokens and every concept's mask, over maps where the feature is active."""

    def __init__(self, num_features: int, grid_hw: tuple[int, int], num_concepts: int = 0, min_tokens: int = 2):
        self.F, self.grid, self.C, self.min_tokens = num_features, tuple(grid_hw), num_concepts, min_tokens
        self.moran_sum = np.zeros(num_features)
        self.moran_n = np.zeros(num_features, np.int64)
        self.iou_sum = np.zeros((num_features, num_concepts))
        self.iou_n = np.zeros(num_features, np.int64)

    def add(self, maps_NTF: np.ndarray, active_NTF: np.ndarray, concepts_NTC: np.ndarray | None = None) -> None:
        n, T, F = maps_NTF.shape
        H, W = self.grid
        cnt = active_NTF.sum(1)  # [n, F]
        use = cnt >= self.min_tokens
        if use.any():
            I = morans_i(np.moveaxis(maps_NTF, 2, 1).reshape(n, F, H, W))  # [n, F]
            ok = use & np.isfinite(I)
            self.moran_sum += np.where(ok, I, 0).sum(0)
            self.moran_n += ok.sum(0)
        if concepts_NTC is not None and self.C:
            A = active_NTF.astype(np.float32)
            M = concepts_NTC.astype(np.float32)
            inter = np.einsum("ntf,ntc->nfc", A, M)
            union = cnt[:, :, None] + M.sum(1)[:, None, :] - inter
            on = cnt > 0  # [n, F]
            r = np.where(union > 0, inter / np.maximum(union, 1), 0.0) * on[:, :, None]
            self.iou_sum += r.sum(0)
            self.iou_n += on.sum(0)

    def moran(self) -> np.ndarray:
        """Mean Moran's I per feature (NaN where no map qualified)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.moran_n > 0, self.moran_sum / np.maximum(self.moran_n, 1), np.nan)

    def localisation(self, concept_F: np.ndarray) -> np.ndarray:
        """Mean IoU per feature with the given concept (one per feature), over maps where it fires."""
        v = self.iou_sum[np.arange(self.F), concept_F]
        return np.where(self.iou_n > 0, v / np.maximum(self.iou_n, 1), np.nan)
