"""JumpReLU SAE (Rajamanoharan et al. 2024): a learned threshold per latent and an L0 penalty.

    pre = W_enc (x_n − b_dec) + b_enc
    z_f = pre_f · H(pre_f − θ_f)             θ_f = exp(log_θ_f) > 0, H the Heaviside step
    x̂_n = W_dec z + b_dec
    loss = mse + l0_coeff · mean_rows Σ_f H(pre_f − θ_f)

H has no useful gradient, so θ learns through a straight-through estimator with a rectangle
kernel of width ε (`jumprelu_bandwidth`), K(u) = 1{|u| < 1/2}:
    ∂z_f/∂θ_f  ≈ −(θ_f/ε) · K((pre_f − θ_f)/ε)        (the jump's height is θ_f)
    ∂H/∂θ_f    ≈ −(1/ε) · K((pre_f − θ_f)/ε)
and ∂z_f/∂pre_f = H(pre_f − θ_f) as usual; the L0 term sends no gradient to pre.

Init: the encoder is the decoder's transpose as for the other SAEs; θ_f starts at the
(1 − k/F) quantile of latent f's pre-activations on the first batch, so the first step has L0 ≈ k
(k is only this starting point; the L0 reached is set by `l0_coeff`). Without k, θ starts at
`jumprelu_init_threshold`. Dense codes ([B, F]): no TopK kernel applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflens.dictionaries.base import DictOutput, register
from difflens.dictionaries.config import SAEConfig, bad
from difflens.dictionaries.sae import SAE


@dataclass
class JumpReLUConfig(SAEConfig):
    """JumpReLU: k (optional) only sets the initial thresholds; `l0_coeff` sets the sparsity."""

    needs_k: ClassVar[bool] = False

    l0_coeff: float = 2e-3  # weight of the mean number of active latents per row, beside the per-element MSE
    jumprelu_bandwidth: float = 0.05  # ε of the rectangle kernel, in normalised pre-activation units
    jumprelu_init_threshold: float = 0.01  # θ at init when k is not given

    def validate(self) -> None:
        super().validate()
        if self.k is not None and not 0 < self.k <= self.width:
            raise bad(f"k={self.k} must be in 1..width (it sets the initial thresholds for L0 ≈ k)")
        if not self.jumprelu_bandwidth > 0 or not self.jumprelu_init_threshold > 0 or self.l0_coeff < 0:
            raise bad("jumprelu_bandwidth and jumprelu_init_threshold must be > 0 and l0_coeff >= 0")


def _rect(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_pre = g * (pre > theta)
        g_theta = (-(theta / eps) * _rect((pre - theta) / eps) * g).sum(0)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = (-(1.0 / eps) * _rect((pre - theta) / eps) * g).sum(0)
        return None, g_theta, None


def jumprelu(pre_BF: Tensor, theta_F: Tensor, eps: float) -> Tensor:
    """pre · H(pre − θ) with the rectangle-kernel straight-through gradient for θ."""
    return _JumpReLU.apply(pre_BF, theta_F, eps)


def step(pre_BF: Tensor, theta_F: Tensor, eps: float) -> Tensor:
    """H(pre − θ) with the rectangle-kernel straight-through gradient for θ (none for pre)."""
    return _Step.apply(pre_BF, theta_F, eps)


@register("jumprelu", JumpReLUConfig)
class JumpReLUSAE(SAE):
    """Dense JumpReLU SAE; `threshold_F` gives θ in the normalised pre-activation space."""

    def __init__(self, cfg: JumpReLUConfig, *, fast: bool = True):
        super().__init__(cfg, fast=fast)
        self.log_threshold_F = nn.Parameter(torch.full((cfg.width,), float(cfg.jumprelu_init_threshold)).log())

    @property
    def threshold_F(self) -> Tensor:
        return self.log_threshold_F.exp()

    @torch.no_grad()
    def init_from_data(self, x_BD: Tensor, t_B=None) -> None:
        super().init_from_data(x_BD, t_B)
        if self.cfg.k is None:
            return
        x, t = self._inputs(x_BD, t_B)
        pre = self._pre(self.norm.apply(x, t))
        q = 1.0 - float(self.cfg.k) / self.num_latents
        theta = torch.quantile(pre.float(), q, dim=0) if pre.shape[0] > 1 else pre[0]
        self.log_threshold_F.copy_(theta.clamp_min(1e-3).log())

    def _activate(self, pre_BF: Tensor) -> Tensor:
        return pre_BF * (pre_BF > self.threshold_F.to(pre_BF.dtype))

    def forward(self, x_BD: Tensor, t_B=None) -> DictOutput:
        x, t = self._inputs(x_BD, t_B)
        xn = self.norm.apply(x, t)
        pre = self._pre(xn)
        theta, eps = self.threshold_F, float(self.cfg.jumprelu_bandwidth)
        z = jumprelu(pre, theta, eps)
        xn_hat = z @ self.W_dec_FD + self.b_dec_D
        active = z.detach() != 0
        self._track(active.any(0), x.shape[0])
        losses = {"mse": F.mse_loss(xn_hat, xn)}
        if self.cfg.l0_coeff > 0:
            losses["l0"] = self.cfg.l0_coeff * step(pre, theta, eps).sum(1).mean()
        return self._output(t, xn_hat, losses, dense_codes=z, l0=active.sum().float() / x.shape[0])
