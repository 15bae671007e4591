"""A prompt set and how an epoch draws from it: the prompts, each with its metadata (GenEval's
``{"tag", "include", ...}``, OCR's ``{"tag": "ocr", "text"}``, or nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# the reward servers refuse longer prompts (serving.protocol's max_prompt_chars), and a tokenizer can take
# minutes over a multi-megabyte one: prompt files are checked against it when read
MAX_PROMPT_CHARS = 4096


def check_prompt_length(prompt: str, where: str) -> None:
    """Refuse a prompt over ``MAX_PROMPT_CHARS``; ``where`` names its file and line or row."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"{where}: the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS} "
            "(what the reward servers accept)"
        )


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
