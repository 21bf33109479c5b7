"""Sampling the toy model with diffusers' FlowMatchEulerDiscreteScheduler and classifier-free guidance.

The batch for a guided step is [uncond rows; cond rows] (as SD3/PixArt lay it out). `on_step` and
`on_call` let the hook machinery know the step, the scheduler's timestep and which rows are
conditional before each transformer call.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from difflens.errors import DifflensError
from difflens.models.toy.model import ToyT2I, unpack


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def initial_noise(seeds: list[int], n_tokens: int, channels: int) -> torch.Tensor:
    """One generator per sample: an image depends on its seed, not on its batch (up to the float
    rounding of batched matmuls, at most one grey level in the output)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append(torch.randn(n_tokens, channels, generator=g))
    return torch.stack(out)


def to_uint8(tokens_BND: torch.Tensor, size: int) -> np.ndarray:
    img = unpack(tokens_BND.float(), size)
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(
    model: ToyT2I,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int,
    guidance: float,
    on_step: Callable[[int, float], None] | None = None,
    on_call: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    dtype: torch.dtype = torch.float32,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
) -> tuple[np.ndarray, list[float], torch.Tensor]:
    """Generate images; returns (uint8 [B,32,32,3], the scheduler's timesteps, final tokens).

    Guidance applies only at steps whose sigma lies in `guidance_interval` (lo, hi], and the plain
    conditional prediction elsewhere (Kynkäänniemi et al. 2024), for models where strong guidance
    at low noise over-sharpens texture. On the shipped toy model every narrower interval lowered
    object adherence (guidance 7 on (0.4, 1]: 74.5% vs 78.5% everywhere), so its default is (0, 1].
    Both branches still run at every step, so hooks see the same calls either way."""
    if len(prompts) != len(seeds):
        raise DifflensError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if steps < 1:
        raise DifflensError(f"steps must be >= 1, got {steps}")
    cfg = model.cfg
    dev = model.img_ids.device
    B = len(prompts)
    guided = guidance is not None and guidance != 1.0
    text, pooled = model.encode_text(list(prompts))
    if guided:
        u_text, u_pooled = model.encode_text([""] * B)
        text, pooled = torch.cat([u_text, text]), torch.cat([u_pooled, pooled])
    is_cond = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]) if guided else torch.ones(B, dtype=torch.bool)
    sample_index = torch.arange(B).repeat(2 if guided else 1)
    sched = make_scheduler()
    sched.set_timesteps(steps, device=dev)
    timesteps = [float(t) for t in sched.timesteps]
    x = initial_noise(seeds, cfg.grid * cfg.grid, cfg.token_channels).to(dev)
    for i, t in enumerate(sched.timesteps):
        if on_step:
            on_step(i, float(t))
        if on_call:
            on_call(is_cond, sample_index)
        inp = torch.cat([x, x]) if guided else x
        sigma = (t / 1000.0).expand(inp.shape[0]).to(dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            v = model(inp.to(dtype) if dtype != torch.float32 else inp, sigma, text, pooled).float()
        if guided:
            v_u, v_c = v.chunk(2)
            lo, hi = guidance_interval
            scale = guidance if lo < float(t) / 1000.0 <= hi else 1.0
            v = v_u + scale * (v_c - v_u)
        x = sched.step(v, t, x).prev_sample
    return to_uint8(x, cfg.image_size), timesteps, x
