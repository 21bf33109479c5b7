"""Training dictionaries on an activation store: one loop for every architecture, DDP, resume.

    from difflens.train import TrainConfig, expand_specs, train
    specs = expand_specs([{"arch": "topk", "k": [32, 64]}], defaults={"site": "transformer_blocks.18:img", "width": 4096})
    dicts = train("runs/store", specs, TrainConfig(steps=20_000), "runs/sae")

See docs/training.md.
"""

from difflens.train.config import DictSpec, TrainConfig, expand_specs


def __getattr__(name):  # the loop pulls in torch and the dictionaries: import it on first use
    if name in ("train", "Trainer", "Interrupted"):
        from difflens.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["DictSpec", "Interrupted", "TrainConfig", "Trainer", "expand_specs", "train"]
