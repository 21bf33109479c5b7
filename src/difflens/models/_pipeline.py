"""Shared driver for adapters that wrap a real diffusers pipeline (Flux, SD3, PixArt, DiT).

Step counting: every diffusers denoising loop calls `scheduler.step` exactly once per step,
whatever callbacks the pipeline offers (DiT offers none, PixArt only a legacy one), so the
driver counts steps by wrapping `scheduler.step` for the duration of one call. A forward
pre-hook on the transformer then tells the tracker which step, timestep and CFG rows the
coming call has. Nothing is installed when no hooks are given, so a plain run is the stock
pipeline run.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from difflens.hooks import HookSet, SiteBinding, StepTracker, batch_rows
from difflens.models.base import Adapter


def dtype_kwarg() -> str:
    """diffusers renamed from_pretrained's `torch_dtype` to `dtype` (0.42); use whichever this
    install understands, so loads neither warn nor silently fall back to fp32."""
    import importlib

    helpers = importlib.import_module("diffusers.utils.deprecation_utils")
    return "dtype" if hasattr(helpers, "_resolve_dtype") else "torch_dtype"


def to_uint8(images: Any) -> np.ndarray:
    """Float images in [0, 1] (diffusers `output_type="np"`) to uint8 [B, H, W, 3]."""
    arr = np.asarray(images, dtype=np.float32)
    return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class PipelineAdapter(Adapter):
    """An adapter around a loaded diffusers pipeline; subclasses know their family's details."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()
    transformer_class: str = ""

    def __init__(self, pipe, *, model_id: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.transformer = pipe.transformer
        self.dtype = self.transformer.dtype
        self.device = torch.device(pipe.device)
        pipe.set_progress_bar_config(disable=True)
        self._bindings: dict[str, SiteBinding] | None = None

    # ---- sites ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def bindings_for(cls, transformer: nn.Module) -> dict[str, SiteBinding]:
        """The family's site table for a transformer (works on a meta-device instance too)."""

    @classmethod
    @abstractmethod
    def default_site_for(cls, transformer: nn.Module) -> str: ...

    def site_bindings(self) -> dict[str, SiteBinding]:
        if self._bindings is None:
            self._bindings = self.bindings_for(self.transformer)
        return self._bindings

    def default_site(self) -> str:
        return self.default_site_for(self.transformer)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        source: str,
        pipeline_class: str,
        *,
        model_id: str,
        dtype: torch.dtype,
        device: torch.device,
        quantization_config=None,
        local_files_only: bool = True,
    ) -> PipelineAdapter:
        import diffusers

        dtype_key = dtype_kwarg()
        kwargs: dict[str, Any] = {dtype_key: dtype, "local_files_only": local_files_only}
        if quantization_config is not None:
            transformer_cls = getattr(diffusers, cls.transformer_class)
            kwargs["transformer"] = transformer_cls.from_pretrained(
                source,
                subfolder="transformer",
                quantization_config=quantization_config,
                **{dtype_key: dtype},
                local_files_only=local_files_only,
            )
        pipe = getattr(diffusers, pipeline_class).from_pretrained(source, **kwargs)
        pipe.to(device)
        return cls(pipe, model_id=model_id)

    # ---- running -------------------------------------------------------------------------
    @abstractmethod
    def row_layout(self, rows: int, n: int, call_index: int) -> str:
        """The `batch_rows` layout of a transformer call with `rows` rows for `n` samples."""

    def run(self, call_kwargs: dict[str, Any], *, n: int, hooks: HookSet | None, grid_hw: tuple[int, int]):
        """Call the pipeline once with hooks active; returns (uint8 images, visited timesteps)."""
        tracker = StepTracker(num_steps=0, grid_hw=grid_hw)
        with self.attach(hooks, tracker), self._tracking(tracker, n, active=bool(hooks)):
            out = self.pipe(**call_kwargs, output_type="np", return_dict=True)
        timesteps = [float(t) for t in self.pipe.scheduler.timesteps]
        return to_uint8(out.images), timesteps

    @contextmanager
    def _tracking(self, tracker: StepTracker, n: int, *, active: bool) -> Iterator[None]:
        if not active:
            yield
            return
        scheduler = self.pipe.scheduler
        had_own = "step" in vars(scheduler)
        previous = vars(scheduler).get("step")
        original_step = scheduler.step
        done = [0]

        def counted_step(*args, **kwargs):
            out = original_step(*args, **kwargs)
            done[0] += 1
            return out

        def before_call(module, args, kwargs):
            step = done[0]
            if step != tracker.step:
                ts = scheduler.timesteps
                if step >= len(ts):
                    raise RuntimeError(f"transformer called after the last scheduler step ({len(ts)})")
                tracker.begin_step(step, float(ts[step]), num_steps=len(ts))
            x = kwargs.get("hidden_states", args[0] if args else None)
            layout = self.row_layout(int(x.shape[0]), n, tracker.call_index + 1)
            tracker.set_batch(*batch_rows(n, layout, device=x.device))

        handle = self.transformer.register_forward_pre_hook(before_call, with_kwargs=True)
        scheduler.step = counted_step
        try:
            yield
        finally:
            handle.remove()
            if had_own:
                scheduler.step = previous
            else:
                del scheduler.step

    @staticmethod
    def cfg_rows_layout(rows: int, n: int, paired: str) -> str:
        """Layout for pipelines that batch CFG: 2n rows in the `paired` order, n rows all cond."""
        if rows == 2 * n:
            return paired
        if rows == n:
            return "cond"
        raise RuntimeError(f"unexpected transformer batch of {rows} rows for {n} samples")

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.pipe.vae.config.block_out_channels) - 1))
