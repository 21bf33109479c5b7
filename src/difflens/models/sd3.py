"""Stable Diffusion 3 / 3.5 through diffusers' `StableDiffusion3Pipeline`.

Sites: joint (MMDiT) blocks `transformer_blocks.{i}:img|txt`; the last block is
`context_pre_only` (it returns no text tokens), so it has an img site only. MLP neurons:
`transformer_blocks.{i}.ff.net.0:img` and `...ff_context.net.0:txt` where present.
CFG: the transformer batch is [uncond; cond].
"""

from __future__ import annotations

import copy

from torch import nn

from difflens.hooks import SiteBinding
from difflens.models._pipeline import PipelineAdapter
from difflens.models._sites import joint_block_sites, middle_block, mlp_sites, model_width


class SD3Adapter(PipelineAdapter):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    cfg_layout = "uncond_cond"
    transformer_class = "SD3Transformer2DModel"

    @classmethod
    def bindings_for(cls, transformer: nn.Module) -> dict[str, SiteBinding]:
        out = joint_block_sites("transformer_blocks", transformer.transformer_blocks, model_width(transformer))
        out.update(mlp_sites("transformer_blocks", transformer.transformer_blocks))
        return out

    @classmethod
    def default_site_for(cls, transformer: nn.Module) -> str:
        return f"transformer_blocks.{middle_block(len(transformer.transformer_blocks))}:img"

    @classmethod
    def text_tokens_for(cls, max_text_length: int | None, clip_length: int) -> int:
        return int(clip_length) + int(max_text_length or 256)  # CLIP tokens, then T5 padded to max_sequence_length

    def timesteps(self, steps: int | None = None, *, height: int | None = None, width: int | None = None) -> list[float]:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        steps = self.default_steps if steps is None else steps
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

    def call_kwargs(self, prompts: list[str], height: int, width: int, *, guidance: float | None,
                    negative_prompt: str | None = None) -> dict:
        """`guidance` is the CFG scale (pipeline default 7.0; <= 1 turns CFG off)."""
        kwargs = dict(prompt=prompts, height=height, width=width, **self.text_kwargs())
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = [negative_prompt] * len(prompts)
        return kwargs

    def text_masks(self, call_kwargs: dict) -> tuple:
        """The txt stream is [CLIP tokens (the two CLIP encoders side by side), T5 tokens]; without a
        T5 encoder the pipeline feeds zeros there, which count as padding."""
        import torch

        pipe = self.pipe
        length = int(call_kwargs.get("max_sequence_length") or 256)

        def mask(prompts: list[str]):
            clip = self._tokenizer_mask(pipe.tokenizer, prompts, pipe.tokenizer_max_length)
            if pipe.text_encoder_3 is None:
                t5 = torch.zeros(len(prompts), length, dtype=torch.bool)
            else:
                t5 = self._tokenizer_mask(pipe.tokenizer_3, prompts, length)
            return torch.cat([clip, t5], dim=1)

        prompts = list(call_kwargs["prompt"])
        return mask(prompts), mask(self._negatives(call_kwargs, len(prompts)))

    def row_layout(self, rows: int, n: int, call_index: int) -> str:
        if call_index != 0:
            raise RuntimeError("SD3 called its transformer twice in one step (skip-layer guidance is not supported)")
        return self.cfg_rows_layout(rows, n, "uncond_cond")
