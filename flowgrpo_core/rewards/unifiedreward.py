"""UnifiedReward: a vision-language judge (UnifiedReward-7b, a Qwen2.5-VL fine-tune) asked for a 1-5 score.

The judge runs in sglang on a GPU machine (``images/unifiedreward-sglang.sh``), which speaks the OpenAI
chat-completions API; this reward is its client. Each image is one chat request (the image as a PNG
data URL, then the template with the caption), sent ``max_concurrency`` at a time so sglang can batch
them; the answer's ``Final Score: x`` is parsed and divided by 5, as Flow-GRPO does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from flowgrpo_core.rewards.base import Reward, RewardOutput

# The wording UnifiedReward was trained to answer (its pointwise image-generation task).
PROMPT_TEMPLATE = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to evaluate "
    "this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with "
    "the provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as "
    "described in the caption.\n2. Overall Image Quality: Examine the visual quality of this image, including "
    "clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, "
    "assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
_SCORE = re.compile(r"Final Score:\s*\**\s*([0-9]+(?:\.[0-9]+)?)")
API_KEY_ENV = "UNIFIEDREWARD_API_KEY"


def parse_score(text: str, low: float = 1.0, high: float = 5.0) -> float | None:
    """The number after the last ``Final Score:`` if it lies in [low, high], else None."""
    matches = _SCORE.findall(text or "")
    if not matches:
        return None
    value = float(matches[-1])
    return value if low <= value <= high else None


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class UnifiedReward(Reward):
    """Client of an OpenAI-compatible UnifiedReward endpoint.

    Args:
        url: base URL of the API, e.g. ``http://10.0.0.5:17140/v1``.
        model: the served model name (sglang's ``--served-model-name``).
        api_key: bearer key; default: ``$UNIFIEDREWARD_API_KEY`` (sglang's ``--api-key``), or none.
        max_concurrency: requests in flight at once.
        image_size: images are resized to this square side before sending (Flow-GRPO: 512); 0 keeps them.
        unparsed_score: score of an answer without a valid ``Final Score`` (Flow-GRPO: 0); the
            ``unparsed`` detail flags those images, so a misbehaving judge shows in the logs.
        timeout_s, deadline_s: per attempt and per request, retries included.
    """

    name = "unifiedreward"

    def __init__(
        self,
        url: str = "http://127.0.0.1:17140/v1",
        model: str = "UnifiedReward-7b-v1.5",
        api_key: str | None = None,
        max_concurrency: int = 16,
        image_size: int = 512,
        unparsed_score: float = 0.0,
        timeout_s: float = 120.0,
        deadline_s: float = 600.0,
        max_tokens: int = 512,
    ) -> None:
        from flowgrpo_core.retrying_http import RetryPolicy, check_url

        check_url(url, self.name)
        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.max_concurrency = max_concurrency
        self.image_size = image_size
        self.unparsed_score = unparsed_score
        self.max_tokens = max_tokens
        self.policy = RetryPolicy(timeout_s=timeout_s, deadline_s=deadline_s)
        self.info = {"url": self.url, "model": model}

    def request_body(self, image: Image.Image, prompt: str) -> dict:
        """The chat-completions request for one image (greedy decoding: the same image gets the same score)."""
        if self.image_size:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                        {"type": "text", "text": PROMPT_TEMPLATE.format(prompt=prompt)},
                    ],
                }
            ],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }

    def judge(self, image: Image.Image, prompt: str) -> str:
        """The judge's answer text for one image."""
        from flowgrpo_core.retrying_http import RewardServerError, call

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = json.dumps(self.request_body(image, prompt)).encode("utf-8")
        answer = call(self.name, self.url, "POST", "/chat/completions", body, headers, self.policy)
        try:
            return str(json.loads(answer)["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise RewardServerError(self.name, self.url, f"not a chat completion: {answer[:200]!r}") from None

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict]
    ) -> RewardOutput:
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(images)))) as pool:
            answers = list(pool.map(self.judge, images, prompts))
        parsed = [parse_score(text) for text in answers]
        scores = np.array([self.unparsed_score if p is None else p / 5.0 for p in parsed])
        return RewardOutput(
            scores=scores,
            details={
                "judge_score": parsed,
                "unparsed": [p is None for p in parsed],
                "judge_text": [a[-300:] for a in answers],
            },
        )
