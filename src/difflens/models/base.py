"""The adapter interface every model family implements (toy, Flux, SD3, PixArt, DiT).

Consumers (harvest, evaluation, intervention, interpretation) only talk to `Adapter`: list
sites, learn a run's default steps, image size, token grid and timesteps before running it,
and generate images for prompts and seeds with hooks active. A model with per-pixel ground
truth also returns a `GroundTruth` from `ground_truth()`; generic stages branch on that object,
never on the model's name. Families register once, by declaring `pipeline_classes` (the
diffusers `_class_name`s they load); see docs/architecture.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from difflens.errors import DifflensError
from difflens.hooks import HookSet, Site, SiteBinding, StepTracker, attach_hooks, expand_sites

if TYPE_CHECKING:
    from difflens.groundtruth import GroundTruth

# diffusers pipeline `_class_name` -> the adapter class that loads it; filled by
# `Adapter.__init_subclass__` from each class's `pipeline_classes`, the one place a family registers.
ADAPTERS: dict[str, type[Adapter]] = {}
# How one transformer call's rows map to CFG branches (see `hooks.batch_rows`).
CFG_LAYOUTS = ("uncond_cond", "cond_uncond", "cond_then_uncond", "cond")


@dataclass
class Generation:
    """The result of one `Adapter.generate` call."""

    images: np.ndarray  # uint8 [B, H, W, 3]
    timesteps: list[float]  # the scheduler's timesteps, one per step, in visiting order
    grid_hw: tuple[int, int]  # image-token grid of this resolution
    latents: torch.Tensor | None = None  # final latents, when the adapter keeps them


class Adapter(ABC):
    """One model behind one interface; subclasses describe their sites through `site_bindings`."""

    name: str
    model_id: str
    transformer: nn.Module
    dtype: torch.dtype
    device: torch.device
    # diffusers `_class_name`s this family loads; declaring them registers the class in ADAPTERS.
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    # Row layout of a guided step: "uncond_cond" / "cond_uncond" (2n rows in one call),
    # "cond_then_uncond" (two calls of n rows) or "cond" (one branch; guidance is distilled).
    cfg_layout: ClassVar[str] = "cond"
    # The ground-truth world a family's models were trained on (a `GroundTruth` class), or None;
    # `ground_truth()` returns one, and a store's labels are read through it without loading weights.
    world_class: ClassVar[type | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.cfg_layout not in CFG_LAYOUTS:
            raise TypeError(f"{cls.__name__}.cfg_layout={cls.cfg_layout!r}: use one of {CFG_LAYOUTS}")
        for name in vars(cls).get("pipeline_classes", ()):
            if name in ADAPTERS and ADAPTERS[name] is not cls:
                raise TypeError(f"pipeline class {name} is registered twice ({ADAPTERS[name].__name__}, {cls.__name__})")
            ADAPTERS[name] = cls

    # ---- ground truth ------------------------------------------------------------------------
    def ground_truth(self) -> GroundTruth | None:
        """The world this model was trained on, when it has per-pixel ground truth; None for real models."""
        if self.world_class is None:
            return None
        if getattr(self, "_world", None) is None:
            self._world = self.world_class()
        return self._world

    def text_tokenizer(self):
        """The tokenizer whose tokens the ground truth's `text_labels` labels (the model's own), or
        None when this model's text tokens carry no labels."""
        return None

    # ---- sites -------------------------------------------------------------------------
    @abstractmethod
    def site_bindings(self) -> dict[str, SiteBinding]:
        """Every hookable site (as its string) and where its activations live; stable order."""

    @abstractmethod
    def default_site(self) -> str:
        """The site a user gets when they name none."""

    def sites(self) -> list[str]:
        return list(self.site_bindings())

    def site_dim(self, site: str | Site) -> int:
        key = str(Site.parse(site))
        binding = self.site_bindings().get(key)
        if binding is None:
            expand_sites(key, self.sites())  # raises the helpful unknown-site error
            raise DifflensError(f"unknown site {key}")
        return binding.dim

    def resolve_sites(self, patterns: str | Sequence[str]) -> list[str]:
        """Expand user-typed sites or globs against this model's sites."""
        return expand_sites(patterns, self.sites())

    def attach(self, hooks: HookSet | None, tracker: StepTracker) -> AbstractContextManager[None]:
        """Hooks active on the transformer inside the `with` block; a custom sampling loop
        updates `tracker` (begin_step / set_batch) around each transformer call."""
        return attach_hooks(self.transformer, hooks, self.site_bindings(), tracker)

    # ---- what a run will look like -------------------------------------------------------
    @property
    @abstractmethod
    def default_steps(self) -> int:
        """Denoising steps of a run that names none."""

    def resolve_steps(self, steps: int | None) -> int:
        steps = self.default_steps if steps is None else steps
        self.check_steps(steps)
        return int(steps)

    @abstractmethod
    def image_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The (height, width) in pixels a run at this size makes (None = the model's default);
        raises a DifflensError for a size the model cannot make."""

    @abstractmethod
    def grid_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The image-token grid of a run at this size."""

    @abstractmethod
    def timesteps(self, steps: int, *, height: int | None = None, width: int | None = None) -> list[float]:
        """The scheduler timesteps a `generate(..., steps=steps)` at this size visits."""

    # ---- generation --------------------------------------------------------------------

    @abstractmethod
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
    ) -> Generation:
        """Images for `prompts`, sample i's initial noise drawn from its own `seeds[i]`."""

    # ---- shared checks -------------------------------------------------------------------
    @staticmethod
    def check_request(prompts: Sequence[str], seeds: Sequence[int], steps: int) -> None:
        """Reject malformed generate() arguments with messages a CLI user can act on."""
        if isinstance(prompts, str):
            raise DifflensError("prompts must be a list of strings, not one string: wrap it as [prompt]")
        if len(prompts) == 0:
            raise DifflensError("no prompts given: pass at least one prompt")
        if len(seeds) != len(prompts):
            raise DifflensError(
                f"{len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt"
            )
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
                raise DifflensError(f"seed {s!r} is not a non-negative integer: seeds must be ints >= 0")
        Adapter.check_steps(steps)

    @staticmethod
    def check_steps(steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise DifflensError(f"steps={steps!r}: the number of denoising steps must be an integer >= 1")

    @staticmethod
    def generators(seeds: Sequence[int]) -> list[torch.Generator]:
        """One CPU generator per sample so each image depends on its seed only, not on batching
        or on the device."""
        return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, dtype={self.dtype}, device={self.device})"
