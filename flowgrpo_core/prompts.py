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

    def named(self, texts: list[str]) -> PromptSet:
        """The prompts with these texts (the first of each), with their metadata; KeyError names the missing."""
        missing = [t for t in texts if t not in self.prompts]
        if missing:
            raise KeyError(f"not in the prompt set: {', '.join(map(repr, missing))}")
        return self.take([self.prompts.index(t) for t in texts])


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


def draw_prompts(
    prompt_set: PromptSet, count: int, generator: torch.Generator, by_tag: bool = False
) -> list[int]:
    """Indices of ``count`` prompts: without replacement while the set lasts, then another pass.

    ``by_tag``: as many prompts of each metadata ``tag`` as the count allows (GenEval's overall accuracy is a
    mean over tasks, while a generated training set holds far more prompts of some tasks than of others):
    the tags take turns in a random order, each drawing from its own shuffled prompts.
    """
    if not by_tag:
        order: list[int] = []
        while len(order) < count:
            order += torch.randperm(len(prompt_set), generator=generator).tolist()
        return order[:count]
    groups = tag_groups(prompt_set)
    queues: list[list[int]] = [[] for _ in groups]
    chosen: list[int] = []
    while len(chosen) < count:
        for g in torch.randperm(len(groups), generator=generator).tolist():
            if not queues[g]:
                queues[g] = [
                    groups[g][i] for i in torch.randperm(len(groups[g]), generator=generator).tolist()
                ]
            chosen.append(queues[g].pop())
    return chosen[:count]


def tag_groups(prompt_set: PromptSet) -> list[list[int]]:
    """Prompt indices grouped by metadata ``tag``, in sorted tag order; an error names an untagged prompt."""
    groups: dict[str, list[int]] = {}
    for i, meta in enumerate(prompt_set.metadata):
        tag = meta.get("tag")
        if not isinstance(tag, str):
            raise ValueError(
                f"prompt {i} ({prompt_set.prompts[i]!r}) has no metadata 'tag': drawing by tag "
                "(prompts.balance_tags) needs one on every prompt"
            )
        groups.setdefault(tag, []).append(i)
    return [groups[t] for t in sorted(groups)]
