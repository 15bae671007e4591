"""Reward servers under hostile or unlucky input: a request the model fails on must fail alone, slow
headers must not lock everyone out, Content-Length is parsed strictly, memory follows the documented
limits (measured from /proc), the command line refuses out-of-range numbers, and servers stop when the
process that owns them is killed."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reward_fixtures import render_text, serving

from flowgrpo_core.evaluation.geneval import check, keep_confident
from flowgrpo_core.evaluation.shapes import ShapesDetector, render_scene
from flowgrpo_core.rewards.base import Reward, RewardOutput
from flowgrpo_core.rewards.brightness import Brightness
from flowgrpo_core.serving import commands
from flowgrpo_core.serving.batching import MicroBatcher
from flowgrpo_core.serving.manager import LocalRewardServers
from flowgrpo_core.serving.protocol import (
    Limits,
    ProtocolError,
    decode_request,
    encode_image,
    encode_request,
    parse_request,
)


def post(url_or_port, body: bytes, timeout: float = 30.0) -> tuple[int, dict]:
    """One ``POST /score`` attempt (no retries, unlike the client): (status, JSON answer)."""
    port = url_or_port if isinstance(url_or_port, int) else int(url_or_port.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/score", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def get_health(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def raw_exchange(port: int, data: bytes) -> tuple[int, dict]:
    """Send raw bytes, read until the server closes: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def wait_until(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.01)


def memory_mb(pid: int, key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


# ---- 1. a request the model fails on fails alone ---------------------------------------------------


class GatedReward(Reward):
    """Scores an image by its red value; raises on the prompt "poison"; holds its first call until
    ``gate`` opens, so that the test can queue requests behind it and have them merged."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []

    def score(self, images, prompts, metadata):
        self.entered.set()
        assert self.gate.wait(30)
        self.calls.append(list(prompts))
        if "poison" in prompts:
            raise ValueError("this model cannot read that image")
        return RewardOutput(scores=[im.getpixel((0, 0))[0] / 255 for im in images])


def test_a_request_the_reward_fails_on_fails_alone_in_a_merged_batch():
    reward = GatedReward()
    with serving(reward, max_batch=32, max_wait_s=0.0) as server:
        port = server.httpd.server_address[1]

        def request(red: int, prompt: str = "p") -> tuple[int, dict]:
            return post(port, encode_request([Image.new("RGB", (8, 8), (red, 0, 0))], [prompt]))

        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(request, 10)  # holds the model while the others queue behind it
            assert reward.entered.wait(10)
            valid = [pool.submit(request, 20 + 10 * i) for i in range(6)]
            poisoned = pool.submit(request, 200, "poison")
            wait_until(lambda: server.batcher.stats.requests == 8, what="8 queued requests")
            reward.gate.set()
            answers = [first.result(), *(f.result() for f in valid)]
            status, error = poisoned.result()
        # the six valid requests and the poisoned one were one model call, which failed...
        assert any(len(call) == 7 and "poison" in call for call in reward.calls), reward.calls
        # ...and were then scored one by one: every valid request has its own score
        for (code, body), red in zip(answers, [10, *(20 + 10 * i for i in range(6))]):
            assert code == 200, body
            assert body["scores"] == [pytest.approx(red / 255)]
        assert (
            status == 500 and "internal error (id" in error["error"] and "cannot read" not in error["error"]
        )
        stats = server.batcher.stats.as_dict()
        assert stats["failures"] == 1 and stats["split_batches"] == 1 and stats["images"] == 7
        assert get_health(port) == 200
        assert request(99)[1]["scores"] == [pytest.approx(99 / 255)]


def test_ocr_scores_a_legal_image_it_cannot_read_as_unread_and_spares_the_batch():
    from flowgrpo_core.rewards.ocr import OcrReward

    ocr = OcrReward()
    thin = Image.new("RGB", (4096, 1), (255, 255, 255))
    with pytest.raises(Exception):  # noqa: B017 (RapidOCR cannot resize it for its detector; any error)
        ocr.read(thin)
    # max_batch=2: the worker takes the first request and waits (up to 5 s) for the second, so the
    # two are always one batch; the reference scores an unreadable image 0, as if it read nothing
    batcher = MicroBatcher(ocr, max_batch=2, max_wait_s=5.0)
    try:
        sign = batcher.submit([render_text("Kubeflow")], ['a sign that says "Kubeflow"'], [{}])
        bad = batcher.submit([thin], ['a sign that says "Kubeflow"'], [{}])
        assert sign.result(timeout=60).scores[0] >= 0.9
        unread = bad.result(timeout=60)
        assert unread.scores[0] == 0.0 and unread.details["ocr_error"][0]
        assert batcher.stats.split_batches == 0 and batcher.stats.failures == 0
    finally:
        batcher.close()


# ---- 2. slow headers --------------------------------------------------------------------------------


def test_slow_headers_are_cut_off_at_the_read_deadline_and_free_their_slots():
    with serving(Brightness(), max_connections=4, read_timeout_s=2.0) as server:
        port = server.httpd.server_address[1]
        stop = threading.Event()
        answers: list[bytes | None] = [None] * 4
        sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]

        def trickle(index: int) -> None:
            """Send the headers one byte every 0.1 s until the server answers or closes."""
            sock = sockets[index]
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
                while not stop.is_set():
                    readable, _, _ = select.select([sock], [], [], 0.1)
                    if readable:  # the answer, then the end of the stream (the server closes)
                        answer = b""
                        while chunk := sock.recv(1 << 16):
                            answer += chunk
                        answers[index] = answer
                        return
                    sock.sendall(b"x")
            except OSError:
                answers[index] = b""

        threads = [threading.Thread(target=trickle, args=(i,), daemon=True) for i in range(4)]
        for thread in threads:
            thread.start()
        try:
            # every slot is taken by a slow client: another connection is turned away at once
            assert get_health(port) == 503
            # within the deadline (2 s from each slow client's first byte) their slots come free
            deadline = time.monotonic() + 20
            while get_health(port) != 200:
                assert time.monotonic() < deadline, "slow clients still hold every connection slot"
                time.sleep(0.1)
            for thread in threads:
                thread.join(10)
            # each slow client, still sending, was answered 408 and cut off
            for answer in answers:
                assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
                assert b"not received within 2 s" in answer
        finally:
            stop.set()
            for sock in sockets:
                sock.close()


# ---- 3. Content-Length -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"\xb2", b"\xb9\xb2", b"1\xb3", "٣".encode(), b"+5", b"-0", b"1_0", b"0x10", b"5 5", b"1" * 16, b""],
)
def test_content_length_must_be_ascii_digits(value):
    with serving(Brightness()) as server:
        port = server.httpd.server_address[1]
        body = encode_request([Image.new("RGB", (4, 4))], ["p"])
        request = (
            b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            + value
            + b"\r\n\r\n"
            + body
        )
        status, answer = raw_exchange(port, request)
        assert status == 400 and "Content-Length" in answer["error"], answer
        assert get_health(port) == 200


def test_conflicting_or_missing_content_length_is_refused_and_a_plain_one_works():
    with serving(Brightness()) as server:
        port = server.httpd.server_address[1]
        body = encode_request([Image.new("RGB", (4, 4), (255, 255, 255))], ["p"])
        head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        length = str(len(body)).encode()
        status, answer = raw_exchange(
            port, head + b"Content-Length: " + length + b"\r\nContent-Length: 5\r\n\r\n" + body
        )
        assert status == 400 and "conflicting Content-Length" in answer["error"]
        status, answer = raw_exchange(port, head + b"Connection: close\r\n\r\n" + body)
        assert status == 411 and "Content-Length" in answer["error"]
        status, answer = raw_exchange(
            port, head + b"Connection: close\r\nContent-Length: 00" + length + b"\r\n\r\n" + body
        )
        assert status == 200 and answer["scores"] == [1.0]


# ---- 4. memory and time under the limits -------------------------------------------------------------


def test_memory_follows_the_limits_not_what_a_client_sends(tmp_path):
    """A server process's peak and retained memory, from /proc, on big but legal-looking input."""
    servers = LocalRewardServers(["brightness"], tmp_path, startup_timeout_s=60)
    url = servers.start()["brightness"]
    try:
        pid = servers.servers["brightness"].pid
        port = int(url.rsplit(":", 1)[1])
        base = memory_mb(pid, "VmRSS")
        n = 32 * 2**20 // 3
        for body in (
            b"[" + b"[]," * n + b"[]]",  # 32 MiB of JSON that json.loads turned into ~800 MB of lists
            b'{"prompts": [' + b"[]," * n + b'[]], "images": []}',
            b'{"metadata": [{"a": [' + b"[]," * n + b'[]]}], "prompts": ["p"], "images": []}',
        ):
            status, answer = post(port, body)
            assert 400 <= status < 500, answer
        assert memory_mb(pid, "VmHWM") - base < 300, "parsing a refused body took too much memory"

        # 64 blank 2048 px PNGs are 1.5 MiB on the wire and 1 GiB decoded: refused from the PNG headers
        blank = encode_image(Image.new("RGB", (2048, 2048), (255, 255, 255)))

        def blanks(count: int) -> bytes:
            return json.dumps({"prompts": ["p"] * count, "images": [blank] * count}).encode()

        status, answer = post(port, blanks(64))
        assert status == 413 and "pixels per request" in answer["error"]
        assert memory_mb(pid, "VmHWM") - base < 300

        # 16 of them fit the request limit exactly (64 Mi pixels, 256 MiB decoded): served, then released
        status, answer = post(port, blanks(16))
        assert status == 200 and answer["scores"] == [1.0] * 16
        assert memory_mb(pid, "VmHWM") - base < 600
        wait_until(lambda: memory_mb(pid, "VmRSS") - base < 150, 10, "memory released after the request")
    finally:
        servers.stop()


class HeldReward(Reward):
    name = "held"

    def __init__(self) -> None:
        self.gate = threading.Event()

    def score(self, images, prompts, metadata):
        assert self.gate.wait(30)
        return RewardOutput(scores=[1.0] * len(images))


def test_decoded_pixels_of_all_requests_stay_under_the_server_budget():
    reward = HeldReward()
    limits = Limits(max_request_pixels=2 * 64 * 64)
    with serving(reward, limits=limits, max_pending_pixels=3 * 64 * 64) as server:
        port = server.httpd.server_address[1]
        two = encode_request([Image.new("RGB", (64, 64))] * 2, ["p", "q"])
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(post, port, two)  # 2 x 64 x 64 pixels, held while the model waits
            wait_until(
                lambda: server.pixel_budget.held == 2 * 64 * 64, what="the first request's pixels held"
            )
            status, answer = post(port, two)  # 4 x 64 x 64 would pass the budget
            assert status == 503 and "retry later" in answer["error"]
            status, answer = post(port, encode_request([Image.new("RGB", (64, 64))] * 3, list("abc")))
            assert status == 413 and "pixels per request" in answer["error"]
            reward.gate.set()
            assert held.result()[0] == 200
        wait_until(lambda: server.pixel_budget.held == 0, what="the pixels given back")
        assert post(port, two)[0] == 200


def test_the_field_by_field_parser_reads_what_json_reads():
    images = [Image.new("RGB", (3, 2), (1, 2, 3)), Image.new("RGBA", (2, 5), (9, 8, 7, 6))]
    png = [encode_image(image) for image in images]
    variants = [
        # whitespace everywhere, fields in any order, escapes in prompts and metadata, a data URI,
        # base64 with escaped slashes (as some JSON encoders write it)
        json.dumps(
            {"metadata": [{"k": [1, {"x": None}]}, {}], "images": png, "prompts": ["a", "b"]}, indent=2
        ),
        '{"prompts":["\\u00e9\\"\\ud83d\\ude00","b"],"images":["data:image/png;base64,PNG0","PNG1"],'
        '"metadata":null}'.replace("PNG0", png[0]).replace("PNG1", png[1].replace("/", "\\/")),
        ' \r\n{ "pr\\u006fmpts" : [ "a" , "b" ] , "images" : [ "PNG0" , "PNG1" ] } \n'.replace(
            "PNG0", png[0]
        ).replace("PNG1", png[1]),
    ]
    for text in variants:
        request = decode_request(text.encode(), Limits())
        expected = json.loads(text)
        assert request.prompts == expected["prompts"]
        assert request.metadata == (expected.get("metadata") or [{}, {}])
        for image, sent in zip(request.images, images):
            np.testing.assert_array_equal(np.asarray(image), np.asarray(sent.convert("RGB")))
    refused = {
        '{"prompts": ["a"], "prompts": ["a"], "images": ["PNG"]}': "given twice",
        '{"prompts": ["a"], "images": ["PNG"]} []': "extra data",
        '{"prompts": ["a",], "images": ["PNG"]}': "prompts[1]",
        '{"prompts": ["a"], "images": ["PNG"], "metadata": nul}': "got invalid JSON",
        '{"prompts": ["a"], "images": ["PNG\\u0041"]}': "base64",
    }
    refused = {text.replace("PNG", png[0]): message for text, message in refused.items()}
    for text, message in refused.items():
        with pytest.raises(ProtocolError) as error:
            decode_request(text.encode(), Limits())
        assert error.value.status == 400 and message in error.value.message, (text[:60], error.value.message)
    # the decoded size is known from the PNG headers before any pixel is decoded
    parsed = parse_request(encode_request(images, ["a", "b"]), Limits())
    assert parsed.sizes == [(3, 2), (2, 5)] and parsed.pixels == 16


def test_shapes_geneval_on_a_2048px_image_costs_what_a_512px_image_does():
    """In a fresh process (the peak of this one is whatever earlier tests left): one 2048 px image took
    1.6 GB and 6-9 s before images were reduced to the detector's working size."""
    code = """
import json, sys
from pathlib import Path
from PIL import Image
from flowgrpo_core.evaluation.shapes import render_scene
from flowgrpo_core.rewards.geneval import ShapesGenEvalReward

def hwm():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

meta = {"tag": "counting", "include": [{"class": "star", "count": 3}], "exclude": [{"class": "star", "count": 4}],
        "prompt": "three stars"}
reward = ShapesGenEvalReward(score="strict")
small = render_scene(meta, size=128, seed=1).image
reward([small], [meta["prompt"]], [meta])  # imports and first-call costs out of the way
base = hwm()
big = small.resize((2048, 2048), Image.BICUBIC)
out = reward([big], [meta["prompt"]], [meta])
print(json.dumps({"score": float(out.scores[0]), "peak_mb": hwm() - base}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["score"] == 1.0
    assert result["peak_mb"] < 500, result


def test_shapes_verdicts_hold_on_large_images():
    detector = ShapesDetector()
    metas = [
        {"tag": "single_object", "include": [{"class": "diamond", "count": 1}], "prompt": "a diamond"},
        {
            "tag": "counting",
            "include": [{"class": "star", "count": 4}],
            "exclude": [{"class": "star", "count": 5}],
            "prompt": "four stars",
        },
        {
            "tag": "position",
            "include": [
                {"class": "circle", "count": 1},
                {"class": "cross", "count": 1, "position": ["left of", 0]},
            ],
            "prompt": "a cross left of a circle",
        },
    ]
    # 1024 and 2048 px are reduced by 2 and 4 to 512 px, 1500 px by 3 to 500 px (its last block partial)
    for size, seed in ((1024, 0), (1500, 1), (2048, 2)):
        for meta in metas:
            scene = render_scene(meta, size=128, seed=seed)
            big = scene.image.resize((size, size), Image.BICUBIC)
            found = detector.detect([big])[0]
            result = check(keep_confident(found, meta["tag"]), meta)
            assert result.correct, (size, meta["tag"], result.reason)
            assert all(d.mask.shape == (size, size) for d in found)
            # boxes are in the big image's pixels: the scene's boxes, scaled
            scale = size / 128
            for truth in scene.objects:
                assert any(np.allclose(d.box, np.array(truth.box) * scale, atol=2 * scale + 3) for d in found)


# ---- 5. the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--port", "99999"),
        ("--port", "-1"),
        ("--port", "http"),
        ("--max-connections", "0"),
        ("--max-items", "-1"),
        ("--max-batch", "0"),
        ("--max-image-pixels", "0"),
        ("--max-image-side", "-5"),
        ("--max-request-pixels", "0"),
        ("--max-pending-pixels", "0"),
        ("--max-body-mb", "0"),
        ("--max-body-mb", "inf"),
        ("--read-timeout-s", "0"),
        ("--read-timeout-s", "nan"),
        ("--read-timeout-s", "1e12"),
        ("--batch-wait-ms", "-1"),
        ("--watch-pid", "0"),
    ],
)
def test_serve_reward_refuses_out_of_range_numbers(option, value, capsys, monkeypatch):
    # a value that got through must fail this test, not start a server that waits forever
    monkeypatch.setattr(
        commands, "serve_reward_command", lambda args: pytest.fail(f"{option} {value} accepted")
    )
    with pytest.raises(SystemExit) as exit_:
        commands.main(["serve-reward", "brightness", option, value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {option}:" in error and "Traceback" not in error, error


def test_serve_reward_refuses_a_budget_below_one_request_and_a_missing_watched_process(capsys):
    code = commands.main(
        ["serve-reward", "brightness", "--max-request-pixels", "100", "--max-pending-pixels", "99"]
    )
    assert code == 2 and "--max-pending-pixels" in capsys.readouterr().err
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert commands.main(["serve-reward", "brightness", "--watch-pid", str(gone.pid)]) == 2
    assert f"--watch-pid {gone.pid}" in capsys.readouterr().err


# ---- 6. servers never outlive the process that owns them -------------------------------------------------


def test_process_start_time_tells_a_reused_pid_from_the_watched_process():
    me = commands.process_start_time(os.getpid())
    assert isinstance(me, int) and commands.process_start_time(os.getpid()) == me
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert isinstance(commands.process_start_time(child.pid), int)
        child.kill()
        # a killed child not yet reaped is a zombie: it has ended
        wait_until(lambda: commands.process_start_time(child.pid) is None, what="the zombie seen as ended")
    finally:
        child.kill()
        child.wait()
    # a live pid with another start time is another process: the watch stops
    stop = threading.Event()
    commands.watch_process(os.getpid(), me - 1, stop, interval_s=0.01)
    assert stop.wait(5)
    stop = threading.Event()
    watcher = commands.watch_process(os.getpid(), me, stop, interval_s=0.01)
    assert not stop.wait(0.2)
    stop.set()
    watcher.join(5)


def test_servers_stop_when_the_process_they_watch_is_killed(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    servers = LocalRewardServers(["brightness"], tmp_path, startup_timeout_s=60, watch_pid=owner.pid)
    try:
        url = servers.start()["brightness"]
        server = servers.servers["brightness"]
        assert "--watch-pid" in Path(f"/proc/{server.pid}/cmdline").read_bytes().decode(errors="replace")
        assert post(url, encode_request([Image.new("RGB", (4, 4))], ["p"]))[0] == 200
        os.kill(owner.pid, signal.SIGKILL)  # no exit handler runs; the owner stays a zombie (not reaped)
        assert server.process.wait(timeout=15) == 0  # a clean shutdown
        assert "watched process" in server.log_path.read_text()
    finally:
        owner.kill()
        owner.wait()
        servers.stop()


def test_servers_accept_every_prompt_a_prompt_file_may_hold():
    from flowgrpo_core.prompts.sets import MAX_PROMPT_CHARS

    assert Limits().max_prompt_chars == MAX_PROMPT_CHARS
