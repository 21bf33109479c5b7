"""PixArt-alpha / PixArt-sigma through diffusers' `PixArtAlphaPipeline` / `PixArtSigmaPipeline`.

Cross-attention DiT: text enters through cross-attention, so blocks carry image tokens only.
Sites: `transformer_blocks.{i}:img` and MLP neurons `transformer_blocks.{i}.ff.net.0:img`.
CFG: the transformer batch is [uncond; cond]. Resolution binning is turned off so the image
(and token grid) is exactly the size asked for.
"""

from __future__ import annotations

import copy
import math

from torch import nn

from difflens.errors import DifflensError
from difflens.hooks import HookSet, SiteBinding
from difflens.models._pipeline import PipelineAdapter
from difflens.models._sites import image_block_sites, middle_block, mlp_sites, model_width
from difflens.models.base import Generation


class PixArtAdapter(PipelineAdapter):
    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    transformer_class = "PixArtTransformer2DModel"

    @classmethod
    def bindings_for(cls, transformer: nn.Module) -> dict[str, SiteBinding]:
        out = image_block_sites("transformer_blocks", transformer.transformer_blocks, model_width(transformer))
        out.update(mlp_sites("transformer_blocks", transformer.transformer_blocks))
        return out

    @classmethod
    def default_site_for(cls, transformer: nn.Module) -> str:
        return f"transformer_blocks.{middle_block(len(transformer.transformer_blocks))}:img"

    def _token_px(self) -> int:
        return self.vae_scale_factor * int(self.transformer.config.patch_size)

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = int(self.transformer.config.sample_size * self.vae_scale_factor)
        h, w = int(height or default), int(width or default)
        px = math.lcm(8, self._token_px())  # the pipeline itself insists on multiples of 8
        if h % px or w % px or h <= 0 or w <= 0:
            raise DifflensError(f"image size {h}x{w} must be positive multiples of {px} px for this PixArt model")
        return h, w

    def grid_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        h, w = self._size(height, width)
        return h // self._token_px(), w // self._token_px()

    def timesteps(self, steps: int) -> list[float]:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import retrieve_timesteps

        self.check_steps(steps)
        ts, _ = retrieve_timesteps(copy.deepcopy(self.pipe.scheduler), steps, "cpu")
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
        """`guidance` is the CFG scale (pipeline default 4.5; <= 1 turns CFG off)."""
        self.check_request(prompts, seeds, steps)
        h, w = self._size(height, width)
        kwargs = dict(
            prompt=list(prompts),
            height=h,
            width=w,
            num_inference_steps=int(steps),
            generator=self.generators(seeds),
            use_resolution_binning=False,
            clean_caption=False,  # keep prompts verbatim so token positions match the text
        )
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = negative_prompt
        grid = self.grid_hw(h, w)
        images, timesteps = self.run(kwargs, n=len(prompts), hooks=hooks, grid_hw=grid)
        return Generation(images=images, timesteps=timesteps, grid_hw=grid)

    def row_layout(self, rows: int, n: int, call_index: int) -> str:
        if call_index != 0:
            raise RuntimeError("PixArt called its transformer twice in one step")
        return self.cfg_rows_layout(rows, n, "uncond_cond")
