"""DiT (class-conditional ImageNet DiT) through diffusers' `DiTPipeline`.

Prompts are ImageNet class ids ("207") or names ("golden retriever", from the pipeline's
id2label). Sites: `transformer_blocks.{i}:img` and MLP neurons `transformer_blocks.{i}.ff.net.0:img`.
CFG: the transformer batch is [cond; uncond] (the null class is 1000). The resolution is fixed
by the checkpoint.
"""

from __future__ import annotations

import copy

from torch import nn

from difflens.errors import DifflensError
from difflens.hooks import SiteBinding
from difflens.models._pipeline import PipelineAdapter
from difflens.models._sites import image_block_sites, middle_block, mlp_sites, model_width


class DiTAdapter(PipelineAdapter):
    name = "dit"
    pipeline_classes = ("DiTPipeline",)
    cfg_layout = "cond_uncond"
    transformer_class = "DiTTransformer2DModel"
    text_length_kwarg = None  # class labels, no text encoder

    @classmethod
    def bindings_for(cls, transformer: nn.Module) -> dict[str, SiteBinding]:
        out = image_block_sites("transformer_blocks", transformer.transformer_blocks, model_width(transformer))
        out.update(mlp_sites("transformer_blocks", transformer.transformer_blocks))
        return out

    @classmethod
    def default_site_for(cls, transformer: nn.Module) -> str:
        return f"transformer_blocks.{middle_block(len(transformer.transformer_blocks))}:img"

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        side = self.default_size()[0]
        for name, value in (("height", height), ("width", width)):
            if value is not None and int(value) != side:
                raise DifflensError(
                    f"{name}={value}: this DiT checkpoint only generates {side}x{side} images; leave the size unset"
                )
        return side, side

    def class_ids(self, prompts: list[str]) -> list[int]:
        """Map class ids or ImageNet names to ids, with an error that shows valid examples."""
        n_classes = int(self.transformer.config.num_embeds_ada_norm or 1000)
        labels = getattr(self.pipe, "labels", {}) or {}
        lowered = {k.lower(): v for k, v in labels.items()}
        out = []
        for p in prompts:
            text = str(p).strip()
            if text.isdigit():
                idx = int(text)
                if idx >= n_classes:
                    raise DifflensError(f"class id {idx} is out of range: DiT classes are 0..{n_classes - 1}")
                out.append(idx)
            elif text.lower() in lowered:
                out.append(int(lowered[text.lower()]))
            else:
                examples = ", ".join(list(labels)[:5]) or "(this checkpoint has no label names; use ids)"
                raise DifflensError(
                    f"unknown DiT class {text!r}: give an ImageNet class id 0..{n_classes - 1} or a class name, "
                    f"e.g. {examples}"
                )
        return out

    def timesteps(self, steps: int | None = None, *, height: int | None = None, width: int | None = None) -> list[float]:
        steps = self.default_steps if steps is None else steps
        self.check_steps(steps)
        self._size(height, width)
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(int(steps))
        return [float(t) for t in scheduler.timesteps]

    def call_kwargs(self, prompts: list[str], height: int, width: int, *, guidance: float | None) -> dict:
        """`guidance` is the CFG scale (pipeline default 4.0; <= 1 turns CFG off); prompts are classes."""
        kwargs = dict(class_labels=self.class_ids(prompts))
        if guidance is not None:
            kwargs["guidance_scale"] = float(guidance)
        return kwargs

    def row_layout(self, rows: int, n: int, call_index: int) -> str:
        if call_index != 0:
            raise RuntimeError("DiT called its transformer twice in one step")
        return self.cfg_rows_layout(rows, n, "cond_uncond")
