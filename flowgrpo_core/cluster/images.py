"""The container image of each part of the system, and the recipe under ``images/`` that builds it.

An image is ``<registry>/flowgrpo-<recipe>:<tag>`` and its recipe ``images/<recipe>.Dockerfile``: one name
for both, so a test can check that every image the pipeline or a manifest names can be built.
"""

from __future__ import annotations

import re

# The project's release (pyproject.toml's version; a test keeps them equal): images are tagged with it.
VERSION = "0.1.0"
DEFAULT_REGISTRY = "ghcr.io/flowgrpo"

TRAINER = "trainer"
# one image per reward family: their dependencies conflict (README, "Reward servers")
REWARD_OCR = "reward-ocr"
REWARD_CLIP = "reward-clip"
REWARD_GENEVAL = "reward-geneval"
UNIFIEDREWARD_JUDGE = "unifiedreward-sglang"
RECIPES = (TRAINER, REWARD_OCR, REWARD_CLIP, REWARD_GENEVAL, UNIFIEDREWARD_JUDGE)


def image_ref(recipe: str, registry: str = DEFAULT_REGISTRY, tag: str = "") -> str:
    if recipe not in RECIPES:
        raise ValueError(f"no image recipe {recipe!r}; known: {', '.join(RECIPES)}")
    return f"{registry.rstrip('/')}/flowgrpo-{recipe}:{tag or VERSION}"


def recipe_of(image: str) -> str | None:
    """The recipe name of an image built from ``images/`` (``.../flowgrpo-reward-ocr:0.1.0`` -> ``reward-ocr``),
    or None for an image that does not follow the naming scheme."""
    match = re.fullmatch(r"(?:.+/)?flowgrpo-([a-z0-9-]+)(?::[\w.-]+)?(?:@sha256:[0-9a-f]{64})?", image)
    return match.group(1) if match else None
