"""A tiny random-weight toy model saved to a folder: fast stand-in for the shipped one in tests."""

from __future__ import annotations

from pathlib import Path

import torch

from difflens.models.toy.model import ToyConfig, ToyT2I

TINY = ToyConfig(heads=2, head_dim=16, text_dim=32, text_layers=1, axes_dims_rope=(4, 6, 6), steps_default=3)


def make_tiny_toy(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = ToyT2I(TINY)
    # Random init leaves the image close to noise; scale the output layer up so hooks visibly matter.
    with torch.no_grad():
        model.transformer.proj_out.weight.mul_(20)
    model.save(folder)
    return folder
