"""Model adapters: one interface (`Adapter`) over the toy model and real diffusers pipelines.

`load_adapter("toy" | folder | hub id, dtype=..., device=..., quantize=..., offload=..., max_text_length=...)` picks the adapter
from the pipeline's model_index.json. Heavy imports (diffusers, transformers) happen on load.
"""

from difflens.models.base import Adapter, Generation

DEFAULT_MODEL = "toy"  # the CLI's `--model` default: the embedded model trained on a known world


def load_adapter(model: str, *, dtype="fp32", device="cpu", quantize: str | None = None, offload: str | None = "none",
                 max_text_length: int | None = None) -> Adapter:
    """Load "toy", a local diffusers pipeline folder or a hub id; errors say how to fix the input."""
    from difflens.models._loading import load_adapter as _load

    return _load(model, dtype=dtype, device=device, quantize=quantize, offload=offload, max_text_length=max_text_length)


def ground_truth_for(model: str):
    """The `GroundTruth` of the model a store was harvested from (None for real models), without
    loading weights."""
    from difflens.models._loading import ground_truth_for as _truth

    return _truth(model)


def describe_model(model: str, *, height: int | None = None, width: int | None = None,
                   max_text_length: int | None = None):
    """A `ModelPlan` (sites and widths, image size, token counts, default steps) read from the
    model's configs without loading weights, for planning a harvest."""
    from difflens.models._loading import describe_model as _describe

    return _describe(model, height=height, width=width, max_text_length=max_text_length)


def default_ground_truth():
    """The world of `DEFAULT_MODEL`: what helpers called with no adapter, store or world use."""
    return ground_truth_for(DEFAULT_MODEL)


__all__ = ["DEFAULT_MODEL", "Adapter", "Generation", "default_ground_truth", "describe_model", "ground_truth_for", "load_adapter"]
