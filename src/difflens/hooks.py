"""The one hook mechanism: read or replace a transformer's activations at named sites.

A *site* names a module inside the transformer and a token stream (`transformer_blocks.18:img`).
A hook is `fn(acts_BND, ctx) -> Tensor | None`; returning a tensor replaces the activations for
the rest of the forward pass. Every consumer (harvest, evaluation splices, steering, editing)
goes through `attach_hooks`, so they all see the same step / timestep / CFG bookkeeping.

The bookkeeping lives in a `StepTracker` that whoever drives the denoising loop updates:
`begin_step(step, timestep)` once per scheduler step and `set_batch(is_cond, sample_index)`
before every transformer call. Pipeline adapters do this from a wrapped `scheduler.step` and a
transformer pre-hook (models/_pipeline.py); a custom loop (the toy model) calls it directly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from difflens.errors import DifflensError

Stream = Literal["img", "txt"]
STREAMS: tuple[str, ...] = ("img", "txt")

_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _default_stream(module: str) -> str:
    # Text-stream modules are spelt with "context" in diffusers (ff_context, norm1_context).
    return "txt" if any("context" in part for part in module.split(".")) else "img"


@dataclass(frozen=True)
class Site:
    """Where to hook: a dotted module path inside the transformer plus a token stream."""

    module: str
    stream: Stream = "img"

    def __post_init__(self) -> None:
        if not _MODULE_RE.match(self.module):
            raise DifflensError(
                f"bad site module path {self.module!r}: expected a dotted path such as "
                "'transformer_blocks.1' (see `difflens sites --model ...`)"
            )
        if self.stream not in STREAMS:
            raise DifflensError(
                f"bad stream {self.stream!r} in site {self.module}:{self.stream}: use one of {', '.join(STREAMS)}"
            )

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """`module[:stream]`; without a stream, text-side modules (`ff_context`) mean txt, others img."""
        if isinstance(text, Site):
            return text
        if not isinstance(text, str) or not text.strip():
            raise DifflensError(
                f"empty or non-string site {text!r}: write e.g. 'transformer_blocks.1:img'"
            )
        text = text.strip()
        module, sep, stream = text.partition(":")
        if sep and (not stream or ":" in stream):
            raise DifflensError(
                f"bad site {text!r}: write '<module path>[:img|txt]', e.g. 'transformer_blocks.1:img'"
            )
        module = module.strip()
        return cls(module, stream.strip() if sep else _default_stream(module))

    def __str__(self) -> str:
        return f"{self.module}:{self.stream}"


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` matches within one dotted component, `**` across components, `?` one character."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.:]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.:]")
            i += 1
        elif pattern[i] == "[":
            j = pattern.find("]", i)
            if j < 0:
                raise DifflensError(f"unclosed '[' in site pattern {pattern!r}")
            body = pattern[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + "$")


def _split_patterns(patterns: str | Sequence[str]) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        out.extend(part.strip() for part in str(p).split(",") if part.strip())
    return out


def expand_sites(patterns: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """Resolve user-typed sites and globs (`transformer_blocks.*:img`) against an adapter's sites.

    Results keep the adapter's order within a pattern and the patterns' order overall, without
    duplicates. A pattern without a stream takes the same default as `Site.parse`.
    """
    items = _split_patterns(patterns)
    if not items:
        raise DifflensError("no site given: pass e.g. 'transformer_blocks.1:img' or a glob like 'transformer_blocks.*:img'")
    available = [str(Site.parse(a)) for a in available]
    chosen: list[str] = []
    for pat in items:
        module, sep, stream = pat.partition(":")
        if not sep:
            stream = _default_stream(module.replace("*", "x"))
        regex = _glob_regex(f"{module}:{stream}")
        matches = [a for a in available if regex.match(a)]
        if not matches:
            shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
            raise DifflensError(
                f"site pattern {pat!r} matches none of this model's sites; available include: {shown} "
                "(list them all with `difflens sites --model ...`)"
            )
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


@dataclass
class HookContext:
    """Everything a hook may need to know about the activations it is handed."""

    site: Site
    step: int  # scheduler step, 0-based (not the transformer-call count)
    num_steps: int
    timestep: float  # the scheduler's timestep value for this step
    grid_hw: tuple[int, int]  # image-token grid
    sample_index: torch.LongTensor  # [B] which sample of the generate() call each row is
    is_cond: torch.BoolTensor  # [B] rows of the conditional branch
    call_index: int  # transformer call within this step (true CFG calls twice)
    # [B, L] True where a row's text token is a real token of its prompt, False where it is padding;
    # L is the text length of txt sites. None when the model has no text stream in its blocks.
    text_mask: torch.BoolTensor | None = None


Hook = Callable[[torch.Tensor, HookContext], "torch.Tensor | None"]


class HookSet:
    """Ordered (site, fn) pairs; several hooks on one site run in the order they were added."""

    def __init__(self, pairs: Iterable[tuple[Site | str, Hook]] = ()) -> None:
        self._pairs: list[tuple[Site, Hook]] = []
        for site, fn in pairs:
            self.add(site, fn)

    def add(self, site: Site | str, fn: Hook) -> HookSet:
        if not callable(fn):
            raise DifflensError(f"hook for site {site} is not callable: pass a function (acts, ctx) -> acts or None")
        self._pairs.append((Site.parse(site), fn))
        return self

    def sites(self) -> list[Site]:
        seen: list[Site] = []
        for s, _ in self._pairs:
            if s not in seen:
                seen.append(s)
        return seen

    def __iter__(self) -> Iterator[tuple[Site, Hook]]:
        return iter(list(self._pairs))

    def __len__(self) -> int:
        return len(self._pairs)

    def __bool__(self) -> bool:
        return bool(self._pairs)


@dataclass(frozen=True)
class SiteBinding:
    """How a site's activations are found in a module's output.

    kind "tensor": the output is the activations. "tuple": the output is a tuple and
    `index` picks the stream (diffusers joint blocks return (txt, img)). "tokens": the output
    covers the concatenated [txt; img] sequence (Flux single-block MLP); the text length is read
    from the `encoder_hidden_states` argument of the module at `text_from`.
    """

    module: str
    dim: int
    kind: Literal["tensor", "tuple", "tokens"] = "tensor"
    index: int = 0
    text_from: str | None = None


def batch_rows(n: int, layout: str, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_cond, sample_index) for a transformer batch of `n` samples in a given CFG layout.

    layouts: "cond" / "uncond" (n rows, one branch), "cond_uncond" (DiT), "uncond_cond"
    (PixArt, SD3): 2n rows.
    """
    idx = torch.arange(n, dtype=torch.long, device=device)
    ones = torch.ones(n, dtype=torch.bool, device=device)
    if layout == "cond":
        return ones, idx
    if layout == "uncond":
        return ~ones, idx
    if layout == "cond_uncond":
        return torch.cat([ones, ~ones]), torch.cat([idx, idx])
    if layout == "uncond_cond":
        return torch.cat([~ones, ones]), torch.cat([idx, idx])
    raise ValueError(f"unknown batch layout {layout!r}")


@dataclass
class StepTracker:
    """Step / batch state of a running denoising loop, read by hooks through `context()`."""

    num_steps: int
    grid_hw: tuple[int, int]
    step: int = -1
    timestep: float = math.nan
    call_index: int = -1
    is_cond: torch.Tensor | None = field(default=None, repr=False)
    sample_index: torch.Tensor | None = field(default=None, repr=False)
    text_mask: torch.Tensor | None = field(default=None, repr=False)
    # per sample: (conditional prompts' mask [n, L], unconditional/negative prompts' mask [n, L])
    text_masks: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def set_text_masks(self, cond, uncond) -> None:
        """Call once per generate(): which text tokens of each sample's prompt (and of its negative
        prompt, for unconditional rows) are real. Every later `set_batch` derives the rows' mask."""
        cond = torch.as_tensor(cond, dtype=torch.bool)
        uncond = torch.as_tensor(uncond, dtype=torch.bool)
        if cond.ndim != 2 or cond.shape != uncond.shape:
            raise ValueError(f"text masks must both be [n, L]; got {tuple(cond.shape)} and {tuple(uncond.shape)}")
        self.text_masks = (cond, uncond)

    def begin_step(self, step: int, timestep: float, num_steps: int | None = None) -> None:
        """Call once per scheduler step, before its first transformer call."""
        self.step = int(step)
        self.timestep = float(timestep)
        if num_steps is not None:
            self.num_steps = int(num_steps)
        self.call_index = -1
        self.is_cond = None
        self.sample_index = None
        self.text_mask = None

    def set_batch(self, is_cond, sample_index) -> None:
        """Call before every transformer call of the step, describing its batch rows."""
        is_cond = torch.as_tensor(is_cond, dtype=torch.bool)
        sample_index = torch.as_tensor(sample_index, dtype=torch.long)
        if is_cond.ndim != 1 or is_cond.shape != sample_index.shape:
            raise ValueError(
                f"is_cond {tuple(is_cond.shape)} and sample_index {tuple(sample_index.shape)} must be 1-D and equal length"
            )
        if self.step < 0:
            raise RuntimeError("StepTracker.set_batch called before begin_step")
        self.is_cond = is_cond
        self.sample_index = sample_index
        self.call_index += 1
        if self.text_masks is not None:
            cond, uncond = self.text_masks
            idx = sample_index.cpu()
            self.text_mask = torch.where(is_cond.cpu()[:, None], cond[idx], uncond[idx])

    def context(self, site: Site) -> HookContext:
        if self.is_cond is None or self.sample_index is None:
            raise RuntimeError(
                "a hook fired outside a tracked transformer call: the loop must call "
                "StepTracker.begin_step and set_batch before calling the transformer"
            )
        return HookContext(
            site=site,
            step=self.step,
            num_steps=self.num_steps,
            timestep=self.timestep,
            grid_hw=tuple(self.grid_hw),
            sample_index=self.sample_index,
            is_cond=self.is_cond,
            call_index=self.call_index,
            text_mask=self.text_mask,
        )


def _text_len_from_call(args: tuple, kwargs: dict) -> int:
    ehs = kwargs.get("encoder_hidden_states")
    if ehs is None and len(args) > 1:
        ehs = args[1]
    if ehs is None:
        raise RuntimeError("cannot find encoder_hidden_states to split the [txt; img] sequence")
    return int(ehs.shape[1])


def _read(output, binding: SiteBinding, site: Site, text_len: int | None) -> torch.Tensor:
    if binding.kind == "tensor":
        return output
    if binding.kind == "tuple":
        acts = output[binding.index]
        if acts is None:
            raise DifflensError(f"site {site} produces no activations (this block has no {site.stream} output)")
        return acts
    assert text_len is not None
    return output[:, :text_len] if site.stream == "txt" else output[:, text_len:]


def _write(output, binding: SiteBinding, site: Site, text_len: int | None, acts: torch.Tensor):
    if binding.kind == "tensor":
        return acts
    if binding.kind == "tuple":
        items = list(output)
        items[binding.index] = acts
        return tuple(items)
    if site.stream == "txt":
        return torch.cat([acts, output[:, text_len:]], dim=1)
    return torch.cat([output[:, :text_len], acts], dim=1)


def _module_hook(entries: list[tuple[Site, SiteBinding, Hook]], tracker: StepTracker, text_lens: dict[str, int]):
    def hook(module: nn.Module, args, output):
        out = output
        changed = False
        for site, binding, fn in entries:
            text_len = text_lens.get(binding.text_from) if binding.text_from else None
            acts = _read(out, binding, site, text_len)
            new = fn(acts, tracker.context(site))
            if new is None:
                continue
            if not isinstance(new, torch.Tensor) or new.shape != acts.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise DifflensError(
                    f"hook on site {site} returned {got}; it must return None or a tensor of shape {tuple(acts.shape)}"
                )
            new = new.to(device=acts.device, dtype=acts.dtype)
            out = _write(out, binding, site, text_len, new)
            changed = True
        return out if changed else None

    return hook


def _text_len_hook(path: str, text_lens: dict[str, int]):
    def hook(module: nn.Module, args, kwargs):
        text_lens[path] = _text_len_from_call(args, kwargs)

    return hook


def _get_module(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise DifflensError(f"the model has no module {path!r}: check the site with `difflens sites --model ...`") from None


@contextmanager
def attach_hooks(
    root: nn.Module,
    hooks: HookSet | None,
    bindings: Mapping[str, SiteBinding],
    tracker: StepTracker,
) -> Iterator[None]:
    """Register `hooks` on `root`'s modules for the duration of the block; always removed after."""
    handles = []
    try:
        if not hooks:
            yield
            return
        by_module: dict[str, list[tuple[Site, SiteBinding, Hook]]] = {}
        for site, fn in hooks:
            binding = bindings.get(str(site))
            if binding is None:
                known = list(bindings)
                shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
                raise DifflensError(
                    f"unknown site {site} for this model; available include: {shown} "
                    "(list them all with `difflens sites --model ...`)"
                )
            by_module.setdefault(binding.module, []).append((site, binding, fn))
        text_lens: dict[str, int] = {}
        text_sources = {b.text_from for entries in by_module.values() for _, b, _ in entries if b.text_from}
        for path in sorted(text_sources):
            handles.append(
                _get_module(root, path).register_forward_pre_hook(_text_len_hook(path, text_lens), with_kwargs=True)
            )
        for path, entries in by_module.items():
            handles.append(_get_module(root, path).register_forward_hook(_module_hook(entries, tracker, text_lens)))
        yield
    finally:
        for h in handles:
            h.remove()
