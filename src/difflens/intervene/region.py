"""Where and when an intervention acts: token regions and step windows.

A region is resolved to a boolean mask over the image-token grid (row-major, as adapters lay
out image tokens) only once the grid is known, so the same `Region` works for the toy model
(16x16 tokens of 2x2 px) and for Flux (16x16 tokens of 16x16 px at 256 px).

Boxes are `x0,y0,x1,y1` with x = column, y = row, origin at the top-left, x0/y0 inclusive and
x1/y1 exclusive. In pixel units a token is inside when its centre is inside the box; in token
units the box indexes the grid directly. Masks (PNG or array) of any size are averaged over
each token's area and a token is inside when at least half of it is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difflens.errors import DifflensError

UNITS = ("px", "tokens")


@dataclass(frozen=True)
class Region:
    """A token region: a box (pixels or tokens) or a mask; `resolve` turns it into a token mask."""

    box: tuple[float, float, float, float] | None = None
    units: str = "px"
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # bool/float [H, W]
    label: str = ""

    def __post_init__(self) -> None:
        if (self.box is None) == (self.mask is None):
            raise DifflensError("a region needs exactly one of a box (x0,y0,x1,y1) or a mask")
        if self.units not in UNITS:
            raise DifflensError(f"region units {self.units!r} unknown: use 'px' (image pixels) or 'tokens' (token grid)")
        if self.box is not None:
            if len(self.box) != 4:
                raise DifflensError(f"region box {self.box!r}: give four numbers x0,y0,x1,y1")
            x0, y0, x1, y1 = self.box
            if not (x1 > x0 and y1 > y0):
                raise DifflensError(
                    f"region box {self.box!r} is empty: need x0 < x1 and y0 < y1 (x = column, y = row, ends excluded)"
                )
            if min(self.box) < 0:
                raise DifflensError(f"region box {self.box!r} has a negative coordinate: boxes start at 0,0 (top-left)")
        else:
            m = np.asarray(self.mask)
            if m.ndim != 2 or m.size == 0:
                raise DifflensError(f"region mask must be a 2-D array [height, width], got shape {m.shape}")

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, units: str = "px") -> Region:
        """`x0,y0,x1,y1` (e.g. '0,0,16,16'), the box in `units`."""
        try:
            vals = tuple(float(v) for v in str(text).replace(" ", "").split(","))
        except ValueError:
            raise DifflensError(f"--region {text!r}: write x0,y0,x1,y1 as four numbers, e.g. 0,0,16,16") from None
        if len(vals) != 4:
            raise DifflensError(f"--region {text!r}: write x0,y0,x1,y1 as four numbers, e.g. 0,0,16,16")
        return cls(box=vals, units=units, label=f"box {text} ({units})")

    @classmethod
    def from_png(cls, path: str | Path) -> Region:
        """A mask image: non-black pixels (any channel > 127, or alpha > 127 if present) are inside."""
        from PIL import Image

        path = Path(path)
        if not path.is_file():
            raise DifflensError(f"mask file {path} does not exist: pass a PNG whose white pixels mark the region")
        try:
            img = Image.open(path)
            img.load()
        except Exception as e:  # PIL raises several types for unreadable files
            raise DifflensError(f"cannot read mask {path} ({e}); pass a PNG image") from None
        arr = np.asarray(img.convert("RGBA"))
        inside = arr[..., :3].max(-1) > 127
        if arr[..., 3].min() < 255:  # transparency marks the outside
            inside &= arr[..., 3] > 127
        return cls(mask=inside, label=f"mask {path.name}")

    @classmethod
    def from_tokens(cls, token_mask: np.ndarray | torch.Tensor) -> Region:
        """A mask already on the token grid [h, w]."""
        m = np.asarray(token_mask.cpu() if isinstance(token_mask, torch.Tensor) else token_mask)
        return cls(mask=m.astype(bool), label="token mask")

    # ---- resolution ----------------------------------------------------------------------
    def resolve(self, grid_hw: tuple[int, int], image_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """bool [h*w] over image tokens (row-major). Pixel boxes need the image size."""
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        if self.mask is not None:
            out = _mask_to_grid(np.asarray(self.mask, dtype=np.float64), gh, gw)
        elif self.units == "tokens":
            x0, y0, x1, y1 = self.box
            if x1 > gw or y1 > gh:
                raise DifflensError(
                    f"region box {self.box!r} (tokens) goes beyond the {gw}x{gh} token grid: keep x1 <= {gw}, y1 <= {gh}"
                )
            rows = np.arange(gh)[:, None]
            cols = np.arange(gw)[None, :]
            out = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        else:
            if image_hw is None:
                raise DifflensError(
                    "a pixel region needs the image size, which this model does not report: give the box in "
                    "token units (--region-units tokens) or pass --height/--width"
                )
            ih, iw = int(image_hw[0]), int(image_hw[1])
            x0, y0, x1, y1 = self.box
            if x1 > iw or y1 > ih:
                raise DifflensError(
                    f"region box {self.box!r} (pixels) goes beyond the {iw}x{ih} image: keep x1 <= {iw}, y1 <= {ih}"
                )
            cy = (np.arange(gh) + 0.5) * (ih / gh)
            cx = (np.arange(gw) + 0.5) * (iw / gw)
            out = (cy[:, None] >= y0) & (cy[:, None] < y1) & (cx[None, :] >= x0) & (cx[None, :] < x1)
        out = np.asarray(out, dtype=bool)
        if not out.any():
            raise DifflensError(
                f"region {self.label or self.box} covers no image token on the {gw}x{gh} grid: "
                "make it at least one token wide (a token is inside when its centre is)"
            )
        return torch.from_numpy(out.reshape(-1))

    def pixel_mask(self, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
        """bool [H, W]: the pixels of the tokens the region selects (for measuring change outside it)."""
        tok = self.resolve(grid_hw, image_hw).numpy().reshape(grid_hw)
        ih, iw = image_hw
        ry, rx = ih // grid_hw[0], iw // grid_hw[1]
        return tok.repeat(ry, 0).repeat(rx, 1)


def _mask_to_grid(m: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Average a mask over each token's area (any size; nearest-upsampled first if smaller)."""
    h, w = m.shape
    if h % gh or w % gw:
        # Upsample to a common multiple so every token gets its exact area share.
        fy, fx = gh // np.gcd(h, gh), gw // np.gcd(w, gw)
        m = m.repeat(fy, 0).repeat(fx, 1)
        h, w = m.shape
    cov = m.reshape(gh, h // gh, gw, w // gw).mean(axis=(1, 3))
    return cov >= 0.5


@dataclass(frozen=True)
class Window:
    """When an intervention acts: scheduler step indices and/or a timestep-value range.

    `steps` is a range (a, b) with b excluded (either may be None: open end) or an explicit
    list of step indices; `timesteps` is an inclusive (lo, hi) range of the scheduler's
    timestep values. Both given: both must hold.
    """

    steps: tuple[int | None, int | None] | tuple[int, ...] | None = None
    timesteps: tuple[float, float] | None = None
    explicit: bool = False  # steps is a list of indices rather than a range

    @classmethod
    def all(cls) -> Window:
        return cls()

    @classmethod
    def range(cls, a: int | None, b: int | None) -> Window:
        return cls(steps=(a, b))

    @classmethod
    def of_steps(cls, steps: Sequence[int]) -> Window:
        return cls(steps=tuple(int(s) for s in steps), explicit=True)

    @classmethod
    def parse(cls, steps: str | None = None, timesteps: str | None = None, *, steps_flag: str = "--step-window",
              timesteps_flag: str = "--timestep-range") -> Window:
        """CLI forms: steps 'a:b' (b excluded, either side may be empty) or '0,1,4'; timesteps 'lo:hi'.
        Errors name `steps_flag` / `timesteps_flag`, the options the text came from."""
        s = None
        explicit = False
        if steps is not None:
            text = str(steps).strip()
            try:
                if ":" in text:
                    a, b = text.split(":")
                    s = (int(a) if a.strip() else None, int(b) if b.strip() else None)
                else:
                    s = tuple(int(v) for v in text.split(",") if v.strip())
                    explicit = True
            except ValueError:
                raise DifflensError(
                    f"{steps_flag} {steps!r}: write a:b (step indices, b excluded; e.g. 0:5 or :5) or a list 0,1,4"
                ) from None
            if explicit and not s:
                raise DifflensError(f"{steps_flag} {steps!r} names no step; e.g. 0:5 or 0,1,4")
            if any(v is not None and v < 0 for v in s):
                raise DifflensError(f"{steps_flag} {steps!r}: step indices start at 0")
            if not explicit and s[0] is not None and s[1] is not None and s[1] <= s[0]:
                raise DifflensError(f"{steps_flag} {steps!r}: need a < b (b is excluded)")
        ts = None
        if timesteps is not None:
            try:
                lo, hi = (float(v) for v in str(timesteps).split(":"))
            except ValueError:
                raise DifflensError(
                    f"{timesteps_flag} {timesteps!r}: write lo:hi as scheduler timestep values (inclusive), e.g. 500:1000"
                ) from None
            if hi < lo:
                raise DifflensError(f"{timesteps_flag} {timesteps!r}: need lo <= hi")
            ts = (lo, hi)
        return cls(steps=s, timesteps=ts, explicit=explicit)

    def active(self, step: int, timestep: float) -> bool:
        if self.steps is not None:
            if self.explicit:
                if step not in self.steps:
                    return False
            else:
                a, b = self.steps
                if (a is not None and step < a) or (b is not None and step >= b):
                    return False
        if self.timesteps is not None:
            lo, hi = self.timesteps
            if not (lo - 1e-4 <= timestep <= hi + 1e-4):
                return False
        return True

    def active_steps(self, timesteps: Sequence[float]) -> list[int]:
        return [i for i, t in enumerate(timesteps) if self.active(i, float(t))]

    def check(self, timesteps: Sequence[float]) -> None:
        """Refuse a window that selects none of a run's steps (a silent no-op otherwise)."""
        if not self.active_steps(timesteps):
            shown = ", ".join(f"{t:g}" for t in timesteps)
            raise DifflensError(
                f"the step window {self.describe()} selects none of this run's {len(timesteps)} steps "
                f"(timesteps {shown}): choose steps in 0:{len(timesteps)} or a timestep range that includes some"
            )

    def describe(self) -> str:
        parts = []
        if self.steps is not None:
            if self.explicit:
                parts.append("steps " + ",".join(str(s) for s in self.steps))
            else:
                a, b = self.steps
                parts.append(f"steps {'' if a is None else a}:{'' if b is None else b}")
        if self.timesteps is not None:
            parts.append(f"timesteps {self.timesteps[0]:g}:{self.timesteps[1]:g}")
        return " & ".join(parts) or "all steps"
