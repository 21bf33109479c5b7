"""The toy model behind the common `Adapter` interface (the embedded default, `--model toy`)."""

from __future__ import annotations

from pathlib import Path

import torch

from difflens.errors import DifflensError
from difflens.hooks import HookSet, SiteBinding, StepTracker
from difflens.models.base import Adapter, Generation
from difflens.models.flux import flux_default_site, flux_site_bindings
from difflens.models.toy.model import ToyT2I
from difflens.models.toy.sampling import make_scheduler, sample
from difflens.models.toy import world_class as toy_world_class
from difflens.world.groundtruth import ToyWorld

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class ToyAdapter(Adapter):
    """A real diffusers FluxTransformer2DModel with its own Euler loop and [uncond; cond] CFG batches."""

    name = "toy"
    cfg_layout = "uncond_cond"
    world_class = toy_world_class()  # `ground_truth()`: the toy world (scenes, labels, factor classifier)

    def __init__(self, model: ToyT2I, *, dtype: torch.dtype = torch.float32, model_id: str = "toy"):
        self.model = model
        self.transformer = model.transformer
        self.model_id = model_id
        self.dtype = dtype
        self.device = model.img_ids.device
        self._bindings = flux_site_bindings(self.transformer)
        self._world: ToyWorld | None = None

    @classmethod
    def load(cls, dtype: str = "fp32", device: str = "cpu", folder: str | Path | None = None) -> "ToyAdapter":
        if str(dtype) not in DTYPES:
            raise DifflensError(f"dtype {dtype!r} is not supported for the toy model on CPU; use fp32 or bf16")
        if str(device) != "cpu" and not torch.cuda.is_available():
            raise DifflensError(f"device {device!r} is not available here; use --device cpu")
        model = ToyT2I.load(folder, device=device)
        return cls(model, dtype=DTYPES[str(dtype)], model_id="toy" if folder is None else str(folder))

    def site_bindings(self) -> dict[str, SiteBinding]:
        return self._bindings

    def text_tokenizer(self):
        return self.model.tokenizer  # the world's grammar tokenizer: `text_labels` reads its words

    def default_site(self) -> str:
        return flux_default_site(self.transformer)

    @property
    def default_steps(self) -> int:
        return int(self.model.cfg.steps_default)

    def image_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        size = self.model.cfg.image_size
        for name, v in (("height", height), ("width", width)):
            if v is not None and v != size:
                raise DifflensError(f"the toy model makes {size}x{size} images; drop --{name} or set it to {size}")
        return (size, size)

    def grid_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        self.image_hw(height, width)
        g = self.model.cfg.grid
        return (g, g)

    def timesteps(self, steps: int, *, height: int | None = None, width: int | None = None) -> list[float]:
        self.check_steps(steps)
        self.image_hw(height, width)
        sched = make_scheduler()
        sched.set_timesteps(steps)
        return [float(t) for t in sched.timesteps]

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        hooks: HookSet | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Generation:
        cfg = self.model.cfg
        steps = self.default_steps if steps is None else steps
        self.check_request(prompts, seeds, steps)
        grid = self.grid_hw(height, width)
        guidance = cfg.guidance_default if guidance is None else float(guidance)
        tracker = StepTracker(num_steps=steps, grid_hw=grid)
        if hooks:  # which text tokens are real: the prompt's words (+ BOS) vs padding; uncond rows read ""
            tracker.set_text_masks(self.model.tokenizer(list(prompts))[1], self.model.tokenizer([""] * len(prompts))[1])
        with self.attach(hooks, tracker):
            images, timesteps, latents = sample(
                self.model,
                list(prompts),
                [int(s) for s in seeds],
                steps=steps,
                guidance=guidance,
                on_step=lambda i, t: tracker.begin_step(i, t, num_steps=steps),
                on_call=tracker.set_batch,
                dtype=self.dtype,
                guidance_interval=cfg.guidance_interval,
            )
        return Generation(images=images, timesteps=timesteps, grid_hw=grid, latents=latents)
