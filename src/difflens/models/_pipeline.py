"""Shared driver for adapters that wrap a real diffusers pipeline (Flux, SD3, PixArt, DiT).

Step counting: every diffusers denoising loop calls `scheduler.step` exactly once per step,
whatever callbacks the pipeline offers (DiT offers none, PixArt only a legacy one), so the
driver counts steps by wrapping `scheduler.step` for the duration of one call. A forward
pre-hook on the transformer then tells the tracker which step, timestep and CFG rows the
coming call has. Nothing is installed when no hooks are given, so a plain run is the stock
pipeline run.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from difflens.errors import DifflensError
from difflens.hooks import HookSet, SiteBinding, StepTracker, batch_rows
from difflens.models.base import Adapter, Generation


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
    transformer_class: str = ""

    # the pipeline __call__ keyword that sets the text length (None: the family has no text encoder)
    text_length_kwarg: str | None = "max_sequence_length"

    def __init__(self, pipe, *, model_id: str, max_text_length: int | None = None) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.transformer = pipe.transformer
        self.dtype = self.transformer.dtype
        # with CPU offload the pipeline's parts sit on the CPU between calls; it runs on the execution device
        self.device = torch.device(getattr(pipe, "_execution_device", None) or pipe.device)
        pipe.set_progress_bar_config(disable=True)
        self._bindings: dict[str, SiteBinding] | None = None
        if max_text_length is not None:
            if self.text_length_kwarg is None:
                raise DifflensError(f"{model_id} ({self.name}) takes no text, so --max-text-length does not apply: drop it")
            if int(max_text_length) < 1:
                raise DifflensError(f"--max-text-length must be >= 1, got {max_text_length}")
        self.max_text_length = None if max_text_length is None else int(max_text_length)

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
        offload: str = "none",
        max_text_length: int | None = None,
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
        enforce_dtype(pipe, dtype, model_id=model_id, quantized=quantization_config is not None)
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
        return cls(pipe, model_id=model_id, max_text_length=max_text_length)

    # ---- defaults (also computable from configs alone, for `harvest --dry-run`) ---------------------
    @classmethod
    def default_steps_for(cls, pipeline_class: str, transformer: nn.Module) -> int:
        """The pipeline's own default number of denoising steps (its __call__ default)."""
        import diffusers

        param = inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters.get("num_inference_steps")
        return int(param.default) if param is not None and isinstance(param.default, int) else 28

    @classmethod
    def token_px_for(cls, transformer: nn.Module, vae_scale: int) -> int:
        return vae_scale * int(transformer.config.patch_size)

    @classmethod
    def default_side_for(cls, transformer: nn.Module, vae_scale: int) -> int:
        return int(transformer.config.sample_size) * vae_scale

    @classmethod
    def text_tokens_for(cls, max_text_length: int | None, clip_length: int) -> int:
        """Text tokens a txt site carries per prompt (0: the family has no text stream in its blocks)."""
        return 0

    @property
    def default_steps(self) -> int:
        return self.default_steps_for(type(self.pipe).__name__, self.transformer)

    def default_size(self) -> tuple[int, int]:
        side = self.default_side_for(self.transformer, self.vae_scale_factor)
        return side, side

    def size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels (one token, or what the pipeline insists on)."""
        return self._token_px()

    def _token_px(self) -> int:
        return self.token_px_for(self.transformer, self.vae_scale_factor)

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        dh, dw = self.default_size()
        h, w = int(height or dh), int(width or dw)
        px = self.size_multiple()
        if h % px or w % px or h <= 0 or w <= 0:
            raise DifflensError(
                f"image size {h}x{w} must be positive multiples of {px} px for this {self.name} model "
                f"(e.g. --height {max(px, h // px * px)} --width {max(px, w // px * px)})"
            )
        return h, w

    def grid_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        h, w = self._size(height, width)
        return h // self._token_px(), w // self._token_px()

    # ---- one generate() for every pipeline family ----------------------------------------------
    @abstractmethod
    def call_kwargs(self, prompts: list[str], height: int, width: int, *, guidance: float | None, **extra) -> dict:
        """The family's pipeline __call__ arguments for these prompts (not steps, seeds or output type)."""

    def text_kwargs(self) -> dict:
        if self.max_text_length is None or self.text_length_kwarg is None:
            return {}
        return {self.text_length_kwarg: self.max_text_length}

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
        **extra,
    ) -> Generation:
        """Images for `prompts` (sample i from `seeds[i]`); `steps` None = the model's default; `extra`
        are family options (Flux: true_cfg_scale, negative_prompt; SD3/PixArt: negative_prompt)."""
        steps = self.default_steps if steps is None else steps
        self.check_request(prompts, seeds, steps)
        h, w = self._size(height, width)
        grid = self.grid_hw(h, w)
        kwargs = self.call_kwargs(list(prompts), h, w, guidance=guidance, **extra)
        kwargs.update(num_inference_steps=int(steps), generator=self.generators(seeds))
        masks = self.text_masks(kwargs) if hooks else None
        images, timesteps = self.run(kwargs, n=len(prompts), hooks=hooks, grid_hw=grid, text_masks=masks)
        return Generation(images=images, timesteps=timesteps, grid_hw=grid)

    def image_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        return self._size(height, width)

    # ---- running -------------------------------------------------------------------------
    @abstractmethod
    def row_layout(self, rows: int, n: int, call_index: int) -> str:
        """The `batch_rows` layout of a transformer call with `rows` rows for `n` samples."""

    def text_masks(self, call_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(prompt mask, negative-prompt mask), bool [n, L]: which tokens of the text stream the blocks
        carry are real (True) vs padding, for `HookContext.text_mask`. None: no text stream in the blocks."""
        return None

    @staticmethod
    def _tokenizer_mask(tokenizer, prompts: list[str], length: int) -> torch.Tensor:
        """The attention mask the pipeline's own tokenizer call produces (padding to `length`, truncating)."""
        enc = tokenizer(list(prompts), padding="max_length", max_length=int(length), truncation=True,
                        add_special_tokens=True, return_tensors="pt")
        return enc.attention_mask.to(torch.bool)

    @staticmethod
    def _negatives(call_kwargs: dict[str, Any], n: int) -> list[str]:
        neg = call_kwargs.get("negative_prompt")
        if neg is None:
            return [""] * n
        return [neg] * n if isinstance(neg, str) else [str(x) for x in neg]

    def run(self, call_kwargs: dict[str, Any], *, n: int, hooks: HookSet | None, grid_hw: tuple[int, int],
            text_masks: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Call the pipeline once with hooks active; returns (uint8 images, visited timesteps)."""
        tracker = StepTracker(num_steps=0, grid_hw=grid_hw)
        if text_masks is not None:
            tracker.set_text_masks(*text_masks)
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


def enforce_dtype(pipe, dtype: torch.dtype, *, model_id: str, quantized: bool = False) -> None:
    """Every component in `dtype`, or a DifflensError naming the one that is not, before anything runs.

    Some diffusers models load in fp32 whatever dtype is asked for (SD3's transformer in diffusers
    0.42 without accelerate); a mixed pipeline then fails deep inside a convolution. Parameters a
    model keeps in fp32 on purpose (`_keep_in_fp32_modules`) are left alone."""
    for name, comp in pipe.components.items():
        if not isinstance(comp, nn.Module) or (quantized and name == "transformer"):
            continue
        keep = tuple(getattr(comp, "_keep_in_fp32_modules", None) or ())

        def stray(module: nn.Module) -> list[str]:
            return [n for n, p in module.named_parameters()
                    if p.is_floating_point() and p.dtype != dtype and not any(k in n.split(".") for k in keep)]

        if not stray(comp):
            continue
        try:
            for n, p in comp.named_parameters():
                if p.is_floating_point() and p.dtype != dtype and not any(k in n.split(".") for k in keep):
                    p.data = p.data.to(dtype)
            for n, b in comp.named_buffers():
                if b.is_floating_point() and b.dtype != dtype and not any(k in n.split(".") for k in keep):
                    b.data = b.data.to(dtype)
        except (RuntimeError, TypeError) as e:
            raise DifflensError(
                f"{model_id}: component '{name}' cannot run in {dtype} ({e}); load the model with --model-dtype fp32"
            ) from None
        left = stray(comp)
        if left:
            raise DifflensError(
                f"{model_id}: component '{name}' stays in {next(comp.parameters()).dtype} though {dtype} was asked "
                f"(e.g. {left[0]}); load the model with --model-dtype fp32"
            )
