"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested prefixes each reconstruct.

Latents are ordered; for each prefix size m in `matryoshka_prefixes` (increasing, the last = width)
the first m latents alone must reconstruct x:

    z            = BatchTopK(pre)                     (selection over the whole batch, as BatchTopK)
    x̂_n^(m)      = W_dec[:m]ᵀ z[:m] + b_dec
    loss         = Σ_m mean (x_n − x̂_n^(m))²          `mse` = the full prefix, `prefix_mse` = the others
                   + AuxK on the full reconstruction's residual (as TopK/BatchTopK)

So early latents learn general directions (they are in every prefix) and later ones refine them,
which counters feature absorption. Inference is BatchTopK's: a fixed threshold θ, so a token's
code does not depend on its batch; `x_hat` is the full reconstruction. The prefix sums reuse one
decode: each group's contribution `z[:, g] @ W_dec[g]` is added in turn. Dense codes ([B, F]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from difflens.dictionaries.base import DictOutput, register
from difflens.dictionaries.config import BatchTopKConfig, bad
from difflens.dictionaries.sae import BatchTopKSAE, auxk_loss, fired_latents


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka BatchTopK: prefix sizes (empty → width/8, width/4, width/2, width)."""

    matryoshka_prefixes: list[int] = field(default_factory=list)

    @property
    def prefixes(self) -> list[int]:
        if self.matryoshka_prefixes:
            return [int(m) for m in self.matryoshka_prefixes]
        return sorted({max(1, self.width // 8), max(1, self.width // 4), max(1, self.width // 2), self.width})

    def validate(self) -> None:
        super().validate()
        p = self.prefixes
        if any(b <= a for a, b in zip(p, p[1:])) or p[0] <= 0 or p[-1] != self.width:
            raise bad(f"matryoshka_prefixes must increase strictly and end at width={self.width} (got {p})")


@register("matryoshka", MatryoshkaConfig)
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK whose latent prefixes are each trained to reconstruct."""

    def forward(self, x_BD: Tensor, t_B=None) -> DictOutput:
        x, t = self._inputs(x_BD, t_B)
        xn = self.norm.apply(x, t)
        pre = self._pre(xn)
        pat, _ = self._select(pre.detach())
        rows, ids = pat.rows_N(), pat.indices_N
        pre_N = pre[rows, ids]
        z = torch.zeros_like(pre).index_put((rows, ids), pre_N.relu())
        partial = self.b_dec_D.expand_as(xn)
        prefix_losses, start = [], 0
        for m in self.cfg.prefixes:
            partial = partial + z[:, start:m] @ self.W_dec_FD[start:m]
            if m < self.num_latents:
                prefix_losses.append(F.mse_loss(partial, xn))
            start = m
        xn_hat = partial
        losses = {"mse": F.mse_loss(xn_hat, xn)}
        if prefix_losses:
            losses["prefix_mse"] = torch.stack(prefix_losses).sum()
        aux = self._aux_select(pre.detach())
        if self._aux_active():
            e = (xn - xn_hat).detach()
            ratio = self._variance_ratio(xn, e)
            if aux is not None:
                a_rows, a_ids = aux.pattern.rows_N(), aux.dead_ids[aux.pattern.indices_N]
                z_aux = torch.zeros_like(pre).index_put((a_rows, a_ids), pre[a_rows, a_ids].relu())
                losses["auxk"] = auxk_loss(z_aux @ self.W_dec_FD, e, ratio, self.cfg.auxk_coef)
        self._track(fired_latents(pat, pre_N, self.num_latents), x.shape[0])
        l0 = (pre_N.detach() > 0).sum().float() / x.shape[0]
        return self._output(t, xn_hat, losses, dense_codes=z, l0=l0)
