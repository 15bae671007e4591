"""Reward functions and the registry that builds them by name (docs/algorithm.md sect. 7).

``REWARD_NAMES`` is the catalogue a config may name. ``register_reward`` adds an in-process
implementation; a reward without one must be reached through a reward server (``endpoints``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from flowgrpo_core.rewards.base import Reward, RewardOutput
from flowgrpo_core.rewards.brightness import Brightness
from flowgrpo_core.rewards.jpeg import JpegCompressibility, JpegIncompressibility
from flowgrpo_core.rewards.multi import MultiReward

REWARD_NAMES: dict[str, str] = {
    "jpeg_compressibility": "minus the JPEG size (kB) at quality 95, divided by 500 (flow_grpo's scale)",
    "jpeg_incompressibility": "plus the JPEG size (kB) at quality 95",
    "brightness": "mean luminance in [0, 1]: a control any policy can move",
    "ocr": "1 - normalised edit distance between the quoted text of the prompt and the OCR'd text",
    "geneval": "GenEval rules (objects, counts, colours, positions) checked by a detector",
    "pickscore": "PickScore (CLIP-H) preference score / 26",
    "clipscore": "CLIP image-text cosine similarity",
    "aesthetic": "LAION aesthetic MLP on CLIP image embeddings",
    "imagereward": "ImageReward preference model",
    "hpsv2": "HPSv2 preference model",
    "unifiedreward": "UnifiedReward VLM judge behind an OpenAI-compatible chat endpoint",
    "shapes_geneval": "GenEval rules on the shapes world, checked by a colour-segmentation detector",
}

_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str, factory: Callable[..., Reward]) -> None:
    """Make ``name`` buildable in-process; ``factory(**options)`` returns a Reward."""
    if name not in REWARD_NAMES:
        raise ValueError(f"unknown reward {name!r}; add it to REWARD_NAMES with a description first")
    _REGISTRY[name] = factory


def available_in_process() -> list[str]:
    return sorted(_REGISTRY)


def build_reward(name: str, **options) -> Reward:
    """An in-process reward by name."""
    if name not in REWARD_NAMES:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARD_NAMES))}")
    if name not in _REGISTRY:
        raise ValueError(
            f"reward {name!r} has no in-process implementation; start its reward server "
            f"(`flowgrpo serve-reward {name}`) and pass its URL as an endpoint"
        )
    return _REGISTRY[name](**options)


def build_rewards(
    weights: Mapping[str, float],
    endpoints: Mapping[str, str] | None = None,
    remote_factory: Callable[[str, str], Reward] | None = None,
) -> MultiReward:
    """The weighted reward of a config: each name is served by its endpoint URL if one is given, else
    computed in-process. ``remote_factory(name, url)`` builds the HTTP client reward."""
    endpoints = endpoints or {}
    components: dict[str, tuple[Reward, float]] = {}
    for name, weight in weights.items():
        if name in endpoints:
            if remote_factory is None:
                raise ValueError(f"reward {name!r} has an endpoint but no remote client was given")
            components[name] = (remote_factory(name, endpoints[name]), float(weight))
        else:
            components[name] = (build_reward(name), float(weight))
    return MultiReward(components)


register_reward("jpeg_compressibility", JpegCompressibility)
register_reward("jpeg_incompressibility", JpegIncompressibility)
register_reward("brightness", Brightness)


def _lazy(module: str, attr: str) -> Callable[..., Reward]:
    """A factory importing its reward on first use, so the registry costs no torch/onnx import."""

    def factory(**options) -> Reward:
        import importlib

        return getattr(importlib.import_module(module), attr)(**options)

    factory.__qualname__ = f"{module}.{attr}"
    return factory


register_reward("ocr", _lazy("flowgrpo_core.rewards.ocr", "OcrReward"))
register_reward("clipscore", _lazy("flowgrpo_core.rewards.clip_rewards", "ClipScore"))
register_reward("pickscore", _lazy("flowgrpo_core.rewards.clip_rewards", "PickScore"))
register_reward("aesthetic", _lazy("flowgrpo_core.rewards.clip_rewards", "Aesthetic"))
register_reward("hpsv2", _lazy("flowgrpo_core.rewards.clip_rewards", "HPSv2"))
register_reward("imagereward", _lazy("flowgrpo_core.rewards.imagereward", "ImageReward"))
register_reward("unifiedreward", _lazy("flowgrpo_core.rewards.unifiedreward", "UnifiedReward"))
register_reward("geneval", _lazy("flowgrpo_core.rewards.geneval", "GenEvalReward"))
register_reward("shapes_geneval", _lazy("flowgrpo_core.rewards.geneval", "ShapesGenEvalReward"))

__all__ = [
    "REWARD_NAMES",
    "MultiReward",
    "Reward",
    "RewardOutput",
    "available_in_process",
    "build_reward",
    "build_rewards",
    "register_reward",
]
