"""Learning-rate schedule: linear warm-up, constant, optional decay to 0 over the last fraction.

The trainer takes it from torch.optim.lr_scheduler (`torch_lr_factors`: LinearLR warm-up,
LinearLR / CosineAnnealingLR decay), tabulated per step so a resumed run recomputes the same lr
with no saved scheduler; `lr_factor` is the closed form it is tested against.
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


def _run(make, n: int) -> list[float]:
    """The factors a torch scheduler built by `make(optimizer)` gives over its first n steps."""
    import warnings

    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make(opt)
    out = []
    with warnings.catch_warnings():  # stepping without optimizer.step(): we only read the lr
        warnings.simplefilter("ignore")
        for _ in range(n):
            out.append(float(opt.param_groups[0]["lr"]))
            sched.step()
    return out


def torch_lr_factors(total_steps: int, warmup_steps: int, decay: str, decay_fraction: float) -> list[float]:
    """The schedule above, computed by torch.optim.lr_scheduler: LinearLR for the warm-up, LinearLR or
    CosineAnnealingLR for the decay, and the smaller of the two where they overlap. One list for
    the whole run, indexed by step, so a resumed run needs no saved scheduler state."""
    from torch.optim import lr_scheduler as ls

    total = int(total_steps)
    f = [1.0] * total
    if warmup_steps > 1:
        w = min(int(warmup_steps), total)
        warm = _run(lambda o: ls.LinearLR(o, start_factor=1.0 / warmup_steps, end_factor=w / warmup_steps,
                                          total_iters=max(1, w - 1)), w)
        f[:w] = warm
    if decay != "none":
        d = max(1, int(round(total * decay_fraction)))
        start = total - d
        if decay == "linear":
            tail = [1.0] if d == 1 else _run(lambda o: ls.LinearLR(o, start_factor=1.0, end_factor=1.0 / d, total_iters=d - 1), d)
        elif decay == "cosine":
            tail = _run(lambda o: ls.CosineAnnealingLR(o, T_max=d, eta_min=0.0), d)
        else:
            raise ValueError(f"unknown decay {decay!r}")
        for i, v in enumerate(tail):
            if 0 <= start + i < total:
                f[start + i] = min(f[start + i], v)
    return f
