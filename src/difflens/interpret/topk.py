"""A streaming top-k feature cache: per feature, the N (sample, step) pairs where it fires hardest,
with their token maps, kept while generating — no full-token store needed.

`TopKAccumulator.update(codes_BTF, sample_ids, step)` takes one step's dictionary codes for a
batch of samples (every image token) and keeps, per feature, the N largest per-(sample, step)
maxima over tokens together with that step's whole token map. Only positive maxima are kept (a
feature silent on an image has no example there). Ties keep the pair seen first — arrival order
is (unit, step, sample id), the order a harvest generates them in — so the result equals sorting
every (sample, step) of a full store by (max desc, arrival order) and taking the first N
(`tests/test_interpret_real.py` checks this against a full-store computation).

`merge` adds another accumulator's examples and sums (the same result as having fed its codes
here, in arrival order); `state`/`from_state` keep the exact running sums, so a harvest can
snapshot one per rank after each committed unit and resume or merge ranks (harvest.topk_stream).

It also keeps each feature's timestep profile (mean code and mean per-image max per step) and a
log2-binned histogram of its positive codes (the feature cache's bins).

Memory is features x N x tokens (x 2 bytes with `map_dtype=float16`); a 4,096-latent SAE, N=8
and a 512-px Flux image (1,024 tokens) is 64 MB. `harvest --dict DIR --topk N` fills one per
dictionary and saves it as `topk.safetensors` + `topk.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difflens.errors import DifflensError

HIST_LOG2_MIN, HIST_LOG2_MAX, HIST_BPO = -20, 12, 4  # the feature cache's histogram bins (CacheConfig)


class TopKAccumulator:
    def __init__(self, num_features: int, n: int, num_tokens: int, *, map_dtype: torch.dtype = torch.float32):
        if n < 1:
            raise DifflensError(f"--topk must be >= 1 (examples kept per feature), got {n}")
        self.F, self.n, self.T = int(num_features), int(n), int(num_tokens)
        self.values = torch.full((self.F, self.n), float("-inf"))
        self.sample = torch.full((self.F, self.n), -1, dtype=torch.long)
        self.step = torch.full((self.F, self.n), -1, dtype=torch.long)
        self.unit = torch.full((self.F, self.n), -1, dtype=torch.long)  # arrival: (unit, step, sample)
        self.maps = torch.zeros((self.F, self.n, self.T), dtype=map_dtype)
        self.frequency = torch.zeros(self.F, dtype=torch.long)  # active tokens seen per feature
        self.max_all = torch.full((self.F,), float("-inf"))  # max code over every token (what calibration needs)
        self.tokens_seen = 0
        # what a researcher reads first, next to the examples: the timestep profile (per step: sum of
        # codes, sum of per-image maxima, images seen) and a log2-binned histogram of positive codes
        # (the feature cache's bins: HIST_LOG2_MIN..HIST_LOG2_MAX, HIST_BPO bins per octave)
        self.step_sum: dict[int, torch.Tensor] = {}
        self.step_max_sum: dict[int, torch.Tensor] = {}
        self.step_images: dict[int, int] = {}
        self.hist = torch.zeros(self.F, (HIST_LOG2_MAX - HIST_LOG2_MIN) * HIST_BPO, dtype=torch.long)

    @torch.no_grad()
    def update(self, codes_BTF: torch.Tensor, sample_ids, step: int, unit: int = 0) -> None:
        """One step's codes [B, T, F] for the samples `sample_ids` [B] (in arrival order) of
        harvest unit `unit` (calls come in (unit, step) order)."""
        codes = codes_BTF.detach().float().cpu()
        B, T, F = codes.shape
        if (T, F) != (self.T, self.F):
            raise DifflensError(f"codes of shape {tuple(codes.shape)}: expected [B, {self.T} tokens, {self.F} features]")
        sids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1)
        self.tokens_seen += B * T
        step = int(step)
        flat = codes.reshape(-1, F)
        nz = (flat > 0).nonzero()  # sparse codes: cheaper than reductions over a [B, T, F] bool
        self.frequency += torch.bincount(nz[:, 1], minlength=F)
        self.max_all = torch.maximum(self.max_all, flat.amax(0))
        zeros = torch.zeros(F, dtype=torch.float64)
        self.step_sum[step] = self.step_sum.get(step, zeros) + flat.sum(0).double()
        self.step_max_sum[step] = self.step_max_sum.get(step, zeros) + codes.amax(dim=1).sum(0).double()
        self.step_images[step] = self.step_images.get(step, 0) + B
        if nz.numel():
            nb = self.hist.shape[1]
            bins = torch.floor((torch.log2(flat[nz[:, 0], nz[:, 1]]) - HIST_LOG2_MIN) * HIST_BPO).long().clamp_(0, nb - 1)
            self.hist += torch.bincount(nz[:, 1] * nb + bins, minlength=F * nb).reshape(F, nb)
        peak = codes.amax(dim=1).T  # [F, B]
        peak = torch.where(peak > 0, peak, torch.full_like(peak, float("-inf")))
        # only features where some new pair beats the current N-th best change (ties keep the kept one)
        rows = torch.nonzero((peak > self.values[:, -1:]).any(dim=1)).flatten()
        if rows.numel() == 0:
            return
        R = rows.numel()
        vals = torch.cat([self.values[rows], peak[rows]], dim=1)  # kept entries first: ties keep the earlier
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.n]
        new_vals = vals.gather(1, order)
        old = order < self.n
        f = rows[:, None].expand(R, self.n)
        maps = torch.zeros((R, self.n, self.T), dtype=self.maps.dtype)
        sample = torch.full((R, self.n), -1, dtype=torch.long)
        stp = torch.full((R, self.n), -1, dtype=torch.long)
        unt = torch.full((R, self.n), -1, dtype=torch.long)
        maps[old] = self.maps[f[old], order[old]]
        sample[old] = self.sample[f[old], order[old]]
        stp[old] = self.step[f[old], order[old]]
        unt[old] = self.unit[f[old], order[old]]
        fresh = ~old & torch.isfinite(new_vals)
        b = order[fresh] - self.n
        maps[fresh] = codes[b, :, f[fresh]].to(self.maps.dtype)
        sample[fresh] = sids[b]
        stp[fresh] = step
        unt[fresh] = int(unit)
        self.values[rows], self.sample[rows], self.step[rows], self.maps[rows] = new_vals, sample, stp, maps
        self.unit[rows] = unt

    @torch.no_grad()
    def merge(self, other: TopKAccumulator) -> TopKAccumulator:
        """Add `other`'s examples and sums: the same as feeding its codes here (ties by arrival order)."""
        if (other.F, other.n, other.T) != (self.F, self.n, self.T):
            raise DifflensError(f"cannot merge top-k caches of {other.F} features x {other.n} x {other.T} tokens into "
                                f"{self.F} x {self.n} x {self.T}: they were filled with other settings")
        self.frequency += other.frequency
        self.max_all = torch.maximum(self.max_all, other.max_all)
        self.tokens_seen += other.tokens_seen
        self.hist += other.hist
        zeros = torch.zeros(self.F, dtype=torch.float64)
        for s in other.steps():
            self.step_sum[s] = self.step_sum.get(s, zeros) + other.step_sum[s]
            self.step_max_sum[s] = self.step_max_sum.get(s, zeros) + other.step_max_sum[s]
            self.step_images[s] = self.step_images.get(s, 0) + other.step_images[s]
        rows = torch.nonzero(torch.isfinite(other.values[:, 0])).flatten()
        if rows.numel() == 0:
            return self
        cat = {k: torch.cat([getattr(self, k)[rows], getattr(other, k)[rows]], dim=1)
               for k in ("values", "sample", "step", "unit")}
        perm = torch.arange(2 * self.n).expand(len(rows), -1)
        for key in (cat["sample"], cat["step"], cat["unit"], -cat["values"]):  # least significant key first
            perm = perm.gather(1, torch.sort(key.gather(1, perm), dim=1, stable=True).indices)
        perm = perm[:, : self.n]
        for k, v in cat.items():
            getattr(self, k)[rows] = v.gather(1, perm)
        maps = torch.cat([self.maps[rows], other.maps[rows]], dim=1)
        self.maps[rows] = maps.gather(1, perm[:, :, None].expand(-1, -1, self.T))
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """Everything, running sums exact (float64), as tensors: `from_state` gives it back."""
        st = self.steps()
        z = torch.zeros(0, self.F, dtype=torch.float64)
        return {"values": self.values, "sample": self.sample, "step": self.step, "unit": self.unit, "maps": self.maps,
                "frequency": self.frequency, "max_all": self.max_all, "hist": self.hist, "tokens_seen": torch.tensor([self.tokens_seen]),
                "steps": torch.tensor(st, dtype=torch.long), "step_images": torch.tensor([self.step_images[s] for s in st]),
                "step_sum": torch.stack([self.step_sum[s] for s in st]) if st else z,
                "step_max_sum": torch.stack([self.step_max_sum[s] for s in st]) if st else z}

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor]) -> TopKAccumulator:
        F, n = t["values"].shape
        acc = cls(F, n, t["maps"].shape[2], map_dtype=t["maps"].dtype)
        for k in ("values", "sample", "step", "unit", "maps", "frequency", "max_all", "hist"):
            setattr(acc, k, t[k].clone())
        acc.tokens_seen = int(t["tokens_seen"][0])
        for j, s in enumerate(t["steps"].tolist()):
            acc.step_images[s] = int(t["step_images"][j])
            acc.step_sum[s] = t["step_sum"][j].clone()
            acc.step_max_sum[s] = t["step_max_sum"][j].clone()
        return acc

    def steps(self) -> list[int]:
        return sorted(self.step_images)

    def profiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean code per step over every token, mean per-image max per step), each [F, steps]."""
        st = self.steps()
        if not st:
            return torch.zeros(self.F, 0), torch.zeros(self.F, 0)
        mean = torch.stack([self.step_sum[s] / (self.step_images[s] * self.T) for s in st], dim=1)
        mx = torch.stack([self.step_max_sum[s] / self.step_images[s] for s in st], dim=1)
        return mean.float(), mx.float()

    @staticmethod
    def hist_edges() -> torch.Tensor:
        n = (HIST_LOG2_MAX - HIST_LOG2_MIN) * HIST_BPO
        return 2.0 ** (HIST_LOG2_MIN + torch.arange(n + 1, dtype=torch.float64) / HIST_BPO)

    def examples(self, feature: int) -> list[dict]:
        """The kept (sample, step, value, map [T]) of one feature, best first."""
        out = []
        for j in range(self.n):
            if self.sample[feature, j] < 0:
                break
            out.append({"sample_id": int(self.sample[feature, j]), "step": int(self.step[feature, j]),
                        "value": float(self.values[feature, j]), "map": self.maps[feature, j]})
        return out

    def save(self, folder, info: dict | None = None) -> Path:
        """`topk.safetensors` (values, sample, step, maps, frequency) + `topk.json` (sizes, `info`)."""
        from safetensors.torch import save

        from difflens.utils import atomic_write_bytes, write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        mean, mx = self.profiles()
        atomic_write_bytes(folder / "topk.safetensors", save({"values": self.values.contiguous(), "sample": self.sample.contiguous(), "step": self.step.contiguous(),
                   "maps": self.maps.contiguous(), "frequency": self.frequency.contiguous(), "max_all": self.max_all.contiguous(),
                   "profile_mean": mean.contiguous(), "profile_max": mx.contiguous(), "hist_counts": self.hist.contiguous()}))
        meta = {"num_features": self.F, "n": self.n, "num_tokens": self.T, "tokens_seen": self.tokens_seen,
                "steps": self.steps(), "images_per_step": [self.step_images[s] for s in self.steps()],
                "hist": {"log2_min": HIST_LOG2_MIN, "log2_max": HIST_LOG2_MAX, "bins_per_octave": HIST_BPO}, **(info or {})}
        write_json(folder / "topk.json", meta)  # both files atomically: a reader never sees half of one
        return folder

    @classmethod
    def load(cls, folder) -> TopKAccumulator:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "topk.json").is_file():
            raise DifflensError(f"{folder}: no topk.json; pass a folder written by `harvest --topk`")
        meta = json.loads((folder / "topk.json").read_text(encoding="utf-8"))
        t = load_file(str(folder / "topk.safetensors"))
        acc = cls(meta["num_features"], meta["n"], meta["num_tokens"], map_dtype=t["maps"].dtype)
        acc.values, acc.sample, acc.step, acc.maps, acc.frequency = t["values"], t["sample"], t["step"], t["maps"], t["frequency"]
        acc.tokens_seen = int(meta.get("tokens_seen", 0))
        if "max_all" in t:
            acc.max_all = t["max_all"]
        acc.hist = t["hist_counts"]
        for j, s in enumerate(meta.get("steps", [])):  # profiles back as sums, so update() could go on
            k = int(meta["images_per_step"][j])
            acc.step_images[int(s)] = k
            acc.step_sum[int(s)] = t["profile_mean"][:, j].double() * k * acc.T
            acc.step_max_sum[int(s)] = t["profile_max"][:, j].double() * k
        acc.info = meta
        return acc


def export_features(acc: TopKAccumulator, folder, *, timesteps: list[float], grid_hw, source: dict, site: str) -> Path:
    """The browser's feature files from a streaming top-k cache: folder/index.json (one row per live
    feature) and folder/<f>.json (profiles, histogram, top examples with their maps), the layout
    `interpret` writes, with no explanation or score (no judge has run) and no quantile examples."""
    import math

    from difflens.utils import write_json

    def r(x, nd=4):
        return None if x is None or not math.isfinite(float(x)) else round(float(x), nd)

    def rounded(t) -> list:
        return [float(f"{x:.4g}") for x in t.reshape(-1).tolist()]

    folder = Path(folder)
    mean, mx = acc.profiles()
    edges = acc.hist_edges().tolist()
    ts = [float(t) for t in timesteps]
    index = []
    for f in torch.nonzero(acc.frequency > 0).flatten().tolist():
        ex = acc.examples(f)
        peak = int(torch.argmax(mean[f])) if mean.shape[1] else 0
        row = {"feature": f, "frequency": r(acc.frequency[f] / max(acc.tokens_seen, 1), 6),
               "max": r(ex[0]["value"]) if ex else None, "peak_timestep": ts[peak] if ts else None,
               "explanation": None, "score": None, "has_maps": bool(ex)}
        index.append(row)
        if not ex:
            continue
        counts = acc.hist[f]
        nz = torch.nonzero(counts).flatten()
        a, b = (int(nz[0]), int(nz[-1]) + 1) if nz.numel() else (0, 0)
        write_json(folder / f"{f}.json", {
            **row, "timesteps": ts, "profile_mean": rounded(mean[f]), "profile_max": rounded(mx[f]), "peak_step": peak,
            "histogram": {"edges": edges[a : b + 1] if b else [], "counts": [int(c) for c in counts[a:b]],
                          "nonpositive": int(acc.tokens_seen - acc.frequency[f])},
            "grid_hw": list(grid_hw),
            "top": [{"sample_id": e["sample_id"], "value": r(e["value"]), "step": e["step"],
                     "timestep": ts[acc.steps().index(e["step"])] if ts else None, "split": "explain",
                     "map": rounded(e["map"].float())} for e in ex],
        })
    write_json(folder / "index.json", {"source": source, "site": site, "timesteps": ts, "features": index})
    return folder
