"""The reward client: a Reward whose scores come from a reward server (retries: see retrying_http)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from flowgrpo_core.retrying_http import RetryPolicy, RewardServerError, call, check_url
from flowgrpo_core.rewards.base import Reward, RewardOutput
from flowgrpo_core.serving.batching import concat_outputs
from flowgrpo_core.serving.protocol import decode_response, encode_request

TOKEN_ENV = "FLOWGRPO_REWARD_TOKEN"

__all__ = ["TOKEN_ENV", "RemoteReward", "RetryPolicy", "RewardClient", "RewardServerError"]


class RewardClient:
    """HTTP client of one reward server.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:18001``.
        name: the reward's name, for error messages.
        token: bearer token; default: the ``FLOWGRPO_REWARD_TOKEN`` environment variable, if set.
        timeout_s: socket timeout of one attempt (connect and each read).
        deadline_s: total time of one request, retries and backoff included.
        backoff_s, max_backoff_s: first and largest pause between attempts.
        chunk_size: images per request; default: the server's ``limits.max_items`` from ``/health``.
    """

    def __init__(
        self,
        url: str,
        name: str = "reward",
        token: str | None = None,
        timeout_s: float = 300.0,
        deadline_s: float = 900.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
        chunk_size: int | None = None,
    ) -> None:
        check_url(url, name)
        self.url = url.rstrip("/")
        self.name = name
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.policy = RetryPolicy(timeout_s, deadline_s, backoff_s, max_backoff_s)
        self.chunk_size = chunk_size

    def _call(self, method: str, path: str, body: bytes | None, deadline_s: float | None = None) -> bytes:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return call(self.name, self.url, method, path, body, headers, self.policy, deadline_s)

    def health(self, deadline_s: float | None = None) -> dict[str, Any]:
        """The server's ``/health`` document; with ``deadline_s``, keeps polling a server that is still
        loading its model until then."""
        return json.loads(self._call("GET", "/health", None, deadline_s))

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> RewardOutput:
        """Scores of B images (NaN where the server sent null), in requests of at most ``chunk_size``."""
        if self.chunk_size is None:
            self.chunk_size = int(self.health()["limits"]["max_items"])
        metadata = list(metadata) if metadata is not None else None
        outputs: list[RewardOutput] = []
        for start in range(0, len(images), self.chunk_size):
            stop = start + self.chunk_size
            body = encode_request(
                images[start:stop], prompts[start:stop], metadata[start:stop] if metadata else None
            )
            answer = self._call("POST", "/score", body)
            try:
                scores, details = decode_response(answer, len(images[start:stop]))
            except ValueError as error:
                raise RewardServerError(self.name, self.url, f"malformed answer: {error}") from None
            outputs.append(RewardOutput(scores=scores, details=details))
        return concat_outputs(outputs) if outputs else RewardOutput(scores=np.zeros(0))


class RemoteReward(Reward):
    """A Reward served over HTTP; ``RemoteReward(name, url)`` is the ``remote_factory`` of ``build_rewards``."""

    def __init__(self, name: str, url: str, **client_options: Any) -> None:
        self.name = name
        self.client = RewardClient(url, name=name, **client_options)

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        return self.client.score(images, prompts, metadata)
