"""The adapter interface every model family implements (toy, Flux, SD3, PixArt, DiT).

Consumers (harvest, evaluation, intervention) only talk to `Adapter`: list sites, generate
images for prompts and seeds with hooks active, and learn the timesteps a run will visit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from difflens.errors import DifflensError
from difflens.hooks import HookSet, Site, SiteBinding, StepTracker, attach_hooks, expand_sites


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

    # ---- generation --------------------------------------------------------------------
    @abstractmethod
    def timesteps(self, steps: int) -> list[float]:
        """The scheduler timesteps a `generate(..., steps=steps)` at the default size visits."""

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
