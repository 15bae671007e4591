"""Reward servers on 127.0.0.1: the protocol, a fuzz of malformed requests, concurrent clients,
retries against a killed server, bearer tokens, and the local process manager."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from reward_fixtures import free_port, random_image, render_text, serving

from flowgrpo_core.rewards import build_reward, build_rewards
from flowgrpo_core.rewards.base import Reward, RewardOutput
from flowgrpo_core.rewards.jpeg import JpegCompressibility
from flowgrpo_core.serving.batching import MicroBatcher
from flowgrpo_core.serving.client import RemoteReward, RewardClient, RewardServerError
from flowgrpo_core.serving.manager import LocalRewardServers, stop_servers
from flowgrpo_core.serving.protocol import Limits, ProtocolError, decode_request, encode_image, encode_request
from flowgrpo_core.serving.server import RewardServer

TOKEN = "s3cret-token"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def crafted_png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG with valid chunk CRCs whose header declares any size; its pixel data is ``idat``."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = idat if idat is not None else zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- raw HTTP, so that the fuzz controls every byte ----------------------------------------------


def raw_request(port: int, data: bytes, half_close: bool = False, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes, return (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before reading everything: the answer is still readable
        answer = b""
        while True:
            head, sep, body = answer.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    None,
                )
                if length is not None and len(body) >= length:
                    return int(head.split(b" ", 2)[1]), body[:length]
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            answer += chunk
    if not answer:
        raise ConnectionError("no answer")
    return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[2]


def http_post(path: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {TOKEN}",
        "Content-Length": str(len(body)),
        **(headers or {}),
    }
    lines += [f"{key}: {value}" for key, value in headers.items() if value is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def json_body(payload) -> bytes:
    return json.dumps(payload).encode()


def malformed_requests(valid_png: str, limits: Limits) -> list[tuple[str, bytes, bool]]:
    """(description, raw request, half_close) for at least 200 requests that must all be refused."""
    rng = np.random.default_rng(0)
    valid = encode_request([Image.new("RGB", (8, 8))], ["p"])
    good_png = base64.b64decode(valid_png)
    cases: list[tuple[str, bytes | dict, dict | None]] = []

    def add(name: str, body, headers: dict | None = None) -> None:
        cases.append((name, body, headers))

    for i in range(30):  # not JSON at all
        add(f"garbage {i}", b"{" + bytes(rng.integers(0, 256, int(rng.integers(1, 200))).astype(np.uint8)))
    for i in range(30):  # a valid request cut short
        add(f"truncated json {i}", valid[: int(rng.integers(1, len(valid) - 1))])
    for i, doc in enumerate([[], "text", 12, None, True, [1, 2], "", 1.5]):
        add(f"top level {i}", json_body(doc))
    add("empty body", b"")
    add("not utf-8", b'{"prompts": ["\xff\xfe"], "images": []}')
    add("deep nesting", b"[" * 200_000)
    add("deep nesting in a field", b'{"prompts": ' + b"[" * 100_000 + b"]" * 100_000 + b', "images": []}')
    for missing in ({}, {"prompts": ["p"]}, {"images": [valid_png]}):
        add(f"missing field {sorted(missing)}", json_body(missing))
    add("unknown field", json_body({"prompts": ["p"], "images": [valid_png], "extra": 1}))
    for i, (prompts, images) in enumerate(
        [
            ("p", [valid_png]),
            (["p"], valid_png),
            ({"a": 1}, [valid_png]),
            (["p"], {"a": 1}),
            ([1], [valid_png]),
            ([None], [valid_png]),
            ([["p"]], [valid_png]),
            (["p"], [1]),
            (["p"], [None]),
            (["p"], [[valid_png]]),
            (["p"], [{"png": valid_png}]),
            ([float("nan")], [valid_png]),
            ([True], [valid_png]),
            (["p"], [3.5]),
        ]
    ):
        add(f"wrong types {i}", json.dumps({"prompts": prompts, "images": images}).encode())
    for i, metadata in enumerate(["m", 3, [1], ["x"], [[]], [None], {"a": 1}]):
        add(f"bad metadata {i}", json_body({"prompts": ["p"], "images": [valid_png], "metadata": metadata}))
    for i, text in enumerate(
        [
            "!!!!",
            "abc",
            "a===",
            "é",
            " " * 8,
            "AAAA AAAA",
            "data:image/png;base64,@@",
            "====",
            "A",
            "Zm9v\n" * 3,
        ]
    ):
        add(f"bad base64 {i}", json_body({"prompts": ["p"], "images": [text]}))
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    gif = io.BytesIO()
    Image.new("P", (8, 8)).save(gif, format="GIF")
    not_png = [
        jpeg.getvalue(),
        gif.getvalue(),
        b"",
        b"\x89PNG",
        b"\x89PNG\r\n\x1a\n",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"GIF89a" + b"\x00" * 40,
        b"BM" + b"\x00" * 60,
        b"%PDF-1.4",
        good_png[::-1],
    ]
    not_png += [bytes(rng.integers(0, 256, 64).astype(np.uint8)) for _ in range(10)]
    for i, data in enumerate(not_png):
        add(f"not a png {i}", json_body({"prompts": ["p"], "images": [b64(data)]}))
    for i in range(20):  # a real PNG cut short (header intact, pixels missing)
        cut = int(rng.integers(34, len(good_png) - 13))
        add(f"truncated png {i}", json_body({"prompts": ["p"], "images": [b64(good_png[:cut])]}))
    for i, idat in enumerate([b"not zlib at all", b"", b"\x78\x9c\xff\xff\xff", zlib.compress(b"\x00" * 3)]):
        add(f"bad pixel data {i}", json_body({"prompts": ["p"], "images": [b64(crafted_png(4, 4, idat))]}))
    for i, (w, h) in enumerate(
        [(100_000, 100_000), (2**31 - 1, 1), (1, 2**31 - 1), (5000, 10), (3000, 3000), (0, 10), (10, 0)]
    ):
        add(f"bomb or empty header {i}", json_body({"prompts": ["p"], "images": [b64(crafted_png(w, h))]}))
    for i, (n_prompts, n_images) in enumerate([(2, 1), (1, 2), (0, 1), (3, 2)]):
        add(
            f"count mismatch {i}", json_body({"prompts": ["p"] * n_prompts, "images": [valid_png] * n_images})
        )
    add("metadata count mismatch", json_body({"prompts": ["p"], "images": [valid_png], "metadata": [{}, {}]}))
    add("no images", json_body({"prompts": [], "images": []}))
    add(
        "too many images",
        json_body(
            {"prompts": ["p"] * (limits.max_items + 1), "images": [valid_png] * (limits.max_items + 1)}
        ),
    )
    add(
        "prompt too long",
        json_body({"prompts": ["x" * (limits.max_prompt_chars + 1)], "images": [valid_png]}),
    )
    add(
        "metadata too large",
        json_body(
            {"prompts": ["p"], "images": [valid_png], "metadata": [{"k": "x" * limits.max_metadata_bytes}]}
        ),
    )
    add("body over the limit", b"{" + b" " * limits.max_body_bytes)
    body = json_body({"prompts": ["p"], "images": [valid_png]})
    for i, content_type in enumerate(
        ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None, "application/jsonx"]
    ):
        add(f"content type {i}", body, {"Content-Type": content_type})
    for i, length in enumerate([None, "abc", "-5", "1e3", "0x10", " ", "12 34"]):
        add(f"content length {i}", body, {"Content-Length": length})
    add("chunked", body, {"Transfer-Encoding": "chunked"})
    for i, auth in enumerate([None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"bearer {TOKEN}x", TOKEN]):
        add(f"auth {i}", body, {"Authorization": auth})

    requests = [(name, http_post("/score", raw, headers), False) for name, raw, headers in cases]
    for i, (method, path) in enumerate(
        [
            ("POST", "/scores"),
            ("POST", "/"),
            ("PUT", "/score"),
            ("DELETE", "/score"),
            ("GET", "/score"),
            ("GET", "/nope"),
            ("PATCH", "/score"),
            ("POST", "/health"),
            ("FOO", "/score"),
            ("TRACE", "/score"),
            ("CONNECT", "127.0.0.1:1"),
        ]
    ):
        requests.append((f"route {i}", http_post(path, body, method=method), False))
    raw_lines = [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"POST /score HTTP/9.9\r\n\r\n",
        b"POST /score HTTP/2.0\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
        b"POST /score HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n",
        b"POST /score HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
    ]
    requests += [(f"bad request line {i}", line, False) for i, line in enumerate(raw_lines)]
    # a body shorter than its Content-Length: the client stops sending (half-close)
    requests += [
        (f"short body {i}", http_post("/score", body[:n], {"Content-Length": str(len(body))}), True)
        for i, n in enumerate([0, 10, len(body) - 1])
    ]
    # a client that stalls mid-body: the server stops waiting after its read timeout
    requests.append(
        ("stalled body", http_post("/score", body[:20], {"Content-Length": str(len(body))}), False)
    )
    # a body longer than its Content-Length: the JSON read is cut
    requests += [
        (f"long body {i}", http_post("/score", body, {"Content-Length": str(n)}), False)
        for i, n in enumerate([5, len(body) - 2])
    ]
    return requests


@pytest.fixture(scope="module")
def jpeg_server():
    limits = Limits(
        max_body_bytes=4 * 2**20,
        max_items=8,
        max_image_pixels=2048 * 2048,
        max_prompt_chars=512,
        max_metadata_bytes=1024,
    )
    with serving(
        JpegCompressibility(), limits=limits, token=TOKEN, read_timeout_s=1.0, max_batch=8
    ) as server:
        yield server


def test_fuzz_malformed_requests_get_4xx_and_server_stays_healthy(jpeg_server):
    port = jpeg_server.httpd.server_address[1]
    valid_png = encode_image(Image.new("RGB", (8, 8), (10, 20, 30)))
    requests = malformed_requests(valid_png, jpeg_server.limits)
    assert len(requests) >= 200
    answers = {}
    for name, data, half_close in requests:
        status, body = raw_request(port, data, half_close)
        answers[name] = status
        assert 400 <= status < 500, f"{name}: HTTP {status} {body[:300]!r}"
        message = json.loads(body)["error"]
        assert message and "Traceback" not in message, name
    # spot checks: the right code for the right mistake
    assert (
        answers["bomb or empty header 0"] == 413
        and answers["too many images"] == 413
        and answers["body over the limit"] == 413
    )
    assert (
        answers["count mismatch 0"] == 422 and answers["auth 0"] == 401 and answers["content type 0"] == 415
    )
    assert (
        answers["content length 0"] == 411
        and answers["short body 1"] == 400
        and answers["stalled body"] == 408
        and answers["route 4"] == 405
        and answers["route 8"] == 405
    )
    assert (
        answers["bad base64 0"] == 400 and answers["not a png 0"] == 400 and answers["truncated png 0"] == 400
    )
    # the server survived: healthy, never ran the reward on bad input, and still scores correctly
    client = RewardClient(jpeg_server.url, "jpeg_compressibility", token=TOKEN)
    health = client.health()
    assert health["status"] == "ok" and health["stats"]["failures"] == 0 and health["stats"]["requests"] == 0
    images = [random_image(seed) for seed in range(3)]
    expected = JpegCompressibility()(images, ["a", "b", "c"]).scores
    np.testing.assert_array_equal(client.score(images, ["a", "b", "c"]).scores, expected)


def test_decompression_bomb_is_refused_from_its_header():
    bomb = crafted_png(
        60_000, 60_000, zlib.compress(b"\x00" * (10 * 2**20))
    )  # 10 MiB of zeros inflate, 3.6 GP declared
    body = json_body({"prompts": ["p"], "images": [b64(bomb)]})
    with pytest.raises(ProtocolError) as refused:
        decode_request(body, Limits())
    assert refused.value.status == 413 and "60000x60000" in refused.value.message


def test_protocol_round_trip_is_lossless():
    images = [random_image(seed, size=48) for seed in range(3)] + [Image.new("L", (5, 7), 128)]
    request = decode_request(encode_request(images, ["a", "b", "c", "d"], [{"tag": 1}, {}, {}, {}]), Limits())
    assert request.prompts == ["a", "b", "c", "d"] and request.metadata[0] == {"tag": 1}
    for sent, received in zip(images, request.images):
        assert received.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(received), np.asarray(sent.convert("RGB")))


# ---- concurrency and batching ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ocr_reward():
    return build_reward("ocr")


WORDS = [
    "Apple",
    "Kubeflow",
    "Orange 42",
    "Sunrise",
    "Mlflow",
    "Hello",
    "Rocket",
    "Garden",
    "Piano",
    "Winter",
    "Coffee",
    "Tiger",
    "Silver",
    "Planet",
    "Bridge",
    "Dragon",
]


def test_16_concurrent_clients_get_their_own_correct_scores(ocr_reward):
    images = [render_text(word, seed=i) for i, word in enumerate(WORDS)]
    with serving(ocr_reward, max_batch=8, max_wait_s=0.05) as server:

        def one_client(i: int) -> RewardOutput:
            # client i sends its own image twice: once with its own text, once with the next client's
            prompts = [f'a sign that says "{WORDS[i]}"', f'a sign that says "{WORDS[(i + 1) % 16]}"']
            return RemoteReward("ocr", server.url)([images[i]] * 2, prompts)

        start = threading.Barrier(16)

        def synchronised(i: int) -> RewardOutput:
            start.wait()
            return one_client(i)

        with ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(synchronised, range(16)))
        stats = server.batcher.stats.as_dict()
    for i, out in enumerate(outputs):
        assert out.details["target"] == [WORDS[i], WORDS[(i + 1) % 16]]
        assert out.scores[0] >= 0.9, (WORDS[i], out.details["ocr_text"])
        assert out.scores[1] < out.scores[0], (WORDS[i], out.details["ocr_text"])
    # 16 requests of 2 images were merged into model calls of up to 8
    assert (
        stats["requests"] == 16
        and stats["images"] == 32
        and stats["batches"] < 16
        and stats["largest_batch"] > 2
    )


def test_batcher_keeps_order_and_chunks_large_requests():
    seen: list[int] = []

    def score(images, prompts, metadata):
        seen.append(len(images))
        return RewardOutput(scores=[float(p) for p in prompts], details={"prompt": list(prompts)})

    batcher = MicroBatcher(score, max_batch=4, max_wait_s=0.05)
    futures = [
        batcher.submit([Image.new("RGB", (1, 1))] * n, [str(10 * k + j) for j in range(n)], [{}] * n)
        for k, n in enumerate([1, 2, 9, 1])
    ]
    outputs = [f.result(timeout=5) for f in futures]
    batcher.close()
    assert [o.scores.tolist() for o in outputs] == [[0.0], [10.0, 11.0], [20.0 + j for j in range(9)], [30.0]]
    assert outputs[2].details["prompt"] == [str(20 + j) for j in range(9)]
    assert max(seen) <= 4 and sum(seen) == 13


# ---- failures: retries, deadlines, errors -----------------------------------------------------------


class ExplodingReward(Reward):
    """A reward whose model crashes, with a secret in the message that must not reach the client."""

    name = "exploding"

    def score(self, images, prompts, metadata):
        raise RuntimeError("CUDA error at /secret/path/model.py line 7")


def test_reward_crash_is_a_500_without_traceback_and_the_client_gives_up(tmp_path):
    with serving(ExplodingReward()) as server:
        port = server.httpd.server_address[1]
        status, body = raw_request(
            port,
            http_post("/score", encode_request([Image.new("RGB", (4, 4))], ["p"]), {"Authorization": None}),
        )
        assert status == 500
        message = json.loads(body)["error"]
        assert "internal error (id" in message and "secret" not in message and "Traceback" not in message
        start = time.monotonic()
        with pytest.raises(RewardServerError) as failure:
            RemoteReward("exploding", server.url, deadline_s=1.5, backoff_s=0.1)(
                [Image.new("RGB", (4, 4))], ["p"]
            )
        assert time.monotonic() - start < 3.0
        assert (
            failure.value.attempts >= 3
            and "HTTP 500" in str(failure.value)
            and server.url in str(failure.value)
        )


def test_4xx_is_raised_at_once_with_the_server_message(ocr_reward):
    with serving(ocr_reward) as server:
        start = time.monotonic()
        with pytest.raises(RewardServerError) as failure:
            RemoteReward("ocr", server.url)([Image.new("RGB", (32, 32))], ["no quotes in this prompt"])
        assert time.monotonic() - start < 2.0
    assert failure.value.status == 422 and failure.value.attempts == 1
    assert "reward 'ocr' at http://127.0.0.1:" in str(failure.value) and "no text in double quotes" in str(
        failure.value
    )


def test_bearer_token_is_required_when_set():
    with serving(JpegCompressibility(), token=TOKEN) as server:
        images = [random_image(0)]
        with pytest.raises(RewardServerError, match="HTTP 401"):
            RewardClient(server.url, "jpeg", token="wrong").score(images, ["p"])
        assert RewardClient(server.url, "jpeg", token=TOKEN).score(images, ["p"]).scores.shape == (1,)
        assert RewardClient(server.url, "jpeg").health()["auth"] is True  # health needs no token


def test_client_rides_out_a_restart_within_its_deadline():
    port = free_port()
    first = RewardServer(JpegCompressibility(), port=port).start()
    client = RewardClient(
        f"http://127.0.0.1:{port}", "jpeg_compressibility", deadline_s=20, backoff_s=0.1, max_backoff_s=0.5
    )
    images = [random_image(1)]
    expected = client.score(images, ["p"]).scores
    first.stop()
    restarted: list[RewardServer] = []
    timer = threading.Timer(
        1.0, lambda: restarted.append(RewardServer(JpegCompressibility(), port=port).start())
    )
    timer.start()
    try:
        start = time.monotonic()
        np.testing.assert_array_equal(client.score(images, ["p"]).scores, expected)
        assert time.monotonic() - start >= 0.9  # it had to retry until the new server was up
    finally:
        timer.join()
        for server in restarted:
            server.stop()


def test_server_killed_mid_run_makes_the_client_retry_then_fail_clearly(tmp_path):
    servers = LocalRewardServers({"ocr": ["--max-batch", "4"]}, tmp_path, startup_timeout_s=60)
    url = servers.start()["ocr"]
    try:
        pid = servers.servers["ocr"].pid
        images = [render_text(word) for word in WORDS]  # seconds of OCR: the kill lands mid-request
        prompts = [f'"{word}"' for word in WORDS]
        reward = RemoteReward("ocr", url, timeout_s=30, deadline_s=4.0, backoff_s=0.2, max_backoff_s=0.5)
        monitor = RewardClient(url, "ocr", timeout_s=2)
        with ThreadPoolExecutor(1) as pool:
            start = time.monotonic()
            pending = pool.submit(reward, images, prompts)
            while monitor.health()["stats"]["requests"] < 1:  # the request is in, the model is working
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(RewardServerError) as failure:
                pending.result()
            elapsed = time.monotonic() - start
    finally:
        servers.stop()
    message = str(failure.value)
    assert f"reward 'ocr' at {url}" in message and "deadline 4 s" in message
    assert failure.value.attempts >= 3, message  # the cut request, then refused connections
    assert "Connection" in message or "RemoteDisconnected" in message
    assert 3.0 < elapsed < 6.0


# ---- the process manager and the command line ---------------------------------------------------------


def test_manager_starts_servers_and_stops_them_from_pid_files(tmp_path):
    servers = LocalRewardServers(
        ["jpeg_compressibility", "jpeg_incompressibility"], tmp_path / "run", startup_timeout_s=60
    )
    endpoints = servers.start()
    try:
        assert set(endpoints) == {"jpeg_compressibility", "jpeg_incompressibility"}
        images = [random_image(seed) for seed in range(2)]
        multi = build_rewards(
            {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}, endpoints, RemoteReward
        )
        out = multi(images, ["a", "b"])
        kb = np.array(JpegCompressibility()(images, ["a", "b"]).details["jpeg_kb"])
        np.testing.assert_allclose(out.scores, -kb / 500 + 0.5 * kb)  # flow_grpo's scales: -kB/500 and +kB
        assert out.details["jpeg_incompressibility/weighted"] == (0.5 * kb).tolist()
        pids = [s.pid for s in servers.servers.values()]
        # another process (the pipeline's exit handler) stops them from the pid files alone
        code = "import sys; from flowgrpo_core.serving.manager import stop_servers; print(stop_servers(sys.argv[1]))"
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True, timeout=60
        )
        assert "jpeg_compressibility" in done.stdout and "jpeg_incompressibility" in done.stdout, done.stderr
        for server in servers.servers.values():
            assert server.process.wait(timeout=10) == 0  # SIGTERM is a clean shutdown
        for url in endpoints.values():
            with pytest.raises(RewardServerError):
                RewardClient(url, "gone", deadline_s=0.5, backoff_s=0.1).health()
        assert stop_servers(tmp_path / "run") == [] and all(p not in (None, 0) for p in pids)
    finally:
        servers.stop()


def test_manager_reports_a_server_that_cannot_start(tmp_path):
    servers = LocalRewardServers({"ocr": ["--option", "rule=bogus"]}, tmp_path, startup_timeout_s=60)
    with pytest.raises(RuntimeError, match="unknown OCR rule 'bogus'"):
        servers.start()
    assert not list(tmp_path.glob("*.pid"))


def test_serve_reward_command_help_and_bad_options():
    help_text = subprocess.run(
        [sys.executable, "-m", "flowgrpo_core.serving", "serve-reward", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for option in (
        "--host",
        "--port",
        "--model",
        "--device",
        "--max-batch",
        "--max-items",
        "--token-env",
        "--option",
    ):
        assert option in help_text
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowgrpo_core.serving",
            "serve-reward",
            "jpeg_compressibility",
            "--model",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "does not accept ['model']" in bad.stderr
