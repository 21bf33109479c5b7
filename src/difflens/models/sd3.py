"""Stable Diffusion 3 / 3.5 through diffusers' `StableDiffusion3Pipeline`.

Sites: joint (MMDiT) blocks `transformer_blocks.{i}:img|txt`; the last block is
`context_pre_only` (it returns no text tokens), so it has an img site only. MLP neurons:
`transformer_blocks.{i}.ff.net.0:img` and `...ff_context.net.0:txt` where present.
CFG: the transformer batch is [uncond; cond].
"""

from __future__ import annotations

import copy

from torch import nn

from difflens.errors import DifflensError
from difflens.hooks import HookSet, SiteBinding
from difflens.models._pipeline import PipelineAdapter
from difflens.models._sites import joint_block_sites, middle_block, mlp_sites, model_width
from difflens.models.base import Generation


class SD3Adapter(PipelineAdapter):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    transformer_class = "SD3Transformer2DModel"

    @classmethod
    def bindings_for(cls, transformer: nn.Module) -> dict[str, SiteBinding]:
        out = joint_block_sites("transformer_blocks", transformer.transformer_blocks, model_width(transformer))
        out.update(mlp_sites("transformer_blocks", transformer.transformer_blocks))
        return out

    @classmethod
    def default_site_for(cls, transformer: nn.Module) -> str:
        return f"transformer_blocks.{middle_block(len(transformer.transformer_blocks))}:img"

    def _token_px(self) -> int:
        return self.vae_scale_factor * int(self.transformer.config.patch_size)

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = int(self.pipe.default_sample_size * self.vae_scale_factor)
        h, w = int(height or default), int(width or default)
        px = self._token_px()
        if h % px or w % px or h <= 0 or w <= 0:
            raise DifflensError(f"image size {h}x{w} must be positive multiples of {px} px for this SD3 model")
        return h, w

    def grid_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        h, w = self._size(height, width)
        return h // self._token_px(), w // self._token_px()

    def timesteps(self, steps: int, *, height: int | None = None, width: int | None = None) -> list[float]:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        self.check_steps(steps)
        scheduler = copy.deepcopy(self.pipe.scheduler)
        cfg = scheduler.config
        extra = {}
        if cfg.get("use_dynamic_shifting", None):
            gh, gw = self.grid_hw(height, width)
            extra["mu"] = calculate_shift(
                gh * gw,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.16),
            )
        ts, _ = retrieve_timesteps(scheduler, steps, "cpu", **extra)
        return [float(t) for t in ts]

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int,
        guidance: float | None = None,
        hooks: HookSet | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
    ) -> Generation:
        """`guidance` is the CFG scale (pipeline default 7.0; <= 1 turns CFG off)."""
        self.check_request(prompts, seeds, steps)
        h, w = self._size(height, width)
        kwargs = dict(
            prompt=list(prompts),
            height=h,
            width=w,
            num_inference_steps=int(steps),
            generator=self.generators(seeds),
        )
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * len(prompts)
        grid = self.grid_hw(h, w)
        images, timesteps = self.run(kwargs, n=len(prompts), hooks=hooks, grid_hw=grid)
        return Generation(images=images, timesteps=timesteps, grid_hw=grid)

    def row_layout(self, rows: int, n: int, call_index: int) -> str:
        if call_index != 0:
            raise RuntimeError("SD3 called its transformer twice in one step (skip-layer guidance is not supported)")
        return self.cfg_rows_layout(rows, n, "uncond_cond")
