"""Reconstruction metrics, defined once for the whole project (docs/architecture.md, "Metrics").

This module sits at the bottom of the layering (it imports only torch), so training, evaluation
and the browser all report the same numbers.

Libraries disagree on what "FVU" or "dead" means; every number difflens prints comes from here:

* FVU  = Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean of x over the evaluation set (or over one bucket,
  for per-timestep numbers: each bucket is its own evaluation set).
* explained variance (EV) = 1 − FVU.
* MSE  = Σ‖x − x̂‖² / (n·d), the mean squared error per element.
* cosine = mean over rows of cos(x, x̂).
* L0   = mean number of non-zero latents per row.
* dead fraction = share of latents with no non-zero activation over the last N evaluated tokens
  (N = ``dead_window``; ``None`` means all evaluated tokens). N is reported with the number.

The accumulators stream: FVU is exact across batches because we keep Σx, Σ‖x‖², Σ‖x − x̂‖² and n
(in float64) rather than averaging per-batch ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_EPS = 1e-12


@dataclass
class SparseCodes:
    """Codes as (values [B, K], indices [B, K]) over `width` latents; value 0 = inactive (padding).

    Wide dictionaries (65k latents) must never be densified per batch: 4096 × 65536 floats is 1 GB.
    """

    values: torch.Tensor
    indices: torch.Tensor
    width: int

    def __getitem__(self, sel) -> SparseCodes:
        return SparseCodes(self.values[sel], self.indices[sel], self.width)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), self.width)


def _active_count(codes) -> float:
    if isinstance(codes, SparseCodes):
        return float((codes.values.detach() != 0).sum())
    return float((codes.detach() != 0).sum())


@dataclass
class _Sums:
    """Sufficient statistics for one evaluation set (overall, or one timestep bucket)."""

    n: int = 0
    sum_x: torch.Tensor | None = None  # [d] float64
    sum_sq_x: float = 0.0  # Σ‖x‖²
    sum_sq_err: float = 0.0  # Σ‖x − x̂‖²
    sum_cos: float = 0.0
    sum_l0: float = 0.0
    sum_t: float = 0.0  # Σ timestep, to report a bucket's timestep value
    n_t: int = 0
    d: int = 0

    def add(self, x, x_hat, codes, t) -> None:
        x64 = x.detach().to(torch.float64)
        err = (x64 - x_hat.detach().to(torch.float64)).pow(2).sum()
        if self.sum_x is None:
            self.sum_x = torch.zeros(x.shape[1], dtype=torch.float64)
            self.d = int(x.shape[1])
        self.n += int(x.shape[0])
        self.sum_x += x64.sum(0)
        self.sum_sq_x += float(x64.pow(2).sum())
        self.sum_sq_err += float(err)
        self.sum_cos += float(cosine_rows(x, x_hat).sum())
        if codes is not None:
            self.sum_l0 += _active_count(codes)
        if t is not None:
            self.sum_t += float(t.detach().to(torch.float64).sum())
            self.n_t += int(t.numel())

    def mean_timestep(self) -> float | None:
        return round(self.sum_t / self.n_t, 6) if self.n_t else None

    def total_variance(self) -> float:
        return total_variance(self.n, self.sum_sq_x, self.sum_x)

    def result(self, with_l0: bool) -> dict:
        if self.n == 0:
            return {"n": 0}
        fvu = fvu_from_sums(self.n, self.sum_sq_x, self.sum_x, self.sum_sq_err)
        out = {
            "n": self.n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sum_sq_err / (self.n * self.d),
            "cosine": self.sum_cos / self.n,
        }
        if with_l0:
            out["l0"] = self.sum_l0 / self.n
        return out


def total_variance(n: float, sum_sq_x: float, sum_x: torch.Tensor) -> float:
    """Σ‖x − x̄‖² = Σ‖x‖² − ‖Σx‖²/n from streamed sums (float64; clamped at 0 against round-off)."""
    if n == 0:
        return 0.0
    return max(float(sum_sq_x) - float(sum_x.double().pow(2).sum()) / float(n), 0.0)


def fvu_from_sums(n: float, sum_sq_x: float, sum_x: torch.Tensor, sum_sq_err: float) -> float:
    """FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² from streamed sums; NaN when x has no variance. The one FVU
    definition: the trainer's all-reduced batch sums and the evaluation accumulators both use it."""
    var = total_variance(n, sum_sq_x, sum_x)
    return float(sum_sq_err) / var if var > _EPS else math.nan


def cosine_rows(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """cos(x_i, x̂_i) per row; 0 where either vector is zero (no direction to compare)."""
    x = x.detach().to(torch.float64)
    x_hat = x_hat.detach().to(torch.float64)
    num = (x * x_hat).sum(1)
    den = x.norm(dim=1) * x_hat.norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(_EPS), torch.zeros_like(num))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU of one batch taken as the whole evaluation set (see module docstring)."""
    acc = ReconAccumulator()
    acc.update(x, x_hat)
    return acc.result()["fvu"]


@dataclass
class ReconAccumulator:
    """Streaming reconstruction metrics, overall and per timestep bucket.

    Buckets are keyed by the denoising step index when ``step`` is given (several timesteps can
    never share a step), otherwise by the distinct timestep value. ``dead_window`` is the N of
    "dead = no activation over the last N evaluated tokens"; None = all evaluated tokens.
    """

    width: int | None = None
    dead_window: int | None = None
    per_bucket: bool = True
    overall: _Sums = field(default_factory=_Sums)
    buckets: dict = field(default_factory=dict)
    _last_fired: torch.Tensor | None = None  # per latent: 1-based position of last activation

    def update(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        codes: torch.Tensor | SparseCodes | None = None,
        *,
        timestep: torch.Tensor | None = None,
        step: torch.Tensor | None = None,
    ) -> None:
        if x.shape != x_hat.shape or x.ndim != 2:
            raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must both be [B, d]")
        if x.shape[0] == 0:
            return
        n_before = self.overall.n
        self.overall.add(x, x_hat, codes, timestep)
        if codes is not None:
            self._track_firing(codes, n_before)
        if not self.per_bucket or (timestep is None and step is None):
            return
        keys = step if step is not None else timestep
        keys = keys.detach().reshape(-1)
        for key in torch.unique(keys).tolist():
            sel = keys == key
            k = int(key) if step is not None else float(key)
            sums = self.buckets.setdefault(k, _Sums())
            sums.add(
                x[sel],
                x_hat[sel],
                None if codes is None else codes[sel],
                None if timestep is None else timestep.reshape(-1)[sel],
            )

    def _track_firing(self, codes: torch.Tensor, n_before: int) -> None:
        if self.width is None:
            self.width = int(codes.shape[1])
        if self._last_fired is None:
            self._last_fired = torch.zeros(self.width, dtype=torch.int64)
        pos = torch.arange(1, codes.shape[0] + 1, dtype=torch.int64).unsqueeze(1)
        if isinstance(codes, SparseCodes):
            active = codes.values.detach() != 0  # [B, K]
            rows = pos.expand_as(active)[active]
            last_in_batch = torch.zeros(self.width, dtype=torch.int64).scatter_reduce_(
                0, codes.indices.detach()[active].to(torch.int64), rows, reduce="amax"
            )
        else:
            active = codes.detach() != 0  # [B, F]
            last_in_batch = (active.to(torch.int64) * pos).amax(0)  # 0 where never active in batch
        fired = last_in_batch > 0
        self._last_fired[fired] = last_in_batch[fired] + n_before

    def dead_mask(self) -> torch.Tensor | None:
        """Latents with no activation among the last N evaluated tokens (None if no codes seen)."""
        if self._last_fired is None:
            return None
        n = self.overall.n
        window = n if self.dead_window is None else min(self.dead_window, n)
        return self._last_fired <= n - window

    def result(self) -> dict:
        """Metrics as a JSON-ready dict: overall numbers, dead fraction with its window, buckets."""
        with_l0 = self._last_fired is not None
        out = self.overall.result(with_l0)
        dead = self.dead_mask()
        if dead is not None:
            n = self.overall.n
            out["dead_fraction"] = float(dead.float().mean())
            out["dead_window_tokens"] = n if self.dead_window is None else min(self.dead_window, n)
        if self.buckets:
            rows = []
            keyed_by_step = all(isinstance(k, int) for k in self.buckets)
            for key in sorted(self.buckets):
                sums = self.buckets[key]
                row = {"step": key} if keyed_by_step else {}
                row["timestep"] = sums.mean_timestep() if keyed_by_step else round(key, 6)
                row.update(sums.result(with_l0))
                rows.append(row)
            out["by_timestep"] = rows
        return out
