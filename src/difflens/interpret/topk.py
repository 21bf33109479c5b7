"""A streaming top-k feature cache: per feature, the N (sample, step) pairs where it fires hardest,
with their token maps, kept while generating — no full-token store needed.

`TopKAccumulator.update(codes_BTF, sample_ids, step)` takes one step's dictionary codes for a
batch of samples (every image token) and keeps, per feature, the N largest per-(sample, step)
maxima over tokens together with that step's whole token map. Only positive maxima are kept (a
feature silent on an image has no example there). Ties keep the pair seen first, so the result
equals sorting every (sample, step) of a full store by (max desc, arrival order) and taking the
first N (`tests/test_interpret_real.py` checks this against a full-store computation).

Memory is features x N x tokens (x 2 bytes with `map_dtype=float16`); a 4,096-latent SAE, N=8
and a 512-px Flux image (1,024 tokens) is 64 MB. `harvest --dict DIR --topk N` fills one per
dictionary and saves it as `topk.safetensors` + `topk.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difflens.errors import DifflensError


class TopKAccumulator:
    def __init__(self, num_features: int, n: int, num_tokens: int, *, map_dtype: torch.dtype = torch.float32):
        if n < 1:
            raise DifflensError(f"--topk must be >= 1 (examples kept per feature), got {n}")
        self.F, self.n, self.T = int(num_features), int(n), int(num_tokens)
        self.values = torch.full((self.F, self.n), float("-inf"))
        self.sample = torch.full((self.F, self.n), -1, dtype=torch.long)
        self.step = torch.full((self.F, self.n), -1, dtype=torch.long)
        self.maps = torch.zeros((self.F, self.n, self.T), dtype=map_dtype)
        self.frequency = torch.zeros(self.F, dtype=torch.long)  # active tokens seen per feature
        self.tokens_seen = 0

    @torch.no_grad()
    def update(self, codes_BTF: torch.Tensor, sample_ids, step: int) -> None:
        """One step's codes [B, T, F] for the samples `sample_ids` [B] (in arrival order)."""
        codes = codes_BTF.detach().float().cpu()
        B, T, F = codes.shape
        if (T, F) != (self.T, self.F):
            raise DifflensError(f"codes of shape {tuple(codes.shape)}: expected [B, {self.T} tokens, {self.F} features]")
        sids = torch.as_tensor(sample_ids, dtype=torch.long).reshape(-1)
        self.frequency += (codes > 0).sum(dim=(0, 1))
        self.tokens_seen += B * T
        peak = codes.amax(dim=1).T  # [F, B]
        peak = torch.where(peak > 0, peak, torch.full_like(peak, float("-inf")))
        vals = torch.cat([self.values, peak], dim=1)  # kept entries first: ties keep the earlier
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.n]
        new_vals = vals.gather(1, order)
        old = order < self.n
        f = torch.arange(F)[:, None].expand(F, self.n)
        maps = torch.zeros_like(self.maps)
        sample = torch.full_like(self.sample, -1)
        stp = torch.full_like(self.step, -1)
        maps[old] = self.maps[f[old], order[old]]
        sample[old] = self.sample[f[old], order[old]]
        stp[old] = self.step[f[old], order[old]]
        fresh = ~old & torch.isfinite(new_vals)
        b = order[fresh] - self.n
        maps[fresh] = codes[b, :, f[fresh]].to(self.maps.dtype)
        sample[fresh] = sids[b]
        stp[fresh] = int(step)
        self.values, self.sample, self.step, self.maps = new_vals, sample, stp, maps

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
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"values": self.values.contiguous(), "sample": self.sample.contiguous(), "step": self.step.contiguous(),
                   "maps": self.maps.contiguous(), "frequency": self.frequency.contiguous()},
                  str(folder / "topk.safetensors"))
        meta = {"num_features": self.F, "n": self.n, "num_tokens": self.T, "tokens_seen": self.tokens_seen, **(info or {})}
        (folder / "topk.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
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
        acc.info = meta
        return acc
