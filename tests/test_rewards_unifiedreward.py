"""The UnifiedReward client against an OpenAI-compatible chat endpoint on 127.0.0.1.

sglang needs a GPU and the 7B judge, which are not here; the endpoint below speaks the same
chat-completions protocol and answers like the judge (a reasoning text ending in ``Final Score: x``),
with a score computed from the image it received, so the test checks what the client really sends."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image
from reward_fixtures import serving

from flowgrpo_core.retrying_http import RewardServerError
from flowgrpo_core.rewards import build_reward
from flowgrpo_core.rewards.unifiedreward import PROMPT_TEMPLATE, UnifiedReward, parse_score
from flowgrpo_core.serving.client import RemoteReward


class ChatEndpoint(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: judges brightness (1 + 4 * mean / 255, one decimal)."""

    requests: ClassVar[list[dict]] = []
    failures_left: ClassVar[dict[str, int]] = {"flaky": 1}
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        content = body["messages"][0]["content"]
        url = content[0]["image_url"]["url"]
        caption = content[1]["text"].rsplit("Text Caption: [", 1)[1].rstrip("]")
        if "flaky" in caption:
            with self.lock:
                fail = self.failures_left["flaky"] > 0
                self.failures_left["flaky"] -= 1
            if fail:
                return self._send(503, {"error": {"message": "server overloaded"}})
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        score = round(1 + 4 * float(np.asarray(image).mean()) / 255, 1)
        text = (
            "I cannot judge this."
            if "unparseable" in caption
            else f"The image matches well.\nFinal Score: {score}"
        )
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def endpoint():
    ChatEndpoint.requests = []
    ChatEndpoint.failures_left = {"flaky": 1}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ChatEndpoint)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def grey(level: int, size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), (level, level, level))


def test_parse_score():
    assert parse_score("blah\nFinal Score: 4.5") == 4.5
    assert parse_score("Final Score: **3**") == 3.0
    assert parse_score("Final Score: 2 ... on reflection, Final Score: 4") == 4.0
    assert parse_score("Final Score: 7") is None and parse_score("Final Score: 0.5") is None
    assert parse_score("no score here") is None and parse_score("") is None


def test_scores_follow_the_judge_and_requests_have_the_expected_shape(endpoint):
    reward = UnifiedReward(url=endpoint, model="UnifiedReward-7b-v1.5", api_key="k", max_concurrency=4)
    images = [grey(0), grey(255), grey(128), grey(64)]
    prompts = ["a black square", "a white square", "a grey square", "a dark square"]
    out = reward(images, prompts)
    expected = [round(1 + 4 * level / 255, 1) / 5 for level in (0, 255, 128, 64)]
    np.testing.assert_allclose(out.scores, expected)
    assert out.details["unparsed"] == [False] * 4 and out.details["judge_score"][1] == 5.0
    assert len(ChatEndpoint.requests) == 4
    for request in ChatEndpoint.requests:
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k"
        body = request["body"]
        assert body["model"] == "UnifiedReward-7b-v1.5" and body["temperature"] == 0
        image_part, text_part = body["messages"][0]["content"]
        sent = Image.open(io.BytesIO(base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])))
        assert sent.format == "PNG" and sent.size == (512, 512)  # resized as Flow-GRPO does
        caption = text_part["text"].rsplit("[", 1)[1].rstrip("]")
        assert caption in prompts and text_part["text"] == PROMPT_TEMPLATE.format(prompt=caption)


def test_unparseable_answers_are_flagged_and_5xx_is_retried(endpoint):
    reward = UnifiedReward(url=endpoint, unparsed_score=0.0)
    out = reward([grey(255), grey(255)], ["unparseable caption", "a flaky caption"])
    assert out.scores[0] == 0.0 and out.details["unparsed"] == [True, False]
    assert out.scores[1] == pytest.approx(1.0)
    assert sum("flaky" in r["body"]["messages"][0]["content"][1]["text"] for r in ChatEndpoint.requests) == 2


def test_dead_endpoint_fails_with_the_reward_name_and_url():
    reward = UnifiedReward(url="http://127.0.0.1:9/v1", deadline_s=1.0)
    with pytest.raises(
        RewardServerError, match=r"reward 'unifiedreward' at http://127.0.0.1:9/v1: .*deadline 1 s"
    ):
        reward([grey(0)], ["x"])


def test_served_behind_a_reward_server(endpoint):
    reward = build_reward("unifiedreward", url=endpoint)
    with serving(reward) as server:
        out = RemoteReward("unifiedreward", server.url)([grey(255), grey(0)], ["white", "black"])
    np.testing.assert_allclose(out.scores, [1.0, 0.2])
