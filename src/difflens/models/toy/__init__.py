"""The embedded toy text-to-image model: a tiny diffusers FluxTransformer2DModel trained on the toy world."""
