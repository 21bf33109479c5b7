"""The embedded toy text-to-image model: a tiny diffusers FluxTransformer2DModel trained on the toy world."""


def world_class():
    """The ground-truth world of the toy family (`ToyAdapter.world_class`), importable without
    the model's heavy dependencies, so a store's labels are read without loading diffusers."""
    from difflens.world.groundtruth import ToyWorld

    return ToyWorld
