"""The procedural toy world: scenes with known factors, their prompts, masks and concept labels."""

from difflens.world.labels import image_concepts, token_label_masks, token_owner
from difflens.world.prompts import parse_prompt, scene_to_prompt
from difflens.world.scene import ObjectSpec, Rendered, Scene, SceneSpec, render, sample_scene
from difflens.world.vocab import CONCEPTS, FACTORS

__all__ = [
    "CONCEPTS",
    "FACTORS",
    "ObjectSpec",
    "Rendered",
    "Scene",
    "SceneSpec",
    "image_concepts",
    "parse_prompt",
    "render",
    "sample_scene",
    "scene_to_prompt",
    "token_label_masks",
    "token_owner",
]
