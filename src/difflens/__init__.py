"""difflens: dictionary learning on text-to-image diffusion transformers."""

__version__ = "0.1.0"

from difflens.errors import DifflensError  # noqa: E402


def load(path, **kwargs):
    """Load a dictionary checkpoint folder (cfg.json + weights.safetensors); never unpickles."""
    from difflens.dictionaries.io import load as _load

    return _load(path, **kwargs)


__all__ = ["DifflensError", "load", "__version__"]
