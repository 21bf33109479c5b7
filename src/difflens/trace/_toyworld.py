"""Stand-in for the toy adapter's `ground_truth()` until every adapter reports one: the toy
world's pair proposal and image reader, with the same method names as that interface."""

from __future__ import annotations

import dataclasses

import numpy as np

from difflens.errors import DifflensError
from difflens.world import vocab as V


class ToyWorldTruth:
    name = "toy-world"
    factors = V.FACTORS

    def prompt_pair(self, factor: str, a: str, b: str, *, seed: int = 0) -> tuple[str, str]:
        from difflens.world.prompts import scene_to_prompt
        from difflens.world.scene import sample_scene

        if factor not in V.FACTORS or a not in V.FACTORS[factor] or b not in V.FACTORS[factor]:
            raise DifflensError(f"{factor}={a!r}/{b!r} is not a toy-world factor value")
        scene = sample_scene(np.random.default_rng(seed), two_object_prob=0.0)

        def with_value(v: str):
            if factor in V.BACKGROUND_FACTORS:
                return dataclasses.replace(scene, **{factor: v})
            main = dataclasses.replace(scene.objects[0], **{factor: v})
            return dataclasses.replace(scene, objects=(main,) + scene.objects[1:])

        return scene_to_prompt(with_value(a)), scene_to_prompt(with_value(b))

    def read_factor(self, images, factor: str, position: str | None = None) -> list[str]:
        from difflens.world.classifier import read_factor

        return read_factor(images, factor, position)
