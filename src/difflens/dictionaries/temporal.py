"""TIDE: a TopK SAE whose input is modulated by the timestep (Huang et al. 2025).

    e(t)            sinusoidal embedding of the scheduler timestep t (float, e.g. 0..1000)
    (a, shift)      = MLP(e(t)) = Linear(E→H) · SiLU · Linear(H→2D), last layer zero-initialised
    scale(t)        = s_max · tanh(a / s_max)                      (|scale| < s_max < 1)
    x_mod           = x_n ⊙ (1 + scale(t)) + shift(t)              x_n: normalised activation
    ŷ               = W_dec TopK(W_enc (x_mod − b_dec) + b_enc) + b_dec      (the SAE, reused)
    x̂_n             = (ŷ − shift(t)) / (1 + scale(t))              the exact inverse FiLM

Return to activation space: we invert the FiLM exactly. The safeguard is the bounded scale:
1 + scale(t) ≥ 1 − s_max (0.1 by default), so the division never blows up; at init the last layer
is zero, so scale = shift = 0 and TIDE is exactly a TopK SAE on x_n.

The loss is taken in (normalised) ACTIVATION space, ‖x_n − x̂_n‖², not in modulated space: the
modulation is learnable, so a loss in modulated space could be lowered by the MLP alone (shrink
1 + scale(t) to make every error small) without reconstructing anything better. In activation
space the FiLM is just a per-timestep reparametrisation of the dictionary (effective decoder row
W_dec_f ⊘ (1 + scale(t))), which is what the method intends. The AuxK residual is likewise
compared in activation space, through the same inverse scale (detached, so only dead latents
learn from it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflens.dictionaries.base import register
from difflens.dictionaries.config import TIDEConfig
from difflens.dictionaries.sae import TopKSAE
from difflens.errors import DifflensError


def timestep_embedding(t_B: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """[B, dim] = [cos(t·ω_i), sin(t·ω_i)], ω_i = max_period^(−i/half) (as diffusers does)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args = t_B.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return emb if dim % 2 == 0 else torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1)


class FiLM(nn.Module):
    """t -> (scale [B, D], shift [B, D]); the identity modulation at init."""

    def __init__(self, d_in: int, embed_dim: int, hidden: int, max_scale: float):
        super().__init__()
        self.embed_dim, self.max_scale = embed_dim, max_scale
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * d_in))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t_B: Tensor) -> tuple[Tensor, Tensor]:
        a, shift = self.mlp(timestep_embedding(t_B, self.embed_dim)).chunk(2, dim=1)
        s = self.max_scale
        return s * torch.tanh(a / s), shift


@register("tide", TIDEConfig)
class TIDESAE(TopKSAE):
    """Timestep-conditioned TopK SAE; encode/decode/forward need t_B."""

    family = "tide"

    def __init__(self, cfg: TIDEConfig, *, fast: bool = True):
        super().__init__(cfg, fast=fast)
        self.film = FiLM(cfg.d_in, cfg.tide_embed_dim, cfg.tide_hidden, cfg.tide_max_scale)
        # timestep range seen by init_from_data (for t-averaged decoder directions)
        self.register_buffer("t_range", torch.tensor([0.0, 1000.0]))

    def param_groups(self) -> list[dict]:
        """The timestep MLP keeps the base lr: its size does not depend on the width, so the
        width-based lr scaling (meant for the dictionary matrices) should not shrink it."""
        film = {id(p) for p in self.film.parameters()}
        sae = [p for p in self.parameters() if id(p) not in film]
        return [{"params": sae, "lr_scale": self.lr_scale()}, {"params": list(self.film.parameters()), "lr_scale": 1.0}]

    def _film(self, t_B: Tensor | None):
        if t_B is None:
            raise DifflensError(
                "TIDE dictionaries are timestep-conditioned: pass the scheduler timesteps t_B "
                "(one per row) to encode/decode/forward"
            )
        return self.film(t_B.to(self.W_dec_FD.dtype))

    def _to_sae_space(self, xn_BD: Tensor, film) -> Tensor:
        scale, shift = film
        return xn_BD * (1 + scale) + shift

    def _from_sae_space(self, y_BD: Tensor, film) -> Tensor:
        scale, shift = film
        return (y_BD - shift) / (1 + scale)

    def _from_sae_space_linear(self, y_BD: Tensor, film) -> Tensor:
        return y_BD / (1 + film[0].detach())

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor, t_B=None) -> None:
        if t_B is None:
            raise DifflensError("TIDE needs the timesteps of the first batch: init_from_data(x_BD, t_B)")
        super().init_from_data(x_BD, t_B)
        t = torch.as_tensor(t_B).float().reshape(-1)
        self.t_range.copy_(torch.stack([t.min(), t.max()]))

    def decoder_directions(self, t: float | None = None) -> Tensor:
        """Raw-space unit directions. The inverse FiLM divides by 1 + scale(t), so the direction
        depends on t: pass the timestep you steer at, or get the average over 16 timesteps spanning
        the range seen in init_from_data."""
        with torch.no_grad():
            ts = (
                torch.tensor([float(t)])
                if t is not None
                else torch.linspace(float(self.t_range[0]), float(self.t_range[1]), 16)
            ).to(self.W_dec_FD.device)
            scale, _ = self.film(ts.to(self.W_dec_FD.dtype))
            acc = torch.zeros_like(self.W_dec_FD)
            for s_D in scale:
                d = self.norm.invert_linear(self.W_dec_FD / (1 + s_D))
                acc += d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return acc / acc.norm(dim=1, keepdim=True).clamp_min(1e-12)
