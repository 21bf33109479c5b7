"""Learning-rate schedule: linear warm-up, constant, optional decay to 0 over the last fraction.

A pure function of the step, so a resumed run recomputes the same lr with no saved scheduler.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: str, decay_fraction: float) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based)."""
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    if decay != "none":
        decay_steps = max(1, int(round(total_steps * decay_fraction)))
        start = total_steps - decay_steps
        if step >= start:
            progress = min(1.0, (step - start) / decay_steps)  # 0 would be reached one step after the end
            if decay == "linear":
                factor = min(factor, 1.0 - progress)
            elif decay == "cosine":
                factor = min(factor, 0.5 * (1.0 + math.cos(math.pi * progress)))
            else:
                raise ValueError(f"unknown decay {decay!r}")
    return factor
