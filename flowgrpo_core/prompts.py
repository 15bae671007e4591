"""Prompt sets: where training and evaluation prompts (and their metadata) come from.

A spec is ``builtin:<name>`` or a file: ``.txt`` (one prompt per line), ``.jsonl`` (objects with
``prompt`` and optional ``metadata``) or ``.parquet`` (the prompt-set schema of
``flowgrpo_core.evaluation.prompt_sets``). Generators of the GenEval and OCR sets register themselves here
through :func:`register_prompt_set`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]
        if len(self.metadata) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.metadata)} metadata entries")

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices: list[int]) -> PromptSet:
        return PromptSet([self.prompts[i] for i in indices], [self.metadata[i] for i in indices])


# ddpo-pytorch's simple animals: short prompts whose images a tiny model can tell apart.
ANIMALS = [
    "cat",
    "dog",
    "horse",
    "monkey",
    "rabbit",
    "zebra",
    "spider",
    "bird",
    "sheep",
    "deer",
    "cow",
    "goat",
    "lion",
    "tiger",
    "bear",
    "raccoon",
    "fox",
    "wolf",
    "lizard",
    "beetle",
    "ant",
    "butterfly",
    "fish",
    "shark",
    "whale",
    "dolphin",
    "squirrel",
    "mouse",
    "rat",
    "snake",
    "turtle",
    "frog",
    "chicken",
    "duck",
    "goose",
    "bee",
    "pig",
    "turkey",
    "fly",
    "llama",
    "camel",
    "bat",
    "gorilla",
    "hedgehog",
    "kangaroo",
]

_BUILTINS: dict[str, Callable[[], PromptSet]] = {
    "animals": lambda: PromptSet([f"a photo of a {animal}" for animal in ANIMALS]),
}


def register_prompt_set(name: str, factory: Callable[[], PromptSet]) -> None:
    _BUILTINS[name] = factory


def _register_generated_sets() -> None:
    # The GenEval, OCR, shapes and general sets register themselves on import (kept lazy: pyarrow).
    import flowgrpo_core.evaluation.prompt_sets  # noqa: F401


def builtin_names() -> list[str]:
    _register_generated_sets()
    return sorted(_BUILTINS)


def load_prompts(spec: str) -> PromptSet:
    """Load a prompt set; errors name the spec, the file and the line."""
    if spec.startswith("builtin:"):
        _register_generated_sets()
        name = spec[len("builtin:") :]
        if name not in _BUILTINS:
            raise ValueError(f"unknown prompt set {spec!r}; builtin sets: {', '.join(builtin_names())}")
        prompts = _BUILTINS[name]()
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {spec!r} does not exist")
        if path.suffix == ".txt":
            prompts = PromptSet([line.strip() for line in path.read_text().splitlines() if line.strip()])
        elif path.suffix == ".jsonl":
            prompts = _read_jsonl(path)
        elif path.suffix == ".parquet":
            from flowgrpo_core.evaluation.prompt_sets import read_prompt_parquet

            prompts = read_prompt_parquet(path)
        else:
            raise ValueError(
                f"prompt file {spec!r}: unsupported extension {path.suffix!r} (use .txt, .jsonl or .parquet)"
            )
    if not prompts.prompts:
        raise ValueError(f"prompt set {spec!r} is empty")
    return prompts


def _read_jsonl(path: Path) -> PromptSet:
    prompts, metadata = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}:{number}: expected an object with a non-empty string 'prompt'")
        meta = row.get("metadata", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{path}:{number}: 'metadata' must be an object")
        prompts.append(row["prompt"])
        metadata.append(meta)
    return PromptSet(prompts, metadata)


def draw_prompts(prompt_set: PromptSet, count: int, generator: torch.Generator) -> list[int]:
    """Indices of ``count`` prompts: without replacement while the set lasts, then another pass."""
    order: list[int] = []
    while len(order) < count:
        order += torch.randperm(len(prompt_set), generator=generator).tolist()
    return order[:count]
