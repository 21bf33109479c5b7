"""Input normalisation: raw activations <-> the well-conditioned space a dictionary is trained in.

The DiT residual stream is highly anisotropic and its scale shifts with the timestep; without
normalisation most SAE latents die (Shabalin et al. 2025). Every dictionary owns one
`Normalizer`, fits it once in ``init_from_data`` and applies it on the way in and inverts it on
the way out, so callers only ever see raw activations. Statistics are buffers, hence saved
with the weights.

Modes (x raw, x_n normalised, D = d_in):
  none          x_n = x
  scalar        x_n = s·x,                      s = sqrt(D / E‖x‖²)
  per-timestep  x_n = s_b·(x − μ_b),            b = the timestep bucket of t, E‖x_n‖² = D per bucket
  pca-whiten    x_n = (W x)/σ − m,              W the PCA rotation, σ per-component std, m the mean
                (equivalently W(x − μ)/σ);      inverse x = Wᵀ(σ ⊙ x_n) + μ
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from difflens.errors import DifflensError

MODES = ("none", "scalar", "per-timestep", "pca-whiten")


class Normalizer(nn.Module):
    """A fitted, invertible affine map; buffers may change shape when loaded (bucket count)."""

    def __init__(self, mode: str, d_in: int, *, timestep_buckets: int = 32, pca_min_var_ratio: float = 1e-4):
        super().__init__()
        if mode not in MODES:
            raise DifflensError(f"normalization {mode!r} is unknown; use one of {', '.join(MODES)}")
        self.mode, self.d_in = mode, d_in
        self.timestep_buckets, self.pca_min_var_ratio = timestep_buckets, pca_min_var_ratio
        self.register_buffer("fitted", torch.tensor(mode == "none"))
        if mode == "scalar":
            self.register_buffer("scale", torch.ones(()))
        elif mode == "per-timestep":
            self.register_buffer("centers_T", torch.zeros(1))  # bucket centres (timestep values)
            self.register_buffer("mean_TD", torch.zeros(1, d_in))
            self.register_buffer("scale_T", torch.ones(1))
        elif mode == "pca-whiten":
            self.register_buffer("mean_D", torch.zeros(d_in))
            self.register_buffer("components_DD", torch.eye(d_in))  # rows = principal directions
            self.register_buffer("std_D", torch.ones(d_in))

    # ---- fitting ----------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x_BD: Tensor, t_B: Tensor | None = None) -> None:
        x = x_BD.detach().double()
        n, d = x.shape
        if d != self.d_in:
            raise DifflensError(f"normalizer expects d_in={self.d_in}, got activations of width {d}")
        if self.mode == "scalar":
            self.scale.fill_(math.sqrt(d / max(float(x.pow(2).sum(1).mean()), 1e-12)))
        elif self.mode == "per-timestep":
            if t_B is None:
                raise DifflensError("per-timestep normalisation needs the timesteps t_B of the fitting batch")
            self._fit_buckets(x, t_B.detach().double().reshape(-1))
        elif self.mode == "pca-whiten":
            self._fit_pca(x)
        self.fitted.fill_(True)

    def _fit_buckets(self, x: Tensor, t: Tensor) -> None:
        uniq = torch.unique(t)
        if uniq.numel() <= self.timestep_buckets:
            centers = uniq
        else:  # quantile centres so every bucket sees data
            q = (torch.arange(self.timestep_buckets, dtype=torch.float64) + 0.5) / self.timestep_buckets
            centers = torch.unique(torch.quantile(t, q))
        self.centers_T = centers.float()
        bucket = self._bucket(t)
        d = x.shape[1]
        g_mean = x.mean(0)
        g_scale = math.sqrt(d / max(float((x - g_mean).pow(2).sum(1).mean()), 1e-12))
        means, scales = [], []
        for b in range(centers.numel()):
            xb = x[bucket == b]
            if xb.shape[0] < 2:  # too few rows for statistics: fall back to the global ones
                means.append(g_mean)
                scales.append(g_scale)
                continue
            mb = xb.mean(0)
            means.append(mb)
            scales.append(math.sqrt(d / max(float((xb - mb).pow(2).sum(1).mean()), 1e-12)))
        self.mean_TD = torch.stack(means).float()
        self.scale_T = torch.tensor(scales, dtype=torch.float32)

    def _fit_pca(self, x: Tensor) -> None:
        n, d = x.shape
        if n < 2 * d:
            warnings.warn(
                f"pca-whiten fitted on {n} rows for d_in={d}; use at least {2 * d} rows (a larger first batch) "
                "for a stable covariance — components without data are floored, not amplified",
                stacklevel=3,
            )
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / max(n - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        floor = self.pca_min_var_ratio * max(float(evals.clamp_min(0).mean()), 1e-12)
        self.mean_D.copy_(mean.float())
        self.components_DD.copy_(evecs.T.float())
        self.std_D.copy_(evals.clamp_min(floor).sqrt().float())

    # ---- applying ---------------------------------------------------------------------------------
    def _check(self, t_B: Tensor | None) -> None:
        if not bool(self.fitted):
            raise DifflensError(
                f"the {self.mode} normalisation has no statistics yet; call init_from_data(x, t) on a first batch"
            )
        if self.mode == "per-timestep" and t_B is None:
            raise DifflensError("this dictionary uses per-timestep normalisation: pass the timesteps t_B")

    def _bucket(self, t_B: Tensor) -> Tensor:
        c = self.centers_T.to(torch.float64)
        if c.numel() == 1:
            return torch.zeros(t_B.shape[0], dtype=torch.long, device=t_B.device)
        mids = (c[1:] + c[:-1]) / 2
        return torch.bucketize(t_B.to(torch.float64).reshape(-1), mids.to(t_B.device))

    def apply(self, x_BD: Tensor, t_B: Tensor | None = None) -> Tensor:
        """Raw -> normalised."""
        if self.mode == "none":
            return x_BD
        self._check(t_B)
        if self.mode == "scalar":
            return x_BD * self.scale
        if self.mode == "per-timestep":
            b = self._bucket(t_B)
            return (x_BD - self.mean_TD[b]) * self.scale_T[b, None]
        return ((x_BD - self.mean_D) @ self.components_DD.T) / self.std_D

    def invert(self, xn_BD: Tensor, t_B: Tensor | None = None) -> Tensor:
        """Normalised -> raw (the exact inverse of `apply`)."""
        if self.mode == "none":
            return xn_BD
        self._check(t_B)
        if self.mode == "scalar":
            return xn_BD / self.scale
        if self.mode == "per-timestep":
            b = self._bucket(t_B)
            return xn_BD / self.scale_T[b, None] + self.mean_TD[b]
        return (xn_BD * self.std_D) @ self.components_DD + self.mean_D

    def invert_linear(self, v_ND: Tensor) -> Tensor:
        """The linear part of `invert` (no offset): maps directions, e.g. decoder rows, to raw space.

        Per-timestep scales are positive scalars, so directions do not depend on t there.
        """
        if self.mode == "pca-whiten":
            self._check(None)
            return (v_ND * self.std_D) @ self.components_DD
        return v_ND

    def summary(self) -> dict:
        """Small JSON description of the statistics for cfg.json (the tensors live in the weights)."""
        out: dict = {"mode": self.mode, "fitted": bool(self.fitted)}
        if not bool(self.fitted) or self.mode == "none":
            return out
        if self.mode == "scalar":
            out["scale"] = float(self.scale)
        elif self.mode == "per-timestep":
            out["bucket_centers"] = [round(float(c), 4) for c in self.centers_T]
            out["bucket_scales"] = [float(s) for s in self.scale_T]
        else:
            var = self.std_D.double().pow(2)
            out["components"] = int(var.numel())
            out["top_variances"] = [float(v) for v in var[:8]]
            out["variance_ratio_max_min"] = float(var.max() / var.min())
        return out

    # Buffers whose shape depends on the data (bucket count) are resized before loading.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if key in state_dict and buf is not None and state_dict[key].shape != buf.shape:
                if self.mode == "per-timestep" and name in ("centers_T", "mean_TD", "scale_T"):
                    self._buffers[name] = torch.empty_like(state_dict[key], dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
