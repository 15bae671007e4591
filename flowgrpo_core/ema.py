"""Exponential moving average of the trainable weights, used for evaluation (docs/algorithm.md sect. 4).

Following the reference, the average is updated every ``update_interval`` optimiser steps, and its
decay warms up as ``min(decay, (1 + n) / (10 + n))`` so the first updates do not stay glued to the
initial weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, parameters: dict[str, nn.Parameter], decay: float, update_interval: int) -> None:
        self.parameters = parameters
        self.decay = decay
        self.update_interval = update_interval
        self.shadow = {name: p.detach().float().clone() for name, p in parameters.items()}
        self.optimizer_steps = 0
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def step(self) -> None:
        """Call after every optimiser step."""
        self.optimizer_steps += 1
        if self.optimizer_steps % self.update_interval:
            return
        decay = self.current_decay()
        for name, param in self.parameters.items():
            self.shadow[name].lerp_(param.detach().float(), 1 - decay)
        self.updates += 1

    def swapped_in(
        self, writing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    ) -> contextlib.AbstractContextManager[None]:
        """Temporarily load the averaged weights into the model (for evaluation or export). ``writing()``
        wraps each write of whole weights (ZeRO-3: a gather that writes them back into every rank's slice)."""
        return swapped_weights(self.parameters, self.shadow, writing)

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow), "optimizer_steps": self.optimizer_steps, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the trainable weights: {sorted(missing)[:5]}")
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}
        self.optimizer_steps = int(state["optimizer_steps"])
        self.updates = int(state["updates"])


@contextlib.contextmanager
@torch.no_grad()
def swapped_weights(
    parameters: dict[str, nn.Parameter],
    weights: dict[str, torch.Tensor],
    writing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[None]:
    """Temporarily copy ``weights`` into ``parameters`` (same names), restoring the parameters' values after.
    The copies happen outside autograd: a graph must not be built across the swap. ``writing()`` wraps each
    write of whole weights (ZeRO-3: a gather that writes them back into every rank's slice)."""
    with writing():
        backup = {name: p.detach().clone() for name, p in parameters.items()}
        for name, param in parameters.items():
            param.copy_(weights[name].to(param.dtype))
    try:
        yield
    finally:
        with writing():
            for name, param in parameters.items():
                param.copy_(backup[name])
