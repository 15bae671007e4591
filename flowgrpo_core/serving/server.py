"""The reward HTTP server: ``POST /score`` and ``GET /health`` in front of one Reward.

stdlib ``ThreadingHTTPServer`` is enough: the work is the model, which a single batching thread runs,
and the HTTP threads only read, validate and decode (PIL and zlib release the GIL). Hardening:
- a whole request (request line, headers and body) must arrive within ``read_timeout_s`` of its first
  byte, and each recv waits at most that long, so a slow or lying client (one header byte every few
  seconds, a body that never ends) holds a connection for seconds, not forever; it gets a 408;
- the body is read only after its declared Content-Length (ASCII digits only, one value) passed the
  limit; the JSON is parsed field by field and PNG headers are checked before any pixel is decoded
  (protocol.py), so memory follows the limits, not what a client manages to make the parser build;
- the decoded pixels of all requests in the server (being decoded, queued or scored) stay under
  ``max_pending_pixels``; a request that would pass it gets a 503 with Retry-After before decoding;
- connections beyond ``max_connections`` get an immediate 503 instead of a new thread;
- every refusal is a 4xx JSON message; a failing reward gives a 500 with an error id, and the traceback
  goes to the server log only. A reward that fails on one request's input fails only that request:
  the batcher scores the requests of a failed batch one by one (batching.py).
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import logging
import re
import socket
import threading
import time
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flowgrpo_core.rewards.base import Reward
from flowgrpo_core.serving.batching import BatcherClosed, MicroBatcher, QueueFull
from flowgrpo_core.serving.protocol import Limits, ProtocolError, encode_response, parse_request

log = logging.getLogger("flowgrpo.reward_server")
# ASCII digits only: str.isdigit() also accepts '²' (which int() then refuses) and int() accepts '٣'
_CONTENT_LENGTH = re.compile(r"[0-9]{1,15}")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowgrpo")
    except PackageNotFoundError:
        return "0+unknown"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: bursts of clients must not see connection refused
    app: RewardServer

    def process_request(self, request, client_address) -> None:
        if not self.app.connection_slots.acquire(blocking=False):
            body = b'{"error": "too many open connections; retry later"}'
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app.connection_slots.release()


class PixelBudget:
    """Decoded pixels held by the server's requests (being decoded, queued or scored), up to ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, pixels: int) -> bool:
        """Reserve ``pixels``; False (nothing reserved) if that would pass the limit."""
        with self._lock:
            if self.held + pixels > self.limit:
                return False
            self.held += pixels
            return True

    def give_back(self, pixels: int) -> None:
        with self._lock:
            self.held -= pixels


class RewardServer:
    """Serves ``reward`` on ``host:port`` (port 0 picks a free one; see ``url`` after construction).

    Args:
        reward: the model; only the batching thread ever calls it.
        limits: request, image and batch-length limits (protocol.Limits).
        max_batch: images per call of the reward; concurrent requests are merged up to this size.
        max_wait_s: how long the first request of a batch waits for company.
        token: if set, ``/score`` requires ``Authorization: Bearer <token>``.
        read_timeout_s: socket timeout per recv, and deadline for a whole request (request line, headers
            and body) counted from its first byte.
        score_timeout_s: how long a request waits for its scores before a 503.
        max_connections: open connections; more get an immediate 503.
        max_pending_pixels: decoded pixels of all requests in the server at once (default: twice
            ``limits.max_request_pixels``, i.e. 512 MiB of RGB images); more get a 503 before decoding.
    """

    def __init__(
        self,
        reward: Reward,
        name: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: Limits | None = None,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        token: str | None = None,
        read_timeout_s: float = 30.0,
        score_timeout_s: float = 600.0,
        max_connections: int = 64,
        device: str | None = None,
        max_pending_pixels: int | None = None,
    ) -> None:
        limits = limits or Limits()
        max_pending_pixels = max_pending_pixels or 2 * limits.max_request_pixels
        if max_pending_pixels < limits.max_request_pixels:
            raise ValueError(
                f"max_pending_pixels ({max_pending_pixels}) is below limits.max_request_pixels "
                f"({limits.max_request_pixels}): a request at the limit could never be served"
            )
        if max_connections < 1 or not read_timeout_s > 0 or not score_timeout_s > 0:
            raise ValueError("max_connections must be >= 1 and the timeouts > 0")
        self.reward = reward
        self.name = name or reward.name
        self.limits = limits
        self.pixel_budget = PixelBudget(max_pending_pixels)
        self.token = token or None
        self.read_timeout_s = read_timeout_s
        self.score_timeout_s = score_timeout_s
        self.device = device or str(getattr(reward, "device", "cpu"))
        self.version = package_version()
        self.connection_slots = threading.BoundedSemaphore(max_connections)
        self.batcher = MicroBatcher(
            reward,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            max_queued_images=max(4 * max_batch, 2 * self.limits.max_items),
        )
        self.started = time.time()
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "name": self.name,
            "version": self.version,
            "device": self.device,
            "auth": self.token is not None,
            "max_batch": self.batcher.max_batch,
            "limits": self.limits.as_dict(),
            "pixels": {"pending": self.pixel_budget.held, "max_pending": self.pixel_budget.limit},
            "model": getattr(self.reward, "info", {}),
            "stats": self.batcher.stats.as_dict(),
            "uptime_s": round(time.time() - self.started, 1),
        }

    def serve_forever(self) -> None:
        log.info(
            "reward %r serving on %s (device %s, max batch %d)",
            self.name,
            self.url,
            self.device,
            self.batcher.max_batch,
        )
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> RewardServer:
        """Serve from a background thread (tests, in-process use)."""
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"reward-server-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _DeadlineReader(io.RawIOBase):
    """The connection's socket as the raw stream under ``rfile``, with a deadline per request.

    The first byte of a request arms the deadline (``timeout_s`` later); every recv then waits at most
    until it, and at most ``timeout_s`` (also the idle wait for a next request on a kept-alive
    connection). http.server reads the request line and headers with a plain per-recv timeout, so a
    client sending one byte every few seconds held its connection slot forever."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        self.deadline: float | None = None
        self.received = 0  # bytes of the current request

    def readable(self) -> bool:
        return True

    def new_request(self) -> None:
        self.deadline, self.received = None, 0

    def readinto(self, buffer) -> int:
        timeout = self.timeout_s
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError(f"request not received within {self.timeout_s:g} s")
        self.sock.settimeout(timeout)
        try:
            count = self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout_s)  # answers are written with the plain timeout
        if count and self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
        self.received += count
        return count


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client that scores in a loop reuses its connection
    # answers to unparseable request lines still carry a status line (http.server's default, HTTP/0.9, has none)
    default_request_version = "HTTP/1.0"
    server_version = "flowgrpo-reward"
    sys_version = ""
    server: _HTTPServer

    @property
    def app(self) -> RewardServer:
        return self.server.app

    def setup(self) -> None:
        super().setup()
        self._linger = False
        self.connection.settimeout(self.app.read_timeout_s)
        # headers and body are separate writes: with Nagle's algorithm the body would wait for the
        # client's delayed ACK of the headers (~40 ms per answer)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile.close()  # socketserver's plain socket file; closing it leaves the socket open
        self._reader = _DeadlineReader(self.connection, self.app.read_timeout_s)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """http.server's own step (read the request line and headers, dispatch), with the request's
        deadline reset, and a 408 where http.server drops a request that did not arrive in time
        without a word (a connection idle between requests is still closed silently)."""
        self._reader.new_request()
        self.command, self.requestline, self.request_version = "", "", self.default_request_version
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return  # parse_request answered
            method = getattr(self, f"do_{self.command}", None)
            if method is None:
                self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
                return
            method()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
            if self._reader.received:
                log.info("request from %s not received in time; answering 408", self.address_string())
                self._refuse(
                    408,
                    f"request not received within {self.app.read_timeout_s:g} s "
                    f"({self._reader.received} bytes arrived)",
                )

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, headers too long) as JSON, never HTML."""
        # our contract is "bad input -> 4xx": another HTTP version or an unknown method is the client's error
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code, message = 400, f"unsupported HTTP version ({message}); use HTTP/1.1"
        elif code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = 405, f"{message}; use POST /score or GET /health"
        self._refuse(code, message or HTTPStatus(code).phrase)

    def finish(self) -> None:
        super().finish()
        if self._linger:
            self._lingering_close()

    def _lingering_close(self) -> None:
        """Half-close, then discard what the client still sends for a moment: closing a socket with
        unread input makes the kernel send a reset, which can destroy the error answer in flight."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.25)
            deadline, discarded = time.monotonic() + 1.0, 0
            while time.monotonic() < deadline and discarded < 8 * 2**20:
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                discarded += len(chunk)
        except OSError:
            pass

    def _reply(self, status: int, payload: dict | bytes, headers: dict[str, str] | None = None) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client went away; nothing left to tell it
            self.close_connection = True

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        # the unread rest of the body would be parsed as the next request: never keep such a connection
        self.close_connection = True
        self._linger = True
        self._reply(status, {"error": message}, headers)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/health":
            self._reply(200, self.app.health())
        elif self.path.split("?", 1)[0] == "/score":
            self._refuse(405, "use POST /score", {"Allow": "POST"})
        else:
            self._refuse(404, f"no such endpoint {self.path[:100]!r}; use POST /score or GET /health")

    do_HEAD = do_GET

    def _other(self) -> None:
        self._refuse(405, f"method {self.command} is not allowed; use POST /score or GET /health")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other

    def do_POST(self) -> None:
        try:
            self._score()
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("internal error %s while handling %s %s", error_id, self.command, self.path[:100])
            self._refuse(500, f"internal error (id {error_id}); the reward server's log has the details")

    def _score(self) -> None:
        if self.path.split("?", 1)[0] != "/score":
            return self._refuse(404, f"no such endpoint {self.path[:100]!r}; use POST /score")
        app = self.app
        if app.token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {app.token}".encode()):
                return self._refuse(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            return self._refuse(415, f"Content-Type must be application/json, got {content_type[:100]!r}")
        if self.headers.get("Transfer-Encoding"):
            return self._refuse(411, "chunked bodies are not accepted; send Content-Length")
        length = self._content_length()
        if length is None:
            return None
        if length > app.limits.max_body_bytes:
            return self._refuse(
                413, f"body of {length} bytes exceeds the limit of {app.limits.max_body_bytes} bytes"
            )
        body = self._read_body(length)
        if body is None:
            return None
        try:
            parsed = parse_request(body, app.limits)
            check = getattr(app.reward, "check_inputs", None)
            if check is not None:
                try:
                    check(parsed.prompts, parsed.metadata)
                except ValueError as error:
                    raise ProtocolError(422, str(error)) from None
        except ProtocolError as error:
            return self._refuse(error.status, error.message)
        del body  # parsed holds it until its images are decoded, then nothing does
        pixels = parsed.pixels
        if not app.pixel_budget.take(pixels):
            return self._refuse(
                503,
                f"reward server busy: other requests hold {app.pixel_budget.held} decoded pixels, and "
                f"{pixels} more would pass its limit of {app.pixel_budget.limit}; retry later",
                {"Retry-After": "1"},
            )
        future = None
        try:
            images = parsed.decode_images()
            future = app.batcher.submit(images, parsed.prompts, parsed.metadata)
        except ProtocolError as error:
            return self._refuse(error.status, error.message)
        except (QueueFull, BatcherClosed) as error:
            return self._refuse(503, f"reward server busy: {error}; retry later", {"Retry-After": "1"})
        finally:
            # the pixels are held until the batcher is done with the images, not until this thread is
            if future is None:
                app.pixel_budget.give_back(pixels)
            else:
                future.add_done_callback(lambda _: app.pixel_budget.give_back(pixels))
            images = parsed = None
        try:
            output = future.result(timeout=app.score_timeout_s)
        except FutureTimeout:
            return self._refuse(503, f"scoring took longer than {app.score_timeout_s:g} s; retry later")
        except BatcherClosed as error:
            return self._refuse(503, str(error))
        self._reply(200, encode_response(output.scores, output.details))

    def _content_length(self) -> int | None:
        """The declared body length, or None after refusing a missing, malformed or ambiguous one."""
        values = {value.strip(" \t") for value in self.headers.get_all("Content-Length", [])}
        if not values:
            self._refuse(411, "Content-Length is required")
            return None
        if len(values) > 1:  # two framings of one body: refuse rather than pick one (request smuggling)
            self._refuse(400, f"conflicting Content-Length headers: {sorted(values)[:4]}")
            return None
        (text,) = values
        if not _CONTENT_LENGTH.fullmatch(text):
            self._refuse(400, f"Content-Length must be a number of bytes in ASCII digits, got {text[:50]!r}")
            return None
        return int(text)

    def _read_body(self, length: int) -> bytearray | None:
        """The body, within the request's deadline; grown in place, so it never exists twice in memory
        (a list of chunks joined at the end did, for a moment)."""
        body = bytearray()
        try:
            while len(body) < length:
                chunk = self.rfile.read1(min(1 << 20, length - len(body)))
                if not chunk:
                    self._refuse(400, f"body ended after {len(body)} of {length} bytes")
                    return None
                body += chunk
        except TimeoutError:
            self._refuse(
                408,
                f"body not received within {self.app.read_timeout_s:g} s ({len(body)} of {length} bytes)",
            )
            return None
        return body
