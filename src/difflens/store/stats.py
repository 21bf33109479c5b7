"""Per-site, per-timestep activation statistics, built from partial sums stored in every shard.

Each shard carries float64 sums for its own rows, so statistics never need a second pass over
the activations and units written by different processes simply add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from difflens.store.format import stats_tensor_name
from difflens.store.shardfile import SafetensorsFile
from difflens.utils import progress

PARTS = ("timestep", "count", "sum", "sumsq", "normsum")
_ROW_BLOCK = 8192


def partial_sums(acts_ND: np.ndarray, timestep_N: np.ndarray) -> dict[str, np.ndarray]:
    """Sums over the rows of one unit, grouped by timestep value; acts_ND is float (any width)."""
    ts_T, inv_N = np.unique(timestep_N.astype(np.float32), return_inverse=True)
    T, D = len(ts_T), acts_ND.shape[1]
    out = {
        "timestep": ts_T.astype(np.float32),
        "count": np.bincount(inv_N, minlength=T).astype(np.int64),
        "sum": np.zeros((T, D), np.float64),
        "sumsq": np.zeros((T, D), np.float64),
        "normsum": np.zeros(T, np.float64),
    }
    for a in range(0, acts_ND.shape[0], _ROW_BLOCK):
        x = np.asarray(acts_ND[a : a + _ROW_BLOCK], dtype=np.float64)
        inv = inv_N[a : a + _ROW_BLOCK]
        onehot_TN = np.zeros((T, len(inv)), np.float64)
        onehot_TN[inv, np.arange(len(inv))] = 1.0
        out["sum"] += onehot_TN @ x
        sq = x * x
        out["sumsq"] += onehot_TN @ sq
        out["normsum"] += np.bincount(inv, weights=np.sqrt(sq.sum(1)), minlength=T)
    return out


class Accumulator:
    """Adds partial sums of many units, matching timesteps by their float32 value."""

    def __init__(self, d: int):
        self.d = d
        self._rows: dict[float, dict[str, np.ndarray | float | int]] = {}

    def add(self, part: dict[str, np.ndarray]) -> None:
        for i, t in enumerate(part["timestep"].astype(np.float32).tolist()):
            acc = self._rows.setdefault(
                t, {"count": 0, "sum": np.zeros(self.d), "sumsq": np.zeros(self.d), "normsum": 0.0}
            )
            acc["count"] += int(part["count"][i])
            acc["sum"] += part["sum"][i]
            acc["sumsq"] += part["sumsq"][i]
            acc["normsum"] += float(part["normsum"][i])

    def result(self, site: str) -> SiteStats:
        ts = sorted(self._rows)
        T, D = len(ts), self.d
        count_T = np.array([self._rows[t]["count"] for t in ts], np.int64)
        sum_TD = np.stack([self._rows[t]["sum"] for t in ts]) if T else np.zeros((0, D))
        sumsq_TD = np.stack([self._rows[t]["sumsq"] for t in ts]) if T else np.zeros((0, D))
        normsum_T = np.array([self._rows[t]["normsum"] for t in ts], np.float64)
        return SiteStats.from_sums(site, np.array(ts, np.float32), count_T, sum_TD, sumsq_TD, normsum_T)


def _mean_std(count, s, ss):
    n = np.maximum(count, 1)[..., None] if np.ndim(count) else max(int(count), 1)
    mean = s / n
    var = np.maximum(ss / n - mean * mean, 0.0)
    return mean, np.sqrt(var)


@dataclass
class SiteStats:
    """What a trainer needs to normalise a site: overall and per-timestep means, stds and norms."""

    site: str
    d: int
    count: int
    mean_D: torch.Tensor
    std_D: torch.Tensor
    mean_norm: float  # mean L2 norm of a row
    mean_sq_norm: float  # mean squared L2 norm (total variance = mean_sq_norm - |mean_D|^2)
    timesteps_T: np.ndarray  # float32, ascending
    count_T: np.ndarray
    mean_TD: torch.Tensor
    std_TD: torch.Tensor
    mean_norm_T: np.ndarray
    mean_sq_norm_T: np.ndarray

    @classmethod
    def from_sums(cls, site, ts_T, count_T, sum_TD, sumsq_TD, normsum_T) -> SiteStats:
        d = sum_TD.shape[1]
        n = int(count_T.sum())
        mean_D, std_D = _mean_std(n, sum_TD.sum(0), sumsq_TD.sum(0))
        mean_TD, std_TD = _mean_std(count_T, sum_TD, sumsq_TD)
        nT = np.maximum(count_T, 1)
        return cls(
            site=site,
            d=d,
            count=n,
            mean_D=torch.from_numpy(mean_D.astype(np.float32)),
            std_D=torch.from_numpy(std_D.astype(np.float32)),
            mean_norm=float(normsum_T.sum() / max(n, 1)),
            mean_sq_norm=float(sumsq_TD.sum() / max(n, 1)),
            timesteps_T=ts_T.astype(np.float32),
            count_T=count_T.astype(np.int64),
            mean_TD=torch.from_numpy(mean_TD.astype(np.float32)),
            std_TD=torch.from_numpy(std_TD.astype(np.float32)),
            mean_norm_T=(normsum_T / nT).astype(np.float64),
            mean_sq_norm_T=(sumsq_TD.sum(1) / nT).astype(np.float64),
        )

    def timestep_index(self, timestep: float) -> int:
        """Row of the per-timestep tables for a timestep value (nearest, as timesteps are floats)."""
        if len(self.timesteps_T) == 0:
            raise KeyError(f"site {self.site} has no rows")
        return int(np.argmin(np.abs(self.timesteps_T.astype(np.float64) - float(timestep))))

    def to_json(self) -> dict:
        return {
            "d": self.d,
            "count": self.count,
            "mean_norm": self.mean_norm,
            "mean_sq_norm": self.mean_sq_norm,
            "timesteps": [
                {
                    "timestep": float(t),
                    "count": int(c),
                    "mean_norm": float(m),
                    "mean_sq_norm": float(m2),
                }
                for t, c, m, m2 in zip(self.timesteps_T, self.count_T, self.mean_norm_T, self.mean_sq_norm_T)
            ],
        }

    def tensors(self) -> list[tuple[str, np.ndarray, str]]:
        """Vectors for stats.safetensors (name, array, safetensors dtype)."""
        s = self.site
        return [
            (f"{s}/mean", self.mean_D.numpy(), "F32"),
            (f"{s}/std", self.std_D.numpy(), "F32"),
            (f"{s}/timestep", self.timesteps_T, "F32"),
            (f"{s}/count_by_timestep", self.count_T, "I64"),
            (f"{s}/mean_by_timestep", self.mean_TD.numpy(), "F32"),
            (f"{s}/std_by_timestep", self.std_TD.numpy(), "F32"),
        ]

    @classmethod
    def from_files(cls, site: str, js: dict, read) -> SiteStats:
        """Rebuild from stats.json's entry and a `read(name) -> np.ndarray` over stats.safetensors."""
        rows = js["timesteps"]
        return cls(
            site=site,
            d=int(js["d"]),
            count=int(js["count"]),
            mean_D=torch.from_numpy(read(f"{site}/mean")),
            std_D=torch.from_numpy(read(f"{site}/std")),
            mean_norm=float(js["mean_norm"]),
            mean_sq_norm=float(js["mean_sq_norm"]),
            timesteps_T=read(f"{site}/timestep"),
            count_T=read(f"{site}/count_by_timestep"),
            mean_TD=torch.from_numpy(read(f"{site}/mean_by_timestep")),
            std_TD=torch.from_numpy(read(f"{site}/std_by_timestep")),
            mean_norm_T=np.array([r["mean_norm"] for r in rows], np.float64),
            mean_sq_norm_T=np.array([r["mean_sq_norm"] for r in rows], np.float64),
        )



def collect(root, sites: dict[str, int], records, *, show_progress: bool = False) -> dict[str, SiteStats]:
    """Add up the partial sums stored in the shards of `records` (small reads, no activations)."""
    accs = {s: Accumulator(d) for s, d in sites.items()}
    it = progress(records, desc="store stats", unit="shard", leave=False) if show_progress else records
    for rec in it:
        present = [s for s in sites if rec.rows.get(s, 0) > 0]
        if not present:
            continue
        f = SafetensorsFile(root / rec.shard, rec.bytes)
        for s in present:
            accs[s].add({p: f.read(stats_tensor_name(s, p)) for p in PARTS})
    return {s: acc.result(s) for s, acc in accs.items()}
