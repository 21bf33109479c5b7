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

from difflens.hooks import SiteBinding
from difflens.models._pipeline import PipelineAdapter
from difflens.models._sites import image_block_sites, middle_block, mlp_sites, model_width


class PixArtAdapter(PipelineAdapter):
    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    cfg_layout = "uncond_cond"
    transformer_class = "PixArtTransformer2DModel"

    @classmethod
    def bindings_for(cls, transformer: nn.Module) -> dict[str, SiteBinding]:
        out = image_block_sites("transformer_blocks", transformer.transformer_blocks, model_width(transformer))
        out.update(mlp_sites("transformer_blocks", transformer.transformer_blocks))
        return out

    @classmethod
    def default_site_for(cls, transformer: nn.Module) -> str:
        return f"transformer_blocks.{middle_block(len(transformer.transformer_blocks))}:img"

    def size_multiple(self) -> int:
        return math.lcm(8, self._token_px())  # the pipeline itself insists on multiples of 8

    def timesteps(self, steps: int | None = None, *, height: int | None = None, width: int | None = None) -> list[float]:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import retrieve_timesteps

        steps = self.default_steps if steps is None else steps
        self.check_steps(steps)
        self._size(height, width)  # the schedule does not depend on the size, but a bad size is still an error
        ts, _ = retrieve_timesteps(copy.deepcopy(self.pipe.scheduler), steps, "cpu")
        return [float(t) for t in ts]

    def call_kwargs(self, prompts: list[str], height: int, width: int, *, guidance: float | None,
                    negative_prompt: str | None = None) -> dict:
        """`guidance` is the CFG scale (pipeline default 4.5; <= 1 turns CFG off)."""
        kwargs = dict(
            prompt=prompts,
            height=height,
            width=width,
            use_resolution_binning=False,
            clean_caption=False,  # keep prompts verbatim so token positions match the text
            **self.text_kwargs(),
        )
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = negative_prompt
        return kwargs

    def row_layout(self, rows: int, n: int, call_index: int) -> str:
        if call_index != 0:
            raise RuntimeError("PixArt called its transformer twice in one step")
        return self.cfg_rows_layout(rows, n, "uncond_cond")
