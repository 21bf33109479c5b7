"""FLUX.1 (schnell / dev) through diffusers' `FluxPipeline`.

Sites: double blocks `transformer_blocks.{i}:img|txt`, single blocks
`single_transformer_blocks.{i}:img|txt` (the single block's output sliced back into streams),
the text tokens entering the first block `context_embedder:txt` (the projected prompt encoding,
before block 0's joint attention reads it), MLP neurons `transformer_blocks.{i}.ff.net.0:img`, `transformer_blocks.{i}.ff_context.net.0:txt`
and `single_transformer_blocks.{i}.act_mlp:img|txt` (one MLP over [txt; img], sliced).

CFG: dev's distilled guidance is an embedding (one call per step, all rows conditional); true
CFG (`true_cfg_scale > 1`) calls the transformer twice per step, conditional first.
"""

from __future__ import annotations

import copy

import numpy as np
from torch import nn

from difflens.errors import DifflensError
from difflens.hooks import SiteBinding
from difflens.models._pipeline import PipelineAdapter
from difflens.models._sites import joint_block_sites, mlp_sites, model_width


def flux_site_bindings(transformer: nn.Module) -> dict[str, SiteBinding]:
    """Site table of any diffusers `FluxTransformer2DModel` (the toy model reuses it)."""
    dim = model_width(transformer)
    out = joint_block_sites("transformer_blocks", transformer.transformer_blocks, dim)
    out.update(joint_block_sites("single_transformer_blocks", transformer.single_transformer_blocks, dim))
    out.update(mlp_sites("transformer_blocks", transformer.transformer_blocks))
    for i, block in enumerate(transformer.single_transformer_blocks):
        block_path = f"single_transformer_blocks.{i}"
        path = f"{block_path}.act_mlp"
        hidden = int(block.proj_mlp.out_features)
        for stream in ("img", "txt"):
            out[f"{path}:{stream}"] = SiteBinding(path, hidden, "tokens", text_from=block_path)
    # Block outputs come after block 0's joint attention has already read the prompt; this is the
    # one place where an edit of the text tokens reaches every block's image stream.
    embedder = getattr(transformer, "context_embedder", None)
    if embedder is not None:
        out["context_embedder:txt"] = SiteBinding("context_embedder", int(embedder.out_features), "tensor")
    return out


def flux_default_site(transformer: nn.Module) -> str:
    """The paper's main site: the last double block's image tokens."""
    n = len(transformer.transformer_blocks)
    if n:
        return f"transformer_blocks.{n - 1}:img"
    return f"single_transformer_blocks.{len(transformer.single_transformer_blocks) - 1}:img"


class FluxAdapter(PipelineAdapter):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    cfg_layout = "cond_then_uncond"
    transformer_class = "FluxTransformer2DModel"
    _true_cfg = False  # set per generate() call; tells row_layout what a second call means

    @classmethod
    def bindings_for(cls, transformer: nn.Module) -> dict[str, SiteBinding]:
        return flux_site_bindings(transformer)

    @classmethod
    def default_site_for(cls, transformer: nn.Module) -> str:
        return flux_default_site(transformer)

    @classmethod
    def default_steps_for(cls, pipeline_class: str, transformer: nn.Module) -> int:
        """schnell (no guidance embedding) is distilled for 4 steps; dev's pipeline default is 28."""
        return 28 if transformer.config.guidance_embeds else 4

    # Flux packs 2x2 latent patches into one token, on top of the VAE's downsampling.
    @classmethod
    def token_px_for(cls, transformer: nn.Module, vae_scale: int) -> int:
        return vae_scale * 2

    @classmethod
    def default_side_for(cls, transformer: nn.Module, vae_scale: int) -> int:
        return 128 * vae_scale  # FluxPipeline.default_sample_size: 1024 px with the 8x VAE

    @classmethod
    def text_tokens_for(cls, max_text_length: int | None, clip_length: int) -> int:
        return int(max_text_length or 512)  # T5 pads every prompt to max_sequence_length

    def timesteps(self, steps: int | None = None, *, height: int | None = None, width: int | None = None) -> list[float]:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        steps = self.default_steps if steps is None else steps
        self.check_steps(steps)
        gh, gw = self.grid_hw(height, width)
        scheduler = copy.deepcopy(self.pipe.scheduler)
        cfg = scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            gh * gw,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        ts, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        return [float(t) for t in ts]

    def call_kwargs(
        self,
        prompts: list[str],
        height: int,
        width: int,
        *,
        guidance: float | None,
        true_cfg_scale: float | None = None,
        negative_prompt: str | None = None,
    ) -> dict:
        """`guidance` is dev's distilled guidance (embedded, default 3.5); `true_cfg_scale` > 1
        turns on real classifier-free guidance against `negative_prompt` (default "")."""
        kwargs = dict(prompt=prompts, height=height, width=width, **self.text_kwargs())
        if self.transformer.config.guidance_embeds:
            if guidance is not None:
                kwargs["guidance_scale"] = float(guidance)
        elif guidance is not None:
            raise DifflensError(
                f"{self.model_id} has no guidance embedding (a schnell-type model), so guidance={guidance} "
                "would be ignored: leave guidance unset, or use true_cfg_scale with a negative prompt for real CFG"
            )
        if true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = float(true_cfg_scale)
            if true_cfg_scale > 1:
                kwargs["negative_prompt"] = [negative_prompt or ""] * len(prompts)
        self._true_cfg = bool(true_cfg_scale is not None and true_cfg_scale > 1)
        return kwargs

    def text_masks(self, call_kwargs: dict) -> tuple:
        """The txt stream is the T5 sequence padded to max_sequence_length (512 unless set)."""
        tok = self.pipe.tokenizer_2
        length = int(call_kwargs.get("max_sequence_length") or 512)
        prompts = list(call_kwargs["prompt"])
        return (self._tokenizer_mask(tok, prompts, length),
                self._tokenizer_mask(tok, self._negatives(call_kwargs, len(prompts)), length))

    def row_layout(self, rows: int, n: int, call_index: int) -> str:
        if rows != n:
            raise RuntimeError(f"unexpected Flux transformer batch of {rows} rows for {n} samples")
        if call_index == 0:
            return "cond"
        if call_index == 1 and self._true_cfg:
            return "uncond"
        raise RuntimeError(f"unexpected Flux transformer call {call_index} within one step")
