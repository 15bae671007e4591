"""One HTTP call with retries, backoff and a deadline; shared by the reward client and the UnifiedReward
judge client.

Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter until the
deadline; then ``RewardServerError`` names the reward, the URL, the attempts and the last error. Other
4xx answers mean the request itself is wrong and are raised at once (retrying cannot help). A peer's
client retried 1000 times with no deadline, which hangs a training run on a dead server.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import time
import urllib.parse
from dataclasses import dataclass

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class RewardServerError(RuntimeError):
    """A reward server could not answer; the message names the reward and the URL."""

    def __init__(
        self, name: str, url: str, message: str, status: int | None = None, attempts: int = 1
    ) -> None:
        super().__init__(f"reward {name!r} at {url}: {message}")
        self.name, self.url, self.status, self.attempts = name, url, status, attempts


@dataclass(frozen=True)
class RetryPolicy:
    """timeout_s: socket timeout of one attempt; deadline_s: total time of one call, backoff included;
    backoff_s / max_backoff_s: first and largest pause between attempts (doubling, with jitter)."""

    timeout_s: float = 300.0
    deadline_s: float = 900.0
    backoff_s: float = 0.5
    max_backoff_s: float = 15.0


def check_url(url: str, name: str) -> urllib.parse.SplitResult:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ValueError(f"reward {name!r}: endpoint {url!r} is not an http(s) URL")
    return parsed


def call(
    name: str,
    url: str,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str] | None = None,
    policy: RetryPolicy = RetryPolicy(),
    deadline_s: float | None = None,
) -> bytes:
    """``method url+path`` until a 2xx answer (its body is returned) or the deadline."""
    parsed = check_url(url, name)
    deadline_s = policy.deadline_s if deadline_s is None else deadline_s
    start = time.monotonic()
    attempt, last_error = 0, "no attempt made"
    while True:
        attempt += 1
        remaining = deadline_s - (time.monotonic() - start)
        try:
            status, answer = _send(
                parsed, method, path, body, headers or {}, max(0.1, min(policy.timeout_s, remaining))
            )
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut mid-answer
            last_error = f"{type(error).__name__}: {error}"
        else:
            if status < 300:
                return answer
            message = error_message(answer)
            if status not in RETRY_STATUSES:
                raise RewardServerError(
                    name, url, f"HTTP {status} on {method} {path}: {message}", status, attempt
                )
            last_error = f"HTTP {status}: {message}"
        delay = min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        elapsed = time.monotonic() - start
        if elapsed + delay >= deadline_s:
            raise RewardServerError(
                name,
                url,
                f"{method} {path} failed {attempt} time(s) in {elapsed:.1f} s (deadline {deadline_s:g} s); "
                f"last error: {last_error}",
                attempts=attempt,
            )
        time.sleep(delay)


def _send(
    parsed, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float
) -> tuple[int, bytes]:
    connection_class = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parsed.hostname, parsed.port, timeout=timeout)
    headers = {"Accept": "application/json", **headers}
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    try:
        # the server may answer early (e.g. 413) and close while we send: that answer is read below
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.request(method, parsed.path.rstrip("/") + path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def error_message(answer: bytes) -> str:
    """The ``error`` of a JSON error answer (ours, or OpenAI's ``{"error": {"message"}}``), else its start."""
    try:
        error = json.loads(answer)["error"]
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return answer[:200].decode("utf-8", "replace") or "(empty answer)"
